"""The ancestral sampler against brute force on a tiny vocabulary.

With the exact denoiser of p, the sampler's output distribution for a given time grid can be
computed exactly by propagating a distribution over all (V+1)^L partially-masked states; the
empirical distribution of samples must match it. With one step it is the product of the
marginals; with many steps (one reveal at a time) it is p itself."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brute import ExactDenoiser
from dlm.config import ConfigError, SamplingConfig, TimeGrid
from dlm.sampling.ancestral import ancestral_loop, time_grid
from dlm.sampling.generate import prepare_prompts


def sample(den, n, steps, seed, fixed=None, x=None, grid=TimeGrid.UNIFORM, x64=False):
    """The default sampler path: float64-grade (46-bit) noise in float32; x64 runs the float64 path."""
    cfg = SamplingConfig(steps=steps, grid=grid, x64=x64)
    if x is None:
        x = jnp.full((n, den.L), den.mask, jnp.int32)
        fixed = jnp.zeros((n, den.L), bool)
    alphas = jnp.asarray(1.0 - time_grid(steps, grid), jnp.float32)  # linear schedule
    run = jax.jit(lambda k: ancestral_loop(lambda xt, t: den.logits(xt), x, fixed, k, alphas, cfg, den.V, False))
    with jax.enable_x64(x64):
        tokens, nfe, row_nfe = run(jax.random.key(seed))
    # a row needs a pass only when its input changed and it still has masks: at most once per position
    assert int(np.asarray(row_nfe).max()) <= min(int(nfe), den.L) and int(np.asarray(row_nfe).min()) >= 1
    return tokens, nfe


def empirical(den, tokens):
    base = den.V ** np.arange(den.L - 1, -1, -1)
    idx = (np.asarray(tokens) * base).sum(-1)
    return np.bincount(idx, minlength=len(den.seqs)) / len(idx)


def exact_output_distribution(den, alphas):
    """Distribution of the sampler's output over den.seqs, by propagating all partial states."""
    V, L, M = den.V, den.L, den.mask
    states = den.inputs  # [(V+1)^L, L]
    index = {tuple(s): n for n, s in enumerate(states)}
    marg = np.exp(den.table)  # [(V+1)^L, L, V]
    dist = np.zeros(len(states))
    dist[index[(M,) * L]] = 1.0
    steps = len(alphas) - 1
    for i in range(steps):
        r = 1.0 if i + 1 == steps else (alphas[i + 1] - alphas[i]) / (1.0 - alphas[i])
        new = np.zeros_like(dist)
        for n, s in enumerate(states):
            if dist[n] == 0:
                continue
            options = []  # per position: [(token, prob)]
            for j in range(L):
                if s[j] != M:
                    options.append([(s[j], 1.0)])
                else:
                    options.append([(M, 1.0 - r)] + [(v, r * marg[n, j, v]) for v in range(V)])
            for combo in itertools.product(*options):
                prob = np.prod([c[1] for c in combo])
                if prob > 0:
                    new[index[tuple(c[0] for c in combo)]] += dist[n] * prob
        dist = new
    base = (V + 1) ** np.arange(L - 1, -1, -1)
    return np.array([dist[int((x * base).sum())] for x in den.seqs])


@pytest.mark.parametrize("steps,grid", [(1, TimeGrid.UNIFORM), (3, TimeGrid.COSINE), (6, TimeGrid.UNIFORM)])
def test_sample_distribution_matches_brute_force(steps, grid):
    den = ExactDenoiser(3, 3, seed=3)
    tokens, nfe = sample(den, 20000, steps, seed=0, grid=grid)
    assert (np.asarray(tokens) < den.V).all()
    exact = exact_output_distribution(den, 1.0 - time_grid(steps, grid))
    tv = 0.5 * np.abs(empirical(den, tokens) - exact).sum()
    # 27 outcomes, 20k draws: the sampling noise of TV is about 0.015
    assert tv < 0.03, tv
    assert 1 <= int(nfe) <= steps
    if steps == 1:  # all tokens at once: the product of the marginals, which is far from p
        marg = np.exp(den.table[-1])
        prod = np.prod([marg[j, den.seqs[:, j]] for j in range(den.L)], axis=0)
        np.testing.assert_allclose(exact, prod, rtol=1e-5)
        assert 0.5 * np.abs(prod - den.p).sum() > 0.1


def test_many_steps_sample_the_data_distribution():
    den = ExactDenoiser(3, 3, seed=3)
    tokens, _ = sample(den, 20000, 256, seed=5)
    assert 0.5 * np.abs(empirical(den, tokens) - den.p).sum() < 0.03


def test_idle_steps_reuse_the_forward_pass():
    den = ExactDenoiser(3, 3, seed=3)
    tokens, nfe = sample(den, 4, 512, seed=1)
    # 12 tokens revealed over 512 steps: at most 12 steps change anything, plus the first pass
    assert int(nfe) <= 13


def test_prompt_positions_are_kept_and_condition_the_rest():
    den = ExactDenoiser(3, 3, seed=4)
    x, fixed = prepare_prompts([2], 20000, 3, den.mask, den.V)
    tokens, _ = sample(den, 20000, 256, seed=2, fixed=jnp.asarray(fixed), x=jnp.asarray(x), x64=True)
    tokens = np.asarray(tokens)
    assert (tokens[:, 0] == 2).all()
    cond = den.p * (den.seqs[:, 0] == 2)
    cond /= cond.sum()
    tv = 0.5 * np.abs(empirical(den, tokens) - cond).sum()
    assert tv < 0.03, tv


def test_infill_spec_and_errors():
    x, fixed = prepare_prompts(np.array([0, 3, 1]), 2, 3, 3, 3)
    assert fixed.tolist() == [[True, False, True]] * 2
    with pytest.raises(ConfigError, match="longer than the generation length"):
        prepare_prompts([1] * 5, 1, 4, 3, 3)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        prepare_prompts([7], 1, 4, 3, 3)


def test_float64_grade_gumbel_noise_without_x64():
    """Without jax_enable_x64 the precise noise is built from two 23-bit words: it is Gumbel
    distributed (KS against the exact CDF) and its tail reaches far beyond float32 noise's cap."""
    from dlm.sampling.draws import fine_uniform, gumbel

    assert not jax.config.jax_enable_x64
    n = 400_000
    for precise in (False, True):
        g = np.sort(np.asarray(gumbel(jax.random.key(3), (n,), precise), np.float64))
        cdf = np.exp(-np.exp(-g))
        ks = np.max(np.abs(cdf - np.arange(1, n + 1) / n))
        assert ks < 1.6 / np.sqrt(n), (precise, ks)  # 1.6/sqrt(n): a 1% KS critical value
    # the smallest uniform the construction makes: 2^-47 -> g = -log(-log1p(-w)) = 47 log 2 = 32.6,
    # where float32's uniform stops at 2^-23 (g = 15.9); and it never reaches 1
    w = fine_uniform(jnp.asarray([[0, 0], [0, 2**9], [2**9, 0], [2**32 - 1, 2**32 - 1]], jnp.uint32))
    np.testing.assert_allclose(np.asarray(w[:3]), [2.0**-47, 1.5 * 2.0**-46, 2.0**-23 + 2.0**-47], rtol=1e-6)
    assert float(w[3]) < 1.0
    assert float(-jnp.log(-jnp.log1p(-w[0]))) == pytest.approx(47 * np.log(2), rel=1e-5)


def test_a_second_generate_with_the_same_shapes_does_not_compile(root):
    import dlm
    from dlm.config import load_config
    from dlm.sampling.generate import compilations

    cfg = load_config(root / "configs/test.yaml", [])
    model = dlm.build_model(cfg)
    first = dlm.generate(model, [5, 6], cfg.sampling, num_samples=2, length=32)
    n = compilations()
    second = dlm.generate(model, [5, 6], cfg.sampling, num_samples=2, length=32)
    assert compilations() == n and second["compile_seconds"] == 0.0 and first["compile_seconds"] > 0
    np.testing.assert_array_equal(first["tokens"], second["tokens"])  # same seed, same executable
    dlm.generate(model, [5, 6], cfg.sampling, num_samples=3, length=32)  # another shape compiles
    assert compilations() == n + 1


def test_twenty_seeds_at_the_same_shapes_compile_once(root):
    """The seed only makes the key, an argument of the compiled sampler: 20 seeds, one compile,
    and the draws differ (the key does reach the loop)."""
    import dataclasses

    import dlm
    from dlm.config import load_config
    from dlm.sampling.generate import compilations

    cfg = load_config(root / "configs/test.yaml", ["sampling.steps=4"])
    model = dlm.build_model(cfg)
    n = compilations()
    outs = [dlm.generate(model, [5, 6], dataclasses.replace(cfg.sampling, seed=s), num_samples=2, length=32)["tokens"]
            for s in range(20)]
    assert compilations() <= n + 1
    assert len({o.tobytes() for o in outs}) > 1


def test_temperatures_share_one_compiled_sampler_that_draws_what_a_fresh_compile_draws(root, monkeypatch):
    """A positive temperature is traced: four temperatures, one compile, four different draws;
    each equals what a cache emptied before that temperature compiles for it; temperature 0
    (argmax) is a program of its own."""
    import dataclasses

    import dlm
    from dlm.config import load_config
    from dlm.sampling import generate as gen

    cfg = load_config(root / "configs/test.yaml", ["sampling.steps=4"])
    model = dlm.build_model(cfg)
    temps = (0.05, 0.7, 1.3, 5.0)
    n = gen.compilations()
    shared = [dlm.generate(model, [5, 6], dataclasses.replace(cfg.sampling, temperature=t), num_samples=4, length=32)["tokens"]
              for t in temps]
    assert gen.compilations() <= n + 1
    assert len({o.tobytes() for o in shared}) == len(temps)
    for t, tokens in zip(temps, shared):
        monkeypatch.setattr(gen, "_COMPILED", gen._Compiled())
        alone = dlm.generate(model, [5, 6], dataclasses.replace(cfg.sampling, temperature=t), num_samples=4, length=32)
        np.testing.assert_array_equal(alone["tokens"], tokens)
    n = gen.compilations()
    dlm.generate(model, [5, 6], dataclasses.replace(cfg.sampling, temperature=0.0), num_samples=4, length=32)
    assert gen.compilations() == n + 1


@pytest.mark.parametrize("float64", [False, True])
def test_a_traced_temperature_draws_what_a_python_temperature_draws(float64):
    """The traced temperature is taken at the logits' precision, as a Python float is: the
    same draws bit for bit, under jit, with and without x64."""
    from dlm.sampling.draws import categorical

    for x64 in (False, True):
        with jax.enable_x64(x64):
            logits = jax.random.normal(jax.random.key(1), (64, 50)) * 3
            for t in (0.05, 0.3, 0.7, 1.0, 2.9):
                key = jax.random.key(int(t * 100))
                static = jax.jit(lambda k, l: categorical(k, l, t, float64))(key, logits)
                traced = jax.jit(lambda k, l, temp: categorical(k, l, temp, float64))(
                    key, logits, jnp.asarray(t, jnp.float64 if x64 else jnp.float32))
                np.testing.assert_array_equal(static, traced)
