"""A dropless mixture-of-experts feed-forward: routing, expert compute and the training losses.

Every token goes to its top-k experts (none is dropped for capacity): the T x k assignments are
sorted by expert, the token rows gathered into that order, each expert's SwiGLU applied to its
contiguous group with `jax.lax.ragged_dot` (one grouped matmul per projection, no padding to a
capacity), and the outputs weighted by the router's gates and added back to their tokens.

Routing, as the families do it:
- `softmax` then top-k, the gates renormalised to sum to 1 (`renormalize=True`: Qwen3-MoE with
  norm_topk_prob, SDAR-MoE) or not (`renormalize=False`: LLaDA-MoE, OLMoE);
- the losses: the load-balancing loss E / k * sum_e f_e P_e (f_e the fraction of the T x k
  assignments that go to expert e, P_e the mean router probability of e; 1 when routing is
  uniform) and the router z-loss mean_t logsumexp(router logits_t)^2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def route(logits, top_k: int, renormalize: bool):
    """Router logits [T, E] -> (gates [T, k], experts [T, k], probabilities [T, E])."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    gates, experts = jax.lax.top_k(probs, top_k)
    if renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return gates, experts, probs


def aux_losses(logits, experts, probs, num_experts: int) -> dict:
    """{'load_balance', 'router_z'} of one routing (see the module docstring)."""
    T, k = experts.shape
    f = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0) / (T * k)
    P = probs.mean(axis=0)
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return {"load_balance": num_experts * jnp.sum(f * P), "router_z": jnp.mean(z * z)}


def dropless_swiglu(x, gates, experts, w_gate, w_up, w_down, dtype=None):
    """x [T, d]; gates, experts [T, k]; w_gate, w_up [E, d, ff]; w_down [E, ff, d] -> [T, d]:
    sum_j gates[t, j] * SwiGLU_{experts[t, j]}(x[t]), every assignment computed (no capacity)."""
    T, d = x.shape
    E, k = w_gate.shape[0], experts.shape[1]
    dt = dtype or x.dtype
    flat = experts.reshape(-1)  # [T k]
    order = jnp.argsort(flat, stable=True)
    token = order // k  # the token of each sorted assignment
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    h = x[token].astype(dt)  # [T k, d], grouped by expert
    g = jax.lax.ragged_dot(h, w_gate.astype(dt), sizes, preferred_element_type=jnp.float32)
    u = jax.lax.ragged_dot(h, w_up.astype(dt), sizes, preferred_element_type=jnp.float32)
    a = (jax.nn.silu(g) * u).astype(dt)
    y = jax.lax.ragged_dot(a, w_down.astype(dt), sizes, preferred_element_type=jnp.float32)  # [T k, d]
    y = y * gates.reshape(-1)[order][:, None].astype(jnp.float32)
    return jnp.zeros((T, d), jnp.float32).at[token].add(y).astype(x.dtype)


def dense_reference(x, gates, experts, w_gate, w_up, w_down):
    """The same sum, token by token through each of its experts' weights: what the dropless
    path must equal (tests)."""
    def one(xt, gt, et):
        def expert(e):
            return (jax.nn.silu(xt @ w_gate[e]) * (xt @ w_up[e])) @ w_down[e]
        return jnp.sum(gt[:, None] * jax.vmap(expert)(et), axis=0)

    return jax.vmap(one)(x.astype(jnp.float32), gates, experts)
