"""Command-line entry points (train.py, sample.py, and the dlm-train / dlm-sample console scripts)."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from dlm.config import ConfigError, load_config


def _fail(e: Exception) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def train_main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train a discrete diffusion LM.",
                                     epilog="Overrides: dotted keys, e.g. model.num_layers=2 train.steps=50 workdir=runs/x")
    parser.add_argument("--config", required=True, help="YAML config file (may `extends:` another).")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from dlm.train.trainer import train

        train(cfg)
    except ConfigError as e:
        _fail(e)


def sample_main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Sample from a trained run.")
    parser.add_argument("--workdir", required=True, help="Directory of a run written by train.py.")
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="Sampling steps (time-grid size).")
    parser.add_argument("--prompt", default=None, help="Text the samples start with.")
    parser.add_argument("--length", type=int, default=None, help="Tokens per sample (default: seq_len).")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-ema", action="store_true", help="Use the raw parameters instead of the EMA.")
    parser.add_argument("--out", default=None, help="JSONL output (default: <workdir>/samples.jsonl).")
    args = parser.parse_args(argv)
    try:
        import dlm

        workdir = pathlib.Path(args.workdir)
        model, cfg = dlm.restore(workdir, use_ema=not args.no_ema)
        tok = dlm.load_tokenizer(workdir)
        s = cfg.sampling
        for name in ("steps", "temperature", "seed", "length"):
            if getattr(args, name) is not None:
                setattr(s, name, getattr(args, name))
        if args.num_samples is not None:
            s.num_samples = args.num_samples
        length = s.length or cfg.data.seq_len
        if length > cfg.data.seq_len:
            raise ConfigError(f"--length {length} exceeds the model context data.seq_len={cfg.data.seq_len}.")
        prompt = tok.encode(args.prompt) if args.prompt else None
        from dlm.parallel.mesh import make_mesh

        out = dlm.generate(model, prompt, s, diffusion=cfg.diffusion, length=length, mesh=make_mesh(cfg.mesh))
    except ConfigError as e:
        _fail(e)
    path = pathlib.Path(args.out) if args.out else workdir / "samples.jsonl"
    per = out["seconds"] / len(out["tokens"])
    with path.open("a") as f:
        for i, row in enumerate(out["tokens"]):
            text = tok.decode(row)
            print(f"--- sample {i} (NFE {out['nfe']}, {out['seconds']:.2f}s for the batch)\n{text}")
            f.write(json.dumps({"text": text, "tokens": row.tolist(), "nfe": out["nfe"], "steps": out["steps"],
                                "seconds": per, "batch_seconds": out["seconds"], "prompt": args.prompt}) + "\n")
    print(f"Wrote {len(out['tokens'])} samples to {path}")
