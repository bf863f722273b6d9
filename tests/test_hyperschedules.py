"""Hyperschedules: the autoregressive one is a causal LM, the flat one is MDLM, and no settled
query ever sees an active key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import dlm
from dlm.config import ConfigError, DiffusionConfig, TimeMode, load_config
from dlm.diffusion import hyperschedules as hs
from dlm.diffusion.losses import nelbo_terms, time_and_weight
from dlm.diffusion.processes import absorbing_corrupt
from dlm.diffusion.schedules import make_schedule
from dlm.models.attention import CAUSAL, dense
from dlm.mesh import make_mesh

V = 257


def _model(root):
    cfg = load_config(root / "configs/test.yaml", ["data.seq_len=16"])
    return dlm.build_model(cfg, mesh=make_mesh(devices=jax.devices()[:1]), seed=1), cfg


def test_block_slide_overlaps_blocks_and_settles_whole_blocks():
    tau = hs.Hyperschedule(hs.Kind.BLOCK_SLIDE, 8, width=2, steps=4).table()  # blocks start every 2 steps
    role = np.asarray(hs.roles(tau[:-1], tau[1:]))
    assert tau.shape == (3 * 2 + 4 + 1, 8)
    assert ((role == hs.ACTIVE).sum(1) == 4).any()  # two blocks active at once
    settled = (role == hs.SETTLED).sum(1)
    assert set(np.diff(settled)) <= {0, 2}  # whole blocks settle


def test_tables_are_monotone_and_span_noise_to_clean():
    for h in [hs.Hyperschedule(hs.Kind.FLAT, 8, steps=5), hs.Hyperschedule(hs.Kind.AUTOREGRESSIVE, 8),
              hs.Hyperschedule(hs.Kind.BLOCK, 8, width=4, steps=3), hs.Hyperschedule(hs.Kind.SLIDE, 8, width=2),
              hs.Hyperschedule(hs.Kind.BLOCK_SLIDE, 8, width=2, steps=4)]:
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
    apply = nnx.jit(lambda m, xt, mask: m(xt, attention=dense(mask)))
    total = jnp.zeros((2,))
    for n in range(h.num_steps):
        role = jnp.broadcast_to(hs.roles(tau[n], tau[n + 1]), (2, L))
        xt = hs.corrupt_step(jax.random.key(n), x0, alpha(tau[n]), role, V)
        logits = apply(model, xt, hs.attention_mask(role, h.block_width)[:, None])
        total = total + hs.step_terms(logits, x0, xt, alpha(tau[n]), alpha(tau[n + 1]), role, V).sum(-1)
    np.testing.assert_allclose(np.asarray(total), causal_reference(model, x0), rtol=1e-5)


def causal_reference(model, x0):
    """sum_n -log p(x_n | x_<n) of a causal LM that reads x_<n and a mask token at n, position by
    position: the input is x0 with a mask at n under causal attention, so what follows n is unseen."""
    B, L = x0.shape
    f = nnx.jit(lambda m, inp: m(inp, attention=CAUSAL))
    ref = np.zeros(B)
    for n in range(L):
        logits = f(model, x0.at[:, n].set(V))
        ref -= np.asarray(jax.nn.log_softmax(logits[:, n])[jnp.arange(B), x0[:, n]])
    return ref


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


@pytest.mark.parametrize("kind", ["autoregressive", "block", "slide", "block_slide"])
def test_hyperschedule_training_lowers_the_validation_nelbo(root, tmp_path, kind):
    from dlm.train.trainer import Trainer

    cfg = load_config(root / "configs/test.yaml", [f"workdir={tmp_path}", f"diffusion.hyperschedule={kind}",
                                                    "diffusion.block_width=8", "train.steps=4", "data.max_documents=40",
                                                    "train.eval_use_ema=false", "train.eval_windows=32", "train.eval_t_samples=8"])
    trainer = Trainer(cfg)
    rows = trainer.val_rows
    key = jax.random.key(5)
    before = np.asarray(trainer.evaluator.eval_fn(jax.tree.map(jnp.copy, trainer.state.params), rows, key)[0])  # the state is donated
    trainer.run()
    after = np.asarray(trainer.evaluator.eval_fn(trainer.state.params, rows, key)[0])
    # paired: the same windows, times and masks before and after training
    gain = before - after
    assert np.isfinite(after).all() and gain.mean() > 3 * gain.std(ddof=1) / np.sqrt(len(gain)), (before, after)


def test_autoregressive_estimator_averages_to_the_causal_cross_entropy(root):
    """Autoregressive = block width 1: the estimator (Rao-Blackwellised over t) is L CE_b for the
    block b that u picks, so its mean over u stratified in whole blocks is sum_n CE_n exactly."""
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
    ref = float(causal_reference(model, x0)[0])
    np.testing.assert_allclose(vals.mean() * L, ref, rtol=1e-5)
    assert len(np.unique(vals.round(5))) == L  # one value per block: nothing random left within a block


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
        seq.append(int(jnp.argmax(model(inp, attention=CAUSAL)[0, -1])))
    assert out["tokens"].tolist() == [seq, seq]
    assert out["nfe"] == 10  # one denoiser pass per generated position; the prompt is only committed to the cache


def test_block_sampling_runs_with_prompts(root):
    from dlm.config import SamplingConfig

    model, cfg = _model(root)
    dcfg = load_config(root / "configs/test.yaml", ["data.seq_len=16", "diffusion.hyperschedule=block",
                                                    "diffusion.block_width=4"]).diffusion
    out = dlm.generate(model, [1, 2, 3], SamplingConfig(steps=4, num_samples=3), diffusion=dcfg, length=16)
    assert out["tokens"].shape == (3, 16) and (out["tokens"][:, :3] == [1, 2, 3]).all() and (out["tokens"] < V).all()
    assert out["nfe"] <= 4 * 4


def _trace(model, kind, width, steps, cache, prompt_len=3, grid="uniform", eta=0.0, B=2, L=16):
    from flax import nnx

    from dlm.config import TimeGrid
    from dlm.sampling.hyper import hyper_loop, make_plan

    h = hs.Hyperschedule(hs.Kind(kind), L, width=width, steps=steps)
    plan = make_plan(h, TimeGrid(grid))
    x = np.full((B, L), V, np.int32)
    x[:, :prompt_len] = np.arange(1, prompt_len + 1)
    cfg = model.cfg
    cond = cfg.noise_conditioning
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)

    def run(leaves, x, key):
        m = lambda: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))  # built where it is used (inside the scan)
        fn = lambda tok, pos, att, noise, kv, ret: m()(tok, positions=pos, attention=att, noise=noise if cond else None,
                                                      kv_cache=kv, return_kv=ret)
        return hyper_loop(fn, x, x != V, key, plan, make_schedule(DiffusionConfig()).alpha, mask_id=V,
                          kv_shape=(cfg.num_layers, B, L, cfg.num_heads, cfg.d_model // cfg.num_heads), kv_dtype=jnp.float32,
                          temperature=1.0, float64=False, noise_conditioning=cond, cache=cache, eta=eta, trace=True)

    return plan, jax.jit(run)(leaves, jnp.asarray(x), jax.random.key(7))


@pytest.mark.parametrize("kind,width,steps,cond", [("autoregressive", 1, 1, False), ("block", 4, 3, False),
                                                   ("block", 4, 2, True), ("slide", 4, 1, False), ("flat", 16, 6, False),
                                                   ("block_slide", 4, 4, False)])
def test_kv_cache_logits_equal_full_recompute_at_every_step(root, kind, width, steps, cond):
    """The same generation (same key) with and without the cache: at every step the window's
    logits agree to 1e-5 and so the tokens drawn agree."""
    over = ["data.seq_len=16"] + (["model.noise_conditioning=true"] if cond else [])
    cfg = load_config(root / "configs/test.yaml", over)
    model = dlm.build_model(cfg, mesh=make_mesh(devices=jax.devices()[:1]), seed=1)
    plan, (x_c, nfe_c, commits, (in_c, lg_c, rc_c)) = _trace(model, kind, width, steps, cache=True)
    _, (x_f, nfe_f, _, (in_f, lg_f, rc_f)) = _trace(model, kind, width, steps, cache=False)
    np.testing.assert_array_equal(np.asarray(in_c), np.asarray(in_f))  # the same inputs at every step
    np.testing.assert_array_equal(np.asarray(rc_c), np.asarray(rc_f))
    rc = np.asarray(rc_c)
    assert rc.sum() == int(nfe_c) == int(nfe_f) >= 3
    role = np.asarray(hs.roles(plan.tau[:-1], plan.tau[1:]))  # [N, L]
    win = plan.win_start[:, None] + np.arange(plan.width)
    active = np.take_along_axis(role, win, 1) == hs.ACTIVE  # [N, A]: the rows a step reads
    sel = rc[:, None] & active
    assert sel.sum() >= 3
    np.testing.assert_allclose(np.moveaxis(np.asarray(lg_c), 1, 2)[sel], np.moveaxis(np.asarray(lg_f), 1, 2)[sel],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(x_c), np.asarray(x_f))
    assert (np.asarray(x_c) < V).all()
    if kind != "flat":
        assert int(commits) == (plan.commit_start >= 0).sum() > 0


def test_cached_window_logits_equal_a_full_pass_with_the_role_mask(root):
    """Independent of the loop: after committing the settled prefix, the window pass over the
    cache equals the full forward pass with the hyperschedule's explicit mask."""
    model, cfg = _model(root)
    L, w = 16, 4
    x = jax.random.randint(jax.random.key(1), (2, L), 0, 256)
    role = jnp.where(jnp.arange(L) < 8, hs.SETTLED, jnp.where(jnp.arange(L) < 12, hs.ACTIVE, hs.FUTURE))
    x = jnp.where((role == hs.ACTIVE) & (jnp.arange(L) % 2 == 0), V, x)
    full = model(x, attention=dense(hs.attention_mask(role, w)[None, None]))
    blk = jnp.arange(8) // w
    _, kv = model(x[:, :8], attention=dense((blk[None, :] <= blk[:, None])[None, None]), return_kv=True)
    mask = jnp.concatenate([jnp.ones((4, 8), bool), jnp.ones((4, 4), bool)], 1)[None, None]
    win = model(x[:, 8:12], positions=jnp.broadcast_to(jnp.arange(8, 12), (2, 4)), attention=dense(mask),
                kv_cache=kv)
    np.testing.assert_allclose(np.asarray(win), np.asarray(full[:, 8:12]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cond", [False, True])
def test_double_layout_block_terms_equal_the_single_layout(root, cond):
    """[clean | noised]: the loss is the sum over blocks of the single layout's per-block terms for
    the same times and masks (logits of every noised block equal the single layout's with that
    block active), so it estimates the same NELBO with every block at once."""
    over = ["data.seq_len=16"] + (["model.noise_conditioning=true"] if cond else [])
    cfg = load_config(root / "configs/test.yaml", over)
    model = dlm.build_model(cfg, mesh=make_mesh(devices=jax.devices()[:1]), seed=1)
    L, w = 16, 4
    h = hs.Hyperschedule(hs.Kind.BLOCK, L, width=w)
    x0 = jax.random.randint(jax.random.key(0), (3, L), 0, 256)
    u = jnp.asarray([0.1, 0.45, 0.8])
    seen = {}

    def apply_fn(xt, t, attention, positions=None):
        out = model(xt, noise=t, attention=attention, positions=positions)
        seen["inp"], seen["logits"] = xt, out
        return out

    dcfg = cfg.diffusion
    per = hs.double_nelbo_per_sequence(apply_fn, x0, u, jax.random.key(5), dcfg, h, V, cond)
    xt, dbl = seen["inp"][:, L:], seen["logits"][:, L:]
    np.testing.assert_array_equal(np.asarray(seen["inp"][:, :L]), np.asarray(x0))
    t = jnp.clip(1.0 - jnp.mod(u[:, None] + jnp.arange(L // w)[None] / (L // w), 1.0), dcfg.t_min, 1.0)
    sched = make_schedule(dcfg)
    blk = jnp.arange(L) // w
    ref = jnp.zeros((3,))
    for b in range(L // w):
        role = jnp.broadcast_to(jnp.where(blk < b, hs.SETTLED, jnp.where(blk == b, hs.ACTIVE, hs.FUTURE)), (3, L))
        inp = jnp.where(role == hs.SETTLED, x0, jnp.where(role == hs.ACTIVE, xt, V))
        tau = jnp.where(role == hs.SETTLED, 0.0, jnp.where(role == hs.ACTIVE, t[:, b : b + 1], 1.0))
        single = model(inp, noise=tau if cond else None, attention=dense(hs.attention_mask(role, w)[:, None]))
        sl = slice(b * w, (b + 1) * w)
        np.testing.assert_allclose(np.asarray(dbl[:, sl]), np.asarray(single[:, sl]), atol=1e-5, rtol=1e-5)
        logp = jax.nn.log_softmax(single[:, sl], axis=-1)
        nll = -jnp.take_along_axis(logp, x0[:, sl, None], axis=-1)[..., 0]
        ref = ref + sched.weight(t[:, b]) * jnp.where(xt[:, sl] == V, nll, 0.0).sum(-1)
    np.testing.assert_allclose(np.asarray(per), np.asarray(ref / L), rtol=1e-5)
    assert (np.asarray(xt) == V).any() and (np.asarray(xt) != V).any()


def test_double_layout_trains(root, tmp_path):
    from dlm.train.trainer import Trainer

    cfg = load_config(root / "configs/test.yaml", [f"workdir={tmp_path}", "diffusion.hyperschedule=block", "diffusion.layout=double",
                                                    "diffusion.block_width=8", "train.steps=3", "data.max_documents=40"])
    assert np.isfinite(Trainer(cfg).run()["nelbo"])
    for kind in ("slide", "block_slide"):
        with pytest.raises(ConfigError, match=f"layout=double with diffusion.hyperschedule={kind} is not supported"):
            load_config(root / "configs/test.yaml", [f"diffusion.hyperschedule={kind}", "diffusion.layout=double", "diffusion.block_width=8"])


def test_acs_with_eta_zero_is_the_ancestral_sampler_and_keeps_prompts(root):
    from dlm.config import SamplingConfig

    model, cfg = _model(root)
    for over in ([], ["diffusion.process=epsilon_hybrid", "diffusion.epsilon=0.05"]):
        dcfg = load_config(root / "configs/test.yaml", ["data.seq_len=16"] + over).diffusion
        base = dict(steps=8, num_samples=3, seed=4)
        from dlm.sampling.hyper import make_plan

        plan = make_plan(hs.Hyperschedule(hs.Kind.FLAT, 16, width=16, steps=8))  # the table-driven exact sampler
        anc = dlm.generate(model, [7, 8, 9], SamplingConfig(**base), diffusion=dcfg, length=16, plan=plan)
        acs0 = dlm.generate(model, [7, 8, 9], SamplingConfig(sampler="acs", eta=0.0, **base), diffusion=dcfg, length=16)
        acs = dlm.generate(model, [7, 8, 9], SamplingConfig(sampler="acs", eta=1.0, **base), diffusion=dcfg, length=16)
        if not over:  # absorbing: ACS draws from the same denoiser, so eta = 0 is the exact sampler
            np.testing.assert_array_equal(acs0["tokens"], anc["tokens"])
        assert (acs["tokens"][:, :3] == [7, 8, 9]).all() and (acs["tokens"] < V).all()
        assert (acs["tokens"] != acs0["tokens"]).any()  # corrections changed visible tokens
    with pytest.raises(ConfigError, match="sampling.eta=-1"):
        dlm.generate(model, None, SamplingConfig(sampler="acs", eta=-1.0), diffusion=dcfg, length=16)
