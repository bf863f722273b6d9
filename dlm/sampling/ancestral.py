"""Exact ancestral sampling for masked diffusion (MDLM / MD4).

On a time grid 1 = t_0 > t_1 > ... > t_N = 0, a still-masked token is revealed between t and s < t
with probability (alpha_s - alpha_t) / (1 - alpha_t), taking a draw from the denoiser's
categorical mu_theta(x_t); visible tokens never change (carry-over). At s = 0 every remaining
mask is revealed. When no token changed and the model is not noise-conditioned, the input is the
same and the last forward pass is reused (no extra NFE).

Prompts and infilling are one mechanism: `fixed[b, i]` positions hold given tokens and are
never masked. The loop is one `lax.while_loop` with static shapes; under a mesh the batch is
sharded over (data, expert, fsdp) and the parameters stay sharded as trained.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dlm.config import SamplingConfig, TimeGrid
from dlm.diffusion.hybrid import gamma_levels, gamma_reverse_probs
from dlm.diffusion.prime import carry_over
from dlm.sampling.draws import categorical_at, greedy, position_keys, temper, uniform_at


def time_grid(steps: int, grid: TimeGrid) -> np.ndarray:
    """[steps + 1] times from 1 down to 0; the cosine grid t_i = cos(pi/2 * i/N) takes smaller steps near t = 1."""
    i = np.arange(steps + 1, dtype=np.float64) / steps
    if grid == TimeGrid.COSINE:
        return np.cos(0.5 * math.pi * i)
    return 1.0 - i


def ancestral_loop(apply_fn, x, fixed, key, alphas, cfg: SamplingConfig, vocab_size: int, noise_conditioning: bool,
                   mask_id: int | None = None, pad=None):
    """x [B, L] with the mask id (default vocab_size) at positions to generate; alphas [N + 1] = alpha(t_i).
    Draws are keyed by row and by position from the row's first real token (pad [B]: hidden
    left padding), so padding in front changes none of them.

    apply_fn(x, t_tokens | None) -> logits [B, L, V]. Returns (tokens, nfe, row_nfe): the batch's
    forward passes, and per row [B] the passes that row needed (what decoding it alone would
    take: a pass when its input changed since its last one and it still has masks)."""
    mask_id = vocab_size if mask_id is None else mask_id
    B, L = x.shape
    steps = alphas.shape[0] - 1
    fdt = alphas.dtype
    x = jnp.where(fixed, x, mask_id)

    def forward(x, i):
        t = jnp.full((B, L), 1.0 - alphas[i], jnp.float32) if noise_conditioning else None
        return apply_fn(x, t).astype(jnp.float32)

    def body(carry):
        i, x, logits, changed, nfe, row_nfe, key = carry
        key, k_cat, k_rev = jax.random.split(key, 3)
        recompute = changed.any() | noise_conditioning
        logits = jax.lax.cond(recompute, lambda: forward(x, i), lambda: logits)
        nfe = nfe + recompute.astype(jnp.int32)
        masked = x == mask_id
        row_nfe = row_nfe + ((changed | noise_conditioning) & masked.any(-1)).astype(jnp.int32)
        a_t, a_s = alphas[i], alphas[i + 1]
        p_reveal = jnp.where(i + 1 == steps, 1.0, (a_s - a_t) / (1.0 - a_t))
        draw = categorical_at(position_keys(k_cat, (B, L), pad), logits, cfg.temperature, cfg.float64)
        reveal = masked & (uniform_at(position_keys(k_rev, (B, L), pad), fdt) < p_reveal)
        return i + 1, jnp.where(reveal, draw, x), logits, reveal.any(-1), nfe, row_nfe, key

    init = (jnp.int32(0), x, jnp.zeros((B, L, vocab_size), jnp.float32), jnp.ones((B,), bool), jnp.int32(0),
            jnp.zeros((B,), jnp.int32), key)
    _, x, _, _, nfe, row_nfe, _ = jax.lax.while_loop(lambda c: c[0] < steps, body, init)
    return x, nfe, row_nfe


def gamma_loop(apply_fn, x, fixed, key, times, alphas, cfg: SamplingConfig, vocab_size: int, gamma: float, pad=None):
    """Analytic (Tweedie) sampler of the gamma-hybrid process: x_1 from the prior (mask with
    probability 1 - a(1), else a uniform token), then at every step t -> s each non-prompt
    position draws from sum_x0 mu(x0 | x_t) q(x_s | x_t, x0) (dlm.diffusion.hybrid.gamma_reverse_probs).
    times/alphas [N + 1] from t = 1 to 0. apply_fn(x, t_tokens) -> logits. Returns (tokens, nfe)."""
    mask_id = vocab_size
    B, L = x.shape
    steps = alphas.shape[0] - 1
    key, k_m, k_u = jax.random.split(key, 3)
    a1, b1, _, _ = gamma_levels(alphas[0].astype(jnp.float32), gamma)
    noise = jax.vmap(jax.vmap(lambda k: jax.random.randint(k, (), 0, vocab_size, jnp.int32)))(position_keys(k_u, (B, L), pad))
    z = jnp.where(uniform_at(position_keys(k_m, (B, L), pad)) < a1, noise, mask_id)
    z = z.astype(jnp.int32)
    z = jnp.where(fixed, x, z)

    def body(i, carry):
        z, key = carry
        key, k = jax.random.split(key)
        t_tok = jnp.where(fixed, 0.0, times[i].astype(jnp.float32))
        logits = apply_fn(z, t_tok).astype(jnp.float32)
        if not greedy(cfg.temperature):
            logits = temper(logits, cfg.temperature)
        a_t, a_s = (jnp.full((B, L), a, jnp.float32) for a in (alphas[i], alphas[i + 1]))
        probs = gamma_reverse_probs(logits, z, a_t, a_s, gamma, mask_id)
        # the kernel is already tempered through mu; at temperature 0 take its mode
        draw = categorical_at(position_keys(k, (B, L), pad), jnp.log(jnp.maximum(probs, 1e-30)),
                              0.0 if greedy(cfg.temperature) else 1.0, cfg.float64)
        return jnp.where(fixed, x, draw), key

    z, _ = jax.lax.fori_loop(0, steps, body, (z, key))
    return z, jnp.int32(steps)


def prime_ancestral_loop(apply_fn, x, fixed, key, alphas, cfg: SamplingConfig, codec, noise_conditioning: bool, pad=None):
    """Digit-level ancestral sampling for MDM-Prime.

    x [B, L] tokens (fixed positions hold prompt tokens). Each step draws x_hat from the carried-over
    joint p(x | y_t) and every still-masked sub-token takes x_hat's digit with probability
    (alpha_s - alpha_t) / (1 - alpha_t). The forward pass is reused while y does not change.
    Returns (tokens, nfe, idle_steps)."""
    B, L = x.shape
    steps = alphas.shape[0] - 1
    m = codec.mask_id
    y = jnp.where(fixed[..., None], codec.encode(x), m)

    def forward(y, i):
        t = jnp.full((B, L), 1.0 - alphas[i], jnp.float32) if noise_conditioning else None
        return carry_over(apply_fn(y, t).astype(jnp.float32), y, codec)

    def body(carry):
        i, y, logits, changed, nfe, idle, key = carry
        key, k_cat, k_rev = jax.random.split(key, 3)
        recompute = changed | noise_conditioning
        logits = jax.lax.cond(recompute, lambda: forward(y, i), lambda: logits)
        nfe = nfe + recompute.astype(jnp.int32)
        a_t, a_s = alphas[i], alphas[i + 1]
        p_reveal = jnp.where(i + 1 == steps, 1.0, (a_s - a_t) / (1.0 - a_t))
        digits = codec.encode(categorical_at(position_keys(k_cat, (B, L), pad), logits, cfg.temperature, cfg.float64))  # [B, L, l]
        reveal = (y == m) & (uniform_at(position_keys(k_rev, (B, L), pad), alphas.dtype, y.shape[2:]) < p_reveal)
        changed = reveal.any()
        return i + 1, jnp.where(reveal, digits, y), logits, changed, nfe, idle + (~changed).astype(jnp.int32), key

    init = (jnp.int32(0), y, jnp.zeros((B, L, codec.vocab_size), jnp.float32), jnp.bool_(True), jnp.int32(0), jnp.int32(0), key)
    _, y, _, _, nfe, idle, _ = jax.lax.while_loop(lambda c: c[0] < steps, body, init)
    return codec.decode(y), nfe, idle
