"""dlm.convert: published checkpoint folders <-> dlm workdirs.

    python -m dlm.convert --from DIR --out WORKDIR [--family llada|dream|mdlm] [--dtype float32|bfloat16]
    python -m dlm.convert --to llada|hf --from WORKDIR --out DIR [--dtype ...]

Import writes a workdir that the rest of dlm reads like a trained run: config.yaml (the
family's model options, `train.init_from: pretrained`), the parameters as an Orbax checkpoint in
WORKDIR/pretrained, the tokenizer files in WORKDIR/hf_tokenizer and the folder's config.json as
WORKDIR/hf_config.json. `sample.py --workdir`, `dlm-eval --workdir` and `dlm.restore` read the
parameters from there until the run has checkpoints of its own; `train.py --config
WORKDIR/config.yaml` fine-tunes from them (with a fresh optimizer).

Export writes a Hugging Face folder in the LLaDA layout (`--to llada`: any model with the llama
block, including models trained here) or in the model's own family's layout (`--to hf`):
safetensors (sharded with an index above --max-shard-gb), config.json and the tokenizer files.
Importing an exported folder gives back the same parameters bit for bit.

Both write through `dlm.folders.writing`: into a temporary folder beside --out, moved into
place when complete; an --out that is, holds or lies inside --from is refused, and
--overwrite replaces only a folder dlm wrote (never one holding a file of anyone else's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

from dlm.config import Config, ConfigError, Layout, Schedule, TokenizerKind, apply_overrides, save_config
from dlm.folders import check_apart, check_target, writing
from dlm.models.families import FAMILIES


def import_folder(src, out, family: str | None = None, dtype: str = "float32", overwrite: bool = False, mesh=None,
                  progress: bool = False) -> dict:
    """Convert a published folder into a dlm workdir; returns a summary."""
    from dlm.data.tokenizers import FolderTokenizer
    from dlm.interop.hf import open_checkpoint
    from dlm.models.transformer import mask_id_of

    src, out = pathlib.Path(src), pathlib.Path(out)
    check_apart(out, [src])
    check_target(out, overwrite)
    ckpt = open_checkpoint(src, family, dtype)
    tok = FolderTokenizer(src, ckpt.config, mask_id=mask_id_of(ckpt.model_cfg, ckpt.model_cfg.vocab_size))
    with writing(out, inputs=[src], overwrite=overwrite) as tmp:
        seconds = _write_workdir(ckpt, tok, tmp, out, mesh, progress)
    return {"family": ckpt.family, "workdir": str(out), "keys": len(ckpt.entries), "param_bytes": ckpt.param_bytes,
            "seconds": seconds}


def _write_workdir(ckpt, tok, tmp: pathlib.Path, out: pathlib.Path, mesh, progress: bool) -> float:
    """Write an opened checkpoint's workdir files into `tmp`, which becomes `out`."""
    from dlm.interop import layouts
    from dlm.models import families
    from dlm.interop.hf import _load
    from dlm.interop.safetensors import write
    from dlm.train.checkpoint import save_params
    from flax import nnx

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ckpt.entries), desc="import", unit="tensor")
    model, seconds = _load(ckpt, mesh, (lambda key: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    save_params(tmp.resolve() / "pretrained", nnx.state(model))
    cfg = Config()
    cfg.model = dataclasses.replace(ckpt.model_cfg)
    cfg.data.seq_len = min(ckpt.context, 4096)
    cfg.data.tokenizer = TokenizerKind.PRETRAINED
    cfg.data.pretrained_tokenizer = str(out.resolve())
    cfg.train.init_from = "pretrained"
    cfg.train.ema_decay = 0.0  # fine-tuning from a published model: no EMA warm-up from it
    cfg.sampling.length = min(256, cfg.data.seq_len)
    if ckpt.family == "mdlm":
        cfg.diffusion.schedule = Schedule.LOGLINEAR
    block = families.diffusion_options(ckpt.family, ckpt.config)
    if block:  # a block-diffusion family: decoded as sample.py --pretrained decodes it, fine-tuned on every block at once
        apply_overrides(cfg, families.sampling_overrides(ckpt.family, ckpt.config))
        cfg.diffusion.layout = Layout.DOUBLE
        cfg.data.seq_len -= cfg.data.seq_len % block["block_width"]
        cfg.sampling.length -= cfg.sampling.length % block["block_width"]
    cfg.workdir = str(out)
    save_config(cfg, tmp / "config.yaml")
    tok.save(tmp)
    (tmp / "hf_config.json").write_text(json.dumps(ckpt.config, indent=2) + "\n")
    kept = [k for k in ckpt.folder.keys() if k.endswith(layouts.IGNORED_SUFFIXES)]
    if kept:  # known buffers, kept as they were so that export gives them back bit for bit
        write(tmp / "buffers.safetensors", [(k, ckpt.folder.shape(k), ckpt.folder.dtype(k), lambda k=k: ckpt.folder.read(k))
                                            for k in kept])
    return seconds


def export_workdir(workdir, out, to: str, dtype: str | None = None, max_shard_bytes: int = 5 << 30,
                   overwrite: bool = False, modeling_dir=None) -> dict:
    """Write a workdir's model (its newest checkpoint, or its imported parameters) as a folder;
    with `modeling_dir`, the family's modeling code beside it and config.json's auto_map."""
    import dlm
    from dlm.interop.hf import export, read_modeling_dir
    from dlm.models import families

    workdir = pathlib.Path(workdir)
    check_apart(out, [workdir] + ([modeling_dir] if modeling_dir else []))
    check_target(out, overwrite)
    model, cfg = dlm.restore(workdir, use_ema=True)
    tok = dlm.load_tokenizer(workdir)
    family = cfg.model.family
    if to == "hf":
        layout = family if family in families.FAMILIES else "llada"
    else:
        layout = to
    base = json.loads((workdir / "hf_config.json").read_text()) if (workdir / "hf_config.json").exists() and layout == family else None
    files, special = {}, {}
    if getattr(tok, "files", None):
        files = {n: b for n, b in tok.files.items()}
        special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    elif tok is not None and tok.kind in ("bpe", "pretrained"):
        files = {"tokenizer.json": (workdir / "tokenizer.hf.json").read_bytes(),
                 "tokenizer_config.json": json.dumps({"eos_token": tok.tok.id_to_token(tok.eos_id),
                                                      "tokenizer_class": "PreTrainedTokenizerFast"}).encode()}
        special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}
    else:
        if tok is not None:  # its ids still go into config.json (readers fall back to GPT-2's 50256 otherwise)
            special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}
        print(f"note: this run's {getattr(tok, 'kind', 'missing')} tokenizer has no Hugging Face form; the folder holds "
              "weights and config.json only.", file=sys.stderr)
    buffers = None
    if layout == family and (workdir / "buffers.safetensors").exists():
        from dlm.interop.safetensors import SafetensorsFile

        f = SafetensorsFile(workdir / "buffers.safetensors")
        buffers = {k: f.read(k) for k in f.keys()}
    return export(model, out, layout, context=cfg.data.seq_len, base_config=base, special=special, dtype=dtype,
                  max_shard_bytes=max_shard_bytes, tokenizer_files=files, buffers=buffers, overwrite=overwrite,
                  inputs=[workdir], modeling_files=read_modeling_dir(layout, modeling_dir) if modeling_dir else None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dlm.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="src", required=True, help="A Hugging Face folder (import) or a dlm workdir (with --to).")
    parser.add_argument("--out", required=True, help="The workdir to write (import) or the folder to write (export).")
    parser.add_argument("--to", choices=["llada", "hf"], default=None, help="Export a workdir in this layout.")
    parser.add_argument("--family", choices=list(FAMILIES), default=None, help="Import: the family, when config.json does not say.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="Import: the parameters' dtype (default float32); export: the files' dtype (default the parameters').")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="Export: the largest safetensors file.")
    parser.add_argument("--modeling-dir", default=None,
                        help="Export: a folder with the family release's configuration_*.py / modeling_*.py, copied beside the "
                             "weights and named in config.json's auto_map (for AutoModel.from_pretrained(..., trust_remote_code=True)).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace a non-empty --out that dlm wrote (a folder holding any other file is left alone).")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        if args.to is None and args.modeling_dir:
            raise ConfigError("--modeling-dir goes with an export (--to llada or --to hf); an import reads the folder's weights only.")
        if args.to is None:
            out = import_folder(args.src, args.out, args.family, args.dtype or "float32", args.overwrite, progress=True)
            print(f"Imported a {out['family']} checkpoint ({out['keys']} tensors, {out['param_bytes'] / 1e9:.2f} GB) into "
                  f"{out['workdir']} in {time.time() - start:.1f}s.")
        else:
            out = export_workdir(args.src, args.out, args.to, args.dtype, int(args.max_shard_gb * (1 << 30)),
                                 args.overwrite, args.modeling_dir)
            print(f"Wrote {out['keys']} tensors ({out['bytes'] / 1e9:.2f} GB) in {len(out['files'])} file(s) to {args.out} "
                  f"in {time.time() - start:.1f}s.")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
