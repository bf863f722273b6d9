"""Sharded == single device, on 8 simulated CPU devices."""

import jax
import numpy as np
import pytest

import dlm
from dlm.config import ConfigError, MeshConfig, load_config
from dlm.mesh import global_batch, make_mesh
from dlm.train.checkpoint import Checkpointer
from dlm.train.state import create_train_state, make_train_step

V = 257


def _cfg(root, *over):
    return load_config(root / "configs/test.yaml", ["train.batch_size=8", "train.warmup_steps=1", *over])


def one_device():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def mesh222():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def _initial(cfg):
    _, st, _ = create_train_state(cfg, V, one_device())
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(st.params)}


def _train(cfg, mesh, steps, x):
    g, st, sh = create_train_state(cfg, V, mesh)
    step = make_train_step(cfg, g, V, mesh, sh)
    losses = []
    for _ in range(steps):
        st, m = step(st, global_batch(x, mesh))
        losses.append(float(m["loss"]))
    return st, losses


def test_train_step_on_222_mesh_equals_one_device(root):
    assert jax.device_count() == 8
    cfg = _cfg(root)
    x = np.random.default_rng(0).integers(0, 256, (8, 32)).astype(np.int32)
    s1, l1 = _train(cfg, one_device(), 1, x)
    s8, l8 = _train(cfg, mesh222(), 1, x)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    wq = s8.params["blocks"]["wq"].get_value()
    assert tuple(wq.sharding.spec)[:3] == (None, "fsdp", "tensor")  # [layers, embed, heads, kv]
    # Relative error per tensor, ||p8 - p1|| / ||p1||. Not elementwise: Adam's first update is
    # lr * g / (|g| + eps), which turns the float32 reduction-order difference of a gradient
    # element near 1e-6 into a visible relative change of that one element.
    init = _initial(cfg)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s8.params), jax.tree.leaves(s1.params)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), path
        if b.ndim >= 2:  # weight-decayed matrices all move; the first step's lr is the peak
            assert not np.array_equal(b, np.asarray(init[jax.tree_util.keystr(path)])), "the step changed nothing"


@pytest.mark.parametrize("src,dst", [((8, 1, 1), (2, 2, 2)), ((2, 2, 2), (8, 1, 1))])
def test_checkpoint_restores_on_another_mesh(root, tmp_path, src, dst):
    cfg = _cfg(root)
    x = np.random.default_rng(1).integers(0, 256, (8, 32)).astype(np.int32)
    a = make_mesh(MeshConfig(*src))
    state, _ = _train(cfg, a, 1, x)
    ck = Checkpointer(tmp_path, async_save=True)
    ck.save(1, state)
    ck.close()
    b = make_mesh(MeshConfig(*dst))
    _, abstract, shardings = create_train_state(cfg, V, b, abstract=True)
    restored = Checkpointer(tmp_path).restore(abstract)
    for r, o, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(shardings)):
        np.testing.assert_array_equal(np.asarray(r), np.asarray(o))
        assert r.sharding.is_equivalent_to(sh, r.ndim)


def test_sampling_on_222_mesh_equals_one_device(root):
    cfg = _cfg(root, "sampling.steps=8", "sampling.num_samples=8")
    outs = []
    for mesh in (one_device(), mesh222()):
        model = dlm.build_model(cfg, mesh=mesh, seed=3)
        outs.append(dlm.generate(model, [104, 105], cfg.sampling, length=32, mesh=mesh)["tokens"])
    np.testing.assert_array_equal(outs[0], outs[1])
    assert (outs[0][:, :2] == [104, 105]).all()


def test_mesh_that_does_not_fit_the_devices():
    with pytest.raises(ConfigError, match="does not fit the 8 available devices"):
        make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))
    with pytest.raises(ConfigError, match="do not divide the 8 available devices"):
        make_mesh(MeshConfig(data=-1, fsdp=3, tensor=1))
