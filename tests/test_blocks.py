"""Block decoding (dlm.sampling.blocks): a block-diffusion model decoded block by block with the
parallel decoder's scores and commit rules and a KV cache of the settled blocks."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import dlm
from dlm.config import CommitRule, ConfigError, DecodeCache, Score, load_config
from dlm.models.attention import block_causal
from dlm.sampling.generate import generate
from dlm.sampling.parallel import commit_mask, scores

BW = 8
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]


@pytest.fixture(scope="module")
def run(root):
    cfg = load_config(root / "configs/test.yaml", ["diffusion.hyperschedule=block", f"diffusion.block_width={BW}",
                                                   "sampling.sampler=parallel", f"sampling.decode.block_length={BW}"])
    return cfg, dlm.build_model(cfg)


def _sc(cfg, **decode):
    """Sampling settings: `settled_cache` is sampling.cache (the cache of settled blocks), temperature
    and seed sampling's, the rest sampling.decode's."""
    top = {k: decode.pop(k) for k in ("temperature", "seed") if k in decode}
    if "settled_cache" in decode:
        top["cache"] = decode.pop("settled_cache")
    return dataclasses.replace(cfg.sampling, **top, decode=dataclasses.replace(cfg.sampling.decode, **decode))


def _gen(run, sc, **kw):
    cfg, model = run
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("num_samples", 2)
    return generate(model, cfg=sc, diffusion=cfg.diffusion, length=40, **kw)


SETTINGS = [
    dict(rule=CommitRule.THRESHOLD, tau=0.02),
    dict(rule=CommitRule.TOPK, k=3),
    dict(rule=CommitRule.FACTOR, factor=3.0, score=Score.MARGIN),
    dict(rule=CommitRule.THRESHOLD, tau=0.02, score=Score.ENTROPY, credit=True),
    dict(rule=CommitRule.THRESHOLD, tau=0.02, block_length=4),  # sub-blocks of 4 inside blocks of 8
]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("i", range(len(SETTINGS)))
def test_cached_block_decoding_equals_uncached(run, i, temperature):
    cfg = run[0]
    outs = [_gen(run, _sc(cfg, settled_cache=c, temperature=temperature, **SETTINGS[i])) for c in (True, False)]
    np.testing.assert_array_equal(np.asarray(outs[0]["tokens"]), np.asarray(outs[1]["tokens"]))
    assert (np.asarray(outs[0]["tokens"]) != run[1].mask_id).all()
    # the cached run's passes: the prompt's whole block, then the uncached run's steps
    assert int(outs[0]["nfe"]) == int(outs[1]["nfe"]) + 1 and int(outs[0]["cache_writes"]) == 1 + (40 - BW) // BW - 1


def _reference(model, x, fixed, dc, sub):
    """Greedy block decoding by hand: every step a full block-causal pass, the parallel decoder's
    score and commit rule over the masked positions of the current (sub-)block."""
    x = np.array(x)
    steps = 0
    L = x.shape[1]
    for s in range(0, L, sub):
        while True:
            b0 = s // BW * BW
            blk = x[:, b0:b0 + BW]
            inside = (np.arange(BW) >= s - b0) & (np.arange(BW) < s - b0 + sub)
            masked = (blk == model.mask_id) & inside
            if not masked.any():
                break
            logits = np.asarray(model(jnp.asarray(x), attention=block_causal(BW)))[:, b0:b0 + BW]
            steps += 1
            draw = logits.argmax(-1)
            commit = np.asarray(commit_mask(scores(jnp.asarray(logits), jnp.asarray(draw), dc.score), jnp.asarray(masked), dc))
            x[:, b0:b0 + BW] = np.where(commit, draw, blk)
    return x, steps


@pytest.mark.parametrize("i", [0, 2, 4])
def test_greedy_block_decoding_equals_a_hand_written_loop(run, i):
    cfg, model = run
    sc = _sc(cfg, settled_cache=True, temperature=0.0, **SETTINGS[i])
    out = _gen(run, sc)
    x = np.full((2, 40), model.mask_id, np.int32)
    x[:, :len(PROMPT)] = PROMPT
    ref, steps = _reference(model, x, x != model.mask_id, sc.decode, min(sc.decode.block_length, BW))
    np.testing.assert_array_equal(np.asarray(out["tokens"]), ref)
    assert int(out["nfe"]) == steps + 1  # and one prefill pass


def test_left_padded_rows_decode_what_they_decode_alone(run):
    """Prompts whose lengths differ by whole blocks, left-padded into one batch: at temperature 0
    each row's tokens and passes are those of its prompt alone."""
    cfg, model = run
    sc = _sc(cfg, temperature=0.0, rule=CommitRule.THRESHOLD, tau=0.05)
    prompts = [PROMPT, PROMPT[:3], PROMPT[:3] + [20] * 8]
    batch = generate(model, cfg=sc, diffusion=cfg.diffusion, length=40, prompts=prompts)
    toks, passes = np.asarray(batch["tokens"]), np.asarray(batch["nfe_per_sample"])
    for b, p in enumerate(prompts):
        pad = len(PROMPT) - len(p)
        alone = generate(model, cfg=sc, diffusion=cfg.diffusion, length=40 - pad, prompts=[p])
        np.testing.assert_array_equal(toks[b, pad:], np.asarray(alone["tokens"])[0])
        assert passes[b] == int(np.asarray(alone["nfe_per_sample"])[0])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_length_bucket_of_whole_blocks_changes_no_token(run, temperature):
    cfg, model = run
    sc = _sc(cfg, temperature=temperature, rule=CommitRule.THRESHOLD, tau=0.05, seed=7)
    plain = generate(model, cfg=sc, diffusion=cfg.diffusion, length=40, prompts=[PROMPT, PROMPT[:3]])
    bucketed = generate(model, cfg=dataclasses.replace(sc, length_buckets=[56]), diffusion=cfg.diffusion, length=40,
                        prompts=[PROMPT, PROMPT[:3]])
    np.testing.assert_array_equal(np.asarray(bucketed["tokens"]), np.asarray(plain["tokens"]))  # generate cuts the bucket off
    np.testing.assert_array_equal(np.asarray(bucketed["nfe_per_sample"]), np.asarray(plain["nfe_per_sample"]))


def test_eos_in_a_finished_block_stops_its_row(run):
    cfg, model = run
    sc = _sc(cfg, temperature=0.0, rule=CommitRule.THRESHOLD, tau=0.05)
    free = np.asarray(_gen(run, sc)["tokens"])
    eos = int(free[0, 16])  # a token row 0 emits in its second generated block
    out = _gen(run, sc, eos_id=eos)
    toks = np.asarray(out["tokens"])
    for b in range(2):
        hit = [k for k in range(16, 40, BW) if (free[b, k:k + BW] == eos).any()]
        if hit:
            end = hit[0] + BW
            np.testing.assert_array_equal(toks[b, :end], free[b, :end])
            assert (toks[b, end:] == eos).all()
        else:
            np.testing.assert_array_equal(toks[b], free[b])
    assert int(out["nfe"]) < int(_gen(run, sc)["nfe"]) or (free[:, 40 - BW:] == eos).any()


def test_settings_block_decoding_cannot_use_are_one_sentence(run, root):
    cfg, model = run
    with pytest.raises(ConfigError, match="sampling.decode.cache"):
        _gen(run, _sc(cfg, cache=DecodeCache.DUAL))
    with pytest.raises(ConfigError, match="sub-block"):
        _gen(run, _sc(cfg, block_length=3))
    cond = load_config(root / "configs/test.yaml", ["diffusion.hyperschedule=block", f"diffusion.block_width={BW}",
                                                    "sampling.sampler=parallel", "model.noise_conditioning=true"])
    with pytest.raises(ConfigError, match="noise conditioning"):
        generate(dlm.build_model(cond), cfg=cond.sampling, diffusion=cond.diffusion, length=40, num_samples=1)
