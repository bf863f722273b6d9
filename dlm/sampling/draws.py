"""Draw primitives every sampling loop stands on: Gumbel noise and categorical draws.

float64-grade noise (46-bit uniforms without x64, or true float64 under jax_enable_x64) keeps the
tail probabilities that float32 Gumbel noise cannot reach.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fine_uniform(bits):
    """Uniform on (0, 1) from two uint32 words [..., 2] without float64: w = (i1 + (i2 + 1/2) 2^-23) 2^-23
    from two 23-bit integers, so values near 0 have a resolution of 2^-46 (float32's own uniform
    stops at 2^-23); at most 1 - 2^-24."""
    i1 = (bits[..., 0] >> 9).astype(jnp.float32)
    i2 = (bits[..., 1] >> 9).astype(jnp.float32)
    w = (i1 + (i2 + 0.5) * 2.0**-23) * 2.0**-23
    return jnp.minimum(w, 1.0 - 2.0**-24)


def gumbel(key, shape, precise: bool):
    """Standard Gumbel noise -log(E), E ~ Exp(1). precise: float64 when jax_enable_x64 is on, else
    E = -log1p(-w) with w from fine_uniform, which reaches g = 32.6 (float64: about 37) where plain
    float32 noise stops at 15.9 — the tail that decides whether tokens of probability below e^-16
    are ever drawn."""
    if not precise or jax.config.jax_enable_x64:
        dt = jnp.float64 if precise else jnp.float32
        u = jax.random.uniform(key, shape, dt, minval=jnp.finfo(dt).tiny, maxval=1.0)
        return -jnp.log(-jnp.log(u))
    w = fine_uniform(jax.random.bits(key, (*shape, 2), jnp.uint32))
    return -jnp.log(-jnp.log1p(-w))


def greedy(temperature) -> bool:
    """Whether a temperature means argmax decoding. A traced temperature (generate() passes one,
    so that a new temperature does not compile a new sampler) is positive: temperature 0 is a
    different program and stays a Python number."""
    return not isinstance(temperature, jax.Array) and temperature == 0


def temper(logits, temperature):
    """logits / temperature, the temperature taken at the logits' precision (as a Python float
    would be, traced or not)."""
    return logits / jnp.asarray(temperature).astype(logits.dtype)


def categorical(key, logits, temperature, float64: bool):
    """Gumbel-max draw from softmax(logits / temperature); argmax at temperature 0.

    float64-grade noise (see gumbel) keeps the tail probabilities that float32 Gumbel noise
    cannot reach."""
    if greedy(temperature):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    g = gumbel(key, logits.shape, float64)
    return jnp.argmax(temper(logits.astype(g.dtype), temperature) + g, axis=-1).astype(jnp.int32)


def position_keys(key, shape, pad=None):
    """[B, n] keys, one per row and position: fold_in(fold_in(key, b), position - pad[b]) for
    positions 0..n-1 (`shape` = (B, n), or (B, n, start) for the window [start, start + n)).

    A draw made with them depends on its row and on its position counted from the row's first
    real token, not on the array's shape: columns of hidden left padding (a length bucket) or
    rows appended after it (a batch bucket) change no other draw."""
    B, n = shape[:2]
    start = shape[2] if len(shape) > 2 else 0
    pad = jnp.zeros((B,), jnp.int32) if pad is None else pad
    rows = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(B))
    pos = (start + jnp.arange(n))[None] - pad[:, None]  # [B, n]; negative only on hidden padding
    return jax.vmap(lambda k, p: jax.vmap(lambda q: jax.random.fold_in(k, q))(p))(rows, jnp.maximum(pos, 0))


def uniform_at(keys, dtype=jnp.float32, tail=()):
    """Uniform(0, 1) draws [*keys.shape, *tail], one batch per key."""
    return jax.vmap(jax.vmap(lambda k: jax.random.uniform(k, tail, dtype)))(keys)


def categorical_at(keys, logits, temperature, float64: bool):
    """categorical() with the Gumbel noise of position [b, i] from keys[b, i] (position_keys)."""
    if greedy(temperature):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    V = logits.shape[-1]
    g = jax.vmap(jax.vmap(lambda k: gumbel(k, (V,), float64)))(keys)
    return jnp.argmax(temper(logits.astype(g.dtype), temperature) + g, axis=-1).astype(jnp.int32)
