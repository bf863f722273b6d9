"""Infill in every decoder: given tokens at any positions are kept, and only the masked ones are
filled; an infill spec whose given positions are a prefix decodes exactly like that prompt."""

import numpy as np
import pytest

import dlm
from dlm.config import DecodeConfig, SamplingConfig, load_config

L, V = 32, 257

MODELS = {
    "mdlm": [],
    "block": ["diffusion.hyperschedule=block", "diffusion.block_width=8"],
    "prime": ["diffusion.prime.l=2"],
    "epsilon_hybrid": ["diffusion.process=epsilon_hybrid", "diffusion.epsilon=0.1"],
    "gamma_hybrid": ["diffusion.process=gamma_hybrid", "diffusion.schedule=loglinear", "model.noise_conditioning=true"],
}

PARALLEL = {
    "greedy_confidence": dict(rule="topk", k=1, score="confidence", block_length=L),
    "greedy_margin": dict(rule="topk", k=1, score="margin", block_length=L),
    "greedy_entropy_prefix_cache": dict(rule="topk", k=1, score="entropy", block_length=8, cache="prefix"),
    "topk2_top1_dual_cache": dict(rule="topk", k=2, score="top1", block_length=8, cache="dual"),
    "threshold_credit": dict(rule="threshold", tau=0.7, score="margin", credit=True, block_length=16),
    "factor": dict(rule="factor", factor=1.0, block_length=12),  # 12 does not divide 32: the last block is aligned to the end
}

DECODERS = {f"{m}-ancestral": (m, "ancestral", {}) for m in MODELS}
DECODERS.update({"mdlm-acs": ("mdlm", "acs", {}), "epsilon_hybrid-acs": ("epsilon_hybrid", "acs", {})})
DECODERS.update({f"mdlm-parallel-{k}": ("mdlm", "parallel", d) for k, d in PARALLEL.items()})


@pytest.fixture(scope="module")
def models(root):
    out = {}
    for name, over in MODELS.items():
        cfg = load_config(root / "configs/test.yaml", over)
        out[name] = (dlm.build_model(cfg, seed=1), cfg)
    return out


def _sample(models, model_name, sampler, decode, prompt, temperature=1.0, seed=0):
    model, cfg = models[model_name]
    sc = SamplingConfig(sampler=sampler, steps=8, num_samples=2, temperature=temperature, seed=seed,
                        decode=DecodeConfig(**decode))
    return dlm.generate(model, prompt, sc, diffusion=cfg.diffusion, length=L)


@pytest.mark.parametrize("model_name,sampler,decode", list(DECODERS.values()), ids=list(DECODERS))
def test_every_decoder_fills_exactly_the_one_masked_position(models, model_name, sampler, decode):
    rng = np.random.default_rng(0)
    spec = rng.integers(0, 256, L)
    hole = 13
    spec[hole] = V  # the mask id: the one position to fill
    out = _sample(models, model_name, sampler, decode, spec)
    tokens = out["tokens"]
    keep = np.arange(L) != hole
    assert (tokens[:, keep] == spec[keep]).all()
    assert ((tokens[:, hole] >= 0) & (tokens[:, hole] < V)).all()


@pytest.mark.parametrize("decode", list(PARALLEL.values()), ids=list(PARALLEL))
def test_infill_with_a_prefix_mask_equals_the_prompt_path(models, decode, temperature=1.0):
    prompt = [104, 105, 32, 116]
    spec = np.full(L, V)
    spec[:4] = prompt
    a = _sample(models, "mdlm", "parallel", decode, prompt, temperature)
    b = _sample(models, "mdlm", "parallel", decode, spec, temperature)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert a["nfe"] == b["nfe"] and a["nfe_per_sample"] == b["nfe_per_sample"]


def test_scattered_givens_stay_and_only_holes_are_decoded(models):
    """Givens spread over the sequence (a Sudoku-like condition) in one block: every decoder step
    commits only holes, so k = 1 takes exactly as many steps as there are holes per row."""
    rng = np.random.default_rng(3)
    spec = rng.integers(0, 256, (2, L))
    holes = rng.random((2, L)) < 0.5
    holes[1, :] = holes[0, :]  # the same number of holes per row
    spec[holes] = V
    model, cfg = models["mdlm"]
    sc = SamplingConfig(sampler="parallel", num_samples=2, temperature=0.0, decode=DecodeConfig(rule="topk", k=1, block_length=L))
    out = dlm.generate(model, spec, sc, length=L)
    assert (out["tokens"][~holes] == spec[~holes]).all() and (out["tokens"][holes] < V).all()
    assert out["nfe_per_sample"] == [int(holes[0].sum())] * 2
