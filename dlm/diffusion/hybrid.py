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
from dlm.diffusion import batch
from dlm.diffusion.processes import absorbing_corrupt
from dlm.diffusion.schedules import make_schedule
from dlm.models.logits import per_token


def kernel_entropy(eps: float, V: int) -> float:
    """Entropy (nats) of K(. | x) = (1 - eps) delta_x + eps / V."""
    if eps <= 0:
        return 0.0
    keep, other = 1.0 - eps + eps / V, eps / V
    return -keep * math.log(keep) - (V - 1) * other * math.log(other)


def epsilon_corrupt(key, x0, eps: float, V: int):
    """y: each token replaced with probability eps by a uniform draw over [0, V)."""
    k_r, k_u = jax.random.split(key)
    return jnp.where(batch.uniform(k_r, x0.shape) < eps, batch.randint(k_u, x0.shape, 0, V), x0)


def y_log_probs(logits, eps: float):
    """log p(y | z) = log((1 - eps) mu + eps / V) from the denoiser's logits over the V tokens."""
    logmu = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if eps <= 0:
        return logmu
    V = logits.shape[-1]
    return jnp.logaddexp(math.log1p(-eps) + logmu, math.log(eps / V))


def y_nll(logits, y, eps: float):
    """-log p(y | z) from the denoiser's logits: logits [..., V], y [...] -> [...]."""
    return -jnp.take_along_axis(y_log_probs(logits, eps), y[..., None], axis=-1)[..., 0]


def decoder_nll(apply_fn, x0, y, noise_conditioning: bool):
    """D(x | y) per row [B] (nats, summed over positions): -log mu(x_i | y) with y fully visible."""
    B, L = x0.shape
    from dlm.diffusion.losses import token_nll

    logits = apply_fn(y, jnp.zeros((B, L), jnp.float32) if noise_conditioning else None)
    return per_token(token_nll, logits, x0).sum(-1)


def diffusion_nll(apply_fn, y, t, key, cfg: DiffusionConfig, mask_id: int, noise_conditioning: bool):
    """One-sample M(y) per row [B] (nats, summed over positions) at times t [B]."""
    from dlm.diffusion.losses import time_and_weight

    schedule = make_schedule(cfg)
    B, L = y.shape
    t, w = time_and_weight(t, schedule, cfg)
    z = absorbing_corrupt(key, y, schedule.alpha(t)[:, None], mask_id)
    logits = apply_fn(z, jnp.broadcast_to(t[:, None], (B, L)) if noise_conditioning else None)
    nll = per_token(lambda lg, target: y_nll(lg, target, cfg.epsilon), logits, y)
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
    """Monte-Carlo bound (nats/token) of a batch of B >= 2 rows, one forward pass per row: the
    decoder term on the first B // 8 rows (at least one), the diffusion term on the rest ->
    (loss, metrics). In a micro-batch (dlm.diffusion.batch) B is the large batch, the split is by
    the rows' places in it, and the loss is this micro-batch's share scaled so that the mean over
    micro-batches is the large batch's loss."""
    from dlm.diffusion.losses import LN2, sample_times, time_and_weight, token_nll

    B, L = x0.shape
    index, total = batch.rows(B)
    nd = max(1, total // 8)
    dec = index < nd  # [B] rows that estimate the decoder term
    k_y, k_t, k_z = jax.random.split(key, 3)
    y = epsilon_corrupt(k_y, x0, cfg.epsilon, mask_id)
    schedule = make_schedule(cfg)
    t, w = time_and_weight(sample_times(k_t, B, cfg), schedule, cfg)
    z = absorbing_corrupt(k_z, y, schedule.alpha(t)[:, None], mask_id)
    inp = jnp.where(dec[:, None], y, z)
    noise = jnp.broadcast_to(jnp.where(dec, 0.0, t)[:, None], (B, L)) if noise_conditioning else None

    nll_x, nll_y = per_token(lambda lg, x, target: (token_nll(lg, x), y_nll(lg, target, cfg.epsilon)), apply_fn(inp, noise), x0, y)
    share = total / B  # a micro-batch's sums scaled so that their mean is the large batch's
    d = share * jnp.where(dec, nll_x.sum(-1), 0.0).sum() / (nd * L)
    masked = (z == mask_id) & ~dec[:, None]
    m = share * (w * jnp.where(masked, nll_y, 0.0).sum(-1)).sum() / ((total - nd) * L)
    loss = d + m - kernel_entropy(cfg.epsilon, mask_id)
    mask_fraction = share * masked.sum() / ((total - nd) * L)
    return loss, {"nelbo": loss, "bits_per_token": loss / LN2, "decoder_nll": d, "mask_fraction": mask_fraction}


# --------------------------------------------------------------------------------------------
# Gamma-hybrid: rate matrix (1 - gamma) Q_absorb + gamma Q_uniform, SEDD score entropy.
#
# Per token, with total noise sigma(t) = -log alpha(t) (alpha from diffusion.schedule; alpha(1)
# must be > 0, e.g. the log-linear schedule), the forward marginal from a clean token x is
#     m with probability 1 - a,  a = exp(-(1 - gamma) sigma);
#     otherwise b delta_x + (1 - b) / V over the V tokens,  b = exp(-gamma sigma)
# (the uniform jump may return x). The mask state never leaves. The bound is SEDD's diffusion
# weighted denoising score entropy plus the prior term,
#     -log p(x) <= int_0^1 sum_i sum_{y != z_i} Q_t(z_i <- y) [s_y - c_y log s_y + c_y (log c_y - 1)] dt
#                  + KL(q_1(. | x) || pi),
# c_y = q_t(y | x_i) / q_t(z_i | x_i) the true ratio, valid for any positive model ratio s. dlm
# uses the mean parametrisation s_y = E_{x0 ~ mu_i(. | z)} [q_t(y | x0) / q_t(z_i | x0)] — the exact
# ratio when mu is the exact posterior, so one denoiser (logits over V, per-token noise
# conditioning) serves the loss and the analytic sampler. In closed form, with u = (1 - b) / V:
#   z_i = m:     rate (1 - gamma) sigma' from every token; sum over y reduces to
#                (1 - gamma) sigma' a / (1 - a) KL(b delta_x + u || b mu + u);
#   z_i token:   rate gamma sigma' / V from every other token y; s_y = mu_y k/u + mu_z u/k + 1 - mu_y - mu_z
#                with k = b + u (c_y the same with mu = delta_x).
# The prior pi puts 1 - a(1) on the mask and a(1) / V on each token. At gamma = 0 the bound is
# the MDLM NELBO.
# --------------------------------------------------------------------------------------------


def gamma_levels(alpha, gamma: float):
    """(a, b, u, one_minus_a) from alpha(t) = exp(-sigma)."""
    sigma = -jnp.log(alpha)
    a = jnp.exp(-(1.0 - gamma) * sigma)
    b = jnp.exp(-gamma * sigma)
    return a, b, -jnp.expm1(-gamma * sigma), -jnp.expm1(-(1.0 - gamma) * sigma)


def gamma_corrupt(key, x0, alpha, gamma: float, mask_id: int):
    """z ~ q_t(. | x0); alpha broadcastable to x0."""
    V = mask_id
    a, b, _, _ = gamma_levels(alpha, gamma)
    k_m, k_r, k_u = jax.random.split(key, 3)
    tok = jnp.where(batch.uniform(k_r, x0.shape) < b, x0, batch.randint(k_u, x0.shape, 0, V))
    return jnp.where(batch.uniform(k_m, x0.shape) < a, tok, mask_id)


def _ratio(p_y, p_z, k_over_u, u_over_k):
    return p_y * k_over_u + p_z * u_over_k + (1.0 - p_y - p_z)


def gamma_terms(logits, z, x0, alpha, dalpha, gamma: float, mask_id: int):
    """Integrand of the bound at time t, per position [B, L] (nats): rate-weighted score entropy.
    alpha, dalpha: alpha(t), alpha'(t) broadcastable to [B, L]."""
    V = mask_id
    mu = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    logmu = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    a, b, one_b, one_a = gamma_levels(alpha, gamma)
    dsigma = -dalpha / alpha
    u = one_b / V
    onehot = jax.nn.one_hot(x0, V, dtype=jnp.float32)
    # masked positions: a/(1-a) * KL(b delta_x + u || b mu + u)
    nu_x = b[..., None] * onehot + u[..., None]
    log_nu_mu = jnp.logaddexp(jnp.log(b)[..., None] + logmu, jnp.log(jnp.maximum(u, 1e-30))[..., None])
    kl = jnp.sum(jnp.where(nu_x > 0, nu_x * (jnp.log(jnp.maximum(nu_x, 1e-30)) - log_nu_mu), 0.0), axis=-1)
    masked_term = (1.0 - gamma) * dsigma * a / jnp.maximum(one_a, 1e-30) * kl
    if gamma == 0:
        return jnp.where(z == mask_id, masked_term, 0.0)
    # visible positions: gamma sigma' / V * sum_{y != z} Bregman(c_y, s_y)
    zc = jnp.minimum(z, V - 1)
    k = b + u
    ku, uk = (k / jnp.maximum(u, 1e-30))[..., None], (u / k)[..., None]
    mu_z = jnp.take_along_axis(mu, zc[..., None], axis=-1)
    s = jnp.maximum(_ratio(mu, mu_z, ku, uk), 1e-30)
    c = _ratio(onehot, (x0 == zc).astype(jnp.float32)[..., None], ku, uk)
    breg = s - c * jnp.log(s) + jnp.where(c > 0, c * (jnp.log(jnp.maximum(c, 1e-30)) - 1.0), 0.0)
    not_z = jax.nn.one_hot(zc, V, dtype=jnp.float32) == 0
    visible_term = gamma * dsigma / V * jnp.sum(jnp.where(not_z, breg, 0.0), axis=-1)
    return jnp.where(z == mask_id, masked_term, visible_term)


def gamma_prior_kl(alpha1: float, gamma: float, V: int) -> float:
    """KL(q_1(. | x) || pi) per position (nats): equal for every x."""
    sigma = -math.log(alpha1)
    a, b = math.exp(-(1 - gamma) * sigma), math.exp(-gamma * sigma)
    u = (1 - b) / V
    kl = (b + u) * math.log((b + u) * V)
    if u > 0:
        kl += (V - 1) * u * math.log(u * V)
    return a * kl


def gamma_nelbo_per_sequence(apply_fn, x0, t, key, cfg: DiffusionConfig, mask_id: int, noise_conditioning: bool = True):
    """One-sample bound per row (nats/token) at times t [B] -> ([B], z)."""
    schedule = make_schedule(cfg)
    B, L = x0.shape
    tt = jnp.broadcast_to(t[:, None], (B, L))
    alpha, dalpha = schedule.alpha(tt), schedule.dalpha(tt)
    z = gamma_corrupt(key, x0, alpha, cfg.gamma, mask_id)
    logits = apply_fn(z, tt if noise_conditioning else None)
    terms = per_token(lambda lg, *a: gamma_terms(lg, *a, cfg.gamma, mask_id), logits, z, x0, alpha, dalpha)
    with jax.ensure_compile_time_eval():
        prior = gamma_prior_kl(float(schedule.alpha(jnp.float32(1.0))), cfg.gamma, mask_id)
    return terms.sum(-1) / L + prior, z


def gamma_reverse_probs(logits, z, alpha_t, alpha_s, gamma: float, mask_id: int):
    """Analytic reverse kernel p(x_s | x_t = z) per position over V + 1 states (tokens, then the
    mask): sum_x0 mu(x0 | z) q(x_s | x_t, x0), exact for a factorised x0-posterior. [B, L, V + 1]."""
    V = mask_id
    mu = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    a_t, b_t, one_b_t, one_a_t = gamma_levels(alpha_t, gamma)
    a_s, b_s, one_b_s, one_a_s = gamma_levels(alpha_s, gamma)
    u_t, u_s = one_b_t / V, one_b_s / V
    # from the mask: stay with (1 - a_s) / (1 - a_t), else token y with (a_s - a_t)(b_s mu + u_s) / (1 - a_t)
    tok = (a_s - a_t)[..., None] * (b_s[..., None] * mu + u_s[..., None]) / one_a_t[..., None]
    from_mask = jnp.concatenate([tok, (one_a_s / one_a_t)[..., None]], axis=-1)
    # from a token z: y ~ q(z | y at s) * sum_x0 mu(x0) q_s(y | x0) / q_t(z | x0)
    zc = jnp.minimum(z, V - 1)
    is_z = jax.nn.one_hot(zc, V, dtype=jnp.float32)
    f = 1.0 / (b_t[..., None] * is_z + u_t[..., None])  # 1 / q_t(z | x0) up to a_t
    post = b_s[..., None] * mu * f + u_s[..., None] * jnp.sum(mu * f, axis=-1, keepdims=True)
    r = b_t / b_s
    trans = r[..., None] * is_z + ((1.0 - r) / V)[..., None]
    w = trans * post
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    from_tok = jnp.concatenate([w, jnp.zeros_like(w[..., :1])], axis=-1)
    return jnp.where((z == mask_id)[..., None], from_mask, from_tok)
