"""Epsilon-hybrid noising: the reported NELBO is a valid bound for the process actually used.

Brute force on V = 3, L = 2: enumerate the corruption y, the masks, and integrate over t exactly
(linear schedule: int_0^1 (1/t) t^m (1-t)^(L-m) dt is a Beta function). With the exact posterior
denoiser the bound is >= -log p(x) for every x and equals it at eps = 0; with an arbitrary
(random) denoiser it is >= -log p_theta(x), p_theta being the distribution of the generative
model the bound belongs to (any-order reveals of y from (1 - eps) mu + eps / V, then the decoder
mu(x | y)); the Monte-Carlo training loss is unbiased for it.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm.config import ConfigError, DiffusionConfig, load_config
from dlm.diffusion import hybrid

V, L = 3, 2
M = V  # mask id
SEQS = np.array(list(itertools.product(range(V), repeat=L)))
INPUTS = np.array(list(itertools.product(range(V + 1), repeat=L)))
RADIX = (V + 1) ** np.arange(L - 1, -1, -1)


def kernel(eps):
    return (1 - eps) * np.eye(V) + eps / V  # K[x, y]


def posterior_table(p, eps):
    """Exact logits log mu_i(x_i | z) for every z in (V+1)^L under the eps-hybrid process."""
    K = kernel(eps)
    table = np.zeros((len(INPUTS), L, V))
    for n, z in enumerate(INPUTS):
        w = p.copy()
        for j in range(L):
            if z[j] != M:
                w = w * K[SEQS[:, j], z[j]]
        w = w / w.sum()
        for i in range(L):
            table[n, i] = np.bincount(SEQS[:, i], weights=w, minlength=V)
    return np.log(np.maximum(table, 1e-300))


def lookup(table, z):
    return jnp.asarray(table, jnp.float32)[(jnp.asarray(z) * RADIX).sum(-1)]


def exact_bound(table, x, eps):
    """E_y[D + M] - L h for one sequence x (nats, summed over positions), by enumeration."""
    K = kernel(eps)
    total = 0.0
    for y in SEQS:
        qy = np.prod([K[x[j], y[j]] for j in range(L)])
        d = -float(jax.nn.log_softmax(lookup(table, y[None]))[0, np.arange(L), x].sum())
        m = 0.0
        for pattern in itertools.product([False, True], repeat=L):
            k = sum(pattern)
            if k == 0:
                continue
            z = np.where(pattern, M, y)
            logq = hybrid.y_log_probs(lookup(table, z[None]), eps)[0]
            cost = -float(sum(logq[i, y[i]] for i in range(L) if pattern[i]))
            m += cost * math.gamma(k) * math.gamma(L - k + 1) / math.gamma(L + 1)  # int w(t) t^k (1-t)^(L-k) dt
        total += qy * (d + m)
    return total - L * hybrid.kernel_entropy(eps, V)


def model_log_prob(table, x, eps):
    """log p_theta(x): y revealed one position at a time in a uniformly random order from
    (1 - eps) mu + eps / V (the continuous-time limit of the ancestral sampler), then x ~ mu(. | y)."""
    total = 0.0
    for y in SEQS:
        py = 0.0
        for order in itertools.permutations(range(L)):
            z, pr = np.full(L, M), 1.0
            for i in order:
                pr *= float(jnp.exp(hybrid.y_log_probs(lookup(table, z[None]), eps)[0, i, y[i]]))
                z[i] = y[i]
            py += pr / math.factorial(L)
        dec = float(jnp.exp(jax.nn.log_softmax(lookup(table, y[None]))[0, np.arange(L), x].sum()))
        total += py * dec
    return math.log(total)


@pytest.fixture(scope="module")
def p():
    return np.random.default_rng(0).dirichlet(np.full(len(SEQS), 0.7))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_bound_with_the_exact_denoiser(p, eps):
    table = posterior_table(p, eps)
    bounds = np.array([exact_bound(table, x, eps) for x in SEQS])
    nll = -np.log(p)
    if eps == 0:
        np.testing.assert_allclose(bounds, nll, rtol=1e-5)  # MDLM is tight; the identity decoder costs nothing
    else:  # a bound on the model's own -log p_theta(x) for every x, and on the entropy on average
        logp = np.array([model_log_prob(table, x, eps) for x in SEQS])
        assert (bounds >= -logp - 1e-5).all()
        assert (p * bounds).sum() > (p * nll).sum() + 1e-4  # the factorised decoder leaves a gap


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_bound_holds_for_an_arbitrary_denoiser(eps):
    table = np.random.default_rng(3).normal(size=(len(INPUTS), L, V)) * 2.0
    logp = np.array([model_log_prob(table, x, eps) for x in SEQS])
    np.testing.assert_allclose(np.exp(logp).sum(), 1.0, rtol=1e-5)  # p_theta is a distribution
    bounds = np.array([exact_bound(table, x, eps) for x in SEQS])
    assert (bounds >= -logp - 1e-5).all(), (bounds, -logp)


def test_monte_carlo_loss_is_unbiased(p):
    eps = 0.3
    table = posterior_table(p, eps)
    cfg = DiffusionConfig(process="epsilon_hybrid", epsilon=eps, t_min=1e-6)
    x = SEQS[5]
    exact = exact_bound(table, x, eps) / L
    apply_fn = lambda z, t: lookup(table, z)
    batch = jnp.tile(jnp.asarray(x)[None], (256, 1))
    f = jax.jit(lambda k: hybrid.epsilon_hybrid_loss(apply_fn, batch, k, cfg, M)[0])
    g = jax.jit(lambda k: hybrid.nelbo_per_sequence(apply_fn, batch, jax.random.uniform(k, (256,)), k, cfg, M)[0].mean())
    for fn in (f, g):
        vals = np.array([float(fn(jax.random.key(i))) for i in range(200)])
        mean, err = vals.mean(), vals.std(ddof=1) / np.sqrt(len(vals))
        assert abs(mean - exact) < 4 * err + 1e-4, (mean, exact, err)


def test_epsilon_must_be_in_unit_interval_and_hybrids_are_flat(root):
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match=r"diffusion.epsilon=.* must be in \[0, 1\)"):
            load_config(root / "configs/test.yaml", [f"diffusion.epsilon={bad}"])
    with pytest.raises(ConfigError, match="not supported"):
        load_config(root / "configs/test.yaml", ["diffusion.process=epsilon_hybrid", "diffusion.hyperschedule=block",
                                                 "diffusion.block_width=8"])
