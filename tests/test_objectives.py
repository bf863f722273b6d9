"""The objective registry: dlm.nelbo, the evaluator and the trainer's validation compute one bound,
and weight decay reaches exactly the matrices."""

import jax
import numpy as np
import pytest
from flax import nnx

import dlm
from dlm.config import load_config
from dlm.eval.likelihood import evaluate, make_eval_fn
from dlm.objectives import (EpsilonHybrid, GammaHybrid, Hyperschedule, MaskedDiffusion, PrimeDiffusion, SamplerFamily,
                            objective_for)
from dlm.train.state import create_train_state, decays
from dlm.train.trainer import Trainer

MARKOV = ["data.source=markov", "data.markov.num_states=8", "data.markov.num_validation=64", "train.eval_windows=16",
          "train.batch_size=8", "train.eval_t_samples=3", "train.eval_use_ema=false"]

OBJECTIVES = {
    "mdlm": ([], MaskedDiffusion),
    "mdlm_discrete": (["diffusion.time=discrete", "diffusion.num_steps=16"], MaskedDiffusion),
    "prime": (["diffusion.prime.l=2"], PrimeDiffusion),
    "epsilon_hybrid": (["diffusion.process=epsilon_hybrid", "diffusion.epsilon=0.1"], EpsilonHybrid),
    "gamma_hybrid": (["diffusion.process=gamma_hybrid", "diffusion.gamma=0.1", "diffusion.schedule=loglinear",
                      "model.noise_conditioning=true"], GammaHybrid),
    "autoregressive": (["diffusion.hyperschedule=autoregressive"], Hyperschedule),
    "block": (["diffusion.hyperschedule=block", "diffusion.block_width=8"], Hyperschedule),
    "block_double": (["diffusion.hyperschedule=block", "diffusion.block_width=8", "diffusion.layout=double"], Hyperschedule),
    "slide": (["diffusion.hyperschedule=slide", "diffusion.block_width=4"], Hyperschedule),
    "block_slide": (["diffusion.hyperschedule=block_slide", "diffusion.block_width=8"], Hyperschedule),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_nelbo_evaluator_and_trainer_validation_agree(root, tmp_path, name):
    over, kind = OBJECTIVES[name]
    cfg = load_config(root / "configs/test.yaml", [*MARKOV, *over, f"workdir={tmp_path}"])
    trainer = Trainer(cfg)
    assert type(trainer.objective) is kind
    validation = trainer.evaluate()

    model = nnx.merge(trainer.graphdef, trainer.state.params)
    rows, bs, seed, K = trainer.val_rows, cfg.train.batch_size, cfg.train.seed + 7, cfg.train.eval_t_samples
    objective = objective_for(cfg.diffusion, model.vocab_size, cfg.model.noise_conditioning)
    graphdef, params = nnx.split(model)
    evaluator = evaluate(make_eval_fn(graphdef, objective, K), params, rows, bs, seed=seed)

    key = jax.random.key(seed)
    nelbo = nnx.jit(lambda m, x, k: dlm.nelbo(m, x, cfg.diffusion, k, K)[1]["nelbo_per_sequence"])  # compiled once
    per_row = np.concatenate([np.asarray(nelbo(model, rows[i: i + bs], jax.random.fold_in(key, i))) for i in range(0, len(rows), bs)])
    assert len(per_row) == len(rows) == 16
    assert np.isfinite(per_row).all() and per_row.std() > 0  # 16 different estimates, not a constant
    np.testing.assert_allclose(evaluator["nelbo"], validation["nelbo"], rtol=1e-6)
    np.testing.assert_allclose(per_row.mean(), validation["nelbo"], rtol=1e-6)
    np.testing.assert_allclose(per_row.std(ddof=1) / 4, validation["nelbo_stderr"], rtol=1e-5)


def test_objective_picks_the_matching_sampler(root):
    families = {}
    for name, (over, kind) in OBJECTIVES.items():
        cfg = load_config(root / "configs/test.yaml", over)
        families[name] = objective_for(cfg.diffusion, 257, cfg.model.noise_conditioning).sampler
    assert families["mdlm"] == SamplerFamily.TOKENS and families["prime"] == SamplerFamily.DIGITS
    assert families["gamma_hybrid"] == SamplerFamily.GAMMA
    assert {families[n] for n in ("epsilon_hybrid", "autoregressive", "block", "slide", "block_slide")} == {SamplerFamily.HYPERSCHEDULE}


def test_dlm_nelbo_follows_the_hyperschedule(root):
    """The same model and draws under the block hyperschedule and under flat MDLM give different
    bounds (dlm.nelbo once returned the flat value for every hyperschedule)."""
    flat = load_config(root / "configs/test.yaml")
    block = load_config(root / "configs/test.yaml", ["diffusion.hyperschedule=block", "diffusion.block_width=8"])
    model = dlm.build_model(flat, seed=0)
    x = jax.random.randint(jax.random.key(0), (8, 32), 0, 257)
    a = float(dlm.nelbo(model, x, flat.diffusion, jax.random.key(1), 4)[0])
    b = float(dlm.nelbo(model, x, block.diffusion, jax.random.key(1), 4)[0])
    assert abs(a - b) > 1e-3 * abs(a), (a, b)


def test_weight_decay_reaches_the_matrices_and_no_norm_scale(root):
    cfg = load_config(root / "configs/test.yaml", ["model.noise_conditioning=true"])
    mesh = dlm.api.make_mesh(cfg.mesh)
    _, state, _ = create_train_state(cfg, 257, mesh)
    decayed = sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params) if decays(p))
    kept = sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params) if not decays(p))
    assert decayed == sorted([f"['blocks'][{k!r}].value" for k in ("ada", "w_down", "w_gate", "w_up", "wk", "wo", "wq", "wv")]
                             + [f"[{k!r}].value" for k in ("head", "t_in", "t_out")])
    assert not any("scale" in p for p in decayed), decayed
    assert kept == ["['blocks']['attn_scale'].value", "['blocks']['mlp_scale'].value", "['embed'].value", "['final_scale'].value"]

    # and the optimizer applies it so: with zero gradients only the decayed parameters move
    tx = dlm.train.state.make_optimizer(cfg.train)
    params = jax.tree.map(lambda p: p + 1.0, state.params)  # no zero entries (adaLN starts at zero)
    zero = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        assert bool(np.any(np.asarray(u) != 0)) == decays(path), jax.tree_util.keystr(path)
