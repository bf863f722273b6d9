"""Train-step throughput and MFU.

    python benchmarks/train_throughput.py --config configs/bench.yaml --out FILE [key=value ...]

model_flops_per_token = 6 * (matmul parameters) + 12 * num_layers * d_model * seq_len
(the second term is attention's QK^T and PV, forward and backward; bidirectional, so not halved).
MFU = tokens/s * model_flops_per_token / peak, with the peak a matmul measured in the same run
(float32 on CPU, bfloat16 on accelerators).
"""

from __future__ import annotations

import argparse
import time

from common import matmul_peak_flops, peak_rss_bytes, write_json


def model_flops_per_token(cfg, vocab_size: int) -> float:
    from dlm.models.transformer import mlp_width

    d, L, S = cfg.model.d_model, cfg.model.num_layers, cfg.data.seq_len
    per_layer = 4 * d * d + 3 * d * mlp_width(cfg.model)
    matmul_params = L * per_layer + d * vocab_size
    return 6.0 * matmul_params + 12.0 * L * d * S


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import jax
    import numpy as np

    from dlm.config import load_config
    from dlm.data.pipeline import load_data, train_iterator
    from dlm.mesh import check_batch, global_batch, make_mesh
    from dlm.train.state import create_train_state, make_train_step

    cfg = load_config(args.config, args.overrides)
    mesh = make_mesh(cfg.mesh)
    check_batch(cfg.train.batch_size, mesh)
    data = load_data(cfg.data, seed=cfg.train.seed)
    V = data.vocab_size
    it = train_iterator(data, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed, jax.process_index(), jax.process_count())
    graphdef, state, shardings = create_train_state(cfg, V, mesh)
    step = make_train_step(cfg, graphdef, V, mesh, shardings)
    t0 = time.perf_counter()
    for _ in range(2):
        state, m = step(state, global_batch(next(it), mesh))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        batch = global_batch(next(it), mesh)
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    tokens = cfg.train.batch_size * cfg.data.seq_len
    tps = tokens / step_s
    fpt = model_flops_per_token(cfg, V)
    peak = matmul_peak_flops()
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    record = {
        "config": args.config, "overrides": args.overrides, "parameters": int(n_params),
        "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len, "devices": jax.device_count(),
        "step_seconds_median": step_s, "step_seconds": times, "warmup_seconds": compile_s,
        "tokens_per_second": tps, "model_flops_per_token": fpt, "achieved_flops": tps * fpt,
        **peak, "mfu": tps * fpt / peak["peak_flops"] / jax.device_count(), "peak_rss_bytes": peak_rss_bytes(),
        "final_loss": float(m["loss"]),
    }
    write_json(args.out, record)
    print(f"tokens/s {tps:,.0f}  model FLOPs/token {fpt / 1e6:.1f}M  peak {peak['peak_flops'] / 1e9:.1f} GFLOP/s  "
          f"MFU {record['mfu']:.3f}")


if __name__ == "__main__":
    main()
