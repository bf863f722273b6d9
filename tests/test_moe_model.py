"""model.moe: the mixture-of-experts feed-forward as a model option (dense first layers, shared
experts, training losses) and expert parallelism over the mesh's expert axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dlm
from dlm.config import ConfigError, MeshConfig, load_config
from dlm.mesh import global_batch, make_mesh, mesh_context, on_mesh
from dlm.models import moe
from dlm.train.state import create_train_state, make_train_step

V = 257
MOE = ["model.moe.experts=8", "model.moe.top_k=2", "model.moe.expert_dim=32"]


def _cfg(root, *over):
    return load_config(root / "configs/test.yaml", ["train.batch_size=8", "train.warmup_steps=1", *over])


def one_device():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def _tree(state):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def test_identical_experts_with_renormalised_gates_equal_the_dense_model(root):
    """Every expert a copy of the dense feed-forward and gates that sum to 1: the MoE model is the
    dense model, whatever the routing."""
    dense = dlm.build_model(_cfg(root, "model.mlp_dim=32"))
    sparse = dlm.build_model(_cfg(root, *MOE, "model.moe.renormalize=true"))
    d, s = nnx.state(dense), nnx.state(sparse)
    for name in ("gate", "up", "down"):
        w = d["blocks"][f"w_{name}"].get_value()  # [layers, ...]
        s["blocks"][f"experts_{name}"].set_value(jnp.repeat(w[:, None], 8, axis=1))
    for k in d:  # everything else shared
        if k != "blocks":
            s[k] = d[k]
    for k in d["blocks"]:
        if not k.startswith("w_"):
            s["blocks"][k] = d["blocks"][k]
    nnx.update(sparse, s)
    x = jax.random.randint(jax.random.key(0), (2, 32), 0, V)
    a, b = dense(x), sparse(x)
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(a)))
    raw = dlm.build_model(_cfg(root, *MOE, "model.moe.renormalize=false"))  # raw gates sum below 1: not the dense model
    nnx.update(raw, s)
    assert float(jnp.max(jnp.abs(raw(x) - a))) > 1e-3


def test_dense_first_layers_and_shared_experts_build_and_cache_like_the_uncached_pass(root):
    cfg = _cfg(root, *MOE, "model.num_layers=3", "model.moe.dense_layers=1", "model.moe.shared_experts=1")
    model = dlm.build_model(cfg)
    st = nnx.state(model)
    assert st["dense_blocks"]["w_gate"].get_value().shape == (1, 32, 96)
    assert st["blocks"]["experts_gate"].get_value().shape == (2, 8, 32, 32)
    assert st["blocks"]["w_gate"].get_value().shape == (2, 32, 32)  # the shared expert
    x = jax.random.randint(jax.random.key(1), (2, 32), 0, V)
    full, kv = model(x, return_kv=True)
    assert kv[0].shape[0] == 3  # one cache layer per block, dense stack first
    # the last 8 tokens again, reading the first 24 tokens' keys and values from the cache
    part = model(x[:, 24:], positions=jnp.broadcast_to(jnp.arange(24, 32), (2, 8)),
                 kv_cache=jax.tree.map(lambda a: a[:, :, :24], kv))
    np.testing.assert_allclose(part, full[:, 24:], atol=2e-5)


def test_training_loss_is_the_nelbo_plus_the_weighted_router_losses(root):
    cfg = _cfg(root, *MOE, "model.moe.load_balance=0.5", "model.moe.router_z=0.25")
    mesh = one_device()
    g, st, sh = create_train_state(cfg, V, mesh)
    x = np.random.default_rng(0).integers(0, 256, (8, 32)).astype(np.int32)
    _, m = make_train_step(cfg, g, V, mesh, sh)(st, global_batch(x, mesh))
    assert 1.0 <= float(m["load_balance"]) <= 8.0 and float(m["router_z"]) > 0
    np.testing.assert_allclose(m["loss"], m["nelbo"] + 0.5 * m["load_balance"] + 0.25 * m["router_z"], rtol=1e-6)


def test_router_losses_equal_the_layer_formula_on_every_routed_layer(root):
    cfg = _cfg(root, *MOE)
    model = dlm.build_model(cfg)
    x = jax.random.randint(jax.random.key(2), (2, 32), 0, V)
    _, losses = model(x, aux=True)
    # recompute layer by layer from each block's feed-forward input and router
    captured = []
    orig = moe.moe_feedforward

    def spy(h, router, *a, **k):
        captured.append((h, router))
        return orig(h, router, *a, **k)

    import dlm.models.transformer as tr
    tr.moe_feedforward = spy
    try:
        jax.config.update("jax_disable_jit", True)
        model(x)
    finally:
        tr.moe_feedforward = orig
        jax.config.update("jax_disable_jit", False)
    per = []
    for h, router in captured:
        logits = h.reshape(-1, h.shape[-1]) @ router
        gates, experts, probs = moe.route(logits, 2, True)
        per.append(moe.aux_losses(logits, experts, probs, 8))
    assert len(per) == 2
    for name in ("load_balance", "router_z"):
        np.testing.assert_allclose(losses[name], np.mean([p[name] for p in per]), rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 1, 1), (1, 4, 2, 1), (1, 2, 2, 2)])
def test_moe_forward_on_an_expert_mesh_equals_one_device(root, shape):
    cfg = _cfg(root, *MOE)
    model = dlm.build_model(cfg)
    x = jax.random.randint(jax.random.key(3), (4, 32), 0, V)
    ref, ref_aux = model(x, aux=True)
    mesh = make_mesh(MeshConfig(data=shape[0], expert=shape[1], fsdp=shape[2], tensor=shape[3]))
    g, st = nnx.split(model)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with mesh_context(mesh):
        fn = jax.jit(on_mesh(lambda st, x: nnx.merge(g, st)(x, aux=True), mesh))
        out, aux = fn(jax.device_put(st, rep), jax.device_put(x, rep))
        hlo = fn.lower(jax.device_put(st, rep), jax.device_put(x, rep)).compile().as_text()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    for k in ref_aux:
        np.testing.assert_allclose(float(aux[k]), float(ref_aux[k]), rtol=1e-5)
    assert "all-to-all" in hlo


def test_expert_parallel_layer_with_every_token_on_one_shard_drops_nothing():
    """The worst case of the dropless all-to-all: every assignment goes to the experts of one
    shard; forward and gradients equal the dense reference."""
    mesh = make_mesh(MeshConfig(data=1, expert=4, fsdp=2, tensor=1))
    T, d, ff, E, k = 64, 16, 24, 8, 2
    ks = jax.random.split(jax.random.key(4), 5)
    x = jax.random.normal(ks[0], (T, d))
    w = [jax.random.normal(kk, s) * 0.3 for kk, s in zip(ks[1:4], [(E, d, ff), (E, d, ff), (E, ff, d)])]
    router = jax.random.normal(ks[4], (d, E)) * 0.1
    x = x.at[:, 0].set(1.0)
    router = router.at[0, 2:].set(-30.0)  # through the constant feature: experts 0 and 1 (shard 0) only

    def ref(x, router, *w):
        logits = x @ router
        gates, experts, _ = moe.route(logits, k, True)
        return moe.dense_reference(x, gates, experts, *w)

    def sharded(x, router, *w):
        return moe.moe_feedforward(x[None], router, *w, moe.Routing(k, True), jnp.float32)[0][0]

    with mesh_context(mesh):
        fn = jax.jit(on_mesh(sharded, mesh))
        y = fn(x, router, *w)
        loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a))))
        g = jax.jit(on_mesh(jax.grad(loss(sharded), argnums=(0, 1, 2, 3, 4)), mesh))(x, router, *w)
    gates, experts, _ = moe.route(x @ router, k, True)
    assert set(np.unique(experts).tolist()) <= {0, 1}
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref(x, router, *w)), atol=1e-5)
    for a, b in zip(g, jax.grad(loss(ref), argnums=(0, 1, 2, 3, 4))(x, router, *w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_expert_4_by_data_2_training_equals_one_device(root):
    cfg = _cfg(root, *MOE)
    x = np.random.default_rng(0).integers(0, 256, (8, 32)).astype(np.int32)
    runs = []
    for mesh in (one_device(), make_mesh(MeshConfig(data=2, expert=4, fsdp=1, tensor=1))):
        g, st, sh = create_train_state(cfg, V, mesh)
        step = make_train_step(cfg, g, V, mesh, sh)
        losses = []
        for _ in range(3):
            st, m = step(st, global_batch(x, mesh))
            losses.append(float(m["loss"]))
        runs.append((st, losses))
    (s1, l1), (s8, l8) = runs
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    w = s8.params["blocks"]["experts_gate"].get_value()
    assert tuple(w.sharding.spec)[:2] == (None, "expert")  # [layers, experts, embed, mlp]
    assert w.addressable_shards[0].data.shape[1] == 2
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s8.params), jax.tree.leaves(s1.params)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b), path


def test_bad_moe_settings_are_one_sentence(root):
    with pytest.raises(ConfigError, match="top_k"):
        _cfg(root, "model.moe.experts=4", "model.moe.top_k=5")
    with pytest.raises(ConfigError, match="dense_layers"):
        _cfg(root, "model.moe.experts=4", "model.moe.dense_layers=2")
    with pytest.raises(ConfigError, match="mesh.expert"):
        _cfg(root, "model.moe.experts=6", "mesh.expert=4")
