"""The NELBO against brute force on a 3-token vocabulary.

With the exact denoiser of a distribution p, the continuous-time masked-diffusion NELBO of a
sequence equals -log p(x) exactly (every reveal order is an exact autoregressive
factorisation), for every schedule. We enumerate all masks, integrate over t by quadrature and
check that identity through the library's own loss code; then check the Monte-Carlo training
loss is unbiased for it, and that the discrete-time NELBO tends to it as T grows.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brute import ExactDenoiser
from dlm.config import DiffusionConfig, Schedule, TimeMode
from dlm.diffusion.losses import nelbo_terms, time_and_weight
from dlm.diffusion.schedules import make_schedule
from dlm.objectives import objective_for

V, L = 3, 3


@pytest.fixture(scope="module")
def den():
    return ExactDenoiser(V, L, seed=1)


def mask_costs(den, x):
    """{mask pattern (tuple of bools): sum over masked i of -log p(x0^i | visible)} via nelbo_terms."""
    out = {}
    for pattern in itertools.product([False, True], repeat=L):
        m = np.array(pattern)
        xt = np.where(m, den.mask, x)[None]
        terms = nelbo_terms(den.logits(xt), jnp.asarray(x)[None], jnp.asarray(xt), 1.0, den.mask)
        out[pattern] = float(terms.sum())
    return out


def expected_cost(costs, alpha):
    """E_{mask ~ q(.|t)} [cost] for alpha = alpha(t) (array of times)."""
    total = 0.0
    for pattern, c in costs.items():
        m = sum(pattern)
        total = total + c * (1 - alpha) ** m * alpha ** (L - m)
    return total


def continuous_nelbo(den, x, cfg):
    s = make_schedule(cfg)
    nodes, weights = np.polynomial.legendre.leggauss(200)
    t = 0.5 * (nodes + 1.0)
    with jax.enable_x64(True):
        tt = jnp.asarray(t, jnp.float64)
        w, a = np.asarray(s.weight(tt)), np.asarray(s.alpha(tt))
    return float(0.5 * (weights * w * expected_cost(mask_costs(den, x), a)).sum())


@pytest.mark.parametrize("schedule", [Schedule.LINEAR, Schedule.COSINE, Schedule.POLYNOMIAL])
def test_exact_denoiser_nelbo_equals_negative_log_likelihood(den, schedule):
    cfg = DiffusionConfig(schedule=schedule, exponent=2.0)
    for x in den.seqs[:: 5]:
        assert continuous_nelbo(den, x, cfg) == pytest.approx(-den.log_prob(x), rel=1e-5)


def test_wrong_denoiser_is_above_the_likelihood(den):
    """A denoiser that ignores context (unigram marginals) pays more than -log p on average."""
    cfg = DiffusionConfig()
    other = ExactDenoiser(V, L, seed=2)
    nelbos = []
    for x in den.seqs:
        costs = mask_costs(other, x)
        s = make_schedule(cfg)
        nodes, weights = np.polynomial.legendre.leggauss(200)
        t = 0.5 * (nodes + 1.0)
        nelbos.append(float(0.5 * (weights * np.asarray(s.weight(t)) * expected_cost(costs, np.asarray(s.alpha(t)))).sum()))
    assert float((den.p * np.array(nelbos)).sum()) > den.entropy() + 1e-3


def test_monte_carlo_loss_is_unbiased(den):
    """The MDLM objective's training loss (antithetic times, random masks) averages to the brute-force NELBO."""
    cfg = DiffusionConfig()
    x = den.seqs[7]
    exact = -den.log_prob(x)
    batch = jnp.asarray(np.tile(x, (256, 1)))
    objective = objective_for(cfg, den.mask, False)
    loss = jax.jit(lambda k: objective.loss(lambda xt, t: den.logits(xt), batch, k)[0] * L)
    vals = np.array([float(loss(jax.random.key(i))) for i in range(200)])
    mean, err = vals.mean(), vals.std(ddof=1) / np.sqrt(len(vals))
    assert abs(mean - exact) < 4 * err + 1e-6, (mean, exact, err)


def test_discrete_time_nelbo_converges_to_continuous(den):
    cont = sum(p * continuous_nelbo(den, x, DiffusionConfig()) for p, x in zip(den.p, den.seqs))
    assert cont == pytest.approx(den.entropy(), rel=1e-5)
    gaps = []
    for T in (4, 32, 256, 2048):
        cfg = DiffusionConfig(time=TimeMode.DISCRETE, num_steps=T)
        s = make_schedule(cfg)
        with jax.enable_x64(True):
            t_snapped, w = time_and_weight(jnp.asarray((np.arange(1, T + 1) - 0.5) / T, jnp.float64), s, cfg)
            a = np.asarray(s.alpha(t_snapped))
            w = np.asarray(w)
        total = 0.0
        for p, x in zip(den.p, den.seqs):
            total += p * float((w * expected_cost(mask_costs(den, x), a)).mean())
        gaps.append(total - cont)
    assert all(g >= -1e-9 for g in gaps), gaps  # the discrete-time bound is looser
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps  # and tightens as T grows
    assert gaps[-1] < 1e-3 * cont


def test_evaluator_is_unbiased_for_minus_log_p_with_the_exact_denoiser(den):
    """evaluate() over every sequence (a partial last batch included) with K = 3 stratified times per
    row: the mean NELBO matches the exact mean of -log p(x) / L within its own standard error."""
    from dlm.eval.likelihood import evaluate

    objective = objective_for(DiffusionConfig(), den.mask, False)
    eval_fn = jax.jit(lambda params, rows, key: objective.bound(lambda xt, t, *a, **k: den.logits(xt), rows, key, 3))
    rows = np.repeat(den.seqs, 40, axis=0)  # 1080 rows: the last batch of 64 is padded
    r = evaluate(eval_fn, None, rows, 64, seed=3)
    exact = np.mean([-den.log_prob(x) for x in rows]) / L
    assert 0 < r["nelbo_stderr"] < 0.05 * exact
    assert abs(r["nelbo"] - exact) < 4 * r["nelbo_stderr"], (r, exact)


def test_evaluate_averages_exactly_the_given_rows_with_paired_draws():
    from dlm.eval.likelihood import evaluate

    def eval_fn(params, rows, key):  # a per-row value from the row and from the batch's key
        return rows.sum(-1).astype(jnp.float32) + jax.random.uniform(key, (rows.shape[0],)), jnp.zeros(rows.shape[0])

    rows = np.arange(50 * 4).reshape(50, 4) % 7
    a, b, c = (evaluate(eval_fn, None, rows, 16, seed=s) for s in (1, 1, 2))
    assert a == b and a["nelbo"] != c["nelbo"]  # the same seed gives the same draws
    padded = np.concatenate([rows, np.repeat(rows[:1], 14, 0)])  # 4 batches of 16
    per = np.concatenate([np.asarray(eval_fn(None, padded[i: i + 16], jax.random.fold_in(jax.random.key(1), i))[0])
                          for i in range(0, 64, 16)])[:50].astype(np.float64)
    assert a["nelbo"] == pytest.approx(per.mean(), rel=1e-7)  # 50 rows: the two padded ones are not counted
    assert a["nelbo_stderr"] == pytest.approx(per.std(ddof=1) / np.sqrt(50), rel=1e-7)
