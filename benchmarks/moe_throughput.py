"""Tokens per second of the dropless MoE feed-forward against a dense SwiGLU of the same active parameters.

    python benchmarks/moe_throughput.py --out benchmarks/results/moe_throughput.json [--experts 8] [--top-k 2]

The feed-forward alone (dlm.models.moe: routing, experts on sorted rows in tiles, gates, the
auxiliary losses; forward and backward, as training runs it; also with jax.lax.ragged_dot), on T tokens of width d: the MoE has E experts of hidden width ff,
each token through k of them; the dense layer has hidden width k x ff, so both do the same
matmul FLOPs per token. Medians of several timed runs after a compile. (The MoE is not yet a
model option, so this is the layer, not the whole model.)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

from common import ROOT  # noqa: F401  (puts the repository on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--ff", type=int, default=512, help="Hidden width of one expert.")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from dlm.models import moe

    T, d, ff, E, k = args.tokens, args.d_model, args.ff, args.experts, args.top_k
    ks = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(ks[0], (T, d))
    router = jax.random.normal(ks[1], (d, E)) * d**-0.5
    experts = [jax.random.normal(ks[2 + i], shape) * shape[1] ** -0.5 for i, shape in enumerate(((E, d, ff), (E, d, ff), (E, ff, d)))]
    dense = [jax.random.normal(ks[5 + i], shape) * shape[0] ** -0.5 for i, shape in enumerate(((d, k * ff), (d, k * ff), (k * ff, d)))]

    def moe_loss(x, router, wg, wu, wd, impl="tiles"):
        logits = x @ router
        gates, chosen, probs = moe.route(logits, k, True)
        aux = moe.aux_losses(logits, chosen, probs, E)
        y = moe.dropless_swiglu(x, gates, chosen, wg, wu, wd, impl=impl)
        return jnp.mean(y * y) + 0.01 * aux["load_balance"] + 1e-3 * aux["router_z"]

    def dense_loss(x, wg, wu, wd):
        y = (jax.nn.silu(x @ wg) * (x @ wu)) @ wd
        return jnp.mean(y * y)

    moe_step = jax.jit(jax.value_and_grad(moe_loss, argnums=(0, 1, 2, 3, 4)))
    ragged_step = jax.jit(jax.value_and_grad(lambda *a: moe_loss(*a, impl="ragged"), argnums=(0, 1, 2, 3, 4)))
    dense_step = jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1, 2, 3)))

    def timed(fn, *a):
        jax.block_until_ready(fn(*a))  # compile
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            runs.append(time.perf_counter() - t0)
        return T / statistics.median(runs), [T / r for r in runs]

    moe_runs, dense_runs, ragged_runs = [], [], []
    for _ in range(2):  # alternate, so that drift hits all
        moe_runs += timed(moe_step, x, router, *experts)[1]
        dense_runs += timed(dense_step, x, *dense)[1]
        ragged_runs += timed(ragged_step, x, router, *experts)[1]
    moe_tps, dense_tps = statistics.median(moe_runs), statistics.median(dense_runs)
    ragged_tps = statistics.median(ragged_runs)
    report = {"moe_tokens_per_second": moe_tps, "dense_tokens_per_second": dense_tps, "experts": E, "top_k": k,
              "ratio_dense_over_moe": dense_tps / moe_tps, "ragged_dot_tokens_per_second": ragged_tps, "tokens": T, "d_model": d, "expert_ff": ff, "dense_ff": k * ff,
              "scope": "the feed-forward layer, forward and backward", "device": str(jax.devices()[0].device_kind),
              "goal": "MoE within 1.5x of the dense model"}
    print(f"MoE ({E} experts, top-{k}): {moe_tps:.0f} tokens/s; dense (ff {k * ff}): {dense_tps:.0f} tokens/s; "
          f"dense / MoE = x{dense_tps / moe_tps:.2f}; with jax.lax.ragged_dot instead of tiles: {ragged_tps:.0f} tokens/s")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
