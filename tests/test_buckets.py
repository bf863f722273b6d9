"""Shape buckets: a few compiled samplers for many batch sizes and prompt lengths, and the same
tokens as the unbucketed call, for every loop at any temperature."""

import dataclasses

import numpy as np
import pytest

import dlm
from dlm.config import ConfigError, DecodeCache, DiffusionConfig, load_config
from dlm.sampling import generate as gen


@pytest.fixture(scope="module")
def model(root):
    cfg = load_config(root / "configs/test.yaml", ["sampling.steps=6"])
    return cfg, dlm.build_model(cfg, seed=2)


def _parallel(cfg, **decode):
    dc = dataclasses.replace(cfg.sampling.decode, block_length=8, **decode)
    return dataclasses.replace(cfg.sampling, sampler=dlm.config.Sampler.PARALLEL, decode=dc)


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20] * 12]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("decode", [dict(), dict(cache=DecodeCache.DUAL), dict(suffix_dropout=True, credit=True)],
                         ids=["plain", "dual_cache", "dpad_credit"])
def test_length_buckets_give_the_parallel_decoders_tokens_unpadded(model, temperature, decode):
    cfg, m = model
    sc = dataclasses.replace(_parallel(cfg, **decode), temperature=temperature, seed=4)
    for length in (24, 33):
        plain = gen.generate(m, cfg=sc, prompts=PROMPTS, length=length, eos_id=256)
        bucketed = gen.generate(m, cfg=dataclasses.replace(sc, length_buckets=[40, 64]), prompts=PROMPTS, length=length,
                                eos_id=256)
        np.testing.assert_array_equal(bucketed["tokens"], plain["tokens"])
        assert bucketed["nfe_per_sample"] == plain["nfe_per_sample"]


LOOPS = {"ancestral": [], "prime": ["diffusion.prime.l=2"],
         "gamma_hybrid": ["diffusion.process=gamma_hybrid", "diffusion.schedule=loglinear", "diffusion.loglinear_eps=0.01",
                          "model.noise_conditioning=true"],
         "epsilon_hybrid_acs": ["diffusion.process=epsilon_hybrid", "sampling.sampler=acs"],
         "block_cached": ["diffusion.hyperschedule=block", "diffusion.block_width=8"],
         "block_uncached": ["diffusion.hyperschedule=block", "diffusion.block_width=8", "sampling.cache=false"],
         "autoregressive": ["diffusion.hyperschedule=autoregressive"],
         "slide": ["diffusion.hyperschedule=slide", "diffusion.block_width=8"]}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("loop", list(LOOPS))
def test_length_buckets_give_every_loops_tokens_unpadded(root, loop, temperature):
    """The ancestral loops key their draws by position from each row's first token, the
    hyperschedule loop also its steps from the first step at which a real position is active:
    whole blocks of hidden padding in front change no token."""
    cfg = load_config(root / "configs/test.yaml", ["sampling.steps=6", *LOOPS[loop]])
    m = dlm.build_model(cfg, seed=2)
    sc = dataclasses.replace(cfg.sampling, temperature=temperature, seed=4)
    for length in (24, 32):
        plain = gen.generate(m, cfg=sc, diffusion=cfg.diffusion, prompts=PROMPTS, length=length, eos_id=256)
        bucketed = gen.generate(m, cfg=dataclasses.replace(sc, length_buckets=[40, 64]), diffusion=cfg.diffusion,
                                prompts=PROMPTS, length=length, eos_id=256)
        np.testing.assert_array_equal(bucketed["tokens"], plain["tokens"])
        assert bucketed["nfe"] == plain["nfe"]


def test_hyperschedule_buckets_must_pad_whole_blocks(root):
    cfg = load_config(root / "configs/test.yaml", ["sampling.steps=6", "diffusion.hyperschedule=block", "diffusion.block_width=8"])
    m = dlm.build_model(cfg, seed=2)
    with pytest.raises(ConfigError, match="multiple of the block width 8"):
        gen.generate(m, cfg=dataclasses.replace(cfg.sampling, length_buckets=[36]), diffusion=cfg.diffusion, prompts=PROMPTS,
                     length=24)


def test_prompt_lengths_and_batch_sizes_within_buckets_compile_once_per_generation_length(model):
    """The decoder's blocks follow the prompt, so a program serves every prompt length (and
    batch size) of a bucket for one generation length G; another G is another program."""
    cfg, m = model
    sc = dataclasses.replace(_parallel(cfg), length_buckets=[64], batch_buckets=[4])
    G = 16
    gen.generate(m, cfg=sc, prompts=[[5]], length=1 + G)
    n = gen.compilations()
    for k, prompt_len in enumerate((2, 9, 30, 48)):
        gen.generate(m, cfg=sc, prompts=[[5] * prompt_len] * (1 + k % 4), length=prompt_len + G)
    assert gen.compilations() == n
    gen.generate(m, cfg=sc, prompts=[[5]], length=1 + 2 * G)
    assert gen.compilations() == n + 1


@pytest.mark.parametrize("loop", ["ancestral", "block_hyperschedule", "parallel"])
def test_batch_buckets_leave_every_real_row_unchanged(model, loop):
    cfg, m = model
    diffusion = DiffusionConfig()
    sc = dataclasses.replace(cfg.sampling, temperature=1.0, seed=7)
    if loop == "block_hyperschedule":
        diffusion = dataclasses.replace(cfg.diffusion, hyperschedule=dlm.config.HyperscheduleKind.BLOCK, block_width=8)
    if loop == "parallel":
        sc = dataclasses.replace(_parallel(cfg), temperature=1.0, seed=7)
    for rows in (1, 3, 5):
        plain = gen.generate(m, [5, 6], sc, diffusion=diffusion, num_samples=rows, length=32)
        bucketed = gen.generate(m, [5, 6], dataclasses.replace(sc, batch_buckets=[4, 8]), diffusion=diffusion,
                                num_samples=rows, length=32)
        np.testing.assert_array_equal(bucketed["tokens"], plain["tokens"])


@pytest.mark.parametrize("buckets", [[8, 4], [0, 4], [2.5], "8"])
def test_bad_buckets_are_one_sentence(model, buckets):
    cfg, m = model
    with pytest.raises(ConfigError, match="increasing positive integers"):
        gen.generate(m, [5], dataclasses.replace(cfg.sampling, batch_buckets=buckets), length=16)
