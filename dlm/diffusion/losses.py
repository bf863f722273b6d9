"""Masked-diffusion NELBO (MDLM / MD4) and its metrics.

Continuous time (MD4 eq. 4, MDLM eq. 10):
    NELBO(x0) = E_{t ~ U(0,1)} [ w(t) * sum_{i: x_t^i = mask} -log mu_theta(x_t)[x0^i] ],
    w(t) = -alpha'(t) / (1 - alpha(t)).
Discrete time with T steps: t = i/T, s = (i-1)/T, i ~ U{1..T},
    NELBO_T(x0) = E_i [ T * (alpha_s - alpha_t)/(1 - alpha_t) * sum_{masked} -log mu_theta(x_t)[x0^i] ].
SUBS parametrisation: the model never predicts the mask, and visible tokens are carried over
(they cost nothing), so only masked positions are scored.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dlm.config import DiffusionConfig, TimeMode
from dlm.diffusion import batch as rows
from dlm.diffusion.processes import absorbing_corrupt
from dlm.diffusion.schedules import NoiseSchedule, make_schedule
from dlm.models.logits import per_token

LN2 = math.log(2.0)


def sample_times(key, batch: int, cfg: DiffusionConfig):
    """t [B] in [t_min, 1]; antithetic draws t_i = (u + i/B) mod 1 lower the variance (B: the
    whole batch when this is a micro-batch of it)."""
    def times(key, shape):
        n = shape[0]
        if cfg.antithetic:
            return jnp.mod(jax.random.uniform(key, ()) + jnp.arange(n) / n, 1.0)
        return jax.random.uniform(key, (n,))

    return jnp.clip(rows.draw(times, key, (batch,)), cfg.t_min, 1.0)


def time_and_weight(t, schedule: NoiseSchedule, cfg: DiffusionConfig):
    """The time the tokens are noised at, and the per-sequence weight of the masked CE.

    Continuous: (t, w(t)). Discrete: t is snapped up onto the T-grid, s = t - 1/T and the
    weight is T * (alpha_s - alpha_t) / (1 - alpha_t).
    """
    if cfg.time == TimeMode.CONTINUOUS:
        return t, schedule.weight(t)
    T = cfg.num_steps
    t = jnp.ceil(t * T) / T
    s = t - 1.0 / T
    return t, T * schedule.discrete_weight(s, t)


def token_nll(logits, target):
    """-log softmax(logits)[target]: logits [..., V], target [...] -> [...]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]


def masked_cross_entropy(logits, x0, xt, mask_id: int):
    """-log mu_theta(x_t)[x0] at masked positions, 0 elsewhere. logits [B, L, V] (an array or
    LazyLogits, computed in chunks) -> [B, L]."""
    return jnp.where(xt == mask_id, per_token(token_nll, logits, x0), 0.0)


def nelbo_terms(logits, x0, xt, weight, mask_id: int):
    """Per-token NELBO terms [B, L] in nats: weight * masked CE (weight broadcast to [B, L])."""
    w = jnp.asarray(weight)
    w = w.reshape(w.shape + (1,) * (x0.ndim - w.ndim))
    return w * masked_cross_entropy(logits, x0, xt, mask_id)


def scored_count(x0, given):
    """Positions per row a bound is normalised by: L, or the positions not given [B] (at least 1)."""
    if given is None:
        return x0.shape[1]
    return jnp.maximum((~given).sum(-1), 1).astype(jnp.float32)


def nelbo_per_sequence(apply_fn, x0, t, key, cfg: DiffusionConfig, mask_id: int, noise_conditioning: bool = False, given=None):
    """One-sample NELBO estimate of each sequence at times t [B], in nats/token -> ([B], x_t).

    apply_fn(xt, t_tokens) -> logits [B, L, V]; t_tokens is the per-token noise level [B, L]
    (None unless the model is noise-conditioned). `given` [B, L] (bool, optional) marks a
    condition: those positions stay clean and are not scored, and the estimate is of
    -log p(x0[~given] | x0[given]) per position not given.
    """
    schedule = make_schedule(cfg)
    B, L = x0.shape
    t, w = time_and_weight(t, schedule, cfg)
    xt = absorbing_corrupt(key, x0, schedule.alpha(t)[:, None], mask_id)
    if given is not None:
        xt = jnp.where(given, x0, xt)
    logits = apply_fn(xt, jnp.broadcast_to(t[:, None], (B, L)) if noise_conditioning else None)
    return nelbo_terms(logits, x0, xt, w, mask_id).sum(-1) / scored_count(x0, given), xt
