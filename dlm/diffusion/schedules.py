"""Noise schedules alpha(t): the probability that a token is still clean at time t.

t in [0, 1], t = 1 is pure noise, alpha(0) = 1 and alpha(1) = 0 (log-linear: eps). Every schedule
gives `alpha`, its derivative `dalpha`, and the continuous-time ELBO weight
    w(t) = -alpha'(t) / (1 - alpha(t)),
computed from a closed form so that no 0/0 appears near t = 0.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from dlm.config import DiffusionConfig, Schedule


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """alpha(t) of one family. `kind` picks the formula, `k` and `eps` its parameters."""

    kind: Schedule = Schedule.LINEAR
    k: float = 2.0
    eps: float = 1e-3

    def alpha(self, t):
        t = jnp.asarray(t, jnp.float32) if not hasattr(t, "dtype") else t
        if self.kind == Schedule.LINEAR:
            return 1.0 - t
        if self.kind == Schedule.COSINE:
            return 1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))
        if self.kind == Schedule.POLYNOMIAL:
            return 1.0 - t**self.k
        if self.kind == Schedule.LOGLINEAR:
            return 1.0 - (1.0 - self.eps) * t
        raise ValueError(f"unknown schedule {self.kind}")

    def dalpha(self, t):
        """alpha'(t)."""
        t = jnp.asarray(t)
        if self.kind == Schedule.LINEAR:
            return -jnp.ones_like(t)
        if self.kind == Schedule.COSINE:
            return -0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))
        if self.kind == Schedule.POLYNOMIAL:
            return -self.k * t ** (self.k - 1.0)
        if self.kind == Schedule.LOGLINEAR:
            return -(1.0 - self.eps) * jnp.ones_like(t)
        raise ValueError(f"unknown schedule {self.kind}")

    def weight(self, t):
        """Continuous-time ELBO weight -alpha'(t) / (1 - alpha(t)) >= 0."""
        t = jnp.asarray(t)
        if self.kind in (Schedule.LINEAR, Schedule.LOGLINEAR):
            return 1.0 / t
        if self.kind == Schedule.COSINE:
            return 0.5 * math.pi * jnp.tan(0.5 * math.pi * (1.0 - t))
        if self.kind == Schedule.POLYNOMIAL:
            return self.k / t
        raise ValueError(f"unknown schedule {self.kind}")

    def discrete_weight(self, s, t):
        """Weight of the masked cross-entropy in one step s < t of the T-step NELBO:
        (alpha_s - alpha_t) / (1 - alpha_t), the probability a token masked at t was revealed at s."""
        return (self.alpha(s) - self.alpha(t)) / (1.0 - self.alpha(t))


def make_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    return NoiseSchedule(kind=cfg.schedule, k=cfg.exponent, eps=cfg.loglinear_eps)
