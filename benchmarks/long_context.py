"""Memory of one training step against the sequence length: chunked attention + chunked loss.

    python benchmarks/long_context.py --out FILE [--lengths 1024 4096 8192] [--batch 2]

Each measurement is a fresh process (peak RSS is per process) that builds the test model
(configs/test.yaml) at data.seq_len = L, then compiles and runs one training step on random
tokens, and reports its peak RSS (getrusage). `baseline_rss_bytes` is the RSS after the model and
the batch exist, before the step is compiled; `bytes_per_token` = (peak - baseline) / (B L), the
step's own memory per token: constant when memory grows linearly in L, doubling from 4096 to
8192 when it grows quadratically. The einsum (whole score matrix) implementation at 4096 is the
comparison. The record also keeps the peak RSS per token without the baseline subtraction.

JSON: {"results": [{"seq_len", "attention", "peak_rss_bytes", "bytes_per_token", "step_seconds",
"baseline_rss_bytes", "raw_bytes_per_token"}], "ratio_8192_to_4096_per_token", ...}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import ROOT, peak_rss_bytes, write_json, write_markdown_table


def child(seq_len: int, attention: str, batch: int) -> dict:
    import jax
    import numpy as np

    from dlm.config import load_config
    from dlm.mesh import MeshConfig, global_batch, make_mesh
    from dlm.train.state import create_train_state, make_train_step

    cfg = load_config(ROOT / "configs/test.yaml", [f"data.seq_len={seq_len}", f"train.batch_size={batch}",
                                                   f"model.attention={attention}", "train.ema_decay=0"])
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    V = 257
    graphdef, state, shardings = create_train_state(cfg, V, mesh)
    x = global_batch(np.random.default_rng(0).integers(0, V, (batch, seq_len)).astype(np.int32), mesh)
    jax.block_until_ready((state, x))
    baseline = _current_rss()
    step = make_train_step(cfg, graphdef, V, mesh, shardings)
    state, metrics = step(state, x)  # compile and run
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    state, metrics = step(state, x)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    tokens = batch * seq_len
    return {"seq_len": seq_len, "attention": attention, "peak_rss_bytes": peak, "bytes_per_token": (peak - baseline) / tokens,
            "step_seconds": seconds, "baseline_rss_bytes": baseline, "raw_bytes_per_token": peak / tokens,
            "loss": float(metrics["loss"]), "batch": batch}


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--reference", type=int, default=4096, help="length at which the einsum attention is measured too")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(int(args.child[0]), args.child[1], args.batch)), flush=True)
        return

    runs = [(L, "chunked") for L in args.lengths] + [(args.reference, "einsum")]
    results = []
    for L, impl in runs:
        cmd = [sys.executable, __file__, "--child", str(L), impl, "--batch", str(args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"the {impl} step at seq_len {L} failed (exit {out.returncode})")
        r = json.loads(line[0][7:])
        print(f"{impl:8s} L={L:5d}: peak RSS {r['peak_rss_bytes'] / 2**20:8.0f} MB, step {r['bytes_per_token'] / 1024:7.1f} KB/token, "
              f"{r['step_seconds']:.2f} s", flush=True)
        results.append(r)
    per_token = {(r["seq_len"], r["attention"]): r["bytes_per_token"] for r in results}
    record = {"results": results, "batch": args.batch, "config": "configs/test.yaml"}
    if (8192, "chunked") in per_token and (4096, "chunked") in per_token:
        record["ratio_8192_to_4096_per_token"] = per_token[8192, "chunked"] / per_token[4096, "chunked"]
        record["linear"] = record["ratio_8192_to_4096_per_token"] < 2.5
    if (args.reference, "einsum") in per_token and (args.reference, "chunked") in per_token:
        record["einsum_over_chunked_at_reference"] = per_token[args.reference, "einsum"] / per_token[args.reference, "chunked"]
    write_markdown_table(args.out, ["seq_len", "attention", "peak RSS (MB)", "step KB/token", "step s"],
                         [[r["seq_len"], r["attention"], f"{r['peak_rss_bytes'] / 2**20:.0f}", f"{r['bytes_per_token'] / 1024:.1f}",
                           f"{r['step_seconds']:.2f}"] for r in results])
    write_json(args.out, record)


if __name__ == "__main__":
    main()
