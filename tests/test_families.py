"""The 2025-26 families: SDAR (dense and MoE, block diffusion) and LLaDA-MoE, imported from folders
in their released layouts, run against their reference logits, decoded, and exported back.

The folders under tests/fixtures/pretrained/{sdar,sdar_moe,llada_moe} are tiny random models
made by tests/fixtures/make_pretrained_fixtures.py with transformers' Qwen3 / Qwen3-MoE classes
under each family's attention mask (block-causal for SDAR, checked there); sdar/reference.npz
also holds the tokens of SDAR's own greedy block_diffusion_generate.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlm
from dlm.config import CommitRule, ConfigError, DiffusionConfig, HyperscheduleKind, SamplingConfig
from dlm.interop import hf
from dlm.interop.safetensors import Folder
from dlm.mesh import make_mesh
from dlm.models.attention import FULL, block_causal

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "pretrained"
BLOCKS = {"sdar": 4, "sdar_moe": 4, "llada_moe": None, "llada2": 8}


def one_device():
    return make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def models():
    return {f: dlm.load_pretrained(FIXTURES / f, mesh=one_device()) for f in BLOCKS}


@pytest.mark.parametrize("family", list(BLOCKS))
def test_imported_logits_equal_the_reference_under_the_family_mask_and_every_key_is_used_once(family):
    used = []
    model = dlm.load_pretrained(FIXTURES / family, mesh=one_device(), progress=used.append)
    assert sorted(used) == sorted(Folder(FIXTURES / family).keys()) and len(used) == len(set(used))
    ref = np.load(FIXTURES / family / "reference.npz")
    bw = BLOCKS[family]
    got = np.asarray(model(jnp.asarray(ref["input_ids"].astype(np.int32)), attention=block_causal(bw) if bw else FULL))
    cols = np.arange(got.shape[-1]) != model.mask_id
    assert np.abs(got[..., cols] - ref["logits"][..., cols]).max() < 1e-4
    assert model.cfg.qk_norm and (model.cfg.moe.experts > 0) == (family != "sdar")


def test_moe_families_route_as_they_were_built(models):
    assert models["sdar_moe"].cfg.moe.renormalize and models["sdar_moe"].cfg.moe.dense_layers == 1
    assert not models["llada_moe"].cfg.moe.renormalize and models["llada_moe"].cfg.moe.top_k == 3


@pytest.mark.parametrize("family", list(BLOCKS))
def test_export_in_the_family_layout_gives_back_the_checkpoint_bit_for_bit(family, models, tmp_path):
    config = json.loads((FIXTURES / family / "config.json").read_text())
    hf.export(models[family], tmp_path, family, base_config=config)
    a, b = Folder(FIXTURES / family), Folder(tmp_path)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        x, y = a.read(k), b.read(k)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k
    assert json.loads((tmp_path / "config.json").read_text()) == config


def _sdar_sampling(**over):
    dc = dict(block_length=4, rule=CommitRule.THRESHOLD, tau=0.85)
    dc.update(over)
    return SamplingConfig(sampler="parallel", temperature=0.0, float64=False, decode=dlm.config.DecodeConfig(**dc))


@pytest.mark.parametrize("family", ["sdar", "llada2"])
def test_greedy_block_decoding_equals_the_release_generate(family, models):
    """SDAR's block_diffusion_generate, and LLaDA2's generate (the same rule: one token per step
    unless more pass the threshold), ported greedy into the fixture script."""
    ref = np.load(FIXTURES / family / "reference.npz")
    prompt, want = ref["generate_prompt"][0].tolist(), ref["generate_tokens"]
    bw = BLOCKS[family]
    diffusion = DiffusionConfig(hyperschedule=HyperscheduleKind.BLOCK, block_width=bw)
    for cache in (True, False):
        sc = dataclasses.replace(_sdar_sampling(tau=float(ref["generate_threshold"]), block_length=bw), cache=cache)
        out = dlm.generate(models[family], prompt, sc, diffusion=diffusion, length=want.shape[1], num_samples=1)
        np.testing.assert_array_equal(np.asarray(out["tokens"]), want)


def test_llada2_routes_by_biased_sigmoid_scores_in_groups(models):
    moe = models["llada2"].cfg.moe
    assert (moe.router, moe.groups, moe.group_top_k, moe.route_scale, moe.expert_bias, moe.shared_experts, moe.dense_layers) == \
        ("sigmoid", 4, 2, 2.5, True, 1, 1)
    assert models["llada2"].cfg.rope_fraction == 0.5


def test_sdar_moe_decodes_cached_as_uncached(models):
    diffusion = DiffusionConfig(hyperschedule=HyperscheduleKind.BLOCK, block_width=4)
    outs = [dlm.generate(models["sdar_moe"], [3, 4, 5, 6, 7], dataclasses.replace(_sdar_sampling(tau=0.3), cache=c),
                         diffusion=diffusion, length=20, num_samples=2) for c in (True, False)]
    np.testing.assert_array_equal(np.asarray(outs[0]["tokens"]), np.asarray(outs[1]["tokens"]))


def test_import_maps_sdar_onto_the_block_hyperschedule(tmp_path):
    from dlm.convert import import_folder

    import_folder(FIXTURES / "sdar", tmp_path / "w")
    _, cfg = dlm.restore(tmp_path / "w")
    assert cfg.diffusion.hyperschedule == HyperscheduleKind.BLOCK and cfg.diffusion.block_width == 4
    assert cfg.sampling.sampler.value == "parallel" and cfg.sampling.decode.block_length == 4


def _refused(tmp_path, family, **change):
    d = tmp_path / family
    d.mkdir(parents=True)
    config = json.loads((FIXTURES / family / "config.json").read_text())
    config.update(change)
    (d / "config.json").write_text(json.dumps(config))
    for f in (FIXTURES / family).glob("*.safetensors"):
        (d / f.name).symlink_to(f)
    with pytest.raises(ConfigError) as e:
        hf.open_checkpoint(d)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_llada_moe_is_told_apart_from_llada_by_its_architectures():
    config = json.loads((FIXTURES / "llada_moe" / "config.json").read_text())
    assert config["model_type"] == "llada"
    assert dlm.models.families.detect(config) == "llada_moe"
    assert dlm.models.families.detect(json.loads((FIXTURES / "llada" / "config.json").read_text())) == "llada"


def test_unsupported_variants_are_refused_in_one_sentence(tmp_path):
    assert "head_dim" in _refused(tmp_path / "a", "sdar", head_dim=32)
    assert "ties" in _refused(tmp_path / "b", "sdar", tie_word_embeddings=True)
    assert "moe_router_score_function" in _refused(tmp_path / "c", "llada_moe", moe_router_score_function="sigmoid")
    assert "mlp_only_layers" in _refused(tmp_path / "d", "sdar_moe", mlp_only_layers=[1])
    assert "shared_expert" in _refused(tmp_path / "e", "llada_moe", shared_expert_intermediate_size=64)
    assert "use_qkv_bias" in _refused(tmp_path / "f", "llada2", use_qkv_bias=True)
    assert "n_group" in _refused(tmp_path / "g", "llada2", n_group=3)
    assert "partial_rotary_factor" in _refused(tmp_path / "h", "llada2", partial_rotary_factor=0.3)


def test_fast_dllm_v2_logits_and_greedy_block_decoding_equal_its_own(tmp_path):
    """Fast-dLLM v2: the fixture's logits (shifted by one as the family predicts), and dlm's block
    decoder (sub-blocks, threshold, each block's first token autoregressive) against the
    release's own greedy batch_sample, with and without the cache, from a prompt that ends inside
    a block and one that ends on a block boundary."""
    used = []
    model = dlm.load_pretrained(FIXTURES / "fast_dllm_v2", mesh=one_device(), progress=used.append)
    assert sorted(used) == sorted(Folder(FIXTURES / "fast_dllm_v2").keys())
    ref = np.load(FIXTURES / "fast_dllm_v2" / "reference.npz")
    got = np.asarray(model(jnp.asarray(ref["input_ids"].astype(np.int32)), attention=block_causal(8)))
    want = np.concatenate([ref["logits"][:, :1], ref["logits"][:, :-1]], axis=1)
    cols = np.arange(got.shape[-1]) != model.mask_id
    assert np.abs(got[..., cols] - want[..., cols]).max() < 1e-4
    diffusion = DiffusionConfig(hyperschedule=HyperscheduleKind.BLOCK, block_width=8)
    for n in (5, 8):
        want = ref[f"generate_tokens_{n}"]
        for cache in (True, False):
            sc = dataclasses.replace(_sdar_sampling(block_length=int(ref["generate_small_block"]),
                                                    tau=float(ref["generate_threshold"])), cache=cache)
            out = dlm.generate(model, ref[f"generate_prompt_{n}"][0].tolist(), sc, diffusion=diffusion, length=want.shape[1],
                               num_samples=1)
            np.testing.assert_array_equal(np.asarray(out["tokens"]), want, err_msg=f"prompt {n}, cache {cache}")
    config = json.loads((FIXTURES / "fast_dllm_v2" / "config.json").read_text())
    hf.export(model, tmp_path, "fast_dllm_v2", base_config=config)
    for k in Folder(FIXTURES / "fast_dllm_v2").keys():
        assert Folder(FIXTURES / "fast_dllm_v2").read(k).tobytes() == Folder(tmp_path).read(k).tobytes(), k
    assert json.loads((tmp_path / "config.json").read_text()) == config


def test_sample_script_decodes_an_sdar_folder_block_by_block(tmp_path):
    """sample.py --pretrained runs a block family with its blocks (the family's overrides come
    first, the user's win): a folder whose blocks were not applied would be refused by nothing
    and decoded as a flat model, so the overrides are checked, then the script is run."""
    from dlm.cli import sample_main
    from dlm.models.families import sampling_overrides

    config = json.loads((FIXTURES / "sdar" / "config.json").read_text())
    assert sampling_overrides("sdar", config)[:2] == ["diffusion.hyperschedule=block", "diffusion.block_width=4"]
    assert sampling_overrides("llada_moe", json.loads((FIXTURES / "llada_moe" / "config.json").read_text())) == []
    sample_main(["--pretrained", str(FIXTURES / "sdar"), "--chat", "what is the answer?", "--num-samples", "1", "--length", "40",
                 "--out", str(tmp_path / "s.jsonl"), "sampling.temperature=0"])
    record = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])
    assert record["nfe"] >= 1 and record["tokens"]
