"""The accelerator check: what dlm does on one GPU / TPU chip, in a few minutes.

    python benchmarks/device_check.py --out FILE [--small]

1. the chip: its kind, the rated dense bf16 peak from a table of known cards, and the peak of a
   measured bf16 matmul;
2. train-step MFU of a ~350M-parameter model (d_model 1024, 28 layers, seq_len 1024, batch 16,
   byte vocabulary) in bfloat16 (float32 parameters and Adam state), against both peaks;
3. attention implementations (einsum, chunked, xla, cudnn; splash on TPU) at L = 4096, forward
   and backward, full and causal masks: median seconds, or the error where one cannot run;
4. the parallel decoder generating 1024 tokens: vanilla (one token per step, no cache) against
   prefix cache + DPad + credit with a confidence threshold: seconds (medians) and passes.

`--small` shrinks every size so that the script runs on a CPU in a minute (a check of the script,
not of a device). Every section is timed after a compile, as medians of repeated runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

from common import ROOT, matmul_peak_flops, write_json

# Dense bf16 peak FLOP/s of known chips (vendor data sheets; no sparsity).
RATED_BF16 = {
    "H200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def rated_peak(kind: str):
    best = None
    for name, flops in RATED_BF16.items():
        if name.lower() in kind.lower() and (best is None or len(name) > len(best[0])):
            best = (name, flops)
    return best[1] if best else None


def _median_seconds(fn, repeats: int):
    fn()  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_mfu(small: bool, peaks: dict) -> dict:
    import jax
    import numpy as np

    from dlm.config import MeshConfig, load_config
    from dlm.mesh import global_batch, make_mesh
    from dlm.train.state import create_train_state, make_train_step
    from train_throughput import model_flops_per_token

    over = (["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "data.seq_len=128", "train.batch_size=4"] if small else
            ["model.d_model=1024", "model.num_layers=28", "model.num_heads=16", "data.seq_len=1024", "train.batch_size=16"])
    cfg = load_config(ROOT / "configs/bench.yaml", over + ["model.dtype=bfloat16", "model.attention=auto", "train.ema_decay=0"])
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    V = 257
    graphdef, state, shardings = create_train_state(cfg, V, mesh)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    step = make_train_step(cfg, graphdef, V, mesh, shardings)
    x = global_batch(np.random.default_rng(0).integers(0, V, (cfg.train.batch_size, cfg.data.seq_len)).astype(np.int32), mesh)
    t0 = time.perf_counter()
    state, m = step(state, x)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(3 if small else 10):
        t0 = time.perf_counter()
        state, m = step(state, x)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    tokens_s = cfg.train.batch_size * cfg.data.seq_len / statistics.median(times)
    flops_token = model_flops_per_token(cfg, V)
    out = {"parameters": params, "seq_len": cfg.data.seq_len, "batch_size": cfg.train.batch_size, "dtype": "bfloat16",
           "tokens_per_second": tokens_s, "step_seconds": statistics.median(times), "compile_seconds": compile_s,
           "model_flops_per_token": flops_token, "loss": float(m["loss"])}
    for name, peak in peaks.items():
        if peak:
            out[f"mfu_vs_{name}"] = tokens_s * flops_token / peak
    return out


def attention_table(small: bool) -> list:
    import jax
    import jax.numpy as jnp

    from dlm.models import attention as A

    B, L, H, D = (1, 256, 4, 32) if small else (4, 4096, 16, 64)
    dt = jnp.float32 if small else jnp.bfloat16
    q, k, v = (jax.random.normal(key, (B, L, H, D), dt) for key in jax.random.split(jax.random.key(0), 3))
    impls = ["einsum", "chunked", "xla", "cudnn"] + (["splash"] if jax.devices()[0].platform == "tpu" else [])
    rows = []
    for mask in ("full", "causal"):
        spec = A.FULL if mask == "full" else A.CAUSAL
        for impl in impls:
            f = jax.jit(jax.value_and_grad(lambda q, k, v: A.attention(q, k, v, spec, impl, 512).astype(jnp.float32).sum(), (0, 1, 2)))
            try:
                s = _median_seconds(lambda: jax.block_until_ready(f(q, k, v)), 5)
                rows.append({"implementation": impl, "mask": mask, "seq_len": L, "seconds_fwd_bwd": s})
            except Exception as e:  # an implementation this backend lacks (cuDNN on CPU, splash off TPU)
                rows.append({"implementation": impl, "mask": mask, "seq_len": L, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return rows


def decoder(small: bool) -> dict:
    import dlm
    from dlm.config import load_config

    length = 128 if small else 1024
    over = (["model.d_model=64", "model.num_layers=2", "model.num_heads=4"] if small else
            ["model.d_model=1024", "model.num_layers=28", "model.num_heads=16", "model.dtype=bfloat16"])
    over += [f"data.seq_len={length}", "sampling.sampler=parallel", "sampling.temperature=0", "sampling.num_samples=1"]
    model = dlm.build_model(load_config(ROOT / "configs/bench.yaml", over), 257)
    prompt = list(range(3, 35))
    variants = {"vanilla": ["sampling.decode.rule=topk", "sampling.decode.k=1", "sampling.decode.block_length=32"],
                "prefix_dpad_credit": ["sampling.decode.rule=threshold", "sampling.decode.tau=0.9", "sampling.decode.block_length=32",
                                       "sampling.decode.cache=prefix", "sampling.decode.suffix_dropout=true", "sampling.decode.credit=true",
                                       "sampling.decode.early_stop=false"]}
    out = {"length": length}
    for name, extra in variants.items():
        c = load_config(ROOT / "configs/bench.yaml", over + extra)
        runs = [dlm.generate(model, prompt, c.sampling, num_samples=1, length=length) for _ in range(3)]
        out[name] = {"seconds": statistics.median(r["seconds"] for r in runs), "nfe": runs[0]["nfe"],
                     "compile_seconds": runs[0]["compile_seconds"]}
    out["speedup"] = out["vanilla"]["seconds"] / out["prefix_dpad_credit"]["seconds"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "attention", "decoder"])
    args = parser.parse_args()

    import jax

    dev = jax.devices()[0]
    record = {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
              "jax": jax.__version__}
    started = time.perf_counter()
    mm = matmul_peak_flops()
    record["measured_peak_flops"], record["measured_peak_dtype"] = mm["peak_flops"], mm["peak_dtype"]
    record["rated_peak_flops_bf16"] = rated_peak(dev.device_kind)
    peaks = {"measured": mm["peak_flops"], "rated": record["rated_peak_flops_bf16"]}
    print(f"{dev.device_kind}: measured {mm['peak_flops'] / 1e12:.1f} TFLOP/s ({mm['peak_dtype']}), rated "
          f"{(record['rated_peak_flops_bf16'] or 0) / 1e12:.0f} TFLOP/s bf16", flush=True)
    for name, fn in (("train", lambda: train_mfu(args.small, peaks)), ("attention", lambda: attention_table(args.small)),
                     ("decoder", lambda: decoder(args.small))):
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            record[name] = fn()
        except Exception:
            record[name] = {"error": traceback.format_exc()[-2000:]}
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        write_json(args.out, record)  # what is done so far survives a timeout
    record["seconds"] = time.perf_counter() - started
    write_json(args.out, record)


if __name__ == "__main__":
    main()
