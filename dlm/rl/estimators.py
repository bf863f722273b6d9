"""Estimates of log pi(o | q), the policy's log-likelihood of a response o given its prompt q.

A masked diffusion model has no tractable likelihood; a policy gradient needs one. Each
estimator below returns, per rollout, a per-token value phi ~ log pi(o | q) / |o| (the mean over
the response positions, the positions not given) from a key, so that the current policy, the
rollout policy and the frozen reference are scored on the same draws (the ratio is exactly 1
and the KL exactly 0 where the parameters agree). Notation: L_t(o) = (1/t) sum over the
positions masked at rate t of log f(o^k | z_t, q), whose mean over t ~ U(0, 1) and the masks is
the ELBO <= log pi(o | q) (continuous time; for a denoiser that does not read the time, the
masking rate t can stand for any schedule's 1 - alpha).

- `elbo`: minus the run objective's bound (dlm.objectives: its process, schedule and
  hyperschedule) at K stratified times. An unbiased estimate of the ELBO, a lower bound: its
  bias as an estimate of log pi is the bound's gap (>= 0, the same at every rollout only for a
  perfect denoiser). Every model dlm trains or imports.
- `d1` (d1's diffu-GRPO): one pass with the whole response masked and each prompt token masked
  with probability rl.mask_prompt; phi is the mean of log f(o^k | q', all masked). It is the ELBO's
  integrand at t = 1 alone (a mean-field, one-step score), biased in both directions: not a
  bound, and its prompt noise changes the condition. Cheapest: one pass.
- `coupled` (DiffuCoder's coupled-GRPO): K pairs of complementary masks, t ~ U(rl.coupled_range)
  and 1 - t, every response token masked in exactly one mask of a pair; phi is the mean of the
  pair's two weighted terms (L_t + L_{1-t}) / 2, antithetic draws of the ELBO. Unbiased for the
  ELBO when the range is [0, 1]; a narrower range (DiffuCoder's [0.2, 0.8], without its t = 1
  term) averages the integrand over that range only: biased. Two passes per pair.
- `sandwich` (SPG): the pairs' ELBO estimate (a lower bound) and the Renyi upper bound
  UB = (1/beta) sum_k log E_{t, z}[(1/t) 1(z^k masked) f(o^k | z)^beta], the expectation replaced
  by the mean over the K pairs' 2K draws (every token is masked in one draw of each pair, so the
  log never sees 0). The log outside the mean makes the UB estimate biased low (Jensen), less
  with more pairs. `loss` uses the lower bound for rollouts with positive advantage (raising a
  lower bound raises the likelihood) and rl.sandwich_mix * UB + (1 - mix) * ELBO for negative
  ones (lowering an upper bound lowers it).

- `trace` (TraceRL): the rollout's decoding trace is the trajectory. Pass s of the parallel
  decoder saw x_s (the prompt and the tokens committed before s) and committed a set C_s of
  tokens, each drawn from softmax(logits / T); log pi(o | q) over the token draws is
  sum_s sum_{k in C_s} log softmax(f(x_s) / T)[o^k]. Each update rescores t_samples passes per
  rollout (stratified over its S passes, each weighted S / t_samples): an unbiased estimate of
  that sum, exact for the draws of a decoder without KV caches or credit (with them the passes
  it rescores are full passes with plain logits: approximate). With the deterministic commit
  rules it leaves out the probability of *which* positions the rule committed (a function of the
  scores and the draws, which no gradient reaches). With the stochastic threshold rule
  (sampling.decode.commit_temperature = kappa > 0) the decisions are part of the policy and of
  the trajectory's probability: each position still masked in the pass's block committed with
  probability c = sigmoid((score - tau) / kappa) and waited with 1 - c, independently, and when
  none committed the best did, so a pass that committed only its best position has probability
  prod over the others of (1 - c) (both ways of getting there). The estimate then adds those log
  probabilities, so the gradient also moves the scores: it lowers the confidence of positions
  committed on failed rollouts and teaches when to wait.

d1, coupled, sandwich and trace mask positions themselves, so they need a flat absorbing model
(MDLM / MD4 over whole tokens) without noise conditioning (d1: with it, the time 1); `elbo`
goes through the objective registry and takes whatever it takes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlm.config import ConfigError, DecodeConfig, Estimator, HyperscheduleKind, Process, RLConfig, Score
from dlm.diffusion import batch as rows
from dlm.diffusion.losses import token_nll
from dlm.models.logits import per_token
from dlm.sampling.parallel import commit_logit, scores


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Estimate:
    """Per-rollout estimates [B] of log pi(o | q) / |o| (nats per response token)."""

    lower: jax.Array  # the estimator's value (for sandwich: its lower bound)
    upper: jax.Array | None = None  # sandwich: the upper bound


@dataclasses.dataclass(frozen=True)
class CommitPolicy:
    """The rollouts' stochastic threshold rule (sampling.decode with commit_temperature > 0) as
    the trace estimator scores it: the score, tau and kappa, and the blocks (the decoder's
    prompt_len and block_length) that say which masked positions a pass could commit."""

    score: Score
    tau: float
    kappa: float
    prompt_len: int
    block_length: int

    @classmethod
    def of(cls, dc: DecodeConfig, prompt_len: int) -> "CommitPolicy | None":
        if dc.commit_temperature <= 0:
            return None
        return cls(dc.score, dc.tau, dc.commit_temperature, prompt_len, dc.block_length)


def check_estimator(rl: RLConfig, objective, noise_conditioning: bool) -> None:
    """One sentence when the estimator cannot score this model."""
    if rl.estimator == Estimator.ELBO:
        return
    d = objective.diffusion
    if d.hyperschedule != HyperscheduleKind.FLAT or d.process != Process.ABSORBING or d.prime.l > 1:
        raise ConfigError(f"rl.estimator={rl.estimator.value} masks positions itself and needs a flat absorbing model over whole "
                          "tokens; this model's hyperschedule, process or Prime setting needs rl.estimator=elbo.")
    if noise_conditioning and rl.estimator not in (Estimator.D1, Estimator.TRACE):
        raise ConfigError(f"rl.estimator={rl.estimator.value} draws masking rates, not times, and needs a model without noise "
                          "conditioning; use rl.estimator=elbo or d1 with this model.")


def _token_logp(logits, x0):
    """log f(x0^k | .) [B, L]."""
    return -per_token(token_nll, logits, x0)


def _response(given, x0):
    resp = ~given
    return resp, jnp.maximum(resp.sum(-1), 1).astype(jnp.float32)


def elbo(objective, apply_fn, x0, given, key, t_samples: int) -> Estimate:
    nelbo, _ = objective.bound_samples(apply_fn, x0, key, t_samples, given=given)
    return Estimate(-jnp.mean(nelbo, axis=0))


def d1(apply_fn, x0, given, key, mask_id: int, p_prompt: float, noise_conditioning: bool) -> Estimate:
    resp, n = _response(given, x0)
    hide = rows.uniform(key, x0.shape) < p_prompt
    xt = jnp.where(resp | hide, mask_id, x0)
    noise = jnp.where(xt == mask_id, 1.0, 0.0) if noise_conditioning else None
    logp = _token_logp(apply_fn(xt, noise), x0)
    return Estimate(jnp.where(resp, logp, 0.0).sum(-1) / n)


def pair_masks(key, given, t_samples: int, lo: float, hi: float, t_min: float):
    """K complementary pairs: (rates t [K, B] in [lo, hi] stratified per row, masks [K, B, L] of the
    first draw; the second masks the other response positions at rate 1 - t). Clipped to
    [t_min, 1 - t_min] so that neither weight 1/t nor 1/(1 - t) is infinite."""
    B, L = given.shape
    k_u, k_m = jax.random.split(key)
    u = rows.uniform(k_u, (B,))
    t = jnp.stack([lo + (hi - lo) * jnp.mod(u + k / t_samples, 1.0) for k in range(t_samples)])
    t = jnp.clip(t, t_min, 1.0 - t_min)
    v = jnp.stack([rows.uniform(jax.random.fold_in(k_m, k), (B, L)) for k in range(t_samples)])
    return t, (v < t[:, :, None]) & ~given[None]


def _pair_logps(apply_fn, x0, given, key, rl: RLConfig, mask_id: int, t_min: float):
    """(t [K, B], first masks [K, B, L], log f at the first draw's and at the second draw's inputs
    [K, B, L]): each pair's two inputs in one pass of 2B rows."""
    K = rl.t_samples
    t, m1 = pair_masks(key, given, K, *rl.coupled_range, t_min)
    resp = ~given
    m2 = resp[None] & ~m1
    inputs = jnp.concatenate([jnp.where(m1, mask_id, x0[None]), jnp.where(m2, mask_id, x0[None])])  # [2K, B, L]
    B, L = x0.shape
    logp = _token_logp(apply_fn(inputs.reshape(2 * K * B, L), None), jnp.tile(x0, (2 * K, 1))).reshape(2 * K, B, L)
    return t, m1, m2, logp[:K], logp[K:]


def coupled(apply_fn, x0, given, key, rl: RLConfig, mask_id: int, t_min: float) -> Estimate:
    t, m1, m2, lp1, lp2 = _pair_logps(apply_fn, x0, given, key, rl, mask_id, t_min)
    _, n = _response(given, x0)
    terms = jnp.where(m1, lp1 / t[:, :, None], 0.0) + jnp.where(m2, lp2 / (1.0 - t)[:, :, None], 0.0)  # [K, B, L]
    return Estimate(0.5 * terms.sum(-1).mean(0) / n)


def sandwich(apply_fn, x0, given, key, rl: RLConfig, mask_id: int, t_min: float) -> Estimate:
    t, m1, m2, lp1, lp2 = _pair_logps(apply_fn, x0, given, key, rl, mask_id, t_min)
    resp, n = _response(given, x0)
    lower = 0.5 * (jnp.where(m1, lp1 / t[:, :, None], 0.0) + jnp.where(m2, lp2 / (1.0 - t)[:, :, None], 0.0)).sum(-1).mean(0) / n
    beta, K = rl.sandwich_beta, rl.t_samples
    # log of the mean over the 2K draws of (1/rate) 1(masked) f^beta, per token, in log space
    terms = jnp.concatenate([jnp.where(m1, beta * lp1 - jnp.log(t)[:, :, None], -jnp.inf),
                             jnp.where(m2, beta * lp2 - jnp.log1p(-t)[:, :, None], -jnp.inf)])  # [2K, B, L]
    log_mean = jax.nn.logsumexp(terms, axis=0) - jnp.log(2.0 * K)
    upper = jnp.where(resp, log_mean / beta, 0.0).sum(-1) / n
    return Estimate(lower, upper)


def decisions_log_prob(score, now, waiting, commit: CommitPolicy):
    """[B]: log-probability of one pass's commit decisions under the stochastic threshold rule:
    `now` [B, L] the positions it committed, `waiting` [B, L] those it could have committed and
    did not, `score` [B, L] their scores in that pass."""
    z = commit_logit(score, commit.tau, commit.kappa)
    eligible = now | waiting
    best = jnp.argmax(jnp.where(eligible, score, -jnp.inf), axis=-1)
    is_best = jnp.arange(score.shape[-1])[None] == best[:, None]
    only_best = (now.sum(-1) == 1) & (now & is_best).any(-1)  # committed by a draw or as the fallback
    terms = jnp.where(now, jax.nn.log_sigmoid(z), jnp.where(waiting, jax.nn.log_sigmoid(-z), 0.0))
    return jnp.where(only_best[:, None] & is_best, 0.0, terms).sum(-1)


def trace(apply_fn, x0, given, commit_step, key, t_samples: int, temperature: float, mask_id: int,
          noise_conditioning: bool, commit: CommitPolicy | None = None) -> Estimate:
    resp, n = _response(given, x0)
    B, L = x0.shape
    passes = jnp.maximum(commit_step.max(-1) + 1, 1)  # [B]
    u = rows.uniform(key, (B,))
    total = jnp.zeros(B, jnp.float32)
    if commit is not None:
        block = (jnp.arange(L) - commit.prompt_len) // commit.block_length  # the block that decodes each position

    def token_and_score(lg, t):
        return -token_nll(lg / temperature, t), scores(lg, t, commit.score) if commit is not None else jnp.zeros_like(t)

    for k in range(t_samples):
        s = jnp.minimum(jnp.floor(jnp.mod(u + k / t_samples, 1.0) * passes), passes - 1).astype(jnp.int32)  # [B]
        later = resp & ((commit_step >= s[:, None]) | (commit_step < 0))
        xt = jnp.where(later, mask_id, x0)
        noise = jnp.where(xt == mask_id, 1.0, 0.0) if noise_conditioning else None
        logp, score = per_token(token_and_score, apply_fn(xt, noise), x0)
        now = resp & (commit_step == s[:, None])
        value = jnp.where(now, logp, 0.0).sum(-1)
        if commit is not None:
            active = jnp.where(now, block[None], -1).max(-1)  # [B]: the block pass s decoded
            waiting = resp & (commit_step > s[:, None]) & (block[None] == active[:, None])
            value = value + decisions_log_prob(score, now, waiting, commit)
        total = total + value * passes / t_samples
    return Estimate(total / n)


def estimate(rl: RLConfig, objective, apply_fn, x0, given, key, noise_conditioning: bool, commit_step=None,
             temperature: float = 1.0, commit: CommitPolicy | None = None) -> Estimate:
    """The configured estimator of every rollout x0 [B, L] (given [B, L]: the prompt's positions;
    commit_step [B, L]: the decoding trace, for rl.estimator=trace, drawn at `temperature` and,
    with `commit`, by the stochastic threshold rule)."""
    kind = rl.estimator
    if kind == Estimator.TRACE:
        return trace(apply_fn, x0, given, commit_step, key, rl.t_samples, temperature, objective.mask_id, noise_conditioning,
                     commit)
    if kind == Estimator.ELBO:
        return elbo(objective, apply_fn, x0, given, key, rl.t_samples)
    if kind == Estimator.D1:
        return d1(apply_fn, x0, given, key, objective.mask_id, rl.mask_prompt, noise_conditioning)
    t_min = max(objective.diffusion.t_min, 1e-4)
    if kind == Estimator.COUPLED:
        return coupled(apply_fn, x0, given, key, rl, objective.mask_id, t_min)
    return sandwich(apply_fn, x0, given, key, rl, objective.mask_id, t_min)
