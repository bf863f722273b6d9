"""Parallel decoding for masked diffusion: one composable, compiled sampler.

The generation [P, P + G) after a prompt of P tokens (or the masked positions of an infill spec,
blocks over [P, L) where P is the given prefix) is decoded in semi-autoregressive blocks of
`block_length`. Each step of a block:

1. logits of the block's positions from the denoiser (see *forward passes* below);
2. credit (CreditDecoding, optional): the block's credit table C [B, block, V] is decayed by beta
   and C[i, top1_i] += p_top1_i ** gamma at still-masked positions (top1 of the raw
   distribution), then the logits are fused: l + alpha * log(1 + C). C lives for one block;
3. a draw x_hat per position from the fused logits (argmax at temperature 0; float64 Gumbel
   noise optional) and a score from the fused distribution: confidence p(x_hat), top1 p1 (the same
   at temperature 0), margin p1 - p2, or exp(-entropy). At temperature > 0 they differ in kind:
   - confidence (LLaDA's and Fast-dLLM's rule) lets the draw decide: a position whose draw landed
     on an unlikely token waits and is drawn again. Threshold commits are then near-certain
     tokens, so the tokens committed together agree with each other, but commits lean towards
     each position's mode, and one token per step on a weak model collapses onto its most
     predictable token (whitespace for the byte-level corpus model);
   - top1, margin and entropy look at the distribution only, so one token per step commits exact
     draws from it; but a position passing a threshold on them commits whatever was drawn (up to
     1 - tau of the time not its mode), independently of the others committed with it, which
     costs coherence (the true NLL of Markov samples at tau 0.9 rises sharply);
4. a commit rule over the still-masked positions: topk (the k best), threshold (every score > tau,
   and always the best: tau = 1 commits one per step) or factor (the longest prefix of the sorted
   scores with c_j >= 1 - f / (j + 1), at least one).

Forward passes:
- no cache: the whole sequence, bidirectional, every step;
- suffix dropout (DPad): only suffix positions d in [0, W) after the block may be attended, each
  kept with probability min(1, a * phi(k d / (W - 1))), drawn once per block from the block's
  key; they keep their true positions (RoPE). A full pass feeds a canvas of the first Lc
  positions (Lc the smallest of a few static lengths that holds the block: prompt, decoded
  tokens and block; lax.switch picks the compiled one) and the kept suffix gathered into K_max
  slots (K_max = the expected count + 4 sd + 2: a draw with more kept positions, odds about 2e-6
  per block at the defaults, loses its farthest ones), so a pass costs what the decoded length
  costs, not L; a cached step feeds the block and those slots (prefix cache) or the block alone;
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

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dlm.config import CommitRule, DecodeCache, DecodeConfig, Score
from dlm.models.attention import FULL, visible_keys
from dlm.models.logits import LazyLogits
from dlm.sampling.draws import categorical


def keep_probabilities(dc: DecodeConfig) -> np.ndarray:
    """DPad keep probability of suffix offsets d = 0..W-1: min(1, a * phi(k d / (W - 1)))."""
    W = dc.window
    d = np.arange(W, dtype=np.float64)
    z = dc.k_sigma * d / max(W - 1, 1)
    return np.minimum(1.0, dc.scale * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))


def max_kept(dc: DecodeConfig) -> int:
    p = keep_probabilities(dc)
    return int(min(dc.window, math.ceil(p.sum() + 4 * math.sqrt((p * (1 - p)).sum()) + 2)))


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
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    if kind == Score.TOP1:
        return jnp.max(p, axis=-1)
    if kind == Score.CONFIDENCE:
        return jnp.take_along_axis(p, draw[..., None], axis=-1)[..., 0]
    if kind == Score.MARGIN:
        top2 = jax.lax.top_k(p, 2)[0]
        return top2[..., 0] - top2[..., 1]
    return jnp.exp(jnp.sum(p * logp, axis=-1))  # exp(-H) in (0, 1]


def commit_logit(score, tau, kappa: float):
    """The stochastic threshold rule's log-odds of committing a position of this score: it commits
    with probability sigmoid(commit_logit) (what the trace estimator scores)."""
    return (score - tau) / kappa


def commit_mask(score, masked, dc: DecodeConfig, tau=None, u=None):
    """[B, n] bool: positions to commit this step (a subset of `masked`, at least one per row
    that has a masked position). Ties break towards the lower position. `tau` (traced, e.g. one
    per row of the serving engine) replaces dc.tau. With dc.commit_temperature > 0 the threshold
    rule is stochastic: each masked position commits when its uniform draw u [B, n] falls below
    sigmoid(commit_logit(score)), and the best one commits when none does."""
    s = jnp.where(masked, score, -jnp.inf)
    order = jnp.argsort(-s, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    if dc.rule == CommitRule.THRESHOLD and dc.commit_temperature > 0:
        p = jax.nn.sigmoid(commit_logit(score, dc.tau if tau is None else tau, dc.commit_temperature))
        take = masked & (u < p)
        return take | (masked & (rank == 0) & ~take.any(-1, keepdims=True))
    if dc.rule == CommitRule.TOPK:
        n = jnp.full(s.shape[:1], dc.k)
    elif dc.rule == CommitRule.THRESHOLD:
        n = jnp.maximum((s > (dc.tau if tau is None else tau)).sum(-1), 1)
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


def block_logits(logits, start, n: int):
    """Float32 logits of positions [start, start + n): cut from an array, or computed for those
    rows only from LazyLogits (the head is then applied to the block, not the whole canvas)."""
    if isinstance(logits, LazyLogits):
        return logits.slice(start, n).materialize()
    return jax.lax.dynamic_slice_in_dim(logits, start, n, axis=1).astype(jnp.float32)


class Passes:
    """The decoder's forward passes for one geometry: batch B, sequence length L, block Bk, DPad
    window W, S suffix slots and, under suffix dropout, a canvas of the first Lc positions.

    Without suffix dropout a full pass feeds the whole sequence. With it, a full pass feeds the
    canvas x[:, :Lc] (Lc >= the block end: the prompt, decoded tokens and the block, then
    padding that no query attends to) followed by the kept suffix gathered into S slots at their
    true positions, so its cost follows the decoded length rather than L.

    `valid` (traced [B] or None): each row's own sequence length; keys at or after it are hidden
    from every pass, so a row in a longer canvas computes what it computes alone (the serving
    engine's rows of different lengths)."""

    def __init__(self, model_fn, B, L, Bk, W, S, drop: bool, cache: DecodeCache, mask_id: int, Lc: int | None = None,
                 shift: bool = False, valid=None):
        self.model_fn, self.B, self.L, self.Bk, self.W, self.S = model_fn, B, L, Bk, W, S
        self.drop, self.cache, self.mask_id, self.shift, self.valid = drop, cache, mask_id, shift, valid
        self.Lc = L if Lc is None else Lc
        self.gather = drop and self.Lc + S < L  # else a full-length pass with the dropped suffix masked out is smaller
        self.pos = jnp.arange(L)

    def visible(self, start, keep):
        """[B, L] keys a masked full-length pass may attend to: everything, or under DPad the
        prefix, block and kept suffix."""
        inside = jnp.ones((self.B, self.L), bool) if self.valid is None else self.pos[None] < self.valid[:, None]
        if not self.drop:
            return inside
        return dpad_visible(start, keep, self.Bk, self.W, self.L) & inside

    def slots(self, start, keep):
        """The block's suffix slots (true positions and validity [B, S]): the kept offsets under
        DPad, else the positions after the block. Computed once per block."""
        spos, svalid = suffix_slots(start, keep if self.drop else None, self.Bk, self.S, self.L)
        if self.valid is not None:
            svalid = svalid & (spos < self.valid[:, None])
        return jnp.broadcast_to(spos, (self.B, self.S)), jnp.broadcast_to(svalid, (self.B, self.S))

    def canvas(self, x, start, keep, slots=None):
        """Tokens, true positions and key visibility [B, N] of a full pass: the sequence (N = L),
        or under DPad the canvas and the kept suffix slots (N = Lc + S)."""
        B = self.B
        if not self.gather:
            return x, jnp.broadcast_to(self.pos, x.shape), self.visible(start, keep)
        cpos = jnp.arange(self.Lc)
        spos, svalid = self.slots(start, keep) if slots is None else slots
        toks = jnp.concatenate([x[:, :self.Lc], jnp.where(svalid, jnp.take_along_axis(x, spos, axis=1), self.mask_id)], axis=1)
        positions = jnp.concatenate([jnp.broadcast_to(cpos, (B, self.Lc)), spos], axis=1)
        vis = jnp.concatenate([jnp.broadcast_to(cpos < start + self.Bk, (B, self.Lc)), svalid], axis=1)
        return toks, positions, vis

    def full(self, x, start, keep, return_kv, slots=None):
        """Block logits [B, Bk, V] (and the keys/values of every fed position) of a full pass."""
        toks, positions, vis = self.canvas(x, start, keep, slots)
        spec = visible_keys(vis) if self.drop or self.valid is not None else FULL
        out = self.model_fn(toks, positions, spec, None, return_kv)
        logits, kv = out if return_kv else (out, None)
        return block_logits(logits, start, self.Bk), kv

    def cache_length(self):
        """Positions the cache holds: the prefix region of the fed sequence (prefix cache) or all
        of it (dual cache)."""
        if self.cache == DecodeCache.DUAL:
            return self.Lc + self.S if self.gather else self.L
        return self.Lc if self.drop else self.L

    def cached(self, x, start, keep, ck, cv, slots=None):
        """Block logits from the cache: prefix [0, start) read from it and [block | suffix slots]
        fed (prefix cache), or prefix and (kept) suffix read from it and the block fed (dual).

        A shifted model (Dream: position i is predicted from position i - 1) also gets the
        position before the block as a query: its key stays hidden (the cache holds it), so it
        computes the hidden state the full pass computes, and the block's logits are the fed
        outputs 1..Bk."""
        B, Bk = self.B, self.Bk
        end = start + Bk
        C = ck.shape[2]
        cpos = jnp.arange(C)
        blk = jax.lax.dynamic_slice_in_dim(x, start, Bk, axis=1)
        bpos = jnp.broadcast_to(start + jnp.arange(Bk), (B, Bk))
        bvis = jnp.ones((B, Bk), bool)
        if self.shift:
            before = jnp.maximum(start - 1, 0)
            blk = jnp.concatenate([jax.lax.dynamic_slice_in_dim(x, before, 1, axis=1), blk], axis=1)
            bpos = jnp.concatenate([jnp.full((B, 1), before), bpos], axis=1)
            bvis = jnp.concatenate([jnp.zeros((B, 1), bool), bvis], axis=1)
        first = 1 if self.shift else 0
        spos, svalid = self.slots(start, keep) if slots is None else slots
        if self.cache == DecodeCache.DUAL:
            if self.gather:  # the cache is the canvas then the suffix slots
                cache_vis = jnp.concatenate([jnp.broadcast_to(cpos[:self.Lc] < start, (B, self.Lc)), svalid], axis=1)
            else:
                cache_vis = (cpos < start)[None] | (self.visible(start, keep) & (cpos >= end)[None])
            vis = jnp.concatenate([jnp.broadcast_to(cache_vis, (B, C)), bvis], axis=1)
            return block_logits(self.model_fn(blk, bpos, visible_keys(vis), (ck, cv), False), first, Bk)
        toks = jnp.concatenate([blk, jnp.where(svalid, jnp.take_along_axis(x, spos, axis=1), self.mask_id)], axis=1)
        vis = jnp.concatenate([jnp.broadcast_to(cpos < start, (B, C)), bvis, svalid], axis=1)
        logits = self.model_fn(toks, jnp.concatenate([bpos, spos], axis=1), visible_keys(vis), (ck, cv), False)
        return block_logits(logits, first, Bk)


def canvas_sizes(L: int, first_end: int, block_length: int, buckets: int = 16) -> list[int]:
    """Static canvas lengths under suffix dropout: multiples of a granularity g (about L / buckets,
    rounded up to a multiple of the block length), capped at L, from the first that holds the
    first block's end. A block ending at e runs on the smallest one >= e."""
    def cdiv(a, b):
        return -(-a // b)

    g = cdiv(cdiv(L, buckets), block_length) * block_length
    return [min(L, j * g) for j in range(cdiv(first_end, g), cdiv(L, g) + 1)]


def suffix_slot_count(dc: DecodeConfig, G: int) -> int:
    """S, the static suffix slots of a generation of G positions: the kept suffix under suffix
    dropout, every position after the block with a prefix cache, else one masked-out slot."""
    Bk = dc.block_length
    if dc.suffix_dropout:
        S = min(max_kept(dc), max(G - Bk, 0))
    elif dc.cache == DecodeCache.PREFIX:
        S = max(G - Bk, 0)
    else:
        S = 0
    return max(S, 1)  # one (masked-out) slot keeps the shapes simple


def decode_block(model_fn, x, start, given, done, key, dc: DecodeConfig, *, sizes, S: int, mask_id: int, eos_id: int,
                 temperature, float64: bool, kv_dtype, V: int, shift: bool, trace: bool = False, valid=None, tau=None,
                 order=None, base=None):
    """Decode the block [start, start + block_length) of every row of x [B, L] (rows `done` take
    no commits): its steps until no masked position is left, then early termination. `key` is
    the block's key; `sizes` the static canvas lengths (one: no canvas); `valid` [B] each row's
    own length and `tau` a traced threshold (the serving engine's rows). Returns (x, done,
    passes, row_passes [B], first-pass logits (with trace), the suffix-dropout pattern or None);
    with `order` [B, L] (int32) and `base` [B] (the passes each row made before this block) one
    more entry: `order` with each position committed here set to the index of the row's pass
    that committed it (its decoding trace)."""
    B, L = x.shape
    Bk, W = dc.block_length, dc.window
    pos = jnp.arange(L)
    cached = dc.cache != DecodeCache.NONE
    drop = dc.suffix_dropout
    k_drop, k_loop = jax.random.split(key)
    keep = suffix_keep(k_drop, dc, B) if drop else None

    def run_block(Lc, x, k_loop):
        """The block's steps on a canvas of Lc positions (L without suffix dropout)."""
        ctx = Passes(model_fn, B, L, Bk, W, S, drop, dc.cache, mask_id, Lc=Lc, shift=shift, valid=valid)
        slots = ctx.slots(start, keep)

        def step(c, logits_fn):
            it, x, credit, ck, cv, row_nfe, key, first_logits, order = c
            key, k_draw = jax.random.split(key)
            blk = jax.lax.dynamic_slice_in_dim(x, start, Bk, axis=1)
            masked = (blk == mask_id) & ~done[:, None]
            row_nfe = row_nfe + masked.any(-1).astype(jnp.int32)
            logits, ck, cv = logits_fn(x, ck, cv)
            first_logits = jnp.where(it == 0, logits, first_logits) if trace else first_logits
            if dc.credit:
                credit = credit_update(credit, logits, masked, dc, it == 0)
                logits = fuse(logits, credit, dc)
            draw = categorical(k_draw, logits, temperature, float64)
            u = jax.random.uniform(jax.random.fold_in(k_draw, 1), masked.shape) if dc.commit_temperature > 0 else None
            commit = commit_mask(scores(logits, draw, dc.score), masked, dc, tau, u)
            x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(commit, draw, blk), start, axis=1)
            if order is not None:
                ob = jax.lax.dynamic_slice_in_dim(order, start, Bk, axis=1)
                ob = jnp.where(commit, (base + row_nfe - 1)[:, None], ob)
                order = jax.lax.dynamic_update_slice_in_dim(order, ob, start, axis=1)
            return it + 1, x, credit, ck, cv, row_nfe, key, first_logits, order

        def full(x, ck, cv):
            return ctx.full(x, start, keep, False, slots)[0], ck, cv

        def refresh(x, ck, cv):  # a cached block's first step: a full pass, which also builds the cache
            logits, kv = ctx.full(x, start, keep, True, slots)
            C = ctx.cache_length()
            return logits, kv[0][:, :, :C].astype(kv_dtype), kv[1][:, :, :C].astype(kv_dtype)

        def from_cache(x, ck, cv):
            return ctx.cached(x, start, keep, ck, cv, slots), ck, cv

        first, later = (refresh, from_cache) if cached else (full, full)

        def more(c):
            it, x = c[0], c[1]
            blk = jax.lax.dynamic_slice_in_dim(x, start, Bk, axis=1)
            return (it < Bk) & ((blk == mask_id) & ~done[:, None]).any()

        # the first step always runs (it builds the cache, None without one); a row with nothing
        # masked in the block commits nothing in it and is not counted in its row_nfe
        credit = jnp.zeros((B, Bk, V) if dc.credit else (1, 1, 1), jnp.float32)
        fl = jnp.zeros((B, Bk, V) if trace else (1, 1, 1), jnp.float32)
        c = step((jnp.int32(0), x, credit, None, None, jnp.zeros((B,), jnp.int32), k_loop, fl, order0), first)
        it, x, _, _, _, row_nfe, _, fl, order = jax.lax.while_loop(more, lambda c: step(c, later), c)
        return it, x, row_nfe, fl, order

    order0 = order
    if len(sizes) == 1:
        it, x, row_nfe, fl, order = run_block(sizes[0], x, k_loop)
    else:  # the smallest canvas that holds the block
        which = (start + Bk > jnp.asarray(sizes)).sum()
        it, x, row_nfe, fl, order = jax.lax.switch(which, [functools.partial(run_block, Lc) for Lc in sizes], x, k_loop)
    if dc.early_stop and eos_id >= 0:
        blk = jax.lax.dynamic_slice_in_dim(x, start, Bk, axis=1)
        finished = (blk == eos_id).any(-1) & ~done
        x = jnp.where(finished[:, None] & (pos >= start + Bk)[None] & ~given, eos_id, x)
        done = done | finished
    if order is not None:
        return x, done, it, row_nfe, fl, keep, order
    return x, done, it, row_nfe, fl, keep


def parallel_decode(model_fn, x, prompt_len: int, key, dc: DecodeConfig, *, mask_id: int, eos_id: int, temperature: float,
                    float64: bool, kv_dtype=jnp.float32, trace: bool = False, vocab_size: int | None = None,
                    shift: bool = False, commit_steps: bool = False):
    """x [B, L] with mask_id at the positions to fill and given tokens everywhere else (a prompt
    prefix, or any set of fixed positions: infill). Blocks start at `prompt_len` (the given prefix
    common to all rows, P) and tile [P, L); when block_length does not divide L - P the last block
    is aligned to the end of the sequence (it overlaps the one before, whose positions are already
    decoded). Within a block only masked positions are scored and committed; given tokens stay.

    model_fn(tokens, positions, attention, kv_cache, return_kv) -> logits | (logits, kv), where logits may be
    LazyLogits (dlm.models.logits: only the block's rows are then computed); `shift`:
    the model predicts position i from position i - 1 (Dream), which cached passes account for.
    kv_dtype: the caches' dtype (their shapes follow the passes). Returns a dict of tokens [B, L], nfe (forward
    passes of the batch: a block runs until its slowest row is done), row_nfe [B] (the passes each
    row needed: what decoding it alone would take), steps, finished [B] and, with trace, 'refresh_logits' [blocks, B, block, V] (the block
    logits of each block's first pass), 'block_inputs' [blocks, B, L] (x at each block start) and
    'keep' [blocks, B, W] (each block's suffix-dropout pattern); with commit_steps, 'commit_step' [B, L]
    (int32: the index of the row's pass that committed each position, -1 where given or never
    decoded: the decoding trace)."""
    B, L = x.shape
    P, Bk = prompt_len, dc.block_length
    G = L - P
    nb = -(-G // Bk)
    given = x != mask_id
    W = dc.window
    S = suffix_slot_count(dc, G)
    V = mask_id if vocab_size is None else vocab_size  # logit columns
    sizes = canvas_sizes(L, P + Bk, Bk) if dc.suffix_dropout else [L]
    settings = dict(sizes=sizes, S=S, mask_id=mask_id, eos_id=eos_id, temperature=temperature, float64=float64,
                    kv_dtype=kv_dtype, V=V, shift=shift, trace=trace)

    def block_body(carry):
        b, x, done, nfe, row_nfe, steps, key, tr, order = carry
        start = jnp.minimum(P + b * Bk, L - Bk)
        key, k_blk = jax.random.split(key)
        x0 = x
        if commit_steps:
            x, done, it, rn, fl, keep, order = decode_block(model_fn, x, start, given, done, k_blk, dc, **settings,
                                                            order=order, base=row_nfe)
        else:
            x, done, it, rn, fl, keep = decode_block(model_fn, x, start, given, done, k_blk, dc, **settings)
        if trace:
            kp = keep if dc.suffix_dropout else jnp.ones((B, W), bool)
            tr = tuple(jax.lax.dynamic_update_index_in_dim(a, v, b, axis=0) for a, v in zip(tr, (fl, x0, kp)))
        return b + 1, x, done, nfe + it, row_nfe + rn, steps + it, key, tr, order

    tr = ((jnp.zeros((nb, B, Bk, V), jnp.float32), jnp.zeros((nb, B, L), x.dtype), jnp.zeros((nb, B, W), bool))
          if trace else jnp.zeros((1,)))
    order = jnp.full((B, L), -1, jnp.int32) if commit_steps else None
    init = (jnp.int32(0), x, jnp.zeros((B,), bool), jnp.int32(0), jnp.zeros((B,), jnp.int32), jnp.int32(0), key, tr, order)
    _, x, done, nfe, row_nfe, steps, _, tr, order = jax.lax.while_loop(lambda c: (c[0] < nb) & ~c[2].all(), block_body, init)
    out = {"tokens": x, "nfe": nfe, "row_nfe": row_nfe, "steps": steps, "finished": done}
    if commit_steps:
        out["commit_step"] = order
    if trace:
        out["refresh_logits"], out["block_inputs"], out["keep"] = tr
    return out
