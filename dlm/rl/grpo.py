"""Group-relative advantages and the clipped policy-gradient loss with a KL penalty.

For a prompt q the policy draws G rollouts o_1..o_G with rewards r_i. The advantage of o_i is
r_i - mean_j r_j (divided by the group's standard deviation with rl.scale_rewards), so every
group's advantages sum to 0 and a group whose rollouts all score alike teaches nothing.

With phi the per-token log-likelihood estimate (dlm.rl.estimators) of the policy being trained
(theta), of the policy that drew the rollouts (old) and of the frozen starting model (ref), all
on the same draws, the loss of rollout i is

    -min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i) + beta * KL_i,
    rho_i = exp(phi_theta - phi_old)    (= (pi_theta / pi_old)^(1/|o|): the length-normalised,
                                           sequence-level ratio of GSPO, since phi is per token)
    KL_i  = exp(phi_ref - phi_theta) - (phi_ref - phi_theta) - 1   (the k3 estimate, >= 0)

averaged over the batch. At the first update of a batch theta = old, so rho = 1 and the
gradient is -A_i grad phi_theta / B; where theta = ref the KL and its gradient are 0.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def group_advantages(rewards, group_size: int, scale: bool = False, eps: float = 1e-6) -> np.ndarray:
    """rewards [P * G] (rollouts of a prompt consecutive) -> advantages [P * G], each group's summing to 0."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    a = r - r.mean(axis=1, keepdims=True)
    if scale:
        a = a / (r.std(axis=1, keepdims=True) + eps)
    return a.reshape(-1).astype(np.float32)


def k3(phi_ref, phi):
    """The k3 estimate of KL(pi_theta || pi_ref) per rollout from per-token log-likelihoods."""
    d = phi_ref - phi
    return jnp.exp(d) - d - 1.0


def policy_loss(phi, phi_old, phi_ref, advantages, clip: float, kl: float):
    """(loss, metrics) of the clipped objective; phi_ref None: no KL term."""
    ratio = jnp.exp(phi - phi_old)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantages
    pg = -jnp.minimum(unclipped, clipped)
    metrics = {"ratio": ratio.mean(), "clipped": (jnp.abs(ratio - 1.0) > clip).mean()}
    loss = pg.mean()
    if phi_ref is not None:
        div = k3(phi_ref, phi)
        loss = loss + kl * div.mean()
        metrics["kl"] = div.mean()
    return loss, dict(metrics, policy_loss=pg.mean())
