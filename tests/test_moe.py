"""The dropless mixture-of-experts feed-forward (dlm.models.moe): sorted, grouped expert compute
equals a dense per-token reference, forward and gradients; the routing and its losses take the
values they must."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm.models import moe

T, D, FF, E = 37, 16, 24, 8


def _weights(seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (T, D))
    router = jax.random.normal(ks[1], (D, E)) * 0.5
    w_gate = jax.random.normal(ks[2], (E, D, FF)) * D**-0.5
    w_up = jax.random.normal(ks[3], (E, D, FF)) * D**-0.5
    w_down = jax.random.normal(ks[4], (E, FF, D)) * FF**-0.5
    return x, router, w_gate, w_up, w_down


def _layer(path, top_k, renormalize):
    def f(x, router, w_gate, w_up, w_down):
        gates, experts, _ = moe.route(x @ router, top_k, renormalize)
        return path(x, gates, experts, w_gate, w_up, w_down)
    return f


@pytest.mark.parametrize("impl", ["tiles", "ragged"])
@pytest.mark.parametrize("top_k, renormalize", [(1, False), (2, True), (2, False), (8, True)])
def test_dropless_experts_equal_the_dense_per_token_reference_forward_and_gradients(top_k, renormalize, impl):
    args = _weights()
    dropless = lambda *a: moe.dropless_swiglu(*a, impl=impl)  # noqa: E731
    fast, ref = _layer(dropless, top_k, renormalize), _layer(moe.dense_reference, top_k, renormalize)
    np.testing.assert_allclose(fast(*args), ref(*args), atol=1e-5, rtol=1e-5)
    probe = jax.random.normal(jax.random.key(9), (T, D))
    loss = lambda f: lambda *a: jnp.sum(f(*a) * probe)  # noqa: E731
    g_fast = jax.grad(loss(fast), argnums=(0, 1, 2, 3, 4))(*args)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2, 3, 4))(*args)
    for name, a, b in zip(("x", "router", "w_gate", "w_up", "w_down"), g_fast, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)


def test_every_token_reaches_its_top_k_experts_when_one_expert_takes_most():
    """No capacity: a router that sends every token to expert 3 first drops none of them."""
    x, router, w_gate, w_up, w_down = _weights(1)
    logits = (x @ router).at[:, 3].add(50.0)
    gates, experts, _ = moe.route(logits, 2, True)
    assert bool((experts[:, 0] == 3).all())  # all T tokens on one expert: far past any capacity factor
    for impl in ("tiles", "ragged"):
        np.testing.assert_allclose(moe.dropless_swiglu(x, gates, experts, w_gate, w_up, w_down, impl=impl),
                                   moe.dense_reference(x, gates, experts, w_gate, w_up, w_down), atol=1e-5, rtol=1e-5)


def test_routing_renormalises_only_when_asked():
    logits = jax.random.normal(jax.random.key(2), (T, E))
    g_norm, e_norm, p = moe.route(logits, 3, True)
    g_raw, e_raw, _ = moe.route(logits, 3, False)
    np.testing.assert_array_equal(e_norm, e_raw)
    np.testing.assert_allclose(g_norm.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(g_raw, jnp.take_along_axis(p, e_raw, axis=1), rtol=1e-6)
    assert float(g_raw.sum(-1).max()) < 1.0


def test_load_balance_loss_is_one_for_uniform_routing_and_k_over_e_times_e_for_collapse():
    """Uniform router probabilities with assignments spread evenly give 1; every token's
    assignments on the same k experts with all the probability there give E / k."""
    k = 2
    Tu = 4 * E
    experts = (jnp.arange(Tu * k) % E).reshape(Tu, k)
    logits = jnp.zeros((Tu, E))
    probs = jax.nn.softmax(logits, -1)
    np.testing.assert_allclose(moe.aux_losses(logits, experts, probs, E)["load_balance"], 1.0, rtol=1e-6)
    collapsed = jnp.tile(jnp.arange(k), (Tu, 1))
    peaked = jnp.zeros((Tu, E)).at[:, :k].set(1.0 / k)
    np.testing.assert_allclose(moe.aux_losses(logits, collapsed, peaked, E)["load_balance"], E / k, rtol=1e-6)
    z = moe.aux_losses(jnp.full((Tu, E), 2.0), experts, probs, E)["router_z"]
    np.testing.assert_allclose(z, (2.0 + np.log(E)) ** 2, rtol=1e-6)


@pytest.mark.parametrize("tile", [1, 4, 7, 64])
def test_tiled_grouped_matmul_equals_each_row_times_its_groups_matrix(tile):
    """Groups of 0 to 13 rows over tiles of several sizes (groups spanning many tiles, empty groups)."""
    sizes = jnp.asarray([3, 0, 13, 1, 0, 7, 5, 2], jnp.int32)
    R = int(sizes.sum())
    h = jax.random.normal(jax.random.key(3), (R, 6))
    w = jax.random.normal(jax.random.key(4), (8, 6, 5))
    group = np.repeat(np.arange(8), np.asarray(sizes))
    want = jnp.einsum("rd,rdn->rn", h, w[group])
    np.testing.assert_allclose(moe.grouped_matmul(h, w, sizes, "tiles", tile), want, atol=1e-5, rtol=1e-5)


def test_sigmoid_group_limited_routing_equals_a_brute_force_reference():
    """DeepSeek-V3 / LLaDA2 routing, token by token in numpy: biased scores choose, groups ranked by
    the sum of their two best biased scores, unbiased scores renormalised and scaled weight."""
    rng = np.random.default_rng(3)
    T, E, G, g, k = 64, 16, 4, 2, 3
    logits = rng.normal(size=(T, E)).astype(np.float32)
    bias = (0.5 * rng.normal(size=E)).astype(np.float32)
    r = moe.Routing(k, True, "sigmoid", G, g, 2.5)
    gates, experts, _ = moe.route(jnp.asarray(logits), r, bias=jnp.asarray(bias))
    s = 1 / (1 + np.exp(-logits.astype(np.float64)))
    for t in range(T):
        c = s[t] + bias
        group = [sorted(c[i * (E // G):(i + 1) * (E // G)])[-2:] for i in range(G)]
        keep = np.argsort([-sum(v) for v in group], kind="stable")[:g]
        allowed = [e for e in range(E) if e // (E // G) in keep]
        chosen = sorted(allowed, key=lambda e: -c[e])[:k]
        assert sorted(np.asarray(experts[t]).tolist()) == sorted(chosen)
        w = {e: s[t, e] / s[t, chosen].sum() * 2.5 for e in chosen}
        np.testing.assert_allclose([w[int(e)] for e in np.asarray(experts[t])], np.asarray(gates[t]), rtol=1e-5)
    # the bias changes the choice but never the weights' formula: without it, other experts win somewhere
    other = moe.route(jnp.asarray(logits), r)[1]
    assert (np.sort(np.asarray(other), 1) != np.sort(np.asarray(experts), 1)).any()
