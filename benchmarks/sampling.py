"""Sampling speed (and, for the parallel suite, quality).

    python benchmarks/sampling.py --suite hyperschedules --out FILE [--length 1024] [key=value ...]

hyperschedules: per hyperschedule (autoregressive, block(16), slide(16), flat), tokens/s with
the KV cache of settled tokens and without it (a full forward pass over all positions with the
role mask at every step), on the bench model (configs/bench.yaml; random weights: speed does not
depend on them) at the given generation length, one sample, compiled before timing. Every step of
the uncached loop costs one full forward pass whatever the step, so it is timed over its first
--uncached-steps steps (tokens/s = tokens revealed in them / seconds); the cached loop runs the
whole generation. flat has no settled tokens before the end, so the cache does not apply to it.
"""

from __future__ import annotations

import argparse

from common import peak_rss_bytes, write_json

SCHEDULES = [("autoregressive", 1, 1), ("block", 16, 16), ("slide", 16, 1), ("flat", 0, 128)]


def hyperschedules_suite(args) -> dict:
    import jax

    import dlm
    from dlm.config import SamplingConfig, load_config
    from dlm.diffusion import hyperschedules as hs
    from dlm.parallel.mesh import make_mesh
    from dlm.sampling.hyper import make_plan

    L = args.length
    results = []
    model = None
    for kind, width, steps in SCHEDULES:
        cfg = load_config(args.config, [f"data.seq_len={L}", f"diffusion.hyperschedule={kind}"]
                          + ([f"diffusion.block_width={width}"] if width else []) + args.overrides)
        if model is None:
            model = dlm.build_model(cfg, mesh=make_mesh(devices=jax.devices()[:1]), seed=0)
        plan = make_plan(hs.Hyperschedule(hs.Kind(kind), L, width=width or L, steps=steps))
        row = {"hyperschedule": kind, "width": width or L, "steps_per_block": steps, "plan_steps": plan.num_steps}
        modes = [("cached", True, plan), ("uncached", False, plan.truncate(args.uncached_steps))] if kind != "flat" else \
            [("uncached", False, plan)]
        for name, cache, p in modes:
            sc = SamplingConfig(steps=steps, num_samples=args.num_samples, cache=cache, seed=0)
            out = dlm.generate(model, None, sc, diffusion=cfg.diffusion, length=L, plan=p)
            tokens = int((out["tokens"] < model.vocab_size).sum())
            row[name] = {"steps_run": p.num_steps, "tokens": tokens, "seconds": out["seconds"], "nfe": out["nfe"],
                         "cache_writes": out["cache_writes"], "compile_seconds": out["compile_seconds"],
                         "tokens_per_second": tokens / out["seconds"], "seconds_per_step": out["seconds"] / p.num_steps}
            print(f"{kind:15s} {name:9s} steps {p.num_steps:5d} tokens {tokens:6d}  {out['seconds']:8.2f} s  "
                  f"{tokens / out['seconds']:9.1f} tokens/s  nfe {out['nfe']}", flush=True)
        row["cache_applies"] = kind != "flat"
        if kind != "flat":
            row["speedup"] = row["cached"]["tokens_per_second"] / row["uncached"]["tokens_per_second"]
            print(f"{kind:15s} cache speed-up x{row['speedup']:.1f}", flush=True)
        results.append(row)
    return {"suite": "hyperschedules", "config": args.config, "length": L, "num_samples": args.num_samples,
            "device": str(jax.devices()[0].device_kind), "parameters": int(sum(x.size for x in jax.tree.leaves(
                __import__("flax").nnx.state(model, __import__("flax").nnx.Param)))),
            "results": results, "peak_rss_bytes": peak_rss_bytes()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["hyperschedules"], required=True)
    parser.add_argument("--config", default="configs/bench.yaml")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--uncached-steps", type=int, default=32, help="steps timed for the uncached baseline")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    record = hyperschedules_suite(args)
    write_json(args.out, record)


if __name__ == "__main__":
    main()
