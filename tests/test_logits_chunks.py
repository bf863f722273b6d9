"""The losses' vocabulary-sized work in chunks of positions (LazyLogits) against the whole
logits tensor, for every objective: the same bound, loss and gradients."""

import jax
import numpy as np
import pytest
from flax import nnx

import dlm
from dlm.config import load_config
from dlm.objectives import denoiser, objective_for

OBJECTIVES = {
    "mdlm": [],
    "prime": ["diffusion.prime.l=2"],
    "epsilon_hybrid": ["diffusion.process=epsilon_hybrid"],
    "gamma_hybrid": ["diffusion.process=gamma_hybrid", "diffusion.schedule=loglinear", "model.noise_conditioning=true"],
    "block": ["diffusion.hyperschedule=block", "diffusion.block_width=8"],
    "block_double": ["diffusion.hyperschedule=block", "diffusion.block_width=8", "diffusion.layout=double"],
    "slide": ["diffusion.hyperschedule=slide", "diffusion.block_width=8"],
}  # (autoregressive runs the block code path with blocks of one position)


# gradients too where the per-token terms are their own function (the hyperschedules score
# token_nll, as MDLM does: for them the bound checks the roles, the slicing and the chunking)
WITH_OWN_TERMS = ("mdlm", "prime", "epsilon_hybrid", "gamma_hybrid")


def plain(m):
    """The denoiser with its logits materialised at once."""
    return lambda *a, **k: denoiser(m)(*a, **k).materialize()


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_chunked_logits_give_the_plain_nelbo_and_its_gradients(root, name):
    cfg = load_config(root / "configs/test.yaml", OBJECTIVES[name] + ["model.logits_chunk=7"])  # 96 positions: 14 chunks
    model = dlm.build_model(cfg)
    objective = objective_for(cfg.diffusion, model.vocab_size, cfg.model.noise_conditioning)
    x0 = jax.random.randint(jax.random.key(0), (3, 32), 0, model.vocab_size)
    if name != "prime":  # (Prime's input is sub-tokens)
        assert denoiser(model)(x0, x0 * 0.0 if cfg.model.noise_conditioning else None).rows == 7

    graphdef, params = nnx.split(model)
    loss = lambda p, fn: objective.loss(fn(nnx.merge(graphdef, p)), x0, jax.random.key(2))[0]  # the NELBO at train times
    if name in WITH_OWN_TERMS:
        (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, fn) for fn in (denoiser, plain))
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    else:
        l1, l2 = (jax.jit(loss, static_argnums=1)(params, fn) for fn in (denoiser, plain))
    np.testing.assert_allclose(l1, l2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [*WITH_OWN_TERMS, "dit_head_bias"])
def test_chunked_logits_on_a_mesh_give_the_one_device_nelbo_and_gradients(root, name):
    """On 8 devices (fsdp = 8) the chunks run in a shard_map over the batch, each device over its
    own rows with the head gathered once: the loss and every gradient (the DiT head's bias too)
    equal the plain logits on one device."""
    from dlm.config import MeshConfig
    from dlm.mesh import make_mesh, mesh_context, on_mesh

    over = ["model.block=dit"] if name == "dit_head_bias" else OBJECTIVES[name]
    cfg = load_config(root / "configs/test.yaml", over + ["model.logits_chunk=7"])
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    one = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    x0 = jax.random.randint(jax.random.key(0), (8, 32), 0, 257)
    out = []
    for m, fn in ((mesh, denoiser), (one, plain)):
        model = dlm.build_model(cfg, mesh=m)
        objective = objective_for(cfg.diffusion, model.vocab_size, cfg.model.noise_conditioning)
        graphdef, params = nnx.split(model)
        loss = lambda p: objective.loss(fn(nnx.merge(graphdef, p)), x0, jax.random.key(2))[0]
        with mesh_context(m):
            out.append(jax.jit(on_mesh(jax.value_and_grad(loss), m))(params))
    (l1, g1), (l2, g2) = out
    np.testing.assert_allclose(l1, l2, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
