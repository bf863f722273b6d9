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

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Routing:
    """How a router picks and weights experts (model.moe's routing fields)."""

    top_k: int
    renormalize: bool = True
    score: str = "softmax"  # or sigmoid
    groups: int = 1
    group_top_k: int = 1
    scale: float = 1.0

    @classmethod
    def of(cls, moe) -> "Routing":
        return cls(moe.top_k, moe.renormalize, moe.router, moe.groups, moe.group_top_k, moe.route_scale)


def route(logits, top_k, renormalize: bool | None = None, bias=None):
    """Router logits [T, E] -> (gates [T, k], experts [T, k], probabilities [T, E]). `top_k` is a
    Routing, or the k of softmax routing with `renormalize`.

    softmax: the top-k probabilities, renormalised to sum to 1 or not. sigmoid (DeepSeek-V3,
    LLaDA2): scores s = sigmoid(logits); experts chosen by s + bias (within each token's
    group_top_k groups of the largest sums of their two best biased scores, the others at -inf),
    gates the unbiased s of the chosen, divided by their sum (+1e-20) when renormalising with
    k > 1, times `scale`. The probabilities (for the load-balancing loss) are the softmax, or the
    scores normalised per token."""
    r = top_k if isinstance(top_k, Routing) else Routing(top_k, bool(renormalize))
    x = logits.astype(jnp.float32)
    if r.score == "softmax":
        probs = jax.nn.softmax(x, axis=-1)
        gates, experts = jax.lax.top_k(probs, r.top_k)
        if r.renormalize:
            gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
        return gates * r.scale, experts, probs
    scores = jax.nn.sigmoid(x)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    if r.groups > 1:
        T, E = choice.shape
        by_group = choice.reshape(T, r.groups, E // r.groups)
        group_score = jnp.sum(jax.lax.top_k(by_group, 2)[0], axis=-1)  # [T, groups]
        kept = jax.lax.top_k(group_score, r.group_top_k)[1]
        keep = jnp.zeros((T, r.groups), bool).at[jnp.arange(T)[:, None], kept].set(True)
        choice = jnp.where(jnp.repeat(keep, E // r.groups, axis=1), choice, -jnp.inf)
    experts = jax.lax.top_k(choice, r.top_k)[1]
    gates = jnp.take_along_axis(scores, experts, axis=-1)
    if r.renormalize and r.top_k > 1:
        gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-20)
    return gates * r.scale, experts, scores / jnp.sum(scores, axis=-1, keepdims=True)


def routing_sums(logits, experts, probs, valid=None):
    """The sums the losses are made of, over the tokens with valid [T] (default all): (assignments
    per expert [E], router probabilities summed per expert [E], sum of logsumexp^2, tokens).
    Sums add across devices (psum), so sharded tokens give the whole batch's losses."""
    E = probs.shape[-1]
    w = jnp.ones(experts.shape[:1], jnp.float32) if valid is None else valid.astype(jnp.float32)
    counts = jnp.zeros((E,), jnp.float32).at[experts].add(jnp.broadcast_to(w[:, None], experts.shape))
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return counts, jnp.sum(probs * w[:, None], axis=0), jnp.sum(z * z * w), jnp.sum(w)


def losses_of(sums, top_k: int) -> dict:
    """{'load_balance', 'router_z'} from routing_sums (see the module docstring)."""
    counts, prob_sum, z2, n = sums
    n = jnp.maximum(n, 1.0)
    f, P = counts / (n * top_k), prob_sum / n
    return {"load_balance": counts.shape[0] * jnp.sum(f * P), "router_z": z2 / n}


def aux_losses(logits, experts, probs, num_experts: int) -> dict:
    """{'load_balance', 'router_z'} of one routing over all its tokens (see the module docstring)."""
    assert probs.shape[-1] == num_experts
    return losses_of(routing_sums(logits, experts, probs), experts.shape[1])


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


def grouped_swiglu(h, sizes, w_gate, w_up, w_down, dt, impl: str = "tiles"):
    """Rows h [R, d] sorted by expert (sizes [E] rows each; rows past their sum are padding and
    give 0) through their expert's SwiGLU -> [R, d] float32."""
    g = grouped_matmul(h, w_gate.astype(dt), sizes, impl)
    u = grouped_matmul(h, w_up.astype(dt), sizes, impl)
    a = (jax.nn.silu(g) * u).astype(dt)
    y = grouped_matmul(a, w_down.astype(dt), sizes, impl)
    return jnp.where((jnp.arange(h.shape[0]) < jnp.sum(sizes))[:, None], y, 0.0)


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
    y = grouped_swiglu(x[token].astype(dt), sizes, w_gate, w_up, w_down, dt, impl)  # [T k, d], grouped by expert
    y = y * gates.reshape(-1)[order][:, None].astype(jnp.float32)
    return jnp.zeros((T, d), jnp.float32).at[token].add(y).astype(x.dtype)


def expert_parallel_swiglu(x, gates, experts, w_gate, w_up, w_down, axis: str, shards: int, dtype=None,
                           impl: str = "tiles", capacity: int = 0):
    """dropless_swiglu inside shard_map, the experts split over mesh axis `axis` (`shards` ways):
    x [T, d] and gates, experts [T, k] are this device's tokens; w_* [E / shards, ...] its experts
    (global expert e lives on shard e // (E / shards)). Each assignment is sent to its expert's
    shard by one all-to-all (a buffer of `capacity` rows per destination: 0 = T k, every
    assignment, exact whatever the routing), computed there with the shard's experts, sent back
    by a second all-to-all and weighted by its gate. With a capacity below T k the assignments
    past it (in token order) are dropped: they add nothing."""
    T, d = x.shape
    El, k = w_gate.shape[0], experts.shape[1]
    dt = dtype or x.dtype
    C = capacity or T * k
    flat = experts.reshape(-1)  # [A], assignment a = token a // k
    dest = flat // El
    order = jnp.argsort(dest, stable=True)
    per_dest = jnp.bincount(dest, length=shards)
    first = jnp.cumsum(per_dest) - per_dest
    slot = jnp.zeros_like(flat).at[order].set(jnp.arange(flat.shape[0]) - first[dest[order]])  # rank within its destination
    kept = slot < C
    where = jnp.where(kept, dest * C + slot, shards * C)  # out of range: dropped (scatter mode="drop")
    send = jnp.zeros((shards * C, d), dt).at[where].set(x[jnp.arange(flat.shape[0]) // k].astype(dt), mode="drop")
    send_e = jnp.full((shards * C,), El, jnp.int32).at[where].set((flat % El).astype(jnp.int32), mode="drop")
    recv = jax.lax.all_to_all(send.reshape(shards, C, d), axis, 0, 0).reshape(shards * C, d)
    recv_e = jax.lax.all_to_all(send_e.reshape(shards, C), axis, 0, 0).reshape(shards * C)  # El: an empty slot
    by_expert = jnp.argsort(recv_e, stable=True)
    sizes = jnp.bincount(recv_e, length=El + 1)[:El].astype(jnp.int32)
    y_sorted = grouped_swiglu(recv[by_expert], sizes, w_gate, w_up, w_down, dt, impl)
    y = jnp.zeros((shards * C, d), jnp.float32).at[by_expert].set(y_sorted)
    back = jax.lax.all_to_all(y.astype(dt).reshape(shards, C, d), axis, 0, 0).reshape(shards * C, d)
    mine = jnp.where(kept[:, None], back[jnp.minimum(where, shards * C - 1)].astype(jnp.float32), 0.0)
    mine = mine * gates.reshape(-1)[:, None].astype(jnp.float32)
    return jnp.sum(mine.reshape(T, k, d), axis=1).astype(x.dtype)


def dense_reference(x, gates, experts, w_gate, w_up, w_down):
    """The same sum, token by token through each of its experts' weights: what the dropless
    path must equal (tests)."""
    def one(xt, gt, et):
        def expert(e):
            return (jax.nn.silu(xt @ w_gate[e]) * (xt @ w_up[e])) @ w_down[e]
        return jnp.sum(gt[:, None] * jax.vmap(expert)(et), axis=0)

    return jax.vmap(one)(x.astype(jnp.float32), gates, experts)


def moe_feedforward(x, router, w_gate, w_up, w_down, routing: Routing, dtype, impl: str = "tiles",
                    capacity_factor: float = 0.0, bias=None):
    """The routed experts of one block: x [B, L, d] -> (y [B, L, d], routing_sums of its tokens).

    Without a mesh (or on one device) every token is routed and computed here. Under a mesh the
    tokens are flattened, padded to a multiple of the batch devices and split over the mesh's
    batch axes (data, expert, fsdp) inside shard_map, so that sorting and grouping stay on each
    device; with mesh.expert > 1 the experts are split over the expert axis and each device's
    assignments reach them by all-to-all (expert_parallel_swiglu); the routing sums are added
    over the devices, so the losses are the whole batch's."""
    from jax.sharding import PartitionSpec as P

    from dlm.mesh import BATCH

    B, L, d = x.shape
    E = router.shape[1]
    flat = x.reshape(B * L, d)

    top_k = routing.top_k

    def local(xl, valid, router, wg, wu, wd, bias, axes=(), shards=1):
        # the router in float32 (LLaDA2's router_dtype fp32; Qwen3-MoE routes in the model's dtype)
        logits = jnp.matmul(xl.astype(jnp.float32), router.astype(jnp.float32), preferred_element_type=jnp.float32)
        gates, experts, probs = route(logits, routing, bias=bias)
        sums = routing_sums(logits, experts, probs, valid)
        if axes:
            sums = jax.tree.map(lambda s: jax.lax.psum(s, axes), sums)
        if shards > 1:
            A = xl.shape[0] * top_k
            cap = min(A, math.ceil(capacity_factor * A / shards)) if capacity_factor > 0 else 0
            y = expert_parallel_swiglu(xl, gates, experts, wg, wu, wd, "expert", shards, dtype, impl, cap)
        else:
            y = dropless_swiglu(xl, gates, experts, wg, wu, wd, dtype, impl)
        return y, sums

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        y, sums = local(flat, None, router, w_gate, w_up, w_down, bias)
        return y.reshape(B, L, d), sums
    axes = tuple(a for a in BATCH if mesh.shape.get(a, 1) > 1)
    shards = mesh.shape.get("expert", 1)
    if E % shards:
        raise ValueError(f"model.moe.experts={E} must be divisible by mesh.expert={shards} (each device holds E / mesh.expert experts).")
    ways = math.prod(mesh.shape[a] for a in axes)
    T = B * L
    pad = -T % ways
    valid = jnp.arange(T + pad) < T
    if pad:
        flat = jnp.concatenate([flat, jnp.zeros((pad, d), flat.dtype)])
    rows = P(axes or None)
    ew = P("expert" if shards > 1 else None)
    fn = jax.shard_map(functools.partial(local, axes=axes, shards=shards), mesh=mesh,
                       in_specs=(rows, rows, P(), ew, ew, ew, P()), out_specs=(rows, P()))
    y, sums = fn(flat, valid, router, w_gate, w_up, w_down, jnp.zeros((E,), jnp.float32) if bias is None else bias)
    return y[:T].reshape(B, L, d), sums
