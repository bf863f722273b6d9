"""Hyperschedules: the autoregressive one is a causal LM, the flat one is MDLM, and no settled
query ever sees an active key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import dlm
from dlm.config import ConfigError, DiffusionConfig, TimeMode, load_config
from dlm.diffusion import hyperschedules as hs
from dlm.diffusion.losses import nelbo_terms, time_and_weight
from dlm.diffusion.processes import absorbing_corrupt
from dlm.diffusion.schedules import make_schedule
from dlm.models.attention import AttentionSpec
from dlm.parallel.mesh import make_mesh

V = 257


def _model(root):
    cfg = load_config(root / "configs/test.yaml", ["data.seq_len=16"])
    return dlm.build_model(cfg, mesh=make_mesh(devices=jax.devices()[:1]), seed=1), cfg


def test_tables_are_monotone_and_span_noise_to_clean():
    for h in [hs.Hyperschedule(hs.Kind.FLAT, 8, steps=5), hs.Hyperschedule(hs.Kind.AUTOREGRESSIVE, 8),
              hs.Hyperschedule(hs.Kind.BLOCK, 8, width=4, steps=3), hs.Hyperschedule(hs.Kind.SLIDE, 8, width=2)]:
        tau = h.table()
        assert (tau[0] == 1).all() and (tau[-1] == 0).all() and (np.diff(tau, axis=0) <= 0).all()
    with pytest.raises(ConfigError, match="must divide the sequence length"):
        hs.Hyperschedule(hs.Kind.BLOCK, 10, width=4)


def test_autoregressive_loss_summed_over_steps_is_the_causal_lm_cross_entropy(root):
    model, cfg = _model(root)
    L = 16
    x0 = jax.random.randint(jax.random.key(0), (2, L), 0, 256)
    h = hs.Hyperschedule(hs.Kind.AUTOREGRESSIVE, L)
    tau = jnp.asarray(h.table(), jnp.float32)
    alpha = make_schedule(cfg.diffusion).alpha
    total = jnp.zeros((2,))
    for n in range(h.num_steps):
        role = jnp.broadcast_to(hs.roles(tau[n], tau[n + 1]), (2, L))
        xt = hs.corrupt_step(jax.random.key(n), x0, alpha(tau[n]), role, V)
        mask = hs.attention_mask(role, h.block_width)[:, None]
        logits = model(xt, attention=AttentionSpec("explicit", mask))
        total = total + hs.step_terms(logits, x0, xt, alpha(tau[n]), alpha(tau[n + 1]), role, V).sum(-1)
    # reference: a causal LM that reads x_<n and a mask token at n, computed position by position
    ref = jnp.zeros((2,))
    for n in range(L):
        inp = jnp.concatenate([x0[:, :n], jnp.full((2, 1), V)], axis=1)
        logits = model(inp, attention=AttentionSpec("causal"))
        ref = ref - jax.nn.log_softmax(logits[:, -1])[jnp.arange(2), x0[:, n]]
    np.testing.assert_allclose(np.asarray(total), np.asarray(ref), rtol=1e-5)


def test_flat_step_loss_equals_the_discrete_time_mdlm_nelbo(root):
    model, cfg = _model(root)
    L, N = 16, 8
    x0 = jax.random.randint(jax.random.key(0), (4, L), 0, 256)
    h = hs.Hyperschedule(hs.Kind.FLAT, L, steps=N)
    tau = jnp.asarray(h.table(), jnp.float32)
    dcfg = DiffusionConfig(time=TimeMode.DISCRETE, num_steps=N)
    sched = make_schedule(dcfg)
    for n in range(N):
        key = jax.random.key(100 + n)
        role = jnp.broadcast_to(hs.roles(tau[n], tau[n + 1]), (4, L))
        assert (role == hs.ACTIVE).all()
        xt = hs.corrupt_step(key, x0, sched.alpha(tau[n]), role, V)
        ours = hs.step_terms(model(xt), x0, xt, sched.alpha(tau[n]), sched.alpha(tau[n + 1]), role, V).sum()
        t, w = time_and_weight(jnp.full((4,), tau[n, 0] - 0.5 / N), sched, dcfg)  # snaps up to tau[n]
        xt_ref = absorbing_corrupt(key, x0, sched.alpha(t)[:, None], V)
        np.testing.assert_array_equal(np.asarray(xt), np.asarray(xt_ref))
        mdlm = nelbo_terms(model(xt_ref), x0, xt_ref, w, V).sum() / N  # w carries the factor T
        np.testing.assert_allclose(float(ours), float(mdlm), rtol=1e-5)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from(list(hs.Kind)), st.integers(1, 5), st.data())
def test_no_settled_query_attends_to_an_active_key(blocks, width, kind, steps, data):
    L = blocks * width
    h = hs.Hyperschedule(kind, L, width=width, steps=steps)
    tau = h.table()
    n = data.draw(st.integers(0, h.num_steps - 1))
    role = hs.roles(jnp.asarray(tau[n]), jnp.asarray(tau[n + 1]))
    m = np.asarray(hs.attention_mask(role, h.block_width))
    r = np.asarray(role)
    assert not m[np.ix_(r == hs.SETTLED, r == hs.ACTIVE)].any()
    assert not m[:, r == hs.FUTURE].any() and not m[r == hs.FUTURE].any()
    assert m[np.ix_(r == hs.ACTIVE, r != hs.FUTURE)].all()


@pytest.mark.parametrize("kind", ["autoregressive", "block", "slide"])
def test_hyperschedule_training_runs_and_is_unbiased_for_ar(root, tmp_path, kind):
    from dlm.train.trainer import Trainer

    cfg = load_config(root / "configs/test.yaml", [f"workdir={tmp_path}", f"diffusion.hyperschedule={kind}",
                                                    "diffusion.block_width=8", "train.steps=4", "data.max_documents=40"])
    result = Trainer(cfg).run()
    assert np.isfinite(result["nelbo"])


def test_continuous_block_estimator_averages_to_the_causal_cross_entropy(root):
    """Autoregressive = block width 1: the continuous-time estimator is unbiased for sum_n CE_n."""
    model, cfg = _model(root)
    L = 16
    x0 = jax.random.randint(jax.random.key(3), (1, L), 0, 256)
    h = hs.Hyperschedule(hs.Kind.AUTOREGRESSIVE, L)
    from flax import nnx

    graphdef, state = nnx.split(model)

    def per_row(state, u, k):
        m = nnx.merge(graphdef, state)
        return hs.nelbo_per_sequence(lambda xt, t, attention: m(xt, attention=attention), jnp.tile(x0, (u.shape[0], 1)),
                                     u, k, cfg.diffusion, h, V)

    f = jax.jit(per_row)
    u = (jnp.arange(512) + 0.5) / 512  # stratified over (block, t)
    vals = np.concatenate([np.asarray(f(state, u, jax.random.key(i))) for i in range(8)])
    ref = 0.0
    for n in range(L):
        inp = jnp.concatenate([x0[:, :n], jnp.full((1, 1), V)], axis=1)
        ref -= float(jax.nn.log_softmax(model(inp, attention=AttentionSpec("causal"))[0, -1])[x0[0, n]])
    mean, err = vals.mean() * L, vals.std(ddof=1) * L / np.sqrt(len(vals))
    assert abs(mean - ref) < 4 * err + 1e-3 * ref, (mean, ref, err)


def test_unsupported_pairs_and_widths(root):
    with pytest.raises(ConfigError, match="must divide data.seq_len"):
        load_config(root / "configs/test.yaml", ["diffusion.hyperschedule=block", "diffusion.block_width=5"])
    with pytest.raises(ConfigError, match="not supported"):
        load_config(root / "configs/test.yaml", ["diffusion.hyperschedule=block", "diffusion.block_width=8", "diffusion.prime.l=2"])


def test_autoregressive_sampling_is_greedy_causal_decoding(root):
    """At temperature 0 the autoregressive hyperschedule generates exactly what step-by-step greedy
    decoding of the causal reference produces, prompt kept."""
    from dlm.config import SamplingConfig

    model, cfg = _model(root)
    dcfg = load_config(root / "configs/test.yaml", ["data.seq_len=16", "diffusion.hyperschedule=autoregressive"]).diffusion
    out = dlm.generate(model, [104, 105], SamplingConfig(steps=8, temperature=0.0, num_samples=2), diffusion=dcfg, length=12)
    seq = [104, 105]
    for n in range(2, 12):
        inp = jnp.asarray([seq + [V]])
        seq.append(int(jnp.argmax(model(inp, attention=AttentionSpec("causal"))[0, -1])))
    assert out["tokens"].tolist() == [seq, seq]
    assert out["nfe"] == 12  # one forward pass per position (no cache yet)


def test_block_sampling_runs_with_prompts(root):
    from dlm.config import SamplingConfig

    model, cfg = _model(root)
    dcfg = load_config(root / "configs/test.yaml", ["data.seq_len=16", "diffusion.hyperschedule=block",
                                                    "diffusion.block_width=4"]).diffusion
    out = dlm.generate(model, [1, 2, 3], SamplingConfig(steps=4, num_samples=3), diffusion=dcfg, length=16)
    assert out["tokens"].shape == (3, 16) and (out["tokens"][:, :3] == [1, 2, 3]).all() and (out["tokens"] < V).all()
    assert out["nfe"] <= 4 * 4
