"""Hyperschedules: a noise level per token position at every step of generation.

A hyperschedule is a table tau[n, i] in [0, 1] for steps n = 0..N and positions i = 0..L-1:
tau[0] = 1 (all noise), tau[N] = 0 (all clean), non-increasing in n. Step n denoises from
tau[n] to tau[n + 1]. At step n a position is
- settled: tau[n, i] = 0 (clean context; its keys/values never change again, so they cache),
- future:  tau[n, i] = tau[n + 1, i] = 1 (not started; hidden from every query),
- active:  otherwise (being denoised).
MDLM is the flat hyperschedule, an autoregressive LM the quenched one (w = 1), block
diffusion the block one. The per-step NELBO term of a token masked at tau[n, i] is the
probability that it is revealed in this step, (alpha(tau[n+1, i]) - alpha(tau[n, i])) /
(1 - alpha(tau[n, i])), times its cross-entropy; the NELBO is the sum over steps.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from dlm.config import ConfigError
from dlm.config import HyperscheduleKind as Kind  # one enum for the config and the tables
from dlm.diffusion import batch

SETTLED, ACTIVE, FUTURE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Hyperschedule:
    """`kind` over `length` positions; `width` is the block / window width, `steps` the steps per
    block (block, block_slide) or in all (flat). block_slide is the block+slide hybrid: blocks of
    `width` each denoised over `steps` steps, block b starting at step b * stride (stride =
    steps // 2 by default), so consecutive blocks overlap like a slide while settling whole blocks."""

    kind: Kind
    length: int
    width: int = 1
    steps: int = 16
    stride: int = 0

    def __post_init__(self):
        if self.kind in (Kind.BLOCK, Kind.SLIDE, Kind.BLOCK_SLIDE) and (self.width < 1 or self.length % self.width):
            raise ConfigError(f"Hyperschedule width {self.width} must divide the sequence length {self.length}.")
        if self.steps < 1:
            raise ConfigError(f"Hyperschedule steps={self.steps} must be at least 1.")

    @property
    def block_width(self) -> int:
        """Width of the block-causal structure among settled tokens (1 = causal). Slide settles one
        position per step, so its settled tokens are causal: a settled token's keys/values then
        never change and can be cached."""
        return {Kind.FLAT: self.length, Kind.BLOCK: self.width, Kind.BLOCK_SLIDE: self.width}.get(self.kind, 1)

    def table(self) -> np.ndarray:
        """tau [N + 1, L] (float64)."""
        L = self.length
        i = np.arange(L)
        if self.kind == Kind.FLAT:
            n = np.arange(self.steps + 1)[:, None]
            return np.broadcast_to(1.0 - n / self.steps, (self.steps + 1, L)).copy()
        if self.kind == Kind.AUTOREGRESSIVE:
            n = np.arange(L + 1)[:, None]
            return (i[None] >= n).astype(np.float64)
        if self.kind == Kind.BLOCK:
            K, w = self.steps, self.width
            n = np.arange(L // w * K + 1)[:, None]
            start = (i // w)[None] * K
            return np.clip(1.0 - (n - start) / K, 0.0, 1.0)
        if self.kind == Kind.BLOCK_SLIDE:
            K, w = self.steps, self.width
            s = self.stride or max(1, K // 2)
            n = np.arange((L // w - 1) * s + K + 1)[:, None]
            start = (i // w)[None] * s
            return np.clip(1.0 - (n - start) / K, 0.0, 1.0)
        # SLIDE: position i moves from 1 to 0 over the w steps n = i + 1 .. i + w
        w = self.width
        n = np.arange(L + w)[:, None]
        return np.clip((i[None] + w - n) / w, 0.0, 1.0)

    @property
    def num_steps(self) -> int:
        return self.table().shape[0] - 1


def roles(tau_now, tau_next):
    """Role of each position in the step tau_now -> tau_next: SETTLED, ACTIVE or FUTURE (int [..., L])."""
    settled = tau_now <= 0.0
    future = (tau_now >= 1.0) & (tau_next >= 1.0)
    return jnp.where(settled, SETTLED, jnp.where(future, FUTURE, ACTIVE))


def attention_mask(role, block_width: int):
    """[..., L] roles -> [..., L, L] boolean mask (query, key): True = may attend.

    Settled queries see settled keys of their own or earlier blocks (block-causal), never an
    active key, so their keys/values can be cached. Active queries see settled and active keys.
    Future positions are hidden as keys and see nothing as queries. The dense form, kept as the
    written-out reference of attention_spec (the rule every pass uses; no [L, L] array)."""
    L = role.shape[-1]
    blk = jnp.arange(L) // block_width
    block_causal = blk[None, :] <= blk[:, None]  # [q, k]
    q, k = role[..., :, None], role[..., None, :]
    settled_q = (q == SETTLED) & (k == SETTLED) & block_causal
    active_q = (q == ACTIVE) & (k != FUTURE)
    return settled_q | active_q


def _roles_rule(block_width, q, k):
    blk_q, blk_k = q["index"] // block_width, k["index"] // block_width
    settled_q = (q["role"] == SETTLED) & (k["role"] == SETTLED) & (blk_k <= blk_q)
    return settled_q | ((q["role"] == ACTIVE) & (k["role"] != FUTURE))


def attention_spec(role, block_width: int):
    """attention_mask as a structural spec (no [L, L] array): the rule over each position's role
    and block, for a pass over the L positions of `role` [L] / [B, L]."""
    from dlm.models.attention import rule

    return rule(functools.partial(_roles_rule, block_width), {"role": role}, {"role": role})


def step_terms(logits, x0, xt, alpha_now, alpha_next, role, mask_id: int):
    """Per-token NELBO terms [B, L] of one step: reveal probability x masked CE at active positions."""
    from dlm.diffusion.losses import token_nll
    from dlm.models.logits import per_token

    nll = per_token(token_nll, logits, x0)
    w = (alpha_next - alpha_now) / jnp.maximum(1.0 - alpha_now, 1e-12)
    return jnp.where((role == ACTIVE) & (xt == mask_id), w * nll, 0.0)


def corrupt_step(key, x0, alpha_now, role, mask_id: int):
    """Input of step n: settled tokens clean, active tokens masked with probability 1 - alpha,
    future tokens masked (and hidden by the attention mask)."""
    keep = batch.uniform(key, x0.shape) < alpha_now
    return jnp.where(role == SETTLED, x0, jnp.where((role == ACTIVE) & keep, x0, mask_id))


def width_for(kind: Kind, length: int, block_width: int) -> int:
    """Block / window width of a hyperschedule kind over `length` positions."""
    return {Kind.FLAT: length, Kind.AUTOREGRESSIVE: 1}.get(kind, block_width)


def from_config(cfg, length: int) -> Hyperschedule:
    """The hyperschedule of a DiffusionConfig over `length` positions."""
    kind = cfg.hyperschedule
    width = width_for(kind, length, cfg.block_width)
    steps = {Kind.FLAT: cfg.num_steps, Kind.BLOCK_SLIDE: cfg.block_steps}.get(kind, 1)
    return Hyperschedule(kind, length, width=width, steps=steps)


def pick_blocks(u, scored_blocks):
    """Block b [B] drawn through u [B] uniformly among the blocks with a scored position
    (`scored_blocks` [B, nb] bool), the count of those blocks n [B], and the time within the
    block t = 1 - frac(u n): each block is active for an equal share of u."""
    n = jnp.maximum(scored_blocks.sum(-1), 1)
    k = jnp.minimum((u * n).astype(jnp.int32), n - 1)
    rank = jnp.cumsum(scored_blocks, axis=-1) - 1
    b = jnp.argmax(scored_blocks & (rank == k[:, None]), axis=-1)
    return b, n.astype(jnp.float32), 1.0 - (u * n - k)


def nelbo_per_sequence(apply_fn, x0, u, key, cfg, h: Hyperschedule, mask_id: int, noise_conditioning: bool = False,
                       given=None):
    """One-sample NELBO estimate (nats/token) of each row of x0 [B, L] under hyperschedule h.

    u [B] in [0, 1) picks the step. For flat / autoregressive / block schedules the estimator is
    continuous in time within a block (BD3-LM): block b = floor(u * nb) is active at time
    t = 1 - frac(u * nb) (clipped to t_min), earlier blocks are settled and later ones future;
    each masked active token costs nb * w(t) * CE. Slide uses its step table: step n = floor(u * N),
    N times the per-step terms. apply_fn(xt, t_tokens | None, attention) -> logits.

    Blocks of one position (autoregressive) are Rao-Blackwellised over t: a one-token block's term
    is w(t) 1[masked] CE with a CE that does not depend on t, whose mean over t is CE itself
    (the integral of -alpha' is 1), so the token is always masked with weight 1: the causal LM's
    cross-entropy, without the 1/t-weighted draws that make the continuous-time estimate
    heavy-tailed (an AR model trained through them barely learned in 1000 steps).

    `given` [B, L] (bool, optional) marks a condition (a prompt): those positions are settled at
    every step and never scored; the draw of u runs over the blocks that hold a position to
    score (nb is their count), and the estimate is per position not given."""
    from dlm.diffusion.losses import scored_count, token_nll
    from dlm.diffusion.schedules import make_schedule
    from dlm.models.attention import FULL
    from dlm.models.logits import per_token

    schedule = make_schedule(cfg)
    B, L = x0.shape
    pos = jnp.arange(L)
    settled_given = (lambda role: role) if given is None else (lambda role: jnp.where(given, SETTLED, role))
    if h.kind in (Kind.SLIDE, Kind.BLOCK_SLIDE):
        tau = jnp.asarray(h.table(), jnp.float32)
        N = tau.shape[0] - 1
        n = jnp.minimum((u * N).astype(jnp.int32), N - 1)
        tau_now, tau_next = tau[n], tau[n + 1]
        role = settled_given(roles(tau_now, tau_next))
        if given is not None:
            tau_now, tau_next = jnp.where(given, 0.0, tau_now), jnp.where(given, 0.0, tau_next)
        a_now, a_next = schedule.alpha(tau_now), schedule.alpha(tau_next)
        xt = corrupt_step(key, x0, a_now, role, mask_id)
        logits = apply_fn(xt, tau_now if noise_conditioning else None, attention_spec(role, h.block_width))
        return N * step_terms(logits, x0, xt, a_now, a_next, role, mask_id).sum(-1) / scored_count(x0, given)
    w_blk = h.block_width
    nb = L // w_blk
    blk = pos // w_blk
    scored_blocks = jnp.ones((B, nb), bool) if given is None else (~given).reshape(B, nb, w_blk).any(-1)
    b, n_blocks, t = pick_blocks(u, scored_blocks)
    t = jnp.ones_like(t) if w_blk == 1 else jnp.clip(t, cfg.t_min, 1.0)  # [B]
    role = settled_given(jnp.where(blk[None] < b[:, None], SETTLED, jnp.where(blk[None] == b[:, None], ACTIVE, FUTURE)))
    tau_now = jnp.where(role == SETTLED, 0.0, jnp.where(role == ACTIVE, t[:, None], 1.0))
    alpha = schedule.alpha(tau_now)
    xt = corrupt_step(key, x0, alpha, role, mask_id)
    spec = FULL if nb == 1 else attention_spec(role, w_blk)
    logits = apply_fn(xt, tau_now if noise_conditioning else None, spec)
    nll = per_token(token_nll, logits, x0)
    terms = jnp.where((role == ACTIVE) & (xt == mask_id), nll, 0.0)
    weight = 1.0 if w_blk == 1 else schedule.weight(t)
    return n_blocks * weight * terms.sum(-1) / scored_count(x0, given)


def double_layout_mask(L: int, block_width: int):
    """[2L, 2L] mask of the [clean | noised] layout: clean queries are block-causal over clean keys;
    a noised query of block b sees the clean keys of blocks < b and the noised keys of block b.
    The dense reference of double_layout_spec."""
    blk = jnp.arange(L) // block_width
    q, k = blk[:, None], blk[None, :]
    top = jnp.concatenate([k <= q, jnp.zeros((L, L), bool)], axis=1)
    bottom = jnp.concatenate([k < q, k == q], axis=1)
    return jnp.concatenate([top, bottom], axis=0)


def _double_rule(q, k):
    clean = (k["half"] == 0) & (k["blk"] <= q["blk"])
    noised = ((k["half"] == 0) & (k["blk"] < q["blk"])) | ((k["half"] == 1) & (k["blk"] == q["blk"]))
    return jnp.where(q["half"] == 0, clean, noised)


def double_layout_spec(L: int, block_width: int):
    """double_layout_mask as a structural spec: each of the 2L tokens' half (0 clean, 1 noised)
    and block."""
    from dlm.models.attention import rule

    attrs = {"half": jnp.repeat(jnp.arange(2), L), "blk": jnp.tile(jnp.arange(L) // block_width, 2)}
    return rule(_double_rule, attrs, attrs)


def double_nelbo_per_sequence(apply_fn, x0, u, key, cfg, h: Hyperschedule, mask_id: int, noise_conditioning: bool = False,
                              given=None):
    """The same NELBO as nelbo_per_sequence (flat / autoregressive / block), every block at once
    (BD3-LM's vectorised form): the input is [x0 | x_t] of length 2L, both halves at positions
    0..L-1, block b of x_t noised at its own time t_b = 1 - frac(u + b / nb), and each masked token
    costs w(t_b) * CE. A noised block sees its clean prefix exactly as the active block of the
    single layout sees its settled prefix, so every block's term is that layout's, summed instead
    of sampled (no factor nb). Blocks of one position are always masked with weight 1 (the
    Rao-Blackwellised term of nelbo_per_sequence: the teacher-forced causal LM loss). `given`
    positions (a condition) are clean in both halves and never scored; the estimate is per
    position not given."""
    from dlm.diffusion.losses import scored_count, token_nll
    from dlm.diffusion.schedules import make_schedule
    from dlm.models.logits import per_token

    if h.kind in (Kind.SLIDE, Kind.BLOCK_SLIDE):
        raise ConfigError(f"diffusion.layout=double supports the flat, autoregressive and block hyperschedules, not {h.kind.value}.")
    schedule = make_schedule(cfg)
    B, L = x0.shape
    w = h.block_width
    nb = L // w
    t = jnp.clip(1.0 - jnp.mod(u[:, None] + jnp.arange(nb)[None] / nb, 1.0), cfg.t_min, 1.0)  # [B, nb]
    if w == 1:
        t = jnp.ones_like(t)
    tau = jnp.repeat(t, w, axis=1)  # [B, L]
    xt = jnp.where(batch.uniform(key, x0.shape) < schedule.alpha(tau), x0, mask_id)
    if given is not None:
        xt = jnp.where(given, x0, xt)
    pos = jnp.broadcast_to(jnp.concatenate([jnp.arange(L)] * 2), (B, 2 * L))
    noise = jnp.concatenate([jnp.zeros_like(tau), tau], axis=1) if noise_conditioning else None
    spec = double_layout_spec(L, w)
    logits = apply_fn(jnp.concatenate([x0, xt], axis=1), noise, spec, positions=pos)[:, L:]
    nll = per_token(token_nll, logits, x0)
    weight = 1.0 if w == 1 else schedule.weight(tau)
    return (weight * jnp.where(xt == mask_id, nll, 0.0)).sum(-1) / scored_count(x0, given)
