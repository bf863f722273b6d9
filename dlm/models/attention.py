"""Attention with structural masks, and its implementations.

A mask is never stored as an [Lq, Lk] array. An AttentionSpec gives per-token attributes of
the queries (`q`) and keys (`k`), int or bool arrays [Lq] / [B, Lq] and [Lk] / [B, Lk], and a
`rule(q, k) -> bool` that is elementwise over them: the implementation calls it on the
attributes of one tile of queries (shaped [..., cq, 1]) and one tile of keys ([..., 1, ck]), so
a tile's mask is all that ever exists. Every spec's attributes also hold `index`: a key's place
on the key axis, and a query's place aligned to the end of the keys (Lk - Lq + i: with a KV
cache of Lc keys in front, query i is key Lc + i), which is what causal rules compare.

    attention(q, k, v, spec, implementation, chunk) -> [B, Lq, H, D]

Implementations (model.attention):
- `einsum`: softmax(q k^T / sqrt(D)) v over the whole [Lq, Lk] scores (the fastest on CPU for
  short sequences, and the reference the others are tested against);
- `chunked`: query tiles x key tiles with an online softmax (flash attention in pure JAX) and a
  backward pass that recomputes each tile from the saved log-sum-exp, so memory is
  O(L x chunk) forward and backward; any backend;
- `auto` (default): einsum while the score matrix is at most (2 x model.attention_chunk)^2 per
  head (so a cached step's few queries over a long cache stay one einsum); above, splash on TPU where the
  mask allows it (full, causal, key visibility; lengths in multiples of 128), chunked otherwise;
- `xla` / `cudnn`: jax.nn.dot_product_attention (cuDNN flash on GPU); causal is passed as
  is_causal, other rules as a dense mask built from the rule;
- `splash`: the Pallas TPU splash kernel for full, causal and key-visibility rules (keys hidden
  through segment ids), in a shard_map over the mesh; compiled for TPU topologies by dlm.plan
  and tested through the Pallas interpreter here.

Rows whose keys are all hidden produce zeros rather than NaN. Scores, softmax and the
accumulators are float32 whatever the dtype of q, k, v; the matmuls take their inputs in that
dtype and accumulate in float32 (preferred_element_type).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionSpec:
    """Which keys each query sees: `rule(q, k)` over per-token attributes (None: every key).
    `kind` names the structure for kernels that know it: full, causal, keys (a key-visibility
    vector `k['visible']`), dense (a materialised mask `k['mask']`, from `dense`), or rule
    (anything else)."""

    kind: str = "full"
    rule: Callable | None = None
    q: dict = dataclasses.field(default_factory=dict)
    k: dict = dataclasses.field(default_factory=dict)

    def tile(self, q_start, q_len: int, k_start, k_len: int, Lq: int, Lk: int):
        """The mask of queries [q_start, q_start + q_len) x keys [k_start, k_start + k_len):
        bool [B | 1, 1, q_len, k_len], or None for the full spec."""
        if self.kind == "dense":
            m = self.k["mask"]
            return jax.lax.dynamic_slice(m, (0, 0, q_start, k_start), (*m.shape[:2], q_len, k_len))
        if self.rule is None:
            return None
        q = {n: _cut(a, q_start, q_len)[..., :, None] for n, a in self.q.items()}
        k = {n: _cut(a, k_start, k_len)[..., None, :] for n, a in self.k.items()}
        q["index"] = (q_start + jnp.arange(q_len) + (Lk - Lq))[:, None]
        k["index"] = (k_start + jnp.arange(k_len))[None, :]
        m = jnp.asarray(self.rule(q, k))
        m = jnp.broadcast_to(m, (*m.shape[:-2], q_len, k_len))
        return (m[None] if m.ndim == 2 else m)[:, None]

    def mask(self, Lq: int, Lk: int):
        """The whole mask [B | 1, 1, Lq, Lk] (for the einsum and XLA implementations), or None."""
        return self.tile(0, Lq, 0, Lk, Lq, Lk)

    def padded(self, Lq_pad: int, Lk_pad: int):
        """The same spec with attributes padded (with zeros) to Lq_pad / Lk_pad tokens."""
        pad = lambda a, n: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n - a.shape[-1])])
        if self.kind == "dense":
            m = self.k["mask"]
            return dataclasses.replace(self, k={"mask": jnp.pad(m, ((0, 0), (0, 0), (0, Lq_pad - m.shape[2]), (0, Lk_pad - m.shape[3])))})
        return dataclasses.replace(self, q={n: pad(a, Lq_pad) for n, a in self.q.items()},
                                   k={n: pad(a, Lk_pad) for n, a in self.k.items()})


def _cut(a, start, n):
    a = jnp.asarray(a)
    if isinstance(start, int) and start == 0 and a.shape[-1] == n:
        return a
    return jax.lax.dynamic_slice_in_dim(a, start, n, axis=a.ndim - 1)


def _causal(q, k):
    return k["index"] <= q["index"]


def _visible(q, k):
    return k["visible"]


FULL = AttentionSpec("full")
CAUSAL = AttentionSpec("causal", _causal)


def visible_keys(visible) -> AttentionSpec:
    """Every query sees the keys where `visible` [Lk] / [B, Lk] is True (padding, DPad's dropped
    suffix, an unwritten cache)."""
    return AttentionSpec("keys", _visible, {}, {"visible": jnp.asarray(visible, bool)})


def restrict(spec: AttentionSpec, visible) -> AttentionSpec:
    """`spec` with the keys where `visible` [Lk] / [B, Lk] is False hidden as well (left padding)."""
    visible = jnp.asarray(visible, bool)
    if spec.kind == "full":
        return visible_keys(visible)
    if spec.kind == "keys":
        return visible_keys(spec.k["visible"] & visible)
    if spec.kind == "dense":
        return dense(spec.k["mask"] & (visible[:, None, None, :] if visible.ndim == 2 else visible))
    return AttentionSpec("rule", functools.partial(_and_visible, spec.rule), spec.q, {**spec.k, "restricted": visible})


def _and_visible(rule_fn, q, k):
    return rule_fn(q, k) & k["restricted"]


def block_causal(width: int) -> AttentionSpec:
    """Blocks of `width` positions: a query sees the keys of its own block and earlier ones."""
    return AttentionSpec("rule", functools.partial(_block_causal, width))


def _block_causal(width, q, k):
    return k["index"] // width <= q["index"] // width


def rule(fn: Callable, q: dict | None = None, k: dict | None = None) -> AttentionSpec:
    """A spec from a rule over the given attributes (see the module docstring)."""
    return AttentionSpec("rule", fn, {n: jnp.asarray(a) for n, a in (q or {}).items()},
                         {n: jnp.asarray(a) for n, a in (k or {}).items()})


def dense(mask) -> AttentionSpec:
    """A spec from a materialised boolean mask [B | 1, 1, Lq, Lk] (tests and user code; dlm's own
    masks are all structural). Tiles are cut from it."""
    return AttentionSpec("dense", None, {}, {"mask": jnp.asarray(mask, bool)})


# ------------------------------------------------------------------------------------------
# implementations


def attention(q, k, v, spec: AttentionSpec = FULL, implementation: str = "auto", chunk: int = 512):
    """q [B, Lq, H, D], k / v [B, Lk, H, D] -> [B, Lq, H, D]."""
    Lq, Lk = q.shape[1], k.shape[1]
    if implementation == "auto":
        # the whole score matrix while it is no larger than 2 chunks x 2 chunks: a cached
        # decoding step (a few queries over a long cache) stays one einsum, not a loop of tiles
        if Lq * Lk > (2 * chunk) ** 2:
            implementation = "splash" if splash_fits(spec, Lq, Lk) else "chunked"
        else:
            implementation = "einsum"
    if implementation == "einsum":
        return einsum_attention(q, k, v, spec.mask(Lq, Lk))
    if implementation == "chunked":
        return chunked_attention(q, k, v, spec, chunk, chunk)
    if implementation in ("xla", "cudnn"):
        impl = None if implementation == "xla" else "cudnn"
        if spec.kind == "causal" and Lq == Lk:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        mask = spec.mask(Lq, Lk)
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        if mask is None:
            return o
        seen = jnp.moveaxis(mask.any(-1), 1, -1)[..., None]  # [B | 1, Lq, 1, 1]: rows with a visible key
        return jnp.where(seen, o, jnp.zeros((), o.dtype))  # the others give 0, as in every implementation
    if implementation == "splash":
        return splash_attention(q, k, v, spec)
    raise ValueError(f"unknown attention implementation {implementation!r}")


def einsum_attention(q, k, v, mask=None):
    """The reference: exp(s - max) v / sum exp(s - max) over the whole score matrix (the
    normalisation after the value matmul saves a pass over the scores)."""
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, L, D]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=F32) * q.shape[-1] ** -0.5
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)  # hidden keys: exp(-inf) = 0
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=F32) / jnp.where(denom > 0, denom, 1.0)
    return o.astype(v.dtype).transpose(0, 2, 1, 3)


def chunked_attention(q, k, v, spec: AttentionSpec = FULL, q_chunk: int = 512, k_chunk: int = 512):
    """Online-softmax attention over [q_chunk] x [k_chunk] tiles; see the module docstring."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    cq, ck = min(q_chunk, Lq), min(k_chunk, Lk)
    nq, nk = -(-Lq // cq), -(-Lk // ck)
    pq, pk = nq * cq - Lq, nk * ck - Lk
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if pq:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, pq), (0, 0)))
    if pk:
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pk), (0, 0))) for x in (k, v))
    spec = spec.padded(nq * cq, nk * ck) if (pq or pk) else spec
    geo = _Geometry(spec.kind, spec.rule, Lq, Lk, cq, ck, nq, nk)
    o = _flash(geo, q, k, v, spec.q, spec.k)
    return o[:, :, :Lq].transpose(0, 2, 1, 3)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    kind: str
    rule: Callable | None
    Lq: int
    Lk: int
    cq: int
    ck: int
    nq: int
    nk: int

    def mask(self, qa, ka, i, j):
        """Tile (i, j) of the mask including the padding: bool [B | 1, 1, cq, ck]."""
        key_in = (j * self.ck + jnp.arange(self.ck)) < self.Lk
        if self.kind == "full":
            return key_in[None, None, None, :]
        spec = AttentionSpec(self.kind, self.rule, qa, ka)
        return spec.tile(i * self.cq, self.cq, j * self.ck, self.ck, self.Lq, self.Lk) & key_in


def _scores(qi, kj, geo, qa, ka, i, j):
    s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=F32) * qi.shape[-1] ** -0.5
    return jnp.where(geo.mask(qa, ka, i, j), s, -jnp.inf)


def _tiles(x, n, c):
    """[B, H, n c, D] -> [n, B, H, c, D]."""
    B, H, _, D = x.shape
    return x.reshape(B, H, n, c, D).transpose(2, 0, 1, 3, 4)


def _untile(x):
    n, B, H, c = x.shape[:4]
    return x.transpose(1, 2, 0, *range(3, x.ndim)).reshape(B, H, n * c, *x.shape[4:])


def _forward(geo, q, k, v, qa, ka):
    qs, ks, vs = _tiles(q, geo.nq, geo.cq), _tiles(k, geo.nk, geo.ck), _tiles(v, geo.nk, geo.ck)
    B, H, _, D = q.shape

    def one_query_tile(i):
        qi = qs[i]

        def step(carry, j):
            m, l, acc = carry
            s = _scores(qi, ks[j], geo, qa, ka, i, j)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            l = l * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vs[j], preferred_element_type=F32)
            return (m_new, l, acc), None

        init = (jnp.full((B, H, geo.cq), -jnp.inf, F32), jnp.zeros((B, H, geo.cq), F32), jnp.zeros((B, H, geo.cq, D), F32))
        (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(geo.nk))
        o = acc / jnp.where(l > 0, l, 1.0)[..., None]
        lse = jnp.where(l > 0, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
        return o.astype(v.dtype), lse

    o, lse = jax.lax.map(one_query_tile, jnp.arange(geo.nq))
    return _untile(o), _untile(lse[..., None])[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(geo, q, k, v, qa, ka):
    return _forward(geo, q, k, v, qa, ka)[0]


def _flash_fwd(geo, q, k, v, qa, ka):
    o, lse = _forward(geo, q, k, v, qa, ka)
    return o, (q, k, v, qa, ka, o, lse)


def _flash_bwd(geo, res, do):
    """Recompute each tile's probabilities from the saved log-sum-exp: p = exp(s - lse);
    dv = p^T do, dp = do v^T, ds = p (dp - rowsum(do o)), dq = ds k, dk = ds^T q (times the scale)."""
    q, k, v, qa, ka, o, lse = res
    scale = q.shape[-1] ** -0.5
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1)  # [B, H, Lq]
    qs, dos = _tiles(q, geo.nq, geo.cq), _tiles(do.astype(q.dtype), geo.nq, geo.cq)
    lses = _tiles(lse[..., None], geo.nq, geo.cq)[..., 0]
    deltas = _tiles(delta[..., None], geo.nq, geo.cq)[..., 0]
    ks, vs = _tiles(k, geo.nk, geo.ck), _tiles(v, geo.nk, geo.ck)

    def one_key_tile(dq, j):
        kj, vj = ks[j], vs[j]

        def step(carry, i):
            dk, dv, dq = carry
            s = _scores(qs[i], kj, geo, qa, ka, i, j)
            p = jnp.exp(s - lses[i][..., None])  # hidden keys and empty rows (lse = inf): 0
            dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p.astype(v.dtype), dos[i], preferred_element_type=F32)
            dp = jnp.einsum("bhqd,bhkd->bhqk", dos[i], vj, preferred_element_type=F32)
            ds = (p * (dp - deltas[i][..., None]) * scale).astype(q.dtype)
            dq = dq.at[i].add(jnp.einsum("bhqk,bhkd->bhqd", ds, kj, preferred_element_type=F32))
            dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qs[i], preferred_element_type=F32)
            return (dk, dv, dq), None

        zeros = jnp.zeros(kj.shape, F32)
        (dk, dv, dq), _ = jax.lax.scan(step, (zeros, zeros, dq), jnp.arange(geo.nq))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(one_key_tile, jnp.zeros(qs.shape, F32), jnp.arange(geo.nk))
    zero_attrs = lambda a: jax.tree.map(lambda x: None, a)
    return (_untile(dq).astype(q.dtype), _untile(dk).astype(k.dtype), _untile(dv).astype(v.dtype),
            zero_attrs(qa), zero_attrs(ka))


_flash.defvjp(_flash_fwd, _flash_bwd)


def splash_attention(q, k, v, spec: AttentionSpec, interpret: bool = False):
    """Pallas splash attention (TPU): full and causal masks, and key visibility through segment
    ids (queries in segment 1, visible keys 1, hidden keys 0). Other rules raise.

    On a mesh the kernel runs inside a shard_map that is manual over every mesh axis (Mosaic
    kernels cannot be partitioned automatically, nor inside a shard_map manual over only some
    axes): rows split over data x fsdp and heads over tensor where they divide, each device
    calling the kernel on its own rows and heads."""
    if spec.kind not in ("full", "causal", "keys"):
        raise ValueError("model.attention=splash supports full, causal and key-visibility masks; this pass uses a "
                         "hyperschedule or cache rule: use model.attention=chunked.")
    B, Lk = q.shape[0], k.shape[1]
    vis = jnp.broadcast_to(spec.k["visible"], (B, Lk)).astype(jnp.int32) if spec.kind == "keys" else None
    local = functools.partial(_splash_local, kind=spec.kind, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, vis)
    from jax.sharding import PartitionSpec as P

    from dlm.mesh import batch_axes

    rows = batch_axes(B) or None
    heads = "tensor" if mesh.shape.get("tensor", 1) > 1 and q.shape[2] % mesh.shape["tensor"] == 0 \
        and k.shape[2] % mesh.shape["tensor"] == 0 else None
    qkv = P(rows, None, heads, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, None if vis is None else P(rows, None)), out_specs=qkv,
                         axis_names=set(mesh.axis_names), check_vma=False)(q, k, v, vis)


def _splash_local(q, k, v, vis, *, kind: str, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    base = sm.CausalMask((Lq, Lk), offset=Lk - Lq) if kind == "causal" else sm.FullMask((Lq, Lk))
    kernel = sk.make_splash_mha(sm.MultiHeadMask([base] * H), head_shards=1, q_seq_shards=1, interpret=interpret)
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q * D**-0.5, k, v))
    if vis is not None:
        seg = lambda i: sk.SegmentIds(q=jnp.ones((Lq,), jnp.int32), kv=vis[i])
        o = jax.vmap(lambda a, b, c, i: kernel(a, b, c, segment_ids=seg(i)))(qt, kt, vt, jnp.arange(B))
    else:
        o = jax.vmap(kernel)(qt, kt, vt)
    return o.transpose(0, 2, 1, 3)


def splash_fits(spec: AttentionSpec, Lq: int, Lk: int) -> bool:
    """Whether `auto` may pick splash: a TPU mesh (or backend), a mask splash knows, and lengths
    that its 128-wide blocks tile."""
    return spec.kind in ("full", "causal", "keys") and Lq % 128 == 0 and Lk % 128 == 0 and _on_tpu()


def _on_tpu() -> bool:
    """Whether the program is traced for TPU: the mesh in scope's devices, else the backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if device is not None and getattr(device, "platform", None):
        return device.platform == "tpu"
    return jax.default_backend() == "tpu"
