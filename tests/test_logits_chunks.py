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
