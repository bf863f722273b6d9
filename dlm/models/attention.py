"""Attention masks as specs built from token roles, and the attention kernel.

A spec is turned into a boolean mask [B, 1, Lq, Lk] (True = may attend) or None (full
bidirectional attention, no mask materialised). Rows with no visible key produce zeros rather
than NaN.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionSpec:
    """Which keys each query sees. 'full' is bidirectional attention over the sequence, 'causal'
    left-to-right, 'explicit' a boolean array [B, 1, Lq, Lk] built from hyperschedule roles
    (dlm.diffusion.hyperschedules.attention_mask)."""

    kind: str = "full"
    array: object = None

    def mask(self, q_len: int, k_len: int):
        if self.kind == "full":
            return None
        if self.kind == "causal":
            return jnp.tril(jnp.ones((q_len, k_len), bool), k_len - q_len)[None, None]
        if self.kind == "explicit":
            return self.array
        raise ValueError(f"unknown attention kind {self.kind!r}")


FULL = AttentionSpec("full")
CAUSAL = AttentionSpec("causal")


def dot_product_attention(q, k, v, mask=None, implementation: str = "einsum"):
    """q [B, Lq, H, D], k/v [B, Lk, H, D], mask broadcastable to [B, H, Lq, Lk] -> [B, Lq, H, D].

    'einsum': softmax(q k^T / sqrt(D)) v with the normalisation applied after the value matmul
    (exp(s - max) v / sum exp(s - max)), which saves a pass over the [Lq, Lk] scores; rows whose
    keys are all masked give zeros. 'xla'/'cudnn' call jax.nn.dot_product_attention.
    """
    if implementation != "einsum":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None if implementation == "xla" else implementation)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, L, D]
    s = ((q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)) @ k.swapaxes(-1, -2)).astype(jnp.float32)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)  # masked entries: exp(-inf) = 0
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = (p.astype(v.dtype) @ v).astype(jnp.float32) / jnp.where(denom > 0, denom, 1.0)
    return o.astype(v.dtype).transpose(0, 2, 1, 3)
