"""A dropless mixture-of-experts feed-forward: routing, expert compute and the training losses.

Every token goes to its top-k experts (none is dropped for capacity): the T x k assignments are
sorted by expert, the token rows gathered into that order, each expert's SwiGLU applied to its
contiguous group (one grouped matmul per projection: tiles of rows with their expert's matrix,
or `jax.lax.ragged_dot`; no capacity), and the outputs weighted by the router's gates and added
back to their tokens.

Routing, as the families do it:
- `softmax` then top-k, the gates renormalised to sum to 1 (`renormalize=True`: Qwen3-MoE with
  norm_topk_prob, SDAR-MoE) or not (`renormalize=False`: LLaDA-MoE, OLMoE);
- the losses: the load-balancing loss E / k * sum_e f_e P_e (f_e the fraction of the T x k
  assignments that go to expert e, P_e the mean router probability of e; 1 when routing is
  uniform) and the router z-loss mean_t logsumexp(router logits_t)^2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def route(logits, top_k: int, renormalize: bool):
    """Router logits [T, E] -> (gates [T, k], experts [T, k], probabilities [T, E])."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    gates, experts = jax.lax.top_k(probs, top_k)
    if renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return gates, experts, probs


def aux_losses(logits, experts, probs, num_experts: int) -> dict:
    """{'load_balance', 'router_z'} of one routing (see the module docstring)."""
    T, k = experts.shape
    f = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0) / (T * k)
    P = probs.mean(axis=0)
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return {"load_balance": num_experts * jnp.sum(f * P), "router_z": jnp.mean(z * z)}


def grouped_matmul(h, w, sizes, impl: str = "tiles", tile: int | None = None):
    """Rows h [R, d] sorted by group (sizes [E] rows each) times their group's matrix w [E, d, n]
    -> [R, n] float32. impl 'ragged': jax.lax.ragged_dot; 'tiles': each group padded to whole
    tiles of `tile` rows (at most E * (tile - 1) padding rows in all), one batched matmul of
    every tile with its group's matrix (XLA:CPU lowers ragged_dot to E dense products, E times
    the work; the tiles do the work once, plus the padding). The default tile is the power of
    two nearest R / (2 E), within [8, 256]: padding at most about half a tile per group, and few
    enough tiles that gathering their matrices stays cheap (measured by
    benchmarks/moe_throughput.py)."""
    if impl == "ragged":
        return jax.lax.ragged_dot(h, w, sizes, preferred_element_type=jnp.float32)
    R, E = h.shape[0], w.shape[0]
    if tile is None:
        tile = int(min(256, max(8, 2 ** round(math.log2(max(R / (2 * E), 1))))))
    n_tiles = -(-R // tile) + E  # enough for every group padded to whole tiles
    padded = -(-sizes // tile) * tile
    pstart = jnp.cumsum(padded) - padded
    start = jnp.cumsum(sizes) - sizes
    rows = jnp.arange(n_tiles * tile)
    group = jnp.clip(jnp.searchsorted(pstart, rows, side="right") - 1, 0, E - 1)
    offset = rows - pstart[group]
    valid = (offset < sizes[group]) & (rows < pstart[-1] + padded[-1])
    src = jnp.where(valid, start[group] + offset, 0)
    hp = jnp.where(valid[:, None], h[src], 0).reshape(n_tiles, tile, h.shape[1])
    wt = w[group[::tile]]  # [tiles, d, n]: each tile's group matrix
    y = jnp.einsum("trd,tdn->trn", hp, wt, preferred_element_type=jnp.float32).reshape(n_tiles * tile, -1)
    # back to the sorted rows: row i of group e sits at pstart[e] + (i - start[e])
    own = jnp.clip(jnp.searchsorted(start, jnp.arange(R), side="right") - 1, 0, E - 1)
    return y[pstart[own] + jnp.arange(R) - start[own]]


def dropless_swiglu(x, gates, experts, w_gate, w_up, w_down, dtype=None, impl: str = "tiles"):
    """x [T, d]; gates, experts [T, k]; w_gate, w_up [E, d, ff]; w_down [E, ff, d] -> [T, d]:
    sum_j gates[t, j] * SwiGLU_{experts[t, j]}(x[t]), every assignment computed (no capacity).
    impl: how the grouped matmuls run (grouped_matmul)."""
    T, d = x.shape
    E, k = w_gate.shape[0], experts.shape[1]
    dt = dtype or x.dtype
    flat = experts.reshape(-1)  # [T k]
    order = jnp.argsort(flat, stable=True)
    token = order // k  # the token of each sorted assignment
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    h = x[token].astype(dt)  # [T k, d], grouped by expert
    g = grouped_matmul(h, w_gate.astype(dt), sizes, impl)
    u = grouped_matmul(h, w_up.astype(dt), sizes, impl)
    a = (jax.nn.silu(g) * u).astype(dt)
    y = grouped_matmul(a, w_down.astype(dt), sizes, impl)  # [T k, d]
    y = y * gates.reshape(-1)[order][:, None].astype(jnp.float32)
    return jnp.zeros((T, d), jnp.float32).at[token].add(y).astype(x.dtype)


def dense_reference(x, gates, experts, w_gate, w_up, w_down):
    """The same sum, token by token through each of its experts' weights: what the dropless
    path must equal (tests)."""
    def one(xt, gt, et):
        def expert(e):
            return (jax.nn.silu(xt @ w_gate[e]) * (xt @ w_up[e])) @ w_down[e]
        return jnp.sum(gt[:, None] * jax.vmap(expert)(et), axis=0)

    return jax.vmap(one)(x.astype(jnp.float32), gates, experts)
