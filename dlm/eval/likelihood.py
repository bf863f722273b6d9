"""Validation NELBO with Monte-Carlo error bars.

Each window gets K stratified times t_k = (u + k/K) mod 1 and fresh masks; the window's
estimate is the mean over k, and the reported error is the standard error over windows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlm.config import DiffusionConfig
from dlm.diffusion.losses import nelbo_per_sequence
from dlm.models.attention import FULL
from dlm.parallel.mesh import batch_sharding, mesh_context, replicated


def make_eval_fn(graphdef, diffusion: DiffusionConfig, mask_id: int, cond: bool, t_samples: int, mesh=None, seq_len: int = 0):
    """Jitted (params, rows [B, L], key) -> per-row (NELBO [B], Prime joint objective [B]) in nats/token,
    averaged over K draws. `mask_id` is the vocabulary size; the joint objective is 0 without Prime."""
    codec = None
    if diffusion.prime.l > 1:
        from dlm.diffusion.prime import Codec, prime_nelbo_per_sequence

        codec = Codec(mask_id, diffusion.prime.l)

    hyper = None
    if diffusion.hyperschedule.value != "flat":
        from dlm.diffusion import hyperschedules

        hyper = hyperschedules.from_config(diffusion, seq_len)

    def fn(params, rows, key):
        model = nnx.merge(graphdef, params)
        apply_fn = lambda xt, tt, attention=FULL, positions=None: model(xt, noise=tt, attention=attention, positions=positions)
        B = rows.shape[0]
        k_u, k_m = jax.random.split(key)
        u = jax.random.uniform(k_u, (B,))
        total, joint = jnp.zeros((B,), jnp.float32), jnp.zeros((B,), jnp.float32)
        for k in range(t_samples):
            t = jnp.clip(jnp.mod(u + k / t_samples, 1.0), diffusion.t_min, 1.0)
            if hyper is not None:
                per = hyperschedules.nelbo_per_sequence(apply_fn, rows, 1.0 - t, jax.random.fold_in(k_m, k), diffusion,
                                                        hyper, mask_id, cond)
            elif diffusion.process.value == "gamma_hybrid":
                from dlm.diffusion import hybrid

                per, _ = hybrid.gamma_nelbo_per_sequence(apply_fn, rows, t, jax.random.fold_in(k_m, k), diffusion, mask_id, cond)
            elif diffusion.process.value == "epsilon_hybrid":
                from dlm.diffusion import hybrid

                per, _ = hybrid.nelbo_per_sequence(apply_fn, rows, t, jax.random.fold_in(k_m, k), diffusion, mask_id, cond)
            elif codec is None:
                per, _ = nelbo_per_sequence(apply_fn, rows, t, jax.random.fold_in(k_m, k), diffusion, mask_id, cond)
            else:
                per, j, _ = prime_nelbo_per_sequence(apply_fn, rows, t, jax.random.fold_in(k_m, k), diffusion, codec, cond)
                joint = joint + j
            total = total + per
        return total / t_samples, joint / t_samples

    if mesh is None:
        return jax.jit(fn)
    with mesh_context(mesh):
        return jax.jit(fn, in_shardings=(None, batch_sharding(mesh), replicated(mesh)), out_shardings=replicated(mesh))


def evaluate(eval_fn, params, rows: np.ndarray, batch_size: int, seed: int = 0, mesh=None) -> dict:
    """{nelbo, nelbo_stderr, joint}: mean and standard error of the per-window NELBO (nats/token)
    over `rows` [N, L], and the mean Prime joint objective.

    The seed is fixed, so repeated evaluations of different parameters see the same t and masks
    (a paired comparison)."""
    n = len(rows)
    pad = (-n) % batch_size
    padded = np.concatenate([rows, np.repeat(rows[:1], pad, 0)]) if pad else rows
    key = jax.random.key(seed)
    vals, joints = [], []
    for i in range(0, len(padded), batch_size):
        batch = padded[i : i + batch_size]
        if mesh is not None:  # every process holds all rows: each takes its own shards
            batch = jax.make_array_from_callback(batch.shape, batch_sharding(mesh), lambda idx, b=batch: b[idx])
        v, j = eval_fn(params, batch, jax.random.fold_in(key, i))
        vals.append(np.asarray(v))
        joints.append(np.asarray(j))
    per = np.concatenate(vals)[:n].astype(np.float64)
    joint = np.concatenate(joints)[:n].astype(np.float64)
    err = float(per.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return {"nelbo": float(per.mean()), "nelbo_stderr": err, "joint": float(joint.mean())}
