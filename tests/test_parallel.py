"""Parallel decoding: identities between rules, credit, suffix dropout and caches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlm
from dlm.config import ConfigError, DecodeConfig, SamplingConfig, load_config
from dlm.models.attention import dense
from dlm.mesh import make_mesh
from dlm.sampling import parallel as par

V = 257
PROMPT = [72, 101, 108, 108, 111, 32, 119, 111]


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    cfg = load_config(ROOT / "configs/test.yaml", ["data.seq_len=64"])
    return dlm.build_model(cfg, mesh=make_mesh(devices=jax.devices()[:1]), seed=3)


def _gen(model, temperature=1.0, length=40, seed=0, **decode):
    sc = SamplingConfig(sampler="parallel", decode=DecodeConfig(**decode), num_samples=3, temperature=temperature, seed=seed)
    return dlm.generate(model, PROMPT, sc, length=length)


def test_threshold_one_commits_one_token_per_step_and_equals_topk_one(model):
    thr = _gen(model, block_length=8, rule="threshold", tau=1.0)
    top = _gen(model, block_length=8, rule="topk", k=1)
    assert thr["nfe"] == thr["steps"] == 32 and thr["nfe_per_sample"] == [32, 32, 32]  # 32 generated tokens, one per step
    np.testing.assert_array_equal(thr["tokens"], top["tokens"])
    many = _gen(model, block_length=8, rule="topk", k=4)
    assert many["nfe"] == 8 and (many["tokens"][:, :8] == PROMPT).all() and (many["tokens"] < V).all()


def test_credit_with_alpha_zero_is_no_credit(model):
    base = _gen(model, block_length=8, tau=0.02)
    zero = _gen(model, block_length=8, tau=0.02, credit=True, credit_alpha=0.0)
    np.testing.assert_array_equal(base["tokens"], zero["tokens"])
    assert base["nfe"] == zero["nfe"]
    on = _gen(model, block_length=8, tau=0.02, credit=True, credit_alpha=5.0)
    assert on["nfe"] < base["nfe"]  # credit raises the fused confidence, so more tokens pass tau per step


def test_credit_update_follows_the_definition():
    dc = DecodeConfig(credit_beta=0.5, credit_gamma=0.5)
    logits = jnp.log(jnp.asarray([[[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]]))
    masked = jnp.asarray([[True, False]])
    c = par.credit_update(jnp.zeros((1, 2, 3)), logits, masked, dc, jnp.bool_(True))
    np.testing.assert_allclose(np.asarray(c), [[[math.sqrt(0.6), 0, 0], [0, 0, 0]]], rtol=1e-6)
    c2 = par.credit_update(c, logits, masked, dc, jnp.bool_(False))  # decay then boost the same top-1
    np.testing.assert_allclose(np.asarray(c2[0, 0, 0]), 0.5 * math.sqrt(0.6) + math.sqrt(0.6), rtol=1e-6)
    fused = par.fuse(logits, c2, DecodeConfig(credit_alpha=0.7))
    np.testing.assert_allclose(np.asarray(fused - logits), 0.7 * np.log1p(np.asarray(c2)), rtol=1e-6)


def test_commit_rules():
    s = jnp.asarray([[0.95, 0.5, 0.97, 0.2], [0.3, 0.1, 0.2, 0.4]])
    masked = jnp.asarray([[True, True, True, True], [True, False, True, False]])
    thr = par.commit_mask(s, masked, DecodeConfig(rule="threshold", tau=0.9))
    assert np.asarray(thr).tolist() == [[True, False, True, False], [True, False, False, False]]  # at least the best
    top = par.commit_mask(s, masked, DecodeConfig(rule="topk", k=2))
    assert np.asarray(top).tolist() == [[True, False, True, False], [True, False, True, False]]
    fac = par.commit_mask(s, masked, DecodeConfig(rule="factor", factor=0.2))  # c_j >= 1 - 0.2 / (j + 1)
    assert np.asarray(fac).tolist() == [[True, False, True, False], [True, False, False, False]]


def test_scores_that_ignore_the_draw_commit_exact_draws_and_confidence_leans_to_the_mode():
    """A denoiser whose distribution p = (0.5, 0.3, 0.15, 0.05) ignores the context, decoded one
    token per step at temperature 1: ranking by top1 p1 (or margin) does not look at the draws, so
    every committed token is an exact draw from p; ranking by confidence (the drawn token's
    probability) commits, of the still-masked positions, the one whose draw was likeliest, so token
    0 is overrepresented (the first commit alone is token 0 with odds 1 - 0.5^4)."""
    Vs, N, P, G = 4, 2000, 1, 4
    probs = np.array([0.5, 0.3, 0.15, 0.05])

    def fn(tokens, positions, attention, kv, ret):
        return jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), tokens.shape + (Vs,))

    x = jnp.full((N, P + G), Vs, jnp.int32).at[:, :P].set(1)
    freq = {}
    for score in ("top1", "margin", "confidence"):
        out = par.parallel_decode(fn, x, P, jax.random.key(7), DecodeConfig(block_length=G, rule="topk", k=1, score=score),
                                  mask_id=Vs, eos_id=-1, temperature=1.0, float64=False)
        gen = np.asarray(out["tokens"])[:, P:]
        assert int(out["nfe"]) == G and (gen < Vs).all()
        freq[score] = np.bincount(gen.ravel(), minlength=Vs) / gen.size
    sd = np.sqrt(probs * (1 - probs) / (N * G))
    for score in ("top1", "margin"):
        assert (np.abs(freq[score] - probs) < 4.5 * sd).all(), (score, freq[score])
    expected0 = np.mean([1 - 0.5 ** m for m in (4, 3, 2, 1)])  # the m-th last commit: the best of m draws
    assert abs(freq["confidence"][0] - expected0) < 4.5 * np.sqrt(expected0 * (1 - expected0) / (N * G)), freq["confidence"]


def test_suffix_dropout_keep_probabilities_match_the_formula():
    dc = DecodeConfig(window=64, k_sigma=3.0, scale=2.3)
    p = par.keep_probabilities(dc)
    for d in (0, 1, 20, 63):
        z = 3.0 * d / 63
        assert abs(p[d] - min(1.0, 2.3 * math.exp(-z * z / 2) / math.sqrt(2 * math.pi))) < 1e-12
    draws = np.concatenate([np.asarray(par.suffix_keep(jax.random.key(i), dc, 256)) for i in range(16)])  # 4096 blocks
    freq = draws.mean(0)
    err = np.sqrt(p * (1 - p) / len(draws)) + 1e-9
    assert (np.abs(freq - p) < 5 * err + 1e-3).all()
    # the same block key gives the same pattern, another key another one
    a, b = (np.asarray(par.suffix_keep(jax.random.key(k), dc, 4)) for k in (7, 7))
    assert (a == b).all() and (a != np.asarray(par.suffix_keep(jax.random.key(8), dc, 4))).any()


def test_suffix_dropout_feeds_the_kept_positions_at_their_true_positions(model):
    """Masking the dropped suffix out of a full pass equals feeding only prefix + block + kept
    suffix with their true RoPE positions; the cache path gathers exactly the kept offsets."""
    L, Bk, W, start = 48, 8, 16, 16
    x = jnp.asarray(np.where(np.arange(L) < start, np.random.default_rng(0).integers(0, 256, L), V))[None]
    keep = jnp.asarray(np.random.default_rng(1).random((1, W)) < 0.5)
    vis = par.dpad_visible(start, keep, Bk, W, L)
    masked_pass = model(x, attention=dense(jnp.broadcast_to(vis[:, None, None, :], (1, 1, L, L))))
    idx = np.flatnonzero(np.asarray(vis[0]))
    assert (idx[idx >= start + Bk] - start - Bk == np.flatnonzero(np.asarray(keep[0]))).all()
    gathered = model(x[:, idx], positions=jnp.asarray(idx)[None])
    np.testing.assert_allclose(np.asarray(masked_pass[:, start : start + Bk]), np.asarray(gathered[:, start : start + Bk]),
                               atol=1e-5, rtol=1e-5)
    pos, valid = par.suffix_slots(start, keep, Bk, 12, L)
    kept = np.flatnonzero(np.asarray(keep[0])) + start + Bk
    assert np.asarray(pos[0])[np.asarray(valid[0])].tolist() == kept[: int(valid.sum())].tolist()
    assert int(valid.sum()) == min(12, len(kept))


@pytest.mark.parametrize("cache,drop", [("prefix", False), ("dual", False), ("prefix", True), ("dual", True)])
def test_cache_refresh_logits_equal_full_recompute(model, cache, drop):
    """At each block start the cache is built by a full pass: its block logits equal a full
    recompute of the sequence at that point (with the same suffix dropout mask for DPad)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    L, P = 40, len(PROMPT)
    dc = DecodeConfig(block_length=8, tau=0.05, cache=cache, suffix_dropout=drop, window=8, credit=True)
    x = jnp.asarray(np.array([PROMPT + [V] * (L - P)] * 2, np.int32))

    def run(leaves, x):
        m = lambda: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        fn = lambda t, p, a, kv, r: m()(t, positions=p, attention=a, kv_cache=kv, return_kv=r)
        return par.parallel_decode(fn, x, P, jax.random.key(0), dc, mask_id=V, eos_id=-1, temperature=0.0, float64=False,
                                   trace=True)

    out = jax.jit(run)(leaves, x)
    assert (np.asarray(out["tokens"]) < V).all()
    for b in range(4):
        xb = out["block_inputs"][b]
        start = P + 8 * b
        vis = par.dpad_visible(start, out["keep"][b], 8, 8, L) if drop else jnp.ones((2, L), bool)
        full = model(xb, attention=dense(jnp.broadcast_to(vis[:, None, None, :], (2, 1, L, L))))[:, start : start + 8]
        np.testing.assert_allclose(np.asarray(out["refresh_logits"][b]), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_early_termination_on_eos_in_a_finished_block():
    """A denoiser that puts EOS at position 13: the block holding it completes, the rest of the row
    after that block is EOS, and no further blocks are decoded."""
    EOS, Vs, L = 5, 6, 32

    def fn(tokens, positions, attention, kv, ret):
        logits = jnp.where(positions[..., None] == 13, jax.nn.one_hot(EOS, Vs) * 9.0, jax.nn.one_hot(1, Vs) * 9.0)
        return logits

    x = jnp.full((2, L), Vs, jnp.int32).at[:, :4].set(2)
    out = par.parallel_decode(fn, x, 4, jax.random.key(0), DecodeConfig(block_length=4, rule="topk", k=1), mask_id=Vs, eos_id=EOS,
                              temperature=0.0, float64=False)
    tok = np.asarray(out["tokens"])
    assert (tok[:, 4:13] == 1).all() and (tok[:, 13] == EOS).all() and (tok[:, 14:16] == 1).all()  # the block completes
    assert (tok[:, 16:] == EOS).all() and np.asarray(out["finished"]).all()
    assert int(out["nfe"]) == 12  # blocks [4, 8), [8, 12), [12, 16) only
    off = par.parallel_decode(fn, x, 4, jax.random.key(0), DecodeConfig(block_length=4, rule="topk", k=1, early_stop=False),
                              mask_id=Vs, eos_id=EOS, temperature=0.0, float64=False)
    assert int(off["nfe"]) == 28


def test_a_block_longer_than_the_generation_is_one_block_of_the_generation(model):
    """PROMPT then 32 positions: block_length=64 decodes them as one block of 32, draws included."""
    np.testing.assert_array_equal(_gen(model, block_length=64)["tokens"], _gen(model, block_length=32)["tokens"])


def test_parallel_decoding_errors(model, root):
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match=r"tau=.* must be in \(0, 1\]"):
            load_config(root / "configs/test.yaml", [f"sampling.decode.tau={bad}"])
    with pytest.raises(ConfigError, match="window=0 must be at least 1"):
        load_config(root / "configs/test.yaml", ["sampling.decode.window=0"])
    with pytest.raises(ConfigError, match="suffix_dropout=false"):
        sc = SamplingConfig(sampler="parallel", num_samples=1, decode=DecodeConfig(suffix_dropout=True, block_length=4))
        dlm.generate(model, [V] * 4 + [5] * 36, sc, length=40)
    with pytest.raises(ConfigError, match="sampling.temperature=-1.0 must be >= 0"):  # built in code, not from a config
        dlm.generate(model, None, SamplingConfig(sampler="parallel", num_samples=1, temperature=-1.0), length=40)


def test_sample_script_takes_sampling_overrides(tmp_path, capsys):
    import json

    from dlm.cli import sample_main
    from dlm.train.trainer import Trainer

    Trainer(load_config(ROOT / "configs/test.yaml", [f"workdir={tmp_path}", "train.steps=2", "data.max_documents=40"])).run()
    sample_main(["--workdir", str(tmp_path), "--num-samples", "2", "--prompt", "def ", "sampling.sampler=parallel",
                 "sampling.decode.block_length=4", "sampling.decode.credit=true", "sampling.decode.cache=prefix"])
    rec = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rec) == 2 and rec[0]["tokens"][:4] == [100, 101, 102, 32] and rec[0]["nfe"] <= 28
    with pytest.raises(SystemExit):
        sample_main(["--workdir", str(tmp_path), "model.num_layers=3"])
    assert "sampling.* overrides only" in capsys.readouterr().err


@pytest.mark.parametrize("cache,drop", [("prefix", False), ("dual", False), ("prefix", True), ("dual", True)])
def test_cached_pass_with_a_fresh_cache_equals_the_full_pass(model, cache, drop):
    """Right after a refresh (nothing committed since), reading the prefix (and suffix) from the
    cache gives the full pass's block logits: the caches are exact when fresh, and stale only by
    the tokens committed in the block since."""
    L, Bk, W, start, B = 48, 8, 16, 16, 2
    rng = np.random.default_rng(0)
    x = np.full((B, L), V, np.int32)
    x[:, :start] = rng.integers(0, 256, (B, start))
    x[:, start : start + 3] = rng.integers(0, 256, (B, 3))  # a partly decoded block
    x = jnp.asarray(x)
    keep = jnp.asarray(rng.random((B, W)) < 0.6) if drop else None
    dc = DecodeConfig(block_length=Bk, window=W, suffix_dropout=drop, cache=cache)
    S = min(par.max_kept(dc), L - start - Bk) if drop else L - start - Bk
    fn = lambda t, p, a, kv, r: model(t, positions=p, attention=a, kv_cache=kv, return_kv=r)
    # under DPad a pass feeds a canvas [0, 32) (the block ends at 24) and the kept suffix in S slots,
    # or, when that would not be shorter, the whole sequence with the dropped suffix masked out (40)
    for Lc in ([32, 40] if drop else [L]):
        passes = par.Passes(fn, B, L, Bk, W, S, drop, dc.cache, V, Lc=Lc)
        assert passes.gather == (drop and Lc == 32)
        full, (k, v) = passes.full(x, start, keep, True)
        C = passes.cache_length()
        assert k.shape[2] >= C
        cached = passes.cached(x, start, keep, k[:, :, :C], v[:, :, :C])
        np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-5, rtol=1e-5)
        if drop:  # the canvas pass equals a full-length pass with the dropped suffix masked out
            vis = par.dpad_visible(start, keep, Bk, W, L)
            masked = model(x, attention=dense(jnp.broadcast_to(vis[:, None, None, :], (B, 1, L, L))))
            np.testing.assert_allclose(np.asarray(full), np.asarray(masked[:, start : start + Bk]), atol=1e-5, rtol=1e-5)
