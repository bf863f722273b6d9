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


# ------------------------------------------------------------------ gamma-hybrid (SEDD score entropy)

def gamma_q(alpha, gamma):
    """q_t(z | x) as a [V, V + 1] matrix (tokens, then the mask)."""
    sigma = -math.log(alpha)
    a, b = math.exp(-(1 - gamma) * sigma), math.exp(-gamma * sigma)
    q = np.zeros((V, V + 1))
    q[:, :V] = a * (b * np.eye(V) + (1 - b) / V)
    q[:, V] = 1 - a
    return q


def gamma_posterior_logits(p, alpha, gamma):
    q = gamma_q(alpha, gamma)
    table = np.zeros((len(INPUTS), L, V))
    for n, z in enumerate(INPUTS):
        w = p * np.prod([q[SEQS[:, j], z[j]] for j in range(L)], axis=0)
        w = w / w.sum() if w.sum() > 0 else np.full_like(w, 1 / len(w))  # unreachable states: any logits
        for i in range(L):
            table[n, i] = np.bincount(SEQS[:, i], weights=w, minlength=V)
    return np.log(np.maximum(table, 1e-300))


def gamma_exact_terms(p, x, gamma, delta, nodes=48):
    """int_0^1 E_z[sum_i gamma_terms] dt with the exact posterior denoiser, by enumeration and
    Gauss-Legendre in sigma (t = (1 - e^-sigma) / (1 - delta))."""
    from dlm.config import Schedule
    from dlm.diffusion.schedules import NoiseSchedule

    sched = NoiseSchedule(Schedule.LOGLINEAR, eps=delta)
    smax = -math.log(delta)
    g, wts = np.polynomial.legendre.leggauss(nodes)
    total = 0.0
    for gi, wi in zip(g, wts):  # sigma = smax v^4 clusters nodes near sigma = 0, where the integrand is singular
        v = 0.5 * (gi + 1)
        sigma, wi = smax * v**4, wi * 0.5 * 4 * smax * v**3
        t = (1 - math.exp(-sigma)) / (1 - delta)
        alpha, dalpha = float(sched.alpha(t)), float(sched.dalpha(t))
        q = gamma_q(alpha, gamma)
        table = gamma_posterior_logits(p, alpha, gamma)
        qz = np.prod([q[x[j], INPUTS[:, j]] for j in range(L)], axis=0)  # [states]
        terms = hybrid.gamma_terms(jnp.asarray(table, jnp.float32), jnp.asarray(INPUTS), jnp.tile(jnp.asarray(x)[None], (len(INPUTS), 1)),
                                   jnp.float32(alpha), jnp.float32(dalpha), gamma, M)
        integrand = float((qz * np.asarray(terms, np.float64).sum(-1)).sum())
        total += wi * integrand * math.exp(-sigma) / (1 - delta)  # dt = e^-sigma / (1 - delta) dsigma
    return total


@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_gamma_score_entropy_with_the_exact_denoiser_is_tight(p, gamma):
    """SEDD's bound with the exact ratios: score entropy + KL(q_1(.|x) || p_1) = -log p(x) exactly
    (the reverse process is exact; only the prior differs); dlm's prior term KL(q_1 || pi) is the closed form."""
    delta = 0.05
    q1 = gamma_q(delta, gamma)
    p1 = np.array([sum(p[n] * np.prod([q1[SEQS[n, j], z[j]] for j in range(L)]) for n in range(len(SEQS))) for z in INPUTS])
    pi = np.array([np.prod([(1 - delta ** (1 - gamma)) if zj == M else delta ** (1 - gamma) / V for zj in z]) for z in INPUTS])
    for n in (0, 4, 7):
        x = SEQS[n]
        se = gamma_exact_terms(p, x, gamma, delta)
        qx = np.array([np.prod([q1[x[j], z[j]] for j in range(L)]) for z in INPUTS])
        kl_true = float(np.sum(np.where(qx > 0, qx * np.log(np.maximum(qx, 1e-300) / p1), 0)))
        kl_pi = float(np.sum(np.where(qx > 0, qx * np.log(np.maximum(qx, 1e-300) / pi), 0)))
        np.testing.assert_allclose(se + kl_true, -math.log(p[n]), rtol=1e-5)
        np.testing.assert_allclose(kl_pi, L * hybrid.gamma_prior_kl(delta, gamma, V), rtol=1e-6)


def gamma_posterior_fn(p, gamma, sched):
    """apply_fn(z [B, L], t [B, L]) -> the exact posterior logits mu(x_i | z) at each row's time, in jnp."""
    pj, seqs = jnp.asarray(p, jnp.float32), jnp.asarray(SEQS)

    def apply_fn(z, t, *_, **__):
        alpha = sched.alpha(t[:, 0])
        a, b = alpha ** (1 - gamma), alpha ** gamma
        q = jnp.concatenate([a[:, None, None] * (b[:, None, None] * jnp.eye(V) + (1 - b)[:, None, None] / V),
                             jnp.broadcast_to((1 - a)[:, None, None], (z.shape[0], V, 1))], axis=-1)  # [B, V, V + 1]
        w = pj[None]
        for j in range(L):
            w = w * jnp.take_along_axis(q[:, seqs[:, j]], z[:, None, j, None], axis=-1)[..., 0]  # [B, N]
        w = w / w.sum(-1, keepdims=True)
        table = jnp.stack([w @ jax.nn.one_hot(seqs[:, i], V) for i in range(L)], axis=1)  # [B, L, V]
        return jnp.log(jnp.maximum(table, 1e-30))

    return apply_fn


def test_gamma_training_loss_is_unbiased_for_the_bound(p):
    """The mean of the gamma-hybrid training loss (antithetic times, random corruptions) over many
    draws equals the exact bound: score entropy by enumeration and quadrature plus the prior term."""
    from dlm.diffusion.schedules import make_schedule
    from dlm.objectives import GammaHybrid

    gamma, delta = 0.3, 0.05
    cfg = DiffusionConfig(process="gamma_hybrid", gamma=gamma, schedule="loglinear", loglinear_eps=delta, t_min=1e-6)
    apply_fn = gamma_posterior_fn(p, gamma, make_schedule(cfg))
    objective = GammaHybrid(cfg, M, True)
    for n in (1, 5):
        x = SEQS[n]
        exact = (gamma_exact_terms(p, x, gamma, delta) + L * hybrid.gamma_prior_kl(delta, gamma, V)) / L
        batch = jnp.tile(jnp.asarray(x)[None], (2048, 1))
        loss = jax.jit(lambda k: objective.loss(apply_fn, batch, k)[0])
        vals = np.array([float(loss(jax.random.key(i))) for i in range(400)])
        mean, err = vals.mean(), vals.std(ddof=1) / np.sqrt(len(vals))
        # the estimator is heavy-tailed (a rare uniform flip at small t costs ~1/t), hence the many draws
        assert err < 0.03 * exact and abs(mean - exact) < 4 * err, (n, mean, exact, err)


def test_zero_gamma_is_the_mdlm_nelbo_plus_the_prior(p):
    from dlm.diffusion.losses import nelbo_per_sequence

    cfg = DiffusionConfig(process="gamma_hybrid", gamma=0.0, schedule="loglinear", t_min=1e-5)
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(len(INPUTS), L, V)), jnp.float32)
    apply_fn = lambda z, t: lookup(np.asarray(logits), z)
    x = jnp.tile(jnp.asarray(SEQS[3])[None], (512, 1))
    t = jnp.linspace(0.01, 1.0, 512)
    k = jax.random.key(2)
    g, _ = hybrid.gamma_nelbo_per_sequence(apply_fn, x, t, k, cfg, M)
    mdlm, _ = nelbo_per_sequence(apply_fn, x, t, jax.random.split(k, 3)[0], cfg, M)  # same masks: gamma_corrupt's first key
    np.testing.assert_allclose(np.asarray(g), np.asarray(mdlm) + hybrid.gamma_prior_kl(cfg.loglinear_eps, 0.0, V), rtol=1e-5, atol=1e-6)


def test_gamma_analytic_sampler_draws_from_p(p):
    """With the exact posterior denoiser (recomputed at each t), many small steps of the analytic
    sampler draw from p."""
    from dlm.config import SamplingConfig
    from dlm.diffusion.schedules import make_schedule
    from dlm.sampling.ancestral import gamma_loop, time_grid

    gamma, delta = 0.3, 0.05
    cfg = DiffusionConfig(process="gamma_hybrid", gamma=gamma, schedule="loglinear", loglinear_eps=delta)
    pj, seqs = jnp.asarray(p), jnp.asarray(SEQS)
    sched = make_schedule(cfg)

    def apply_fn(z, t):  # exact posterior logits at per-token time t (prompt-free: t is one value)
        alpha = sched.alpha(t[0, 0])
        a, b, _, _ = hybrid.gamma_levels(alpha, gamma)
        qtok = a * (b * jnp.eye(V) + (1 - b) / V)
        q = jnp.concatenate([qtok, jnp.full((V, 1), 1 - a)], axis=1)  # [V, V + 1]
        w = pj[None] * jnp.prod(q[seqs[None, :, :], z[:, None, :]], axis=-1)  # [B, V^L]
        w = w / w.sum(-1, keepdims=True)
        return jnp.log(jnp.maximum(jnp.einsum("bn,nlv->blv", w, jax.nn.one_hot(seqs, V)), 1e-30))

    B = 20000
    times = jnp.asarray(time_grid(64, cfg_grid := __import__("dlm.config", fromlist=["TimeGrid"]).TimeGrid.UNIFORM), jnp.float32)
    del cfg_grid
    out, nfe = jax.jit(lambda k: gamma_loop(apply_fn, jnp.zeros((B, L), jnp.int32), jnp.zeros((B, L), bool), k, times,
                                            sched.alpha(times), SamplingConfig(float64=False), V, gamma))(jax.random.key(0))
    idx = np.asarray(out[:, 0] * V + out[:, 1])
    assert (np.asarray(out) < V).all() and int(nfe) == 64
    freq = np.bincount(idx, minlength=len(SEQS)) / B
    assert 0.5 * np.abs(freq - p).sum() < 0.03, (freq, p)


def test_gamma_config_errors(root):
    with pytest.raises(ConfigError, match=r"diffusion.gamma=1.5 must be in \[0, 1\)"):
        load_config(root / "configs/test.yaml", ["diffusion.gamma=1.5"])
    with pytest.raises(ConfigError, match="use diffusion.schedule=loglinear"):
        load_config(root / "configs/test.yaml", ["diffusion.process=gamma_hybrid", "model.noise_conditioning=true"])
    with pytest.raises(ConfigError, match="model.noise_conditioning=true"):
        load_config(root / "configs/test.yaml", ["diffusion.process=gamma_hybrid", "diffusion.schedule=loglinear"])


@pytest.mark.parametrize("over", [["diffusion.process=epsilon_hybrid", "diffusion.epsilon=0.05"],
                                  ["diffusion.process=gamma_hybrid", "diffusion.gamma=0.05", "diffusion.schedule=loglinear",
                                   "model.noise_conditioning=true"]])
def test_hybrid_models_train_restore_and_sample(root, tmp_path, over):
    import dlm
    from dlm.train.trainer import Trainer

    cfg = load_config(root / "configs/test.yaml", [f"workdir={tmp_path}", "train.steps=3", "data.max_documents=40", *over])
    assert np.isfinite(Trainer(cfg).run()["nelbo"])
    model, cfg = dlm.restore(tmp_path)
    cfg.sampling.steps, cfg.sampling.num_samples = 8, 2
    out = dlm.generate(model, [65, 66], cfg.sampling, diffusion=cfg.diffusion, length=cfg.data.seq_len)
    assert (out["tokens"][:, :2] == [65, 66]).all() and (out["tokens"] < model.vocab_size).all()
