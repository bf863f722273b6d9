"""Validation NELBO with Monte-Carlo error bars.

Each window gets K stratified times t_k = (u + k/K) mod 1 and fresh masks; the window's
estimate is the mean over k, and the reported error is the standard error over windows.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from dlm.data.pipeline import num_rows, split_batch, take_rows
from dlm.diffusion.losses import LN2
from dlm.mesh import batch_sharding, mesh_context, on_mesh, replicated
from dlm.objectives import Objective, denoiser


def make_eval_fn(graphdef, objective: Objective, t_samples: int, mesh=None):
    """Jitted (params, rows [B, L] or a pairs dict, key) -> per-row (NELBO [B], Prime joint objective [B])
    in nats/token: the objective's bound averaged over K = t_samples stratified draws (0 joint
    without Prime); for pairs rows, of the response given the prompt."""

    def fn(params, rows, key):
        tokens, given = split_batch(rows)
        return objective.bound(denoiser(nnx.merge(graphdef, params)), tokens, key, t_samples, given=given)

    if mesh is None:
        return jax.jit(fn)
    with mesh_context(mesh):
        return jax.jit(on_mesh(fn, mesh), in_shardings=(None, batch_sharding(mesh), replicated(mesh)), out_shardings=replicated(mesh))


def evaluate(eval_fn, params, rows, batch_size: int, seed: int = 0, mesh=None) -> dict:
    """{nelbo, nelbo_stderr, joint}: mean and standard error of the per-window NELBO (nats/token)
    over `rows` [N, L] (or a pairs dict), and the mean Prime joint objective.

    The seed is fixed, so repeated evaluations of different parameters see the same t and masks
    (a paired comparison)."""
    n = num_rows(rows)
    pad = (-n) % batch_size
    padded = take_rows(rows, np.concatenate([np.arange(n), np.zeros(pad, int)])) if pad else rows
    key = jax.random.key(seed)
    vals, joints = [], []
    for i in range(0, n + pad, batch_size):
        batch = take_rows(padded, slice(i, i + batch_size))
        if mesh is not None:  # every process holds all rows: each takes its own shards
            batch = jax.tree.map(lambda b: jax.make_array_from_callback(b.shape, batch_sharding(mesh), lambda idx: b[idx]), batch)
        v, j = eval_fn(params, batch, jax.random.fold_in(key, i))
        vals.append(np.asarray(v))
        joints.append(np.asarray(j))
    per = np.concatenate(vals)[:n].astype(np.float64)
    joint = np.concatenate(joints)[:n].astype(np.float64)
    err = float(per.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return {"nelbo": float(per.mean()), "nelbo_stderr": err, "joint": float(joint.mean())}


class Evaluator:
    """The NELBO report of one model on fixed windows: the trainer's validation and dlm-eval are
    this object, so the same windows, seed, batch size and time draws give the same numbers.

    `bytes_per_token` converts to bits per byte (1 for symbol sources: bits per symbol)."""

    def __init__(self, graphdef, objective: Objective, rows, *, batch_size: int, t_samples: int, seed: int,
                 bytes_per_token: float, mesh=None, prime: bool = False):
        self.rows, self.batch_size, self.t_samples, self.seed = rows, batch_size, t_samples, seed
        self.bytes_per_token, self.mesh, self.prime = bytes_per_token, mesh, prime
        self.eval_fn = make_eval_fn(graphdef, objective, t_samples, mesh)

    def __call__(self, params) -> dict:
        r = evaluate(self.eval_fn, params, self.rows, self.batch_size, seed=self.seed, mesh=self.mesh)
        mean, err = r["nelbo"], r["nelbo_stderr"]
        scale = 1.0 / LN2 / self.bytes_per_token
        out = {"nelbo": mean, "nelbo_stderr": err, "bits": mean * scale, "bits_stderr": err * scale,
               "bits_per_byte": mean * scale, "bits_per_token": mean / LN2, "perplexity": math.exp(mean),
               "windows": num_rows(self.rows), "t_samples": self.t_samples}
        if self.prime:
            out["prime_joint_objective"] = r["joint"]  # an objective value, not a likelihood bound
        return out
