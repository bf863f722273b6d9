"""The Objective registry: which process / hyperschedule / Prime combination a run uses.

`objective_for(diffusion, mask_id, noise_conditioning)` is the one place that reads those
settings. The objective it returns gives everything that depends on them:

- `per_sequence(apply_fn, x0, t, key, given)`: a one-sample bound of each row at times t [B]
  (nats/token), with the Prime joint objective beside it where there is one;
- `loss(apply_fn, x0, key, given) -> (loss, metrics)`: the training loss (antithetic times across
  the batch; the loss is the bound, or Prime's joint objective when the config trains on it);
- `bound(apply_fn, x0, key, t_samples, given) -> (nelbo [B], joint [B])`: the evaluation estimate,
  K stratified times t_k = (u + k/K) mod 1 per row (u drawn per row from `key`) averaged. The
  evaluator, the trainer's validation and `dlm.nelbo` all call this, so they agree on the
  same draws;
- `sampler`: the exact sampler family that matches the process (dlm.sampling.generate
  dispatches on it).

`given` [B, L] (bool, optional; data.format=pairs) marks a condition such as a prompt: those
positions are never masked and never scored, and every bound is of -log p(x[~given] | x[given])
per position not given (LLaDA's SFT loss). The hybrid processes corrupt every position and take
no condition.

apply_fn(xt, noise, attention=FULL, positions=None) -> logits [B, L, V]: `noise` is the
per-token time [B, L] (None unless the model is noise-conditioned); `denoiser(model)` builds it.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp

from dlm.config import ConfigError, DiffusionConfig, HyperscheduleKind, Layout, PrimeObjective, Process
from dlm.diffusion import batch, hybrid, hyperschedules
from dlm.diffusion.losses import LN2, nelbo_per_sequence, sample_times
from dlm.diffusion.prime import Codec, prime_nelbo_per_sequence
from dlm.models.attention import FULL
from dlm.models.transformer import mask_id_of


class SamplerFamily(enum.Enum):
    """The exact sampler of a process."""

    TOKENS = "tokens"  # ancestral reveals of whole tokens (MDLM / MD4)
    DIGITS = "digits"  # ancestral reveals of Prime sub-tokens
    GAMMA = "gamma"  # the analytic reverse kernel of the gamma-hybrid process
    HYPERSCHEDULE = "hyperschedule"  # the table-driven loop with the settled-token KV cache (also epsilon-hybrid)


def run_objective(cfg, data_vocab: int) -> Objective:
    """The objective of a run's Config whose data has `data_vocab` tokens (model.vocab_size and
    model.mask_id, when set, take precedence: imported families)."""
    V = cfg.model.vocab_size or data_vocab
    return objective_for(cfg.diffusion, mask_id_of(cfg.model, V), cfg.model.noise_conditioning, V)


def denoiser(model, losses: list | None = None):
    """The apply_fn of a Transformer: its logits come as LazyLogits, computed in chunks by the
    losses (dlm.models.logits). With a list `losses`, each call appends the model's
    mixture-of-experts training losses ({} for a dense model)."""
    def apply(xt, noise, attention=FULL, positions=None):
        out = model(xt, noise=noise, attention=attention, positions=positions, head=False, aux=losses is not None)
        if losses is None:
            return out
        losses.append(out[1])
        return out[0]

    return apply


def with_moe_losses(model, loss, metrics, losses: list):
    """(loss, metrics) with the weighted mixture-of-experts losses of the calls in `losses` added
    to the loss (averaged over the calls) and reported; unchanged for a dense model."""
    if not losses or not losses[0]:
        return loss, metrics
    moe = model.cfg.moe
    mean = {name: sum(d[name] for d in losses) / len(losses) for name in losses[0]}
    loss = loss + moe.load_balance * mean["load_balance"] + moe.router_z * mean["router_z"]
    return loss, dict(metrics, **mean)


@dataclasses.dataclass(frozen=True)
class PerSequence:
    nelbo: jax.Array  # [B] nats/token, a valid bound
    corrupted: jax.Array | None = None  # the model input x_t (Prime: sub-tokens [B, L, l]); None for hyperschedules
    joint: jax.Array | None = None  # [B] Prime's joint objective (not a bound)


@dataclasses.dataclass(frozen=True)
class Objective:
    """Base: the absorbing-process NELBO (MDLM / MD4) on the flat hyperschedule."""

    diffusion: DiffusionConfig
    mask_id: int  # dlm-trained models: the vocabulary size (the mask is the id after the last token)
    noise_conditioning: bool

    sampler = SamplerFamily.TOKENS
    decodes_clean = False  # the sampler ends with one pass that decodes x0 from the last state

    def reveal_logits(self, logits):
        """Logits of the token a reveal writes: the denoiser's own for absorbing processes."""
        return logits

    def per_sequence(self, apply_fn, x0, t, key, given=None) -> PerSequence:
        nelbo, xt = nelbo_per_sequence(apply_fn, x0, t, key, self.diffusion, self.mask_id, self.noise_conditioning, given)
        return PerSequence(nelbo, xt)

    def loss(self, apply_fn, x0, key, given=None):
        """(loss, metrics) of a training batch x0 [B, L]: the mean bound at antithetic times."""
        k_t, k_x = jax.random.split(key)
        r = self.per_sequence(apply_fn, x0, sample_times(k_t, x0.shape[0], self.diffusion), k_x, given)
        loss = r.nelbo.mean()
        return loss, {"nelbo": loss, "bits_per_token": loss / LN2, "mask_fraction": self.mask_fraction(r.corrupted)}

    def mask_fraction(self, corrupted):
        return (corrupted == self.mask_id).mean()

    def bound_samples(self, apply_fn, x0, key, t_samples: int = 1, given=None):
        """(nelbo [K, B], joint [K, B] or None) in nats/token: each row's bound at K stratified
        times t_k = (u + k / K) mod 1 (u one uniform per row), the draws bound() averages."""
        B = x0.shape[0]
        k_u, k_x = jax.random.split(key)
        u = batch.uniform(k_u, (B,))
        values, joints = [], []
        for k in range(t_samples):
            t = jnp.clip(jnp.mod(u + k / t_samples, 1.0), self.diffusion.t_min, 1.0)
            r = self.per_sequence(apply_fn, x0, t, jax.random.fold_in(k_x, k), given=given)
            values.append(r.nelbo)
            joints.append(r.joint)
        return jnp.stack(values), None if joints[0] is None else jnp.stack(joints)

    def bound(self, apply_fn, x0, key, t_samples: int = 1, given=None):
        """(nelbo [B], joint [B]) in nats/token averaged over K stratified times per row; the
        joint objective is 0 without Prime."""
        values, joints = self.bound_samples(apply_fn, x0, key, t_samples, given)
        total = joint = jnp.zeros((x0.shape[0],), jnp.float32)
        for k in range(t_samples):  # summed in order, as the samples were drawn
            total = total + values[k]
            if joints is not None:
                joint = joint + joints[k]
        return total / t_samples, joint / t_samples


class MaskedDiffusion(Objective):
    pass


class PrimeDiffusion(Objective):
    """MDM-Prime: tokens split into l sub-tokens masked independently; the bound is over digit
    marginals, and `diffusion.prime.objective=joint` trains on the published joint objective."""

    sampler = SamplerFamily.DIGITS

    @property
    def codec(self) -> Codec:
        return Codec(self.mask_id, self.diffusion.prime.l)

    def per_sequence(self, apply_fn, x0, t, key, given=None) -> PerSequence:
        valid, joint, yt = prime_nelbo_per_sequence(apply_fn, x0, t, key, self.diffusion, self.codec, self.noise_conditioning, given)
        return PerSequence(valid, yt, joint=joint)

    def mask_fraction(self, corrupted):
        return (corrupted == self.codec.mask_id).mean()

    def loss(self, apply_fn, x0, key, given=None):
        k_t, k_x = jax.random.split(key)
        r = self.per_sequence(apply_fn, x0, sample_times(k_t, x0.shape[0], self.diffusion), k_x, given)
        valid, joint = r.nelbo.mean(), r.joint.mean()
        loss = joint if self.diffusion.prime.objective == PrimeObjective.JOINT else valid
        return loss, {"nelbo": valid, "bits_per_token": valid / LN2, "prime_joint_objective": joint,
                      "mask_fraction": self.mask_fraction(r.corrupted)}


class EpsilonHybrid(Objective):
    """Masking plus a uniform replacement with probability epsilon (dlm.diffusion.hybrid)."""

    sampler = SamplerFamily.HYPERSCHEDULE
    decodes_clean = True  # reveals write y ~ (1 - eps) mu + eps / V; a last pass decodes x ~ mu(. | y)

    def reveal_logits(self, logits):
        return hybrid.y_log_probs(logits, self.diffusion.epsilon)

    def per_sequence(self, apply_fn, x0, t, key, given=None) -> PerSequence:
        no_condition(self, given)
        nelbo, z = hybrid.nelbo_per_sequence(apply_fn, x0, t, key, self.diffusion, self.mask_id, self.noise_conditioning)
        return PerSequence(nelbo, z)

    def loss(self, apply_fn, x0, key, given=None):
        """One forward pass per row: the decoder term on B // 8 rows, the diffusion term on the rest."""
        no_condition(self, given)
        if batch.rows(x0.shape[0])[1] < 2:
            return super().loss(apply_fn, x0, key)
        return hybrid.epsilon_hybrid_loss(apply_fn, x0, key, self.diffusion, self.mask_id, self.noise_conditioning)


class GammaHybrid(Objective):
    """Rate matrix (1 - gamma) absorbing + gamma uniform, SEDD score entropy (dlm.diffusion.hybrid)."""

    sampler = SamplerFamily.GAMMA

    def per_sequence(self, apply_fn, x0, t, key, given=None) -> PerSequence:
        no_condition(self, given)
        nelbo, z = hybrid.gamma_nelbo_per_sequence(apply_fn, x0, t, key, self.diffusion, self.mask_id, self.noise_conditioning)
        return PerSequence(nelbo, z)


class Hyperschedule(Objective):
    """A noise level per position (autoregressive, block, slide, block_slide): t picks the step
    through u = 1 - t; layout=double trains every block at once on [clean | noised]."""

    sampler = SamplerFamily.HYPERSCHEDULE

    def schedule(self, length: int) -> hyperschedules.Hyperschedule:
        return hyperschedules.from_config(self.diffusion, length)

    def per_sequence(self, apply_fn, x0, t, key, given=None, layout: Layout = Layout.SINGLE) -> PerSequence:
        per_row = hyperschedules.double_nelbo_per_sequence if layout == Layout.DOUBLE else hyperschedules.nelbo_per_sequence
        nelbo = per_row(apply_fn, x0, 1.0 - t, key, self.diffusion, self.schedule(x0.shape[1]), self.mask_id,
                        self.noise_conditioning, given)
        return PerSequence(nelbo)

    def loss(self, apply_fn, x0, key, given=None):
        k_t, k_x = jax.random.split(key)
        r = self.per_sequence(apply_fn, x0, sample_times(k_t, x0.shape[0], self.diffusion), k_x, given, self.diffusion.layout)
        loss = r.nelbo.mean()
        return loss, {"nelbo": loss, "bits_per_token": loss / LN2}


def no_condition(objective, given) -> None:
    if given is not None:
        raise ConfigError(f"The {type(objective).__name__} objective corrupts every position and takes no condition; "
                          "train prompt/response data with the absorbing process.")


def objective_for(diffusion: DiffusionConfig, mask_id: int, noise_conditioning: bool, vocab_size: int | None = None) -> Objective:
    """The objective of a diffusion config (validated by dlm.config: hybrids and Prime use the flat
    hyperschedule, hybrids use l = 1). `vocab_size` (the logit columns) tells whether the mask is
    appended (mask_id = vocab_size) or inside the vocabulary (an imported family), which only
    the absorbing process over whole tokens supports: the hybrids draw uniform tokens from
    [0, mask_id) and Prime encodes ids below it."""
    if vocab_size is not None and mask_id < vocab_size and (diffusion.process != Process.ABSORBING or diffusion.prime.l > 1):
        raise ConfigError(f"This model's mask id {mask_id} lies inside its vocabulary of {vocab_size} (an imported family); "
                          "it trains and samples with diffusion.process=absorbing and prime.l=1 only.")
    if diffusion.hyperschedule != HyperscheduleKind.FLAT:
        return Hyperschedule(diffusion, mask_id, noise_conditioning)
    if diffusion.process == Process.GAMMA_HYBRID:
        return GammaHybrid(diffusion, mask_id, noise_conditioning)
    if diffusion.process == Process.EPSILON_HYBRID:
        return EpsilonHybrid(diffusion, mask_id, noise_conditioning)
    if diffusion.prime.l > 1:
        return PrimeDiffusion(diffusion, mask_id, noise_conditioning)
    return MaskedDiffusion(diffusion, mask_id, noise_conditioning)
