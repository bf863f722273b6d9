"""The serving engine (dlm.serve.engine): requests of mixed prompt lengths, generation lengths and
decoder settings, batched with rows joining and leaving at block boundaries, return the tokens
each request gets decoded alone."""

import collections
import dataclasses

import numpy as np
import pytest

import dlm
from dlm.config import ConfigError, DecodeCache, Sampler, load_config
from dlm.mesh import make_mesh
from dlm.sampling import generate as gen
from dlm.serve.engine import Engine


@pytest.fixture(scope="module")
def model(root):
    cfg = load_config(root / "configs/test.yaml", ["sampling.steps=6"])
    return cfg, dlm.build_model(cfg, seed=2)


@pytest.fixture(scope="module")
def eos(model):
    """A token the model often produces, as EOS: rows then finish early and free their slots."""
    cfg, m = model
    out = Engine(m, length_buckets=(64,), batch_buckets=(16,)).generate([[5 + i, 9] for i in range(16)], 16)
    return int(collections.Counter(np.concatenate(out).tolist()).most_common(1)[0][0])


SETTINGS = [dict(block_length=8), dict(block_length=4, cache=DecodeCache.DUAL, tau=0.7),
            dict(block_length=8, cache=DecodeCache.PREFIX, tau=0.5)]


def _sampling(cfg, temperature=0.0, seed=0, **decode):
    return dataclasses.replace(cfg.sampling, sampler=Sampler.PARALLEL, temperature=temperature, seed=seed,
                               decode=dataclasses.replace(cfg.sampling.decode, **decode))


def test_a_thousand_mixed_requests_get_their_solo_greedy_tokens(model, eos):
    """1,000 greedy requests (prompts of 1-24 tokens, 8, 12 or 16 to generate, three decoder
    settings) through a 32-row engine, each against generate() of its prompt alone. The solo
    calls use a length bucket, so that they compile once per setting and generation length;
    test_buckets checks that a bucket changes no token."""
    cfg, m = model
    rng = np.random.default_rng(0)
    reqs = [(rng.integers(0, 256, int(rng.integers(1, 25))).tolist(), int(rng.choice([8, 12, 16])), int(rng.integers(3)))
            for _ in range(1000)]
    eng = Engine(m, eos_id=eos, length_buckets=(32, 48), batch_buckets=(8, 32))
    submitted = [eng.submit(p, g, decode=_sampling(cfg, **SETTINGS[s]).decode) for p, g, s in reqs]
    eng.run()
    for i, (p, g, s) in enumerate(reqs):
        sc = dataclasses.replace(_sampling(cfg, **SETTINGS[s]), length_buckets=[48])
        solo = gen.generate(m, cfg=sc, prompts=[p], length=len(p) + g, eos_id=eos)["tokens"][0, len(p):]
        np.testing.assert_array_equal(submitted[i].tokens, solo, err_msg=f"request {i}: {reqs[i]}")
    reasons = collections.Counter(r.finish_reason for r in submitted)
    assert reasons["stop"] > 100 and reasons["length"] > 100  # early stops happened and freed rows
    assert eng.stats["joined_running_batch"] > 0  # waiting requests joined rows still decoding


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_requests_equal_unbatched_unpadded_generate_at_any_temperature(model, eos, temperature):
    """Each row draws with its own key split per block as generate() splits it: sampled rows
    match too."""
    cfg, m = model
    rng = np.random.default_rng(1)
    eng = Engine(m, eos_id=eos, length_buckets=(40,), batch_buckets=(8,))
    cases = [(rng.integers(0, 256, int(rng.integers(1, 20))).tolist(), int(rng.choice([9, 13])), k % 3, 10 + k)
             for k in range(9)]
    reqs = [eng.submit(p, g, decode=_sampling(cfg, **SETTINGS[s]).decode, temperature=temperature, seed=seed)
            for p, g, s, seed in cases]
    eng.run()
    for (p, g, s, seed), r in zip(cases, reqs):
        solo = gen.generate(m, cfg=_sampling(cfg, temperature, seed, **SETTINGS[s]), prompts=[p], length=len(p) + g,
                            eos_id=eos)
        np.testing.assert_array_equal(r.tokens, solo["tokens"][0, len(p):])
        assert r.passes == solo["nfe_per_sample"][0]


def test_a_block_longer_than_the_generation_is_the_generation_as_in_generate(model):
    cfg, m = model
    eng = Engine(m, length_buckets=(32,), batch_buckets=(2,))
    r = eng.submit([5, 6, 7], 5, decode=_sampling(cfg, block_length=8).decode, temperature=1.0, seed=3)
    eng.run()
    solo = gen.generate(m, cfg=_sampling(cfg, 1.0, 3, block_length=8), prompts=[[5, 6, 7]], length=8)
    np.testing.assert_array_equal(r.tokens, solo["tokens"][0, 3:])


def test_a_failing_step_fails_only_its_own_requests(model, monkeypatch):
    cfg, m = model
    eng = Engine(m, length_buckets=(32,), batch_buckets=(4,))
    good = eng.submit([5, 6], 8, decode=_sampling(cfg, block_length=4).decode)
    bad = eng.submit([5, 6], 8, decode=_sampling(cfg, block_length=8).decode)
    program = eng._program

    def failing(dc, sampled, L, B):
        if dc.block_length == 8:
            raise RuntimeError("boom")
        return program(dc, sampled, L, B)

    monkeypatch.setattr(eng, "_program", failing)
    eng.run()
    assert good.finish_reason == "length" and bad.finish_reason.startswith("error: RuntimeError: boom")
    assert bad.tokens is None and eng.pending() == 0


def test_requests_differing_in_fields_their_rule_ignores_share_a_program(model):
    cfg, m = model
    eng = Engine(m, length_buckets=(32,), batch_buckets=(4,))
    dc = _sampling(cfg, block_length=4).decode
    eng.generate([[5, 6]], 8, decode=dc)
    n = eng.compilations
    for change in (dict(tau=0.3), dict(k=3), dict(factor=2.0), dict(window=7), dict(credit_alpha=0.1)):
        eng.generate([[5, 6]], 8, decode=dataclasses.replace(dc, **change))
    assert eng.compilations == n


def test_sharded_engine_equals_unsharded(model, eos):
    cfg, m = model
    mesh = make_mesh()
    prompts = [[7 + i] * (1 + 3 * i) for i in range(5)]
    plain = Engine(m, eos_id=eos, length_buckets=(32,), batch_buckets=(8,)).generate(prompts, 10)
    sharded = Engine(m, eos_id=eos, length_buckets=(32,), batch_buckets=(8,), mesh=mesh).generate(prompts, 10)
    for a, b in zip(plain, sharded):
        np.testing.assert_array_equal(a, b)


def test_warmed_up_engine_compiles_nothing_for_new_requests(model):
    cfg, m = model
    eng = Engine(m, length_buckets=(32, 64), batch_buckets=(1, 4))
    dc = _sampling(cfg, block_length=8).decode
    eng.warmup(dc)
    n = eng.compilations
    assert n == 4
    rng = np.random.default_rng(2)
    eng.generate([rng.integers(0, 256, k).tolist() for k in (1, 5, 30, 50, 3)], 8, decode=dataclasses.replace(dc, tau=0.6))
    assert eng.compilations == n


def test_cancelled_request_leaves_and_the_others_finish(model):
    cfg, m = model
    eng = Engine(m, length_buckets=(64,), batch_buckets=(4,))
    dc = _sampling(cfg, block_length=4).decode
    reqs = [eng.submit([5, 6, 7], 40, decode=dc) for _ in range(3)]
    eng.step()
    reqs[1].cancel()
    eng.run()
    assert [r.finish_reason for r in reqs] == ["length", "cancelled", "length"]
    np.testing.assert_array_equal(reqs[0].tokens, reqs[2].tokens)


def test_blocks_stream_the_committed_prefix(model):
    cfg, m = model
    eng = Engine(m, length_buckets=(32,), batch_buckets=(2,))
    seen = []
    r = eng.submit([5, 6], 10, decode=_sampling(cfg, block_length=4).decode, on_block=lambda t: seen.append(t.copy()))
    eng.run()
    assert [len(s) for s in seen] == [4, 8, 10]
    np.testing.assert_array_equal(seen[-1], r.tokens)


@pytest.mark.parametrize("prompt, max_tokens, kw, words", [
    ([], 8, {}, "empty"),
    ([5, 300], 8, {}, "token 300"),
    ([5], 0, {}, "max_tokens"),
    ([5] * 60, 10, {}, "context of 64"),
    ([5], 8, {"temperature": -1.0}, "temperature"),
    ([5], 8, {"decode": dlm.config.DecodeConfig(tau=1.5)}, "tau"),
])
def test_bad_requests_are_one_sentence(model, prompt, max_tokens, kw, words):
    cfg, m = model
    eng = Engine(m, length_buckets=(64,))
    with pytest.raises(ConfigError, match=words):
        eng.submit(prompt, max_tokens, **kw)
    assert eng.pending() == 0
