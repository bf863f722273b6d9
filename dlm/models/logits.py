"""Vocabulary-sized work in chunks: logits that are computed a few tokens at a time.

At V = 126k and 16k tokens a batch, one float32 [B, L, V] tensor is 8 GB, and a loss that takes
a log-softmax, a softmax and a few products of it holds several. A denoiser built for a loss
(`dlm.objectives.denoiser`) therefore returns `LazyLogits`: the final hidden states and the
output head, not the logits. `per_token(fn, logits, *args)` flattens the B x L positions into
rows, and for each chunk of rows computes the chunk's logits [n, V] in float32 and calls
`fn(logits, *args)` on them; the chunk is rematerialised in the backward pass, so forward and
backward hold one chunk's vocabulary-sized temporaries at a time. Every objective computes its
per-token terms through `per_token`, and the same call on a plain logits array (a test's
reference denoiser, a sampler) computes them at once: one code path, two memory profiles.

Chunking runs over positions, not over the vocabulary: a chunk of n rows holds n x V floats
whatever V is, and n is chosen so that this stays near `chunk_bytes` (at V = 126k, 64 MB is
~130 rows).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_BYTES = 64 << 20
NEVER = -1e9  # the logit of a column that is never predicted: exp() underflows to 0, 0 * NEVER stays 0 (no inf * 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LazyLogits:
    """Logits [B, L, V] = hidden [B, L, d] @ head [d, >= V] (+ bias), cut to the first V columns,
    float32; column `never` (a mask id inside the vocabulary) is set to NEVER."""

    hidden: jax.Array
    head: jax.Array
    vocab_size: int = dataclasses.field(metadata=dict(static=True))
    rows: int = dataclasses.field(metadata=dict(static=True))  # rows per chunk
    bias: jax.Array | None = None  # [>= V] added to the logits (MDLM's output layer)
    never: int = dataclasses.field(default=-1, metadata=dict(static=True))  # a column never predicted (a mask id inside V)

    @property
    def shape(self):
        return (*self.hidden.shape[:-1], self.vocab_size)

    def __getitem__(self, index):
        """Positions of the logits (an index over the leading axes, e.g. [:, L:])."""
        return dataclasses.replace(self, hidden=self.hidden[index])

    def slice(self, start, n: int, axis: int = 1):
        """Positions [start, start + n) along `axis`, `start` traced or not."""
        return dataclasses.replace(self, hidden=jax.lax.dynamic_slice_in_dim(self.hidden, start, n, axis=axis))

    def compute(self, hidden):
        w = self.head.astype(hidden.dtype)
        y = jnp.matmul(hidden.reshape(-1, hidden.shape[-1]), w, preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias.astype(jnp.float32)
        y = y.reshape(*hidden.shape[:-1], w.shape[-1])[..., : self.vocab_size]
        if self.never >= 0:
            y = y.at[..., self.never].set(NEVER)
        return y

    def materialize(self):
        return self.compute(self.hidden)


def rows_for(vocab_size: int, rows: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk: `rows` when set, else as many float32 rows of V as fit in chunk_bytes."""
    return rows if rows > 0 else max(1, chunk_bytes // (4 * vocab_size))


def per_token(fn: Callable, logits, *args):
    """fn(logits [n, V] float32, *args [n, ...]) -> [n, ...] (or a tuple of such) over every
    position: args have the leading [B, L] axes of the logits and are cut the same way. Returns
    the results with leading [B, L] axes."""
    lead = logits.shape[:-1]
    N = 1
    for s in lead:
        N *= s
    flat = [jnp.broadcast_to(a, (*lead, *jnp.shape(a)[len(lead):])).reshape(N, *jnp.shape(a)[len(lead):]) for a in args]
    if not isinstance(logits, LazyLogits):
        out = fn(jnp.asarray(logits, jnp.float32).reshape(N, -1), *flat)
    elif logits.rows >= N:
        out = fn(logits.compute(logits.hidden.reshape(N, -1)), *flat)
    else:
        out = _chunked(fn, logits, N, flat)
    return jax.tree.map(lambda o: o.reshape(*lead, *o.shape[1:]), out)


def _chunked(fn, logits: LazyLogits, N: int, flat):
    """fn over the N rows in chunks of logits.rows -> results with a leading [N] axis.

    On a mesh whose batch is split (data x fsdp) the chunks run inside a shard_map over those
    axes: each device loops over its own rows with the head gathered once before the loop, and
    the head's gradient is summed over devices once, after it (left to XLA, a loop over
    consecutive rows sits on one device's shard, and the head's gradient is all-reduced in every
    chunk: a gigabyte per chunk at LLaDA's size)."""
    from dlm.mesh import batch_axes

    axes = batch_axes(N)
    if not axes:
        return _local_chunks(fn, logits, N, logits.hidden.reshape(N, -1), logits.head, flat)
    from jax.sharding import PartitionSpec as P

    rows = P(axes)
    # the head (and bias) go in as they are (float32 parameters), explicit inputs rather than
    # closures: each chunk casts the head to the compute dtype, so its gradient is summed over
    # the chunks and the devices in float32

    def local(h, w, b, *a):
        return _local_chunks(fn, dataclasses.replace(logits, bias=b), h.shape[0], h, w, a)

    return jax.shard_map(local, in_specs=(rows, P(), P(), *(rows for _ in flat)), out_specs=rows, axis_names=set(axes),
                         check_vma=False)(logits.hidden.reshape(N, -1), logits.head, logits.bias, *flat)


def _local_chunks(fn, logits: LazyLogits, N: int, hidden, head, flat):
    n = logits.rows
    chunks = -(-N // n)
    pad = chunks * n - N
    # the last chunk is filled up with copies of the last row (zeros could make a loss's inputs
    # singular, e.g. alpha = 0, and NaN times a zero cotangent is NaN)
    cut = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), mode="edge").reshape(chunks, n, *a.shape[1:])

    @jax.checkpoint
    def body(head, h, *a):
        return fn(dataclasses.replace(logits, head=head).compute(h), *a)

    out = jax.lax.map(lambda xs: body(head, *xs), (cut(hidden), *(cut(a) for a in flat)))
    return jax.tree.map(lambda o: o.reshape(chunks * n, *o.shape[2:])[:N], out)
