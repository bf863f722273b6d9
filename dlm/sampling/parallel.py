"""Parallel decoding for masked diffusion: one composable, compiled sampler.

The generation [P, P + G) after a prompt of P tokens is decoded in semi-autoregressive blocks of
`block_length`. Each step of a block:

1. logits of the block's positions from the denoiser (see *forward passes* below);
2. credit (CreditDecoding, optional): the block's credit table C [B, block, V] is decayed by beta
   and C[i, top1_i] += p_top1_i ** gamma at still-masked positions (top1 of the raw
   distribution), then the logits are fused: l + alpha * log(1 + C). C lives for one block;
3. a draw x_hat per position from the fused logits (argmax at temperature 0; float64 Gumbel
   noise optional) and a score from the fused distribution: confidence p(x_hat), margin p1 - p2,
   or exp(-entropy);
4. a commit rule over the still-masked positions: topk (the k best), threshold (every score > tau,
   and always the best: tau = 1 commits one per step) or factor (the longest prefix of the sorted
   scores with c_j >= 1 - f / (j + 1), at least one).

Forward passes:
- no cache: the whole sequence, bidirectional, every step;
- suffix dropout (DPad): only suffix positions d in [0, W) after the block may be attended, each
  kept with probability min(1, a * phi(k d / (W - 1))), drawn once per block from the block's
  key; they keep their true positions (RoPE). With a cache the model is fed only the block and
  the kept suffix, gathered into K_max slots (K_max = the expected count + 6 sd + 8, so a draw
  with more kept positions — odds below 1e-9 — loses its farthest ones); without a cache the
  dropped positions are masked out of attention (static shapes keep the full pass);
- prefix cache: at each block start a full pass (counted as a step) refreshes the keys/values of
  every position; the block's later steps feed [block | suffix] and read the prefix [0, start)
  from the cache (Fast-dLLM: the prefix keys were computed with a still-masked block, an
  approximation that the refresh bounds);
- dual cache: the suffix keys/values come from the same refresh, so later steps feed the block only.

Early termination (one policy for every method): once a block is complete, a row whose block
holds EOS is finished; its later positions are filled with EOS and it takes no more commits; the
loop ends when every row is finished. Everything is one jitted loop with static shapes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dlm.config import CommitRule, DecodeCache, DecodeConfig, Score
from dlm.models.attention import AttentionSpec


def keep_probabilities(dc: DecodeConfig) -> np.ndarray:
    """DPad keep probability of suffix offsets d = 0..W-1: min(1, a * phi(k d / (W - 1)))."""
    W = dc.window
    d = np.arange(W, dtype=np.float64)
    z = dc.k_sigma * d / max(W - 1, 1)
    return np.minimum(1.0, dc.scale * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))


def max_kept(dc: DecodeConfig) -> int:
    p = keep_probabilities(dc)
    return int(min(dc.window, math.ceil(p.sum() + 6 * math.sqrt((p * (1 - p)).sum()) + 8)))


def suffix_keep(key, dc: DecodeConfig, batch: int):
    """[B, W] bool: which suffix offsets are kept for this block."""
    return jax.random.uniform(key, (batch, dc.window)) < jnp.asarray(keep_probabilities(dc), jnp.float32)


def dpad_visible(start, keep, block_length: int, window: int, length: int):
    """[B, L] keys a pass may attend to under suffix dropout: everything before the block end, and
    the kept suffix offsets d = pos - end in [0, W)."""
    pos = jnp.arange(length)
    d = pos - (start + block_length)
    kept = jnp.take_along_axis(keep, jnp.broadcast_to(jnp.clip(d, 0, window - 1), (keep.shape[0], length)), axis=1)
    return (d < 0)[None] | ((d < window)[None] & kept)


def suffix_slots(start, keep, block_length: int, slots: int, length: int):
    """True positions [B, S] and validity of the suffix tokens fed after the block with a prefix
    cache: the kept offsets (nearest first) under suffix dropout (keep [B, W]), else every
    following position (keep None)."""
    end = start + block_length
    B = 1 if keep is None else keep.shape[0]
    if keep is not None:
        order = jnp.argsort(~keep, axis=1, stable=True)[:, :slots]
        valid = jnp.take_along_axis(keep, order, axis=1)
        p = end + order
    else:
        p = jnp.broadcast_to(end + jnp.arange(slots), (B, slots))
        valid = jnp.ones((B, slots), bool)
    valid = valid & (p < length)
    return jnp.minimum(p, length - 1), valid


def scores(logits, draw, kind: Score):
    """Score of each position from (fused) logits [B, n, V] and the drawn token [B, n]."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if kind == Score.CONFIDENCE:
        return jnp.take_along_axis(p, draw[..., None], axis=-1)[..., 0]
    if kind == Score.MARGIN:
        top2 = jax.lax.top_k(p, 2)[0]
        return top2[..., 0] - top2[..., 1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.exp(jnp.sum(p * logp, axis=-1))  # exp(-H) in (0, 1]


def commit_mask(score, masked, dc: DecodeConfig):
    """[B, n] bool: positions to commit this step (a subset of `masked`, at least one per row
    that has a masked position). Ties break towards the lower position."""
    s = jnp.where(masked, score, -jnp.inf)
    order = jnp.argsort(-s, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    if dc.rule == CommitRule.TOPK:
        n = jnp.full(s.shape[:1], dc.k)
    elif dc.rule == CommitRule.THRESHOLD:
        n = jnp.maximum((s > dc.tau).sum(-1), 1)
    else:
        srt = jnp.take_along_axis(s, order, axis=-1)
        j = jnp.arange(1, s.shape[-1] + 1)
        ok = srt >= 1.0 - dc.factor / (j + 1)
        n = jnp.maximum(jnp.cumprod(ok.astype(jnp.int32), axis=-1).sum(-1), 1)
    return masked & (rank < n[:, None])


def credit_update(credit, logits, masked, dc: DecodeConfig, first):
    """Decay (not on the first step of a block) and boost the raw top-1 at masked positions."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top = jnp.argmax(p, axis=-1)
    ptop = jnp.max(p, axis=-1)
    m = masked[..., None]
    credit = jnp.where(m & ~first, dc.credit_beta * credit, credit)
    boost = jax.nn.one_hot(top, p.shape[-1], dtype=jnp.float32) * (ptop ** dc.credit_gamma)[..., None]
    return credit + jnp.where(m, boost, 0.0)


def fuse(logits, credit, dc: DecodeConfig):
    return logits + dc.credit_alpha * jnp.log1p(credit)


class Passes:
    """The decoder's forward passes for one geometry (batch B, length L, block Bk, DPad window W,
    S suffix slots with a prefix cache)."""

    def __init__(self, model_fn, B, L, Bk, W, S, drop: bool, cache: DecodeCache, mask_id: int):
        self.model_fn, self.B, self.L, self.Bk, self.W, self.S = model_fn, B, L, Bk, W, S
        self.drop, self.cache, self.mask_id = drop, cache, mask_id
        self.pos = jnp.arange(L)

    def visible(self, start, keep):
        """[B, L] keys of a full pass: everything, or under DPad the prefix, block and kept suffix."""
        if not self.drop:
            return jnp.ones((self.B, self.L), bool)
        return dpad_visible(start, keep, self.Bk, self.W, self.L)

    def full(self, x, start, keep, return_kv):
        """Block logits [B, Bk, V] (and every position's keys/values) of a pass over the whole sequence."""
        B, L = self.B, self.L
        spec = AttentionSpec("explicit", jnp.broadcast_to(self.visible(start, keep)[:, None, None, :], (B, 1, L, L))) \
            if self.drop else AttentionSpec("full")
        out = self.model_fn(x, jnp.broadcast_to(self.pos, (B, L)), spec, None, return_kv)
        logits, kv = out if return_kv else (out, None)
        return jax.lax.dynamic_slice_in_dim(logits, start, self.Bk, axis=1).astype(jnp.float32), kv

    def cached(self, x, start, keep, ck, cv):
        """Block logits from the cache: prefix [0, start) read from it and [block | suffix slots]
        fed (prefix cache), or prefix and (kept) suffix read from it and the block fed (dual)."""
        B, L, Bk, S, pos = self.B, self.L, self.Bk, self.S, self.pos
        end = start + Bk
        blk = jax.lax.dynamic_slice_in_dim(x, start, Bk, axis=1)
        bpos = jnp.broadcast_to(start + jnp.arange(Bk), (B, Bk))
        if self.cache == DecodeCache.DUAL:
            cache_vis = (pos < start)[None] | (self.visible(start, keep) & (pos >= end)[None])
            mask = jnp.concatenate([jnp.broadcast_to(cache_vis[:, None, :], (B, Bk, L)), jnp.ones((B, Bk, Bk), bool)], axis=2)
            return self.model_fn(blk, bpos, AttentionSpec("explicit", mask[:, None]), (ck, cv), False).astype(jnp.float32)
        spos, svalid = suffix_slots(start, keep if self.drop else None, Bk, S, L)
        spos, svalid = jnp.broadcast_to(spos, (B, S)), jnp.broadcast_to(svalid, (B, S))
        toks = jnp.concatenate([blk, jnp.where(svalid, jnp.take_along_axis(x, spos, axis=1), self.mask_id)], axis=1)
        n = Bk + S
        cache_vis = jnp.broadcast_to((pos < start)[None, None], (B, n, L))
        own = jnp.concatenate([jnp.ones((B, Bk), bool), svalid], axis=1)
        mask = jnp.concatenate([cache_vis, jnp.broadcast_to(own[:, None, :], (B, n, n))], axis=2)
        logits = self.model_fn(toks, jnp.concatenate([bpos, spos], axis=1), AttentionSpec("explicit", mask[:, None]), (ck, cv), False)
        return logits[:, :Bk].astype(jnp.float32)


def parallel_decode(model_fn, x, prompt_len: int, key, dc: DecodeConfig, *, mask_id: int, eos_id: int, temperature: float,
                    float64: bool, kv_shape=None, kv_dtype=jnp.float32, trace: bool = False):
    """x [B, L] with the prompt in [0, prompt_len) and mask_id after it.

    model_fn(tokens, positions, attention, kv_cache, return_kv) -> logits | (logits, kv).
    kv_shape = (layers, B, L, H, D) for the caches. Returns a dict of tokens [B, L], nfe (forward
    passes of the batch: a block runs until its slowest row is done), row_nfe [B] (the passes each
    row needed: what decoding it alone would take), steps, finished [B] and, with trace, 'refresh_logits' [blocks, B, block, V] (the block
    logits of each block's first pass), 'block_inputs' [blocks, B, L] (x at each block start) and
    'keep' [blocks, B, W] (each block's suffix-dropout pattern)."""
    from dlm.sampling.api import categorical

    B, L = x.shape
    P, Bk = prompt_len, dc.block_length
    G = L - P
    nb = G // Bk
    pos = jnp.arange(L)
    cached = dc.cache != DecodeCache.NONE
    drop = dc.suffix_dropout
    W = dc.window
    if cached and not drop and dc.cache == DecodeCache.PREFIX:
        S = max(G - Bk, 0)  # every suffix position, in a static window after the block
    elif cached and drop and dc.cache == DecodeCache.PREFIX:
        S = min(max_kept(dc), max(G - Bk, 0))
    else:
        S = 0
    S = max(S, 1)  # one (masked-out) slot keeps the shapes simple

    ctx = Passes(model_fn, B, L, Bk, W, S, drop, dc.cache, mask_id)
    full_pass, cached_pass = ctx.full, ctx.cached

    def block_body(carry):
        b, x, done, nfe, row_nfe, steps, key, tr = carry
        start = P + b * Bk
        key, k_blk = jax.random.split(key)
        k_drop, k_loop = jax.random.split(k_blk)
        keep = suffix_keep(k_drop, dc, B) if drop else None
        V = mask_id
        x0 = x

        def step_body(c):
            it, x, credit, ck, cv, nfe, row_nfe, key, first_logits = c
            key, k_draw = jax.random.split(key)
            blk = jax.lax.dynamic_slice_in_dim(x, start, Bk, axis=1)
            masked = (blk == mask_id) & ~done[:, None]
            row_nfe = row_nfe + masked.any(-1).astype(jnp.int32)
            if cached:
                def refresh():
                    logits, kv = full_pass(x, start, keep, True)
                    return logits, kv[0].astype(ck.dtype), kv[1].astype(cv.dtype)

                logits, ck, cv = jax.lax.cond(it == 0, refresh, lambda: (cached_pass(x, start, keep, ck, cv), ck, cv))
            else:
                logits, _ = full_pass(x, start, keep, False)
            first_logits = jnp.where(it == 0, logits, first_logits) if trace else first_logits
            if dc.credit:
                credit = credit_update(credit, logits, masked, dc, it == 0)
                logits = fuse(logits, credit, dc)
            draw = categorical(k_draw, logits, temperature, float64)
            commit = commit_mask(scores(logits, draw, dc.score), masked, dc)
            x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(commit, draw, blk), start, axis=1)
            return it + 1, x, credit, ck, cv, nfe + 1, row_nfe, key, first_logits

        def more(c):
            it, x = c[0], c[1]
            blk = jax.lax.dynamic_slice_in_dim(x, start, Bk, axis=1)
            return (it < Bk) & ((blk == mask_id) & ~done[:, None]).any()

        credit = jnp.zeros((B, Bk, V) if dc.credit else (1, 1, 1), jnp.float32)
        ck = cv = jnp.zeros(kv_shape if cached else (1,) * 5, kv_dtype)
        fl = jnp.zeros((B, Bk, V) if trace else (1, 1, 1), jnp.float32)
        it, x, _, _, _, nfe, row_nfe, _, fl = jax.lax.while_loop(more, step_body,
                                                                 (jnp.int32(0), x, credit, ck, cv, nfe, row_nfe, k_loop, fl))
        if trace:
            kp = keep if drop else jnp.ones((B, W), bool)
            tr = tuple(jax.lax.dynamic_update_index_in_dim(a, v, b, axis=0) for a, v in zip(tr, (fl, x0, kp)))
        if dc.early_stop and eos_id >= 0:
            blk = jax.lax.dynamic_slice_in_dim(x, start, Bk, axis=1)
            finished = (blk == eos_id).any(-1) & ~done
            x = jnp.where(finished[:, None] & (pos >= start + Bk)[None], eos_id, x)
            done = done | finished
        return b + 1, x, done, nfe, row_nfe, steps + it, key, tr

    tr = ((jnp.zeros((nb, B, Bk, mask_id), jnp.float32), jnp.zeros((nb, B, L), x.dtype), jnp.zeros((nb, B, W), bool))
          if trace else jnp.zeros((1,)))
    init = (jnp.int32(0), x, jnp.zeros((B,), bool), jnp.int32(0), jnp.zeros((B,), jnp.int32), jnp.int32(0), key, tr)
    _, x, done, nfe, row_nfe, steps, _, tr = jax.lax.while_loop(lambda c: (c[0] < nb) & ~c[2].all(), block_body, init)
    out = {"tokens": x, "nfe": nfe, "row_nfe": row_nfe, "steps": steps, "finished": done}
    if trace:
        out["refresh_logits"], out["block_inputs"], out["keep"] = tr
    return out
