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
import enum

import jax
import jax.numpy as jnp
import numpy as np

from dlm.config import ConfigError

SETTLED, ACTIVE, FUTURE = 0, 1, 2


class Kind(str, enum.Enum):
    FLAT = "flat"
    AUTOREGRESSIVE = "autoregressive"
    BLOCK = "block"
    SLIDE = "slide"


@dataclasses.dataclass(frozen=True)
class Hyperschedule:
    """`kind` over `length` positions; `width` is the block / window width, `steps` the steps per
    block (block) or in all (flat)."""

    kind: Kind
    length: int
    width: int = 1
    steps: int = 16

    def __post_init__(self):
        if self.kind in (Kind.BLOCK, Kind.SLIDE) and (self.width < 1 or self.length % self.width):
            raise ConfigError(f"Hyperschedule width {self.width} must divide the sequence length {self.length}.")
        if self.steps < 1:
            raise ConfigError(f"Hyperschedule steps={self.steps} must be at least 1.")

    @property
    def block_width(self) -> int:
        """Width of the block-causal structure among settled tokens (1 = causal)."""
        return {Kind.FLAT: self.length, Kind.AUTOREGRESSIVE: 1}.get(self.kind, self.width)

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
    Future positions are hidden as keys and see nothing as queries."""
    L = role.shape[-1]
    blk = jnp.arange(L) // block_width
    block_causal = blk[None, :] <= blk[:, None]  # [q, k]
    q, k = role[..., :, None], role[..., None, :]
    settled_q = (q == SETTLED) & (k == SETTLED) & block_causal
    active_q = (q == ACTIVE) & (k != FUTURE)
    return settled_q | active_q


def step_terms(logits, x0, xt, alpha_now, alpha_next, role, mask_id: int):
    """Per-token NELBO terms [B, L] of one step: reveal probability x masked CE at active positions."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0]
    w = (alpha_next - alpha_now) / jnp.maximum(1.0 - alpha_now, 1e-12)
    return jnp.where((role == ACTIVE) & (xt == mask_id), w * nll, 0.0)


def corrupt_step(key, x0, alpha_now, role, mask_id: int):
    """Input of step n: settled tokens clean, active tokens masked with probability 1 - alpha,
    future tokens masked (and hidden by the attention mask)."""
    keep = jax.random.uniform(key, x0.shape) < alpha_now
    return jnp.where(role == SETTLED, x0, jnp.where((role == ACTIVE) & keep, x0, mask_id))
