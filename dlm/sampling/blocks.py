"""Block decoding with commit rules: block-diffusion models (the block hyperschedule: SDAR,
Fast-dLLM v2, LLaDA2) decoded block by block, each block by the parallel decoder's scores and
commit rules (dlm.sampling.parallel), with a KV cache of the settled blocks.

The model's attention is block-causal (blocks of `block_width` columns from column 0): a block
sees itself and the blocks before it, never a later one. So once a block is decoded its keys
and values are final, and a cache of them is exact. The loop:

1. prefill: the prompt's whole blocks are run once and their keys/values written;
2. for each block (or each sub-block of `sub` columns inside it, left to right, Fast-dLLM v2's
   sub-blocks: the model still sees the whole block, later sub-blocks masked) the parallel
   decoder's step repeats until no position of the (sub-)block is masked: the block's logits from
   one pass (the block as queries over the settled cache and itself), optional trace credit, a
   draw, a score (confidence, top1, margin, entropy) and a commit rule (top-k, threshold,
   factor) over the masked positions of the (sub-)block;
3. when a block is done, its keys/values are written into the cache by the first pass of the
   next block (one pass over [finished block | next block], block-causal: what SDAR's extra
   "store" forward computes, without a pass of its own);
4. early stop: once a row's finished block holds EOS, its later positions become EOS and it
   takes no more commits; the loop ends when every row is finished.

`cache=False` runs every step as a full pass over the canvas with the block-causal mask (the
reference the cache is tested against). Left padding (rows of different prompt lengths, length
buckets) must be whole blocks; padded keys are hidden and draws are keyed by position past the
padding, so a padded row decodes what it decodes alone.

A shifted model (`ar_heads`: Fast-dLLM v2, whose position i is predicted from i - 1) decodes the
first token of each block autoregressively, as Fast-dLLM v2 does: once a block is done, one pass
over it (which writes its keys/values) also gives the next block's first token, drawn from the
last position's output and committed at once; the block's other positions then follow the
commit rule, each predicted from the position before it in the block. With a prompt that ends
on a block boundary, the prefill pass gives the first token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlm.config import DecodeConfig
from dlm.models.attention import rule
from dlm.sampling.draws import categorical_at, position_keys
from dlm.sampling.parallel import commit_mask, credit_update, fuse, scores


def _block_rule(q, k):
    """A query sees the keys of its own block or earlier (cache keys carry their block)."""
    return k["blk"] <= q["blk"]


def _fed_rule(q, k):
    """Fed queries see visible keys of their own block or earlier."""
    return k["visible"] & (k["blk"] <= q["blk"])


def block_decode(model_fn, x, fixed, key, dc: DecodeConfig, *, block_width: int, sub: int, prompt_len: int, mask_id: int,
                 eos_id: int, kv_shape, kv_dtype, temperature, float64: bool, cache: bool = True, pad=None,
                 ar_heads: bool = False):
    """x [B, L] (mask_id where to generate, the prompt [0, prompt_len) given: rows left-padded to
    it), fixed [B, L] the given positions. model_fn(tokens, positions, attention, kv_cache,
    return_kv) -> logits | (logits, kv), positions being canvas columns; a model_fn behind left
    padding hides the padded keys itself (dlm.sampling.generate.Padded), `pad` [B] keys the draws. Returns a dict of tokens,
    nfe (forward passes of the batch, prefill included), row_nfe [B] (the denoising passes each
    row took part in), cache_writes (passes that wrote keys/values) and finished [B]."""
    B, L = x.shape
    bw, P = block_width, prompt_len
    cols = jnp.arange(L)
    x = jnp.where(fixed, x, mask_id)
    first_unit = P // sub  # the first (sub-)block with something to generate (the prompt's tail shares it)
    units = -(-L // sub)
    prefill = (P // bw) * bw  # the prompt's whole blocks
    ck = cv = jnp.zeros(kv_shape if cache else (1,) * 5, kv_dtype)

    def pass_full(x):
        """Logits of every position, block-causal (no cache)."""
        spec = rule(_block_rule, {"blk": cols // bw}, {"blk": cols // bw})
        return model_fn(x, jnp.broadcast_to(cols, (B, L)), spec, None, False)

    def pass_fed(x, ck, cv, start, n, written):
        """The n columns [start, start + n) as queries over the cache (keys below `written`) and
        themselves block-causally. Returns (logits of the n columns [B, n, V], (k, v) of them)."""
        q_cols = start + jnp.arange(n)
        keys = {"blk": jnp.concatenate([cols // bw, q_cols // bw]),
                "visible": jnp.concatenate([cols < written, jnp.ones((n,), bool)])}
        logits, (k, v) = model_fn(jax.lax.dynamic_slice_in_dim(x, start, n, axis=1), jnp.broadcast_to(q_cols, (B, n)),
                                  rule(_fed_rule, {"blk": q_cols // bw}, keys), (ck, cv), True)
        return logits.astype(jnp.float32), (k, v)

    nfe = jnp.int32(0)
    writes = jnp.int32(0)

    def head_commit(x, logits, column, key):
        """Commit every row's draw from logits [B, V] at `column` where it is masked (AR heads)."""
        draw = categorical_at(position_keys(key, (B, 1, column), pad), logits[:, None], temperature, float64)[:, 0]
        at = cols[None] == column
        return jnp.where(at & (x == mask_id) & ~fixed, draw[:, None], x)

    if cache and prefill:
        # static start 0: the prompt's whole blocks (and, for AR heads, the first masked column after them)
        head = ar_heads and prefill == P and P < L
        logits, (k, v) = pass_fed(x, ck, cv, 0, prefill + head, 0)
        ck, cv = ck.at[:, :, :prefill].set(k[:, :, :prefill].astype(kv_dtype)), cv.at[:, :, :prefill].set(v[:, :, :prefill].astype(kv_dtype))
        nfe, writes = nfe + 1, writes + 1
        if head:
            x = head_commit(x, logits[:, prefill], prefill, jax.random.fold_in(key, 1 << 30))

    def block_logits(x, ck, cv, u, pending):
        """Logits [B, bw, V] of unit u's model block; with the cache, the pending finished block
        (its start, or -1) is written in the same pass. Returns (logits, ck, cv, wrote)."""
        b0 = (u * sub) // bw * bw
        if not cache:
            full = pass_full(x)
            return jax.lax.dynamic_slice_in_dim(full, b0, bw, axis=1).astype(jnp.float32), ck, cv, jnp.bool_(False)

        def plain():
            logits, _ = pass_fed(x, ck, cv, b0, bw, b0)
            return logits, ck, cv

        def with_write():
            logits, (k, v) = pass_fed(x, ck, cv, pending, 2 * bw, pending)
            ck2 = jax.lax.dynamic_update_slice_in_dim(ck, k[:, :, :bw].astype(kv_dtype), pending, axis=2)
            cv2 = jax.lax.dynamic_update_slice_in_dim(cv, v[:, :, :bw].astype(kv_dtype), pending, axis=2)
            return logits[:, bw:], ck2, cv2

        logits, ck, cv = jax.lax.cond(pending >= 0, with_write, plain)
        return logits, ck, cv, pending >= 0

    def head_step(c):
        """AR heads: one pass over the finished block before b0 (writing its keys/values) whose last
        output gives column b0's token."""
        x, ck, cv, pending, nfe, writes, b0, k_head = c
        if cache:
            logits, (k, v) = pass_fed(x, ck, cv, b0 - bw, bw + 1, b0 - bw)
            ck = jax.lax.dynamic_update_slice_in_dim(ck, k[:, :, :bw].astype(kv_dtype), b0 - bw, axis=2)
            cv = jax.lax.dynamic_update_slice_in_dim(cv, v[:, :, :bw].astype(kv_dtype), b0 - bw, axis=2)
            out, writes = logits[:, bw], writes + 1
        else:
            out = jax.lax.dynamic_index_in_dim(pass_full(x), b0, axis=1, keepdims=False).astype(jnp.float32)
        return head_commit(x, out, b0, k_head), ck, cv, jnp.int32(-1), nfe + 1, writes, b0, k_head

    def unit_body(carry):
        u, x, ck, cv, done, pending, nfe, writes, row_nfe, key = carry
        s = jnp.minimum(u * sub, L - sub)
        b0 = s // bw * bw
        key, k_unit = jax.random.split(key)
        off = s - b0  # the unit's columns inside its model block
        if ar_heads:
            first = jax.lax.dynamic_index_in_dim(x, b0, axis=1, keepdims=False)
            need = (off == 0) & (b0 > 0) & ((first == mask_id) & ~done).any()
            c = (x, ck, cv, pending, nfe, writes, b0, jax.random.fold_in(k_unit, 1 << 30))
            x, ck, cv, pending, nfe, writes, _, _ = jax.lax.cond(need, head_step, lambda c: c, c)

        def step(c):
            it, x, ck, cv, credit, pending, nfe, writes, row_nfe = c
            blk = jax.lax.dynamic_slice_in_dim(x, b0, bw, axis=1)
            inside = (jnp.arange(bw) >= off) & (jnp.arange(bw) < off + sub)
            masked = (blk == mask_id) & inside[None] & ~done[:, None]
            row_nfe = row_nfe + masked.any(-1).astype(jnp.int32)
            logits, ck, cv, wrote = block_logits(x, ck, cv, u, pending)
            if dc.credit:
                credit = credit_update(credit, logits, masked, dc, it == 0)
                logits = fuse(logits, credit, dc)
            keys = position_keys(jax.random.fold_in(k_unit, it), (B, bw, b0), pad)
            draw = categorical_at(keys, logits, temperature, float64)
            coin = jax.vmap(jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1))))(keys) if dc.commit_temperature > 0 else None
            commit = commit_mask(scores(logits, draw, dc.score), masked, dc, u=coin)
            x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(commit, draw, blk), b0, axis=1)
            return (it + 1, x, ck, cv, credit, jnp.where(wrote, -1, pending), nfe + 1, writes + wrote.astype(jnp.int32),
                    row_nfe)

        def more(c):
            it, x = c[0], c[1]
            blk = jax.lax.dynamic_slice_in_dim(x, s, sub, axis=1)
            return (it < sub) & ((blk == mask_id) & ~done[:, None]).any()

        credit = jnp.zeros((B, bw, logits_width) if dc.credit else (1, 1, 1), jnp.float32)
        c = (jnp.int32(0), x, ck, cv, credit, pending, nfe, writes, row_nfe)
        _, x, ck, cv, _, pending, nfe, writes, row_nfe = jax.lax.while_loop(more, step, c)
        block_done = (s + sub) % bw == 0
        if eos_id >= 0 and dc.early_stop:
            blk = jax.lax.dynamic_slice_in_dim(x, b0, bw, axis=1)
            finished = block_done & (blk == eos_id).any(-1) & ~done
            x = jnp.where(finished[:, None] & (cols >= b0 + bw)[None] & ~fixed, eos_id, x)
            done = done | finished
        pending = jnp.where(block_done, b0, pending)  # written by the next block's first pass
        return u + 1, x, ck, cv, done, pending, nfe, writes, row_nfe, key

    logits_width = jax.eval_shape(lambda: block_logits(x, ck, cv, jnp.int32(first_unit), jnp.int32(-1))[0]).shape[-1]
    init = (jnp.int32(first_unit), x, ck, cv, jnp.zeros((B,), bool), jnp.int32(-1), nfe, writes, jnp.zeros((B,), jnp.int32),
            key)
    _, x, _, _, done, _, nfe, writes, row_nfe, _ = jax.lax.while_loop(lambda c: (c[0] < units) & ~c[4].all(), unit_body, init)
    return {"tokens": x, "nfe": nfe, "row_nfe": row_nfe, "cache_writes": writes, "finished": done}
