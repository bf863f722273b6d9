"""Partial masking (MDM-Prime): tokens as l base-b sub-tokens that can be partly revealed.

A token x in {0..V-1} becomes digits y_j = floor(x / b^(l-1-j)) mod b (most significant first),
b = ceil(V^(1/l)) (the smallest b with b^l >= V). Each of the L*l sub-tokens is masked
independently; the sub-token mask id is b. The denoiser outputs a joint softmax over the V
tokens; carry-over sets the probability of every token whose digits disagree with a visible
sub-token to zero (codes >= V are never in the softmax).

Two losses (continuous time, weight w(t) = -alpha'/(1 - alpha)):
- the published *joint objective*: sum over tokens with a masked digit of w(t) * -log p(x0 | y_t).
  It charges all masked digits of a token at the rate of one reveal, so it can fall below the
  entropy of the data: it is an objective, not a likelihood bound.
- the *valid NELBO*: sum over masked sub-tokens of w(t) * -log p_j(y0_j | y_t), with p_j the
  digit marginal of the model's joint. It is the MDLM NELBO of the sub-token sequence under the
  model that reveals digits from these marginals; the codec is a bijection onto the valid codes,
  which are the only ones that model produces, so it bounds the token sequence's NLL.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dlm.config import ConfigError, DiffusionConfig
from dlm.diffusion import batch
from dlm.diffusion.losses import scored_count, time_and_weight
from dlm.diffusion.schedules import make_schedule


def base_for(vocab_size: int, l: int) -> int:
    """Smallest b with b^l >= vocab_size (exact integer arithmetic)."""
    b = max(int(round(vocab_size ** (1.0 / l))), 1)
    while b**l < vocab_size:
        b += 1
    while b > 1 and (b - 1) ** l >= vocab_size:
        b -= 1
    return b


@dataclasses.dataclass(frozen=True)
class Codec:
    vocab_size: int
    l: int

    def __post_init__(self):
        if self.l < 1:
            raise ConfigError(f"diffusion.prime.l={self.l} must be at least 1.")
        max_l = max(int(np.ceil(np.log2(max(self.vocab_size, 2)))), 1)
        if self.l > max_l:
            raise ConfigError(f"diffusion.prime.l={self.l} is too large for a vocabulary of {self.vocab_size}: the base "
                              f"b = ceil(V^(1/l)) would fall below 2 (leading digits always 0); use l <= {max_l}.")

    @property
    def base(self) -> int:
        return base_for(self.vocab_size, self.l)

    @property
    def mask_id(self) -> int:
        """The sub-token mask id (b)."""
        return self.base

    @property
    def powers(self) -> np.ndarray:
        return self.base ** np.arange(self.l - 1, -1, -1)

    @property
    def digits(self) -> np.ndarray:
        """[V, l] digit table of every valid token."""
        return self.encode_np(np.arange(self.vocab_size))

    def encode_np(self, x) -> np.ndarray:
        return (np.asarray(x)[..., None] // self.powers) % self.base

    def encode(self, x):
        """x [...] -> y [..., l]."""
        return (x[..., None] // jnp.asarray(self.powers, x.dtype)) % self.base

    def decode(self, y):
        """y [..., l] (no masks) -> x [...]."""
        return (y * jnp.asarray(self.powers, y.dtype)).sum(-1)

    def valid_codes(self) -> np.ndarray:
        """[b^l] bool: which codes decode to a token of the vocabulary."""
        return np.arange(self.base**self.l) < self.vocab_size


def carry_over(logits, yt, codec: Codec):
    """Set logits of tokens inconsistent with the visible sub-tokens to -inf.

    logits [..., V], yt [..., l] (mask id b) -> [..., V]."""
    consistent = None
    for j, table in enumerate(_digit_tables(codec)):  # one [..., V] gather per digit, no [..., V, l] tensor
        ok = jnp.take(table, yt[..., j], axis=0)
        consistent = ok if consistent is None else consistent & ok
    return jnp.where(consistent, logits, -jnp.inf)


def _digit_tables(codec: Codec):
    """Per digit j, [b + 1, V] bool: row k < b marks the tokens whose digit j is k; row b (the
    sub-token mask) allows every token."""
    digits = codec.digits
    rows = np.arange(codec.base + 1)[:, None]
    return [jnp.asarray((digits[:, j][None] == rows) | (rows == codec.base)) for j in range(codec.l)]


def digit_log_marginals(logp, codec: Codec):
    """log p_j(k) = log sum_{v: digit_j(v) = k} p(v): logp [..., V] -> [..., l, b]."""
    p = jnp.exp(logp)
    marg = jnp.stack([jnp.zeros((*p.shape[:-1], codec.base), p.dtype).at[..., jnp.asarray(codec.digits[:, j])].add(p)
                      for j in range(codec.l)], axis=-2)  # a scatter-add per digit, no [V, l, b] table
    return jnp.log(jnp.maximum(marg, 1e-30))


def prime_terms(logits, x0, yt, weight, codec: Codec):
    """Per-token (valid NELBO, joint objective) terms [B, L] in nats.

    logits [B, L, V] from the denoiser, x0 [B, L] clean tokens, yt [B, L, l] noised sub-tokens,
    weight broadcastable to [B, L]."""
    logp = jax.nn.log_softmax(carry_over(logits.astype(jnp.float32), yt, codec), axis=-1)
    w = jnp.asarray(weight)
    w = w.reshape(w.shape + (1,) * (x0.ndim - w.ndim))
    masked = yt == codec.mask_id  # [B, L, l]
    y0 = codec.encode(x0)
    marg = digit_log_marginals(logp, codec)  # [B, L, l, b]
    nll_digit = -jnp.take_along_axis(marg, y0[..., None], axis=-1)[..., 0]  # [B, L, l]
    valid = w * jnp.where(masked, nll_digit, 0.0).sum(-1)
    nll_token = -jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0]
    joint = w * jnp.where(masked.any(-1), nll_token, 0.0)
    return valid, joint


def corrupt_subtokens(key, x0, alpha_t, codec: Codec):
    """Mask each of the L*l sub-tokens independently with probability 1 - alpha_t ([B] or [B, L])."""
    y0 = codec.encode(x0)
    a = jnp.asarray(alpha_t)
    a = a.reshape(a.shape + (1,) * (y0.ndim - a.ndim))
    keep = batch.uniform(key, y0.shape) < a
    return jnp.where(keep, y0, codec.mask_id)


def prime_nelbo_per_sequence(apply_fn, x0, t, key, cfg: DiffusionConfig, codec: Codec, noise_conditioning: bool = False,
                             given=None):
    """(valid NELBO [B], joint objective [B]) in nats/token at times t [B]; the sub-tokens of
    `given` positions (a condition, optional) stay clean and are not scored.

    apply_fn(yt [B, L, l], t_tokens | None) -> logits [B, L, V]."""
    schedule = make_schedule(cfg)
    B, L = x0.shape
    t, w = time_and_weight(t, schedule, cfg)
    yt = corrupt_subtokens(key, x0, schedule.alpha(t)[:, None], codec)
    if given is not None:
        yt = jnp.where(given[..., None], codec.encode(x0), yt)
    logits = apply_fn(yt, jnp.broadcast_to(t[:, None], (B, L)) if noise_conditioning else None)
    from dlm.models.logits import per_token

    valid, joint = per_token(lambda lg, x, y, ww: prime_terms(lg, x, y, ww, codec), logits, x0, yt,
                             jnp.broadcast_to(jnp.reshape(w, (B, 1)), (B, L)))
    n = scored_count(x0, given)
    return valid.sum(-1) / n, joint.sum(-1) / n, yt
