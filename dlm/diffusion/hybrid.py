"""Epsilon-hybrid noising (HDLM) with a NELBO that is a valid bound for the process used.

Forward process, per token: y = x with probability 1 - eps, otherwise a uniform draw over the V
tokens (it may return x); then y is masked with probability 1 - alpha(t). So
    q_t(z | x) = (1 - alpha_t) delta_m(z) + alpha_t [(1 - eps) delta_x(z) + eps / V],
which at alpha = 1 - t is HDLM's marginal. The latent chain ends at the corrupted y, not at x,
so the generative model is: masked diffusion over y, then a decoder p(x | y) = prod_i mu_i(x_i | y)
(the denoiser read at visible positions: the model predicts the clean token there, which is what
lets a sampler correct tokens). With the denoiser mu(x_i | z) over clean tokens, y is predicted
by pushing mu through the corruption kernel, p(y_i | z) = (1 - eps) mu(y_i | z) + eps / V — the
exact posterior of y_i when mu is exact. The evidence bound on x with y as a latent is
    -log p(x) <= E_y[ D(x | y) + M(y) ] - L * h(eps, V),
    D(x | y) = sum_i -log mu_i(x_i | y)                                     (decoder, t = 0),
    M(y)     = int_0^1 w(t) E_z sum_{i masked} -log p(y_i | z_t) dt           (MDLM NELBO of y),
    h(eps,V) = entropy of the kernel K(. | x) = -(1-eps+eps/V) log(1-eps+eps/V) - (V-1)(eps/V) log(eps/V),
a valid bound for any denoiser (-E log q(y | x) = L h is subtracted because y is a latent drawn
from q). At eps = 0 it is the MDLM NELBO plus the decoder term, which an identity decoder sets to 0.
HDLM's own perplexity ignores the eps corruption; dlm reports this bound.

Training draws y once per sequence; rows [0, B // 8) estimate the decoder term and the others
the diffusion term (both unbiased, one forward pass per row; with B = 1 both are computed).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dlm.config import DiffusionConfig
from dlm.diffusion.processes import absorbing_corrupt
from dlm.diffusion.schedules import make_schedule


def kernel_entropy(eps: float, V: int) -> float:
    """Entropy (nats) of K(. | x) = (1 - eps) delta_x + eps / V."""
    if eps <= 0:
        return 0.0
    keep, other = 1.0 - eps + eps / V, eps / V
    return -keep * math.log(keep) - (V - 1) * other * math.log(other)


def epsilon_corrupt(key, x0, eps: float, V: int):
    """y: each token replaced with probability eps by a uniform draw over [0, V)."""
    k_r, k_u = jax.random.split(key)
    return jnp.where(jax.random.uniform(k_r, x0.shape) < eps, jax.random.randint(k_u, x0.shape, 0, V), x0)


def y_log_probs(logits, eps: float):
    """log p(y | z) = log((1 - eps) mu + eps / V) from the denoiser's logits over the V tokens."""
    logmu = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if eps <= 0:
        return logmu
    V = logits.shape[-1]
    return jnp.logaddexp(math.log1p(-eps) + logmu, math.log(eps / V))


def decoder_nll(apply_fn, x0, y, noise_conditioning: bool):
    """D(x | y) per row [B] (nats, summed over positions): -log mu(x_i | y) with y fully visible."""
    B, L = x0.shape
    logits = apply_fn(y, jnp.zeros((B, L), jnp.float32) if noise_conditioning else None)
    logmu = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logmu, x0[..., None], axis=-1)[..., 0].sum(-1)


def diffusion_nll(apply_fn, y, t, key, cfg: DiffusionConfig, mask_id: int, noise_conditioning: bool):
    """One-sample M(y) per row [B] (nats, summed over positions) at times t [B]."""
    from dlm.diffusion.losses import time_and_weight

    schedule = make_schedule(cfg)
    B, L = y.shape
    t, w = time_and_weight(t, schedule, cfg)
    z = absorbing_corrupt(key, y, schedule.alpha(t)[:, None], mask_id)
    logits = apply_fn(z, jnp.broadcast_to(t[:, None], (B, L)) if noise_conditioning else None)
    logq = y_log_probs(logits, cfg.epsilon)
    nll = -jnp.take_along_axis(logq, y[..., None], axis=-1)[..., 0]
    return w * jnp.where(z == mask_id, nll, 0.0).sum(-1), z


def nelbo_per_sequence(apply_fn, x0, t, key, cfg: DiffusionConfig, mask_id: int, noise_conditioning: bool = False):
    """One-sample bound per row (nats/token) -> ([B], z): both terms for every row."""
    k_y, k_z = jax.random.split(key)
    L = x0.shape[1]
    y = epsilon_corrupt(k_y, x0, cfg.epsilon, mask_id)
    m, z = diffusion_nll(apply_fn, y, t, k_z, cfg, mask_id, noise_conditioning)
    d = decoder_nll(apply_fn, x0, y, noise_conditioning)
    return (d + m) / L - kernel_entropy(cfg.epsilon, mask_id), z


def epsilon_hybrid_loss(apply_fn, x0, key, cfg: DiffusionConfig, mask_id: int, noise_conditioning: bool = False):
    """Monte-Carlo bound (nats/token) of a batch, one forward pass per row -> (loss, metrics)."""
    from dlm.diffusion.losses import LN2, sample_times

    B, L = x0.shape
    if B < 2:
        per, z = nelbo_per_sequence(apply_fn, x0, sample_times(key, B, cfg), key, cfg, mask_id, noise_conditioning)
        loss = per.mean()
        return loss, {"nelbo": loss, "bits_per_token": loss / LN2, "mask_fraction": (z == mask_id).mean()}
    k_y, k_t, k_z = jax.random.split(key, 3)
    y = epsilon_corrupt(k_y, x0, cfg.epsilon, mask_id)
    nd = max(1, B // 8)
    d = decoder_nll(apply_fn, x0[:nd], y[:nd], noise_conditioning).mean() / L
    m, z = diffusion_nll(apply_fn, y[nd:], sample_times(k_t, B - nd, cfg), k_z, cfg, mask_id, noise_conditioning)
    loss = d + m.mean() / L - kernel_entropy(cfg.epsilon, mask_id)
    return loss, {"nelbo": loss, "bits_per_token": loss / LN2, "decoder_nll": d, "mask_fraction": (z == mask_id).mean()}
