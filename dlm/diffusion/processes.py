"""Corruption kernels q(x_t | x_0). The mask token is id `vocab_size`, after the real vocabulary."""

from __future__ import annotations

import jax.numpy as jnp

from dlm.diffusion import batch


def absorbing_corrupt(key, x0, alpha_t, mask_id: int, fixed=None):
    """Mask each token independently with probability 1 - alpha_t.

    x0: [B, L] int tokens; alpha_t: broadcastable to [B, L]; fixed: optional [B, L] bool of
    positions that are never masked (prompts). Returns x_t [B, L].
    """
    keep = batch.uniform(key, x0.shape) < alpha_t
    if fixed is not None:
        keep = keep | fixed
    return jnp.where(keep, x0, mask_id)
