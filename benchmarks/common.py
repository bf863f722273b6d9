"""Shared helpers for the benchmark scripts: argument parsing, peak FLOP/s, JSON output."""

from __future__ import annotations

import json
import pathlib
import resource
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_peak_flops(seconds: float = 3.0) -> dict:
    """Best measured FLOP/s of a square matmul: float32 on CPU, bfloat16 on accelerators."""
    import jax
    import jax.numpy as jnp

    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    sizes = (512, 1024, 2048) if on_cpu else (4096, 8192)
    best = 0.0
    for n in sizes:
        a = jnp.ones((n, n), dtype)
        b = jnp.ones((n, n), dtype)
        f = jax.jit(lambda a, b: a @ b)
        f(a, b).block_until_ready()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / len(sizes):
            f(a, b).block_until_ready()
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return {"peak_flops": best, "peak_dtype": jnp.dtype(dtype).name, "device": str(jax.devices()[0].device_kind)}


def write_json(path: str | None, record: dict) -> None:
    text = json.dumps(record, indent=2)
    print(text)
    if path:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(path).write_text(text + "\n")


def write_markdown_table(out: str | None, header: list, rows: list) -> None:
    """Print a markdown table (header cells, then rows of cells) and write it next to the JSON output."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if out:
        pathlib.Path(out).with_suffix(".md").write_text(text + "\n")
