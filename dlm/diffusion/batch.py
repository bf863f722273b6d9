"""Noise draws that do not depend on how a batch is split into micro-batches.

Gradient accumulation (train.grad_accum = N) runs the loss on N micro-batches and averages their
gradients. For that to be the large batch's update, every row must see the noise it would see
in the large batch: its masking draws and its (antithetic) time. Micro-batch j of a batch of
`total` rows holds rows j, j + N, j + 2N, ... (so that each device's rows stay on it), and every
draw of an objective goes through `draw(fn, key, shape)`: outside a micro-batch it is
fn(key, shape); inside `micro_batch(j, N, total)` it draws for all `total` rows and keeps this
micro-batch's. The draws are [B, L]-sized scalars, cheap next to a forward pass.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

_ROWS = contextvars.ContextVar("dlm_micro_batch", default=None)


@contextlib.contextmanager
def micro_batch(j, n: int, total: int):
    """Draws inside are those of rows j, j + n, ... of a batch of `total` rows (j may be traced)."""
    token = _ROWS.set((j, n, total))
    try:
        yield
    finally:
        _ROWS.reset(token)


def rows(batch: int):
    """(indices [batch] of the current rows in the large batch, its size): (arange, batch)
    outside a micro-batch."""
    ctx = _ROWS.get()
    if ctx is None:
        return jnp.arange(batch), batch
    j, n, total = ctx
    return j + n * jnp.arange(batch), total


def draw(fn, key, shape):
    """fn(key, shape) for a shape whose first axis is the batch, drawn as part of the large batch."""
    ctx = _ROWS.get()
    if ctx is None:
        return fn(key, tuple(shape))
    j, n, total = ctx
    full = fn(key, (total, *shape[1:]))
    return jax.lax.dynamic_index_in_dim(full.reshape(total // n, n, *shape[1:]), j, axis=1, keepdims=False)


def uniform(key, shape, dtype=jnp.float32):
    return draw(lambda k, s: jax.random.uniform(k, s, dtype), key, shape)


def randint(key, shape, low: int, high: int):
    return draw(lambda k, s: jax.random.randint(k, s, low, high), key, shape)
