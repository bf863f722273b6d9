"""Command-line entry points (train.py, sample.py, and the dlm-train / dlm-sample console scripts)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys

from dlm.config import ConfigError, check_sampling_overrides, load_config
from dlm.models.families import FAMILIES


def _fail(e: Exception) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _distributed_args(parser) -> None:
    g = parser.add_argument_group("multi-host (jax.distributed); flags override JAX_COORDINATOR_ADDRESS, "
                                  "JAX_NUM_PROCESSES, JAX_PROCESS_ID")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--distributed", action="store_true", help="initialise jax.distributed from the cluster environment "
                   "(SLURM, Open MPI, TPU) when no address is given")


def init_distributed(args) -> None:
    """Start jax.distributed when a coordinator is named (flag or environment) or --distributed is set."""
    address = args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = args.num_processes if args.num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
    pid = args.process_id if args.process_id is not None else os.environ.get("JAX_PROCESS_ID")
    if not (address or args.distributed):
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives; accelerators ignore it
    if address and (num is None or pid is None):
        raise ConfigError("A coordinator address needs the process count and this process's id "
                          "(--num-processes and --process-id, or JAX_NUM_PROCESSES and JAX_PROCESS_ID).")
    kwargs = {} if not address else {"coordinator_address": address, "num_processes": int(num), "process_id": int(pid)}
    jax.distributed.initialize(**kwargs)


def train_main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train a discrete diffusion LM.",
                                     epilog="Overrides: dotted keys, e.g. model.num_layers=2 train.steps=50 workdir=runs/x")
    parser.add_argument("--config", required=True, help="YAML config file (may `extends:` another).")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    _distributed_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        init_distributed(args)
        from dlm.config import TrainMode
        from dlm.train.checkpoint import RestoreError
        from dlm.train.trainer import TrainingError, train

        try:
            if cfg.train.mode == TrainMode.RL:
                from dlm.rl.trainer import train_rl

                train_rl(cfg)
            else:
                train(cfg)
        except (TrainingError, RestoreError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
    except ConfigError as e:
        _fail(e)


def sample_main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Sample from a trained run or a published checkpoint folder.")
    parser.add_argument("--workdir", default=None, help="Directory of a run written by train.py (or by dlm.convert).")
    parser.add_argument("--pretrained", default=None, help="A published checkpoint folder (LLaDA, Dream, MDLM-OWT: config.json, "
                        "safetensors, tokenizer files) to sample from without converting it.")
    parser.add_argument("--family", choices=list(FAMILIES), default=None, help="With --pretrained: the family, when config.json does not say.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="With --pretrained: the parameters' dtype.")
    parser.add_argument("--chat", default=None, help="A question, rendered with the tokenizer's chat template (instruct models); "
                        "the answer is printed up to the end of the turn.")
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="Sampling steps (time-grid size).")
    parser.add_argument("--prompt", default=None, help="Text the samples start with.")
    parser.add_argument("--length", type=int, default=None, help="Tokens per sample (default: seq_len).")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-ema", action="store_true", help="Use the raw parameters instead of the EMA.")
    parser.add_argument("--sampler", choices=["ancestral", "acs"], default=None,
                        help="ancestral (exact) or acs (Adaptive Correction Sampler; see --eta).")
    parser.add_argument("--eta", type=float, default=None, help="ACS correction strength (default sampling.eta).")
    parser.add_argument("--no-cache", action="store_true", help="Recompute settled tokens every step (no KV cache).")
    parser.add_argument("--out", default=None, help="JSONL output (default: <workdir>/samples.jsonl).")
    parser.add_argument("overrides", nargs="*", help="sampling.* keys, e.g. sampling.sampler=parallel sampling.decode.tau=0.8")
    args = parser.parse_args(argv)
    from dlm.train.checkpoint import RestoreError

    try:
        import dlm

        if (args.workdir is None) == (args.pretrained is None):
            raise ConfigError("Pass exactly one of --workdir (a run) and --pretrained (a published checkpoint folder).")
        check_sampling_overrides(args.overrides, "sample.py")
        if args.pretrained is not None:
            from dlm.data.tokenizers import FolderTokenizer
            from dlm.interop.hf import open_checkpoint, _load

            ckpt = open_checkpoint(args.pretrained, args.family, args.dtype)
            model, _ = _load(ckpt)
            from dlm.models.families import diffusion_options, sampling_overrides

            width = diffusion_options(ckpt.family, ckpt.config).get("block_width", 1)  # a block family's blocks divide the context
            cfg = dlm.load_config(None, [f"data.seq_len={ckpt.context - ckpt.context % width}",
                                         *sampling_overrides(ckpt.family, ckpt.config), *args.overrides])
            cfg.model = model.cfg
            tok = FolderTokenizer(args.pretrained, ckpt.config, mask_id=model.mask_id)
            workdir = None
        else:
            workdir = pathlib.Path(args.workdir)
            wanted = dlm.load_config(workdir / "config.yaml", args.overrides) if (workdir / "config.yaml").exists() else None
            # sampling.use_ema (the run's config, or an override) and --no-ema both choose the raw parameters
            use_ema = (wanted is None or wanted.sampling.use_ema) and not args.no_ema
            model, cfg = dlm.restore(workdir, use_ema=use_ema)
            if args.overrides:
                cfg = wanted
            tok = dlm.load_tokenizer(workdir)
        s = cfg.sampling
        for name in ("steps", "temperature", "seed", "length"):
            if getattr(args, name) is not None:
                setattr(s, name, getattr(args, name))
        if args.num_samples is not None:
            s.num_samples = args.num_samples
        if args.sampler is not None:
            from dlm.config import Sampler

            s.sampler = Sampler(args.sampler)
        if args.eta is not None:
            s.eta = args.eta
        if args.no_cache:
            s.cache = False
        if args.chat is not None and args.prompt is not None:
            raise ConfigError("Pass --prompt (plain text) or --chat (a question for an instruct model), not both.")
        if args.chat is not None:
            if not hasattr(tok, "encode_chat"):
                raise ConfigError("--chat needs a published model's tokenizer with a chat template; this run's has none.")
            prompt = tok.encode_chat(args.chat)
        else:
            prompt = tok.encode(args.prompt) if args.prompt else None
        n_prompt = 0 if prompt is None else len(prompt)
        length = s.length or (cfg.data.seq_len if args.pretrained is None else min(cfg.data.seq_len, n_prompt + 128))
        if length > cfg.data.seq_len:
            raise ConfigError(f"--length {length} exceeds the model context data.seq_len={cfg.data.seq_len}.")
        from dlm.mesh import make_mesh

        out = dlm.generate(model, prompt, s, diffusion=cfg.diffusion, length=length, mesh=make_mesh(cfg.mesh),
                           eos_id=getattr(tok, "eos_id", -1))
    except ConfigError as e:
        _fail(e)
    except RestoreError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    path = pathlib.Path(args.out) if args.out else (workdir / "samples.jsonl" if workdir is not None else None)
    per = out["seconds"] / len(out["tokens"])
    stops = set(getattr(tok, "stop_ids", []))
    with path.open("a") if path is not None else contextlib.nullcontext() as f:
        for i, row in enumerate(out["tokens"]):
            if args.chat is not None:  # the answer: the generated tokens up to the end of the turn
                row = row[n_prompt:]
                ends = [j for j, t in enumerate(row.tolist()) if t in stops]
                row = row[: ends[0]] if ends else row
            text = tok.decode(row)
            print(f"--- sample {i} (NFE {out['nfe']}, {out['seconds']:.2f}s for the batch)\n{text}")
            if f is not None:
                f.write(json.dumps({"text": text, "tokens": row.tolist(), "nfe": out["nfe"], "steps": out["steps"],
                                    "idle_step_ratio": out["idle_step_ratio"], "seconds": per,
                                    "batch_seconds": out["seconds"], "prompt": args.prompt or args.chat}) + "\n")
    if path is not None:
        print(f"Wrote {len(out['tokens'])} samples to {path}")
