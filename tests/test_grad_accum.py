"""train.grad_accum: N micro-batches of B / N rows give the large batch's loss and gradients (every
noise draw is the large batch's) and its update, on a sharded mesh."""

import jax
import numpy as np
import pytest
from flax import nnx

import dlm
from dlm.config import ConfigError, MeshConfig, load_config
from dlm.mesh import check_batch, make_mesh
from dlm.objectives import objective_for
from dlm.train.state import create_train_state, loss_and_grads, make_train_step

# MDLM (antithetic times across the batch), and the epsilon-hybrid loss, which splits the batch into
# decoder and diffusion rows by their place in it
OBJECTIVES = {"mdlm": [], "epsilon_hybrid": ["diffusion.process=epsilon_hybrid"]}


def _cfg(root, *over):
    return load_config(root / "configs/test.yaml", ["train.batch_size=32", *over])


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_four_micro_batches_of_8_give_the_loss_and_gradients_of_a_batch_of_32(root, name):
    cfg = _cfg(root, *OBJECTIVES[name])
    model = dlm.build_model(cfg)
    objective = objective_for(cfg.diffusion, model.vocab_size, cfg.model.noise_conditioning)
    graphdef, params = nnx.split(model)
    x = jax.random.randint(jax.random.key(0), (32, 32), 0, model.vocab_size)
    run = jax.jit(lambda p, n: loss_and_grads(graphdef, objective, p, x, jax.random.key(5), n), static_argnums=1)
    (l1, m1), g1 = run(params, 1)
    (l4, m4), g4 = run(params, 4)
    np.testing.assert_allclose(l4, l1, atol=1e-5, rtol=0)
    for k in m1:
        np.testing.assert_allclose(m4[k], m1[k], atol=1e-5, rtol=0, err_msg=k)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g4), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_accumulated_train_step_equals_the_large_batch_step_on_a_mesh(root):
    mesh = make_mesh(MeshConfig(data=4, fsdp=2, tensor=1))
    x = np.random.default_rng(0).integers(0, 256, (32, 32)).astype(np.int32)
    states = []
    for n in (1, 4):
        cfg = _cfg(root, f"train.grad_accum={n}")
        g, st, sh = create_train_state(cfg, 257, mesh)
        st, metrics = make_train_step(cfg, g, 257, mesh, sh)(st, jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))))
        states.append((st, float(metrics["loss"]), float(metrics["grad_norm"])))
    (s1, l1, n1), (s4, l4, n4) = states
    assert abs(l4 - l1) <= 1e-5 and abs(n4 - n1) <= 1e-5 * n1
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):  # per tensor, relative (see test_sharding)
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


def test_a_micro_batch_that_the_mesh_cannot_split_is_one_sentence(root):
    mesh = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    with pytest.raises(ConfigError, match="micro-batch"):
        check_batch(32, mesh, 8)
    with pytest.raises(ConfigError, match="divide train.batch_size"):
        check_batch(32, mesh, 3)
