"""MDM-Prime: codec, carry-over, the valid bound against brute force, and l = 1 == MDLM."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dlm.config import ConfigError, DiffusionConfig, load_config
from dlm.diffusion.prime import Codec, carry_over, prime_terms
from dlm.objectives import MaskedDiffusion, PrimeDiffusion
from dlm.diffusion.schedules import make_schedule


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5000), st.integers(1, 12))
def test_codec_round_trips_every_token(V, l):
    l = min(l, int(np.ceil(np.log2(V))))
    c = Codec(V, l)
    b = c.base
    assert b >= 2 and b**l >= V and (b - 1) ** l < V
    x = jnp.arange(V)
    y = c.encode(x)
    assert y.shape == (V, l) and int(y.max()) < b and int(y.min()) >= 0
    np.testing.assert_array_equal(np.asarray(c.decode(y)), np.arange(V))
    np.testing.assert_array_equal(np.asarray(y), c.digits)
    assert c.valid_codes().sum() == V


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 300), st.integers(1, 4), st.integers(0, 10_000))
def test_carry_over_zeroes_every_inconsistent_code(V, l, seed):
    l = min(l, int(np.ceil(np.log2(V))))
    c = Codec(V, l)
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(6, V)), jnp.float32)
    x = rng.integers(0, V, 6)
    y = c.encode_np(x)
    y = np.where(rng.random(y.shape) < 0.5, c.mask_id, y)
    p = np.asarray(jax.nn.softmax(carry_over(logits, jnp.asarray(y), c), -1))
    digits = c.digits
    for r in range(6):
        ok = ((y[r] == c.mask_id) | (digits == y[r])).all(-1)
        assert ok[x[r]]  # the true token stays possible
        assert (p[r, ~ok] == 0).all()
        ref = np.exp(np.asarray(logits[r])[ok] - np.asarray(logits[r])[ok].max())
        np.testing.assert_allclose(p[r, ok], ref / ref.sum(), rtol=1e-5)


def brute_force_objectives(p, l):
    """(valid bound, joint objective) in nats of an exact model of a single-token source p."""
    V = len(p)
    c = Codec(V, l)
    logits = jnp.log(jnp.maximum(jnp.asarray(p, jnp.float32), 1e-30))[None, None]  # carry-over conditions it exactly
    s = make_schedule(DiffusionConfig())
    nodes, weights = np.polynomial.legendre.leggauss(64)
    t = 0.5 * (nodes + 1.0)
    valid = joint = 0.0
    for x in range(V):
        if p[x] == 0:
            continue
        y0 = c.encode_np(x)
        for pattern in itertools.product([False, True], repeat=l):
            m = np.array(pattern)
            yt = np.where(m, c.mask_id, y0)[None, None]
            v, j = prime_terms(logits, jnp.asarray([[x]]), jnp.asarray(yt), 1.0, c)
            prob = (t ** m.sum()) * ((1 - t) ** (l - m.sum()))  # linear schedule: mask prob = t
            integral = 0.5 * (weights * np.asarray(s.weight(t)) * prob).sum()
            valid += p[x] * float(v[0, 0]) * integral
            joint += p[x] * float(j[0, 0]) * integral
    return valid, joint


def joint_closed_form(p, l=2):
    """The joint objective of the exact model of a single-token source with l = 2 digits under the
    linear schedule: each digit pattern (both masked, one masked, none) has weight 1/2 after the
    time integral, so it is 1/2 sum_x p(x) [-log p(x) - log p(x | d0) - log p(x | d1)], d_j being
    x's digit j (the other digit masked)."""
    digits = Codec(len(p), l).digits
    total = 0.0
    for x, px in enumerate(p):
        if px > 0:
            given = [px / p[digits[:, j] == digits[x, j]].sum() for j in range(l)]
            total += px * (-np.log(px) - sum(np.log(g) for g in given))
    return 0.5 * total


@pytest.mark.parametrize("p,entropy,joint", [((.5, 0, 0, .5), 0.6931, 0.34657), ((.4, .1, .1, .4), 1.1935, 1.09718)])
def test_valid_bound_equals_entropy_while_the_joint_objective_falls_below(p, entropy, joint):
    valid, j = brute_force_objectives(np.array(p), l=2)
    H = float(-sum(q * np.log(q) for q in p if q > 0))
    assert H == pytest.approx(entropy, abs=1e-4)
    assert valid == pytest.approx(H, rel=1e-5)
    assert joint_closed_form(np.array(p)) == pytest.approx(joint, abs=1e-5)
    assert j == pytest.approx(joint_closed_form(np.array(p)), abs=1e-5) and j < H - 0.05


def test_l1_prime_loss_equals_the_mdlm_nelbo():
    V, B, L = 11, 16, 12
    cfg = DiffusionConfig()
    table = jax.random.normal(jax.random.key(0), (V + 1, V))

    def apply_tokens(xt, t):  # any function of the noised input
        return table[xt] + 0.1 * jnp.cumsum(table[xt], axis=1)

    x0 = jax.random.randint(jax.random.key(1), (B, L), 0, V)
    for k in range(5):
        key = jax.random.key(10 + k)
        a, ma = MaskedDiffusion(cfg, V, False).loss(apply_tokens, x0, key)
        b, mb = PrimeDiffusion(cfg, V, False).loss(lambda yt, t: apply_tokens(yt[..., 0], t), x0, key)
        assert float(b) == pytest.approx(float(a), rel=1e-6)
        assert float(mb["prime_joint_objective"]) == pytest.approx(float(a), rel=1e-6)


def test_prime_errors(root):
    with pytest.raises(ConfigError, match="divisible by diffusion.prime.l=3"):
        load_config(root / "configs/test.yaml", ["diffusion.prime.l=3"])
    with pytest.raises(ConfigError, match="must be at least 1"):
        load_config(root / "configs/test.yaml", ["diffusion.prime.l=0"])
    with pytest.raises(ConfigError, match="too large"):
        Codec(257, 10)


def test_prime_model_trains_and_samples(root, tmp_path):
    import dlm
    from dlm.train.trainer import Trainer

    cfg = load_config(root / "configs/markov.yaml", [f"workdir={tmp_path}", "diffusion.prime.l=2", "train.steps=6",
                                                      "train.batch_size=16", "data.markov.num_validation=32",
                                                      "train.eval_windows=32", "train.progress=false"])
    result = Trainer(cfg).run()
    assert np.isfinite(result["nelbo"]) and "prime_joint_objective" in result
    model, cfg2 = dlm.restore(tmp_path)
    out = dlm.generate(model, [1, 2], cfg2.sampling, diffusion=cfg2.diffusion, length=16, num_samples=8)
    assert out["tokens"].shape == (8, 16) and (out["tokens"] < 8).all() and (out["tokens"][:, :2] == [1, 2]).all()
    assert 0 <= out["idle_step_ratio"] < 1 and 1 <= out["nfe"] <= cfg2.sampling.steps


def test_digit_sampler_draws_from_the_exact_model():
    """With the exact model of a one-token source and many steps, digits are revealed one at a time
    from the carried-over marginals, which is exact sampling from p; idle steps cost no NFE."""
    from dlm.config import SamplingConfig
    from dlm.sampling.ancestral import prime_ancestral_loop, time_grid

    p = np.array([0.4, 0.05, 0.15, 0.1, 0.3])
    c = Codec(5, 2)  # b = 3: codes 5..8 are invalid and must never appear
    logits = jnp.log(jnp.asarray(p, jnp.float32))
    steps = 64
    cfg = SamplingConfig(steps=steps, float64=False)
    alphas = jnp.asarray(1.0 - time_grid(steps, cfg.grid), jnp.float32)

    def run(n, seed):
        x = jnp.zeros((n, 1), jnp.int32)
        f = jax.jit(lambda k: prime_ancestral_loop(lambda y, t: jnp.broadcast_to(logits, y.shape[:2] + (5,)), x,
                                                   jnp.zeros((n, 1), bool), k, alphas, cfg, c, False))
        return f(jax.random.key(seed))

    tokens, nfe, idle = run(20000, 0)
    freq = np.bincount(np.asarray(tokens).ravel(), minlength=9) / 20000
    assert freq[5:].sum() == 0
    assert 0.5 * np.abs(freq[:5] - p).sum() < 0.02
    # one sequence: 2 digits revealed over 64 steps, so almost every step is idle and reuses the pass
    _, nfe, idle = run(1, 1)
    assert int(nfe) <= 3 and int(idle) >= steps - 2 and int(nfe) + int(idle) in (steps, steps + 1)
