"""Hyperschedule-driven generation with a KV cache of settled tokens.

A hyperschedule table tau [N + 1, L] says, at every step n, which positions are settled (clean,
block-causal context), active (being denoised) and future (hidden). For every kind dlm ships
(flat, autoregressive, block, slide) the settled positions are a prefix [0, S_n) and the active
ones a contiguous run, so one step is:

1. commit: positions that became settled since the last step are run once as queries over the
   cache (block-causal among themselves, every earlier key visible) and their keys/values are
   written into a fixed [layers, B, L, H, D] buffer (in the same forward pass as step 2 when both
   are due: an autoregressive step is one pass over two tokens). Settled queries never see an active key, so
   these keys/values are the ones a full recompute would produce, and they never change again;
2. denoise: only a window of the A active positions is run, attending to the settled keys in the
   cache and to the active keys in the window;
3. reveal: each masked active token is revealed with probability
   (alpha(tau[n+1, i]) - alpha(tau[n, i])) / (1 - alpha(tau[n, i])) (1 when tau[n+1, i] = 0),
   taking a draw from the denoiser. The Adaptive Correction Sampler (eta > 0) also resamples each
   visible, non-prompt active token with probability eta * tau[n+1, i] / tau[n, i].

`cache=False` runs the same loop with a full forward pass over all L positions and the explicit
role mask each step (the reference the cache is tested against, and the benchmark's baseline).
The denoiser pass is skipped while the window holds nothing to generate (prompt positions) and
reused while neither the tokens nor the roles changed and the model is not noise-conditioned.
The whole generation is one lax.scan with static shapes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dlm.config import TimeGrid
from dlm.diffusion import hyperschedules as hs
from dlm.models.attention import rule, visible_keys
from dlm.sampling.draws import categorical_at, position_keys, uniform_at


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static per-step layout of a generation under one hyperschedule."""

    tau: np.ndarray  # [N + 1, L]
    win_start: np.ndarray  # [N] start of the active window
    width: int  # A, the window width
    commit_start: np.ndarray  # [N] first newly settled position at step n, -1 when none
    commit_width: int  # C
    same_roles: np.ndarray  # [N] roles equal to those of step n - 1
    block_width: int
    first_active: np.ndarray  # [L] the first step at which each position is active

    @property
    def num_steps(self) -> int:
        return self.tau.shape[0] - 1

    def truncate(self, steps: int) -> "Plan":
        """The first `steps` steps only (a generation cut short, for timing per-step costs)."""
        steps = min(steps, self.num_steps)
        return dataclasses.replace(self, tau=self.tau[: steps + 1], win_start=self.win_start[:steps],
                                   commit_start=self.commit_start[:steps], same_roles=self.same_roles[:steps])


def make_plan(h: hs.Hyperschedule, grid: TimeGrid = TimeGrid.UNIFORM) -> Plan:
    tau = h.table()
    if grid == TimeGrid.COSINE:  # the time grid t_i = cos(pi/2 * i/N) applied to every position's levels
        tau = np.where(tau >= 1.0, 1.0, np.where(tau <= 0.0, 0.0, np.cos(0.5 * math.pi * (1.0 - tau))))
    L = tau.shape[1]
    role = np.asarray(hs.roles(tau[:-1], tau[1:]))
    settled = (role == hs.SETTLED).sum(1)
    active = role == hs.ACTIVE
    if not (np.all((role == hs.SETTLED) == (np.arange(L)[None] < settled[:, None])) and active.any(1).all()):
        raise ValueError(f"hyperschedule {h.kind.value}: settled positions must form a prefix and every step must have an active one")
    lo = active.argmax(1)
    hi = L - 1 - active[:, ::-1].argmax(1)
    if not np.all(active.sum(1) == hi - lo + 1):
        raise ValueError(f"hyperschedule {h.kind.value}: the active positions of a step must be contiguous")
    A = int((hi - lo + 1).max())
    prev = np.concatenate([[0], settled[:-1]])
    grow = settled - prev
    C = int(grow.max())
    if not np.all((grow == 0) | (grow == C)):
        raise ValueError(f"hyperschedule {h.kind.value}: positions must settle in groups of one size")
    same = np.concatenate([[False], np.all(role[1:] == role[:-1], axis=1)])
    return Plan(tau, np.minimum(lo, L - A).astype(np.int32), A, np.where(grow > 0, prev, -1).astype(np.int32), C, same,
                h.block_width, active.argmax(0).astype(np.int32))


def _commit_rule(q, k):
    """Commit queries (seg 1): written cache keys and their own span block-causally. Window
    queries (seg 2): the keys marked for them (settled written cache keys, the commit span,
    active window keys)."""
    commit_q = (k["seg"] == 0) & k["written"] | (k["seg"] == 1) & (k["blk"] <= q["blk"])
    return jnp.where(q["seg"] == 1, commit_q, k["written"] & k["for_window"])


def hyper_loop(model_fn, x, fixed, key, plan: Plan, alpha_fn, *, mask_id: int, kv_shape, kv_dtype, temperature: float,
               float64: bool, noise_conditioning: bool, cache: bool = True, eta: float = 0.0, draw_logits=None,
               trace: bool = False, pad=None):
    """x [B, L] (mask_id where to generate), fixed [B, L] prompt positions.

    Draws are keyed by step and by position, counted past the hidden left padding `pad` [B]:
    step n's key is fold_in(key, n - n0), n0 the first step at which column min(pad) (the
    first real token of the least padded row) is active, and each position's draw is keyed by
    its row and its position from the row's first real token. So whole blocks of padding in
    front of every row (a length bucket, a multiple of the block width) change no draw of the
    real positions.

    model_fn(tokens, positions, attention, noise, kv_cache, return_kv) -> logits | (logits, kv);
    kv_shape = (layers, B, L, H, D). draw_logits(logits) -> the logits reveals draw from (the
    process's prediction of the next state; identity for absorbing). Returns (x, nfe, commits,
    trace) where trace = (inputs [N, B, L], window logits [N, B, A, V], recomputed [N]) or None."""
    B, L = x.shape
    A, C, bw = plan.width, plan.commit_width, plan.block_width
    cache = cache and C > 0  # nothing ever settles before the end (flat): the window is everything
    fdt = jnp.float64 if float64 and jax.config.jax_enable_x64 else jnp.float32  # float64 times only under sampling.x64
    tau = jnp.asarray(plan.tau, fdt)
    N = plan.num_steps
    xs = (tau[:-1], tau[1:], jnp.asarray(plan.win_start), jnp.asarray(plan.commit_start), jnp.asarray(plan.same_roles),
          jnp.arange(N, dtype=jnp.int32))
    n0 = 0 if pad is None else jnp.asarray(plan.first_active)[jnp.min(pad)] - int(plan.first_active[0])
    kpos = jnp.arange(L)
    draw_logits = draw_logits or (lambda l: l)
    x = jnp.where(fixed, x, mask_id)

    # Keys are [cache (L) | commit (C) | window (A)]. The commit span [c0, c0 + C) sees the cache
    # below c0 and itself block-causally; the window sees the settled part of the cache, the
    # commit span when it is in the same pass, and its active positions. Structural specs: each
    # query and key carries its segment (commit / window queries; cache / commit / window keys),
    # its block, whether it is written (cache keys: below c0) and whether window queries see it.
    def cache_attrs(c0, role):
        return {"seg": jnp.zeros((L,), jnp.int32), "blk": kpos // bw, "written": kpos < c0, "for_window": role == hs.SETTLED}

    def span_attrs(seg, start, n, for_window):
        pos = start + jnp.arange(n)
        return {"seg": jnp.full((n,), seg, jnp.int32), "blk": pos // bw, "written": jnp.ones((n,), bool),
                "for_window": jnp.broadcast_to(for_window, (n,))}

    def cat(*parts):
        return {n: jnp.concatenate([p[n] for p in parts]) for n in parts[0]}

    def commit(ck, cv, x, c0, role):
        toks = jax.lax.dynamic_slice_in_dim(x, c0, C, axis=1)
        pos = c0 + jnp.arange(C)
        q = {"seg": jnp.ones((C,), jnp.int32), "blk": pos // bw}
        spec = rule(_commit_rule, q, cat(cache_attrs(c0, role), span_attrs(1, c0, C, True)))
        _, (k, v) = model_fn(toks, jnp.broadcast_to(pos, (B, C)), spec, jnp.zeros((B, C), jnp.float32), (ck, cv), True)
        return k.astype(ck.dtype), v.astype(cv.dtype)

    def fused(ck, cv, x, c0, role, tn, s0):
        """The commit and the window in one pass (C + A queries): what one autoregressive step costs."""
        pos_c, pos_w = c0 + jnp.arange(C), s0 + jnp.arange(A)
        q = {"seg": jnp.concatenate([jnp.ones((C,), jnp.int32), jnp.full((A,), 2, jnp.int32)]),
             "blk": jnp.concatenate([pos_c, pos_w]) // bw}
        keys = cat(cache_attrs(c0, role), span_attrs(1, c0, C, True),
                   span_attrs(2, s0, A, jax.lax.dynamic_slice_in_dim(role, s0, A) == hs.ACTIVE))
        toks = jnp.concatenate([jax.lax.dynamic_slice_in_dim(x, c0, C, axis=1), jax.lax.dynamic_slice_in_dim(x, s0, A, axis=1)], 1)
        noise = jnp.concatenate([jnp.zeros((C,), jnp.float32), jax.lax.dynamic_slice_in_dim(tn, s0, A).astype(jnp.float32)])
        logits, (k, v) = model_fn(toks, jnp.broadcast_to(jnp.concatenate([pos_c, pos_w]), (B, C + A)),
                                  rule(_commit_rule, q, keys), jnp.broadcast_to(noise, (B, C + A)), (ck, cv), True)
        return k[:, :, :C].astype(ck.dtype), v[:, :, :C].astype(cv.dtype), logits[:, C:].astype(jnp.float32)

    def forward(x, ck, cv, role, tn, s0):
        if not cache:
            out = model_fn(x, jnp.broadcast_to(kpos, (B, L)), hs.attention_spec(role, bw),
                           jnp.broadcast_to(tn.astype(jnp.float32), (B, L)), None, False)
            return jax.lax.dynamic_slice_in_dim(out, s0, A, axis=1)
        active = jax.lax.dynamic_slice_in_dim(role, s0, A) == hs.ACTIVE
        tw = jax.lax.dynamic_slice_in_dim(tn, s0, A).astype(jnp.float32)
        return model_fn(jax.lax.dynamic_slice_in_dim(x, s0, A, axis=1), jnp.broadcast_to(s0 + jnp.arange(A), (B, A)),
                        visible_keys(jnp.concatenate([role == hs.SETTLED, active])), jnp.broadcast_to(tw, (B, A)), (ck, cv), False)

    def step(carry, inp):
        x, ck, cv, logits, valid, nfe, commits, key = carry
        tn, tx, s0, c0, same, n = inp
        k_cat, k_rev, k_cor, k_cd = jax.random.split(jax.random.fold_in(key, n - n0), 4)
        role = hs.roles(tn, tx)
        xw = jax.lax.dynamic_slice_in_dim(x, s0, A, axis=1)
        fw = jax.lax.dynamic_slice_in_dim(fixed, s0, A, axis=1)
        active = jax.lax.dynamic_slice_in_dim(role, s0, A) == hs.ACTIVE
        masked = xw == mask_id
        need = (active & (masked | (~fw if eta > 0 else False))).any()
        valid = valid & same & (not noise_conditioning)
        recompute = need & ~valid
        x_in = x
        window = lambda: forward(x, ck, cv, role, tn, s0).astype(jnp.float32)
        if cache:  # settle the new positions into the cache, fused with the window pass when both are due
            # The branches return only the C committed rows of keys and values (the rows already
            # there when nothing commits); the cache is updated in place after the switch. Whole
            # caches as branch results were copied at every step, 4 x the cache's bytes.
            at = jnp.maximum(c0, 0)
            kept = lambda: tuple(jax.lax.dynamic_slice_in_dim(c, at, C, axis=2) for c in (ck, cv))
            branches = [lambda: (*kept(), logits), lambda: (*commit(ck, cv, x, c0, role), logits), lambda: (*kept(), window()),
                        lambda: fused(ck, cv, x, c0, role, tn, s0)]
            k_rows, v_rows, logits = jax.lax.switch((c0 >= 0).astype(jnp.int32) + 2 * recompute.astype(jnp.int32), branches)
            ck = jax.lax.dynamic_update_slice_in_dim(ck, k_rows, at, axis=2)
            cv = jax.lax.dynamic_update_slice_in_dim(cv, v_rows, at, axis=2)
            commits = commits + (c0 >= 0).astype(jnp.int32)
        else:
            logits = jax.lax.cond(recompute, window, lambda: logits)
        nfe = nfe + recompute.astype(jnp.int32)
        t_now, t_next = (jax.lax.dynamic_slice_in_dim(t, s0, A) for t in (tn, tx))
        a_now, a_next = alpha_fn(t_now), alpha_fn(t_next)
        p = jnp.where(t_next <= 0, 1.0, (a_next - a_now) / jnp.maximum(1.0 - a_now, 1e-30))
        keyed = lambda k: position_keys(k, (B, A, s0), pad)  # noqa: E731
        reveal = active & masked & (uniform_at(keyed(k_rev), fdt) < p)
        draw = categorical_at(keyed(k_cat), draw_logits(logits), temperature, float64)
        new = jnp.where(reveal, draw, xw)
        if eta > 0:  # ACS: resample visible generated tokens with probability eta * s / t
            correct = active & ~masked & ~fw & (uniform_at(keyed(k_cor), fdt) < eta * t_next / t_now)
            new = jnp.where(correct, categorical_at(keyed(k_cd), logits, temperature, float64), new)
        changed = (new != xw).any()
        x = jax.lax.dynamic_update_slice_in_dim(x, new, s0, axis=1)
        carry = (x, ck, cv, logits, (valid | recompute) & ~changed, nfe, commits, key)
        return carry, ((x_in, logits, recompute) if trace else None)

    ck = cv = jnp.zeros(kv_shape if cache else (1,) * 5, kv_dtype)
    dummy = jax.eval_shape(lambda: forward(x, ck, cv, hs.roles(tau[0], tau[1]), tau[0], jnp.int32(0)))
    V = dummy.shape[-1]
    init = (x, ck, cv, jnp.zeros((B, A, V), jnp.float32), jnp.bool_(False), jnp.int32(0), jnp.int32(0), key)
    (x, *_, nfe, commits, _), tr = jax.lax.scan(step, init, xs)
    return x, nfe, commits, tr
