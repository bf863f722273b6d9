"""Post-training from rewards (train.mode=rl): the estimators of log pi(response | prompt), group
advantages, the loss at the start, compiled rollouts, and runs that shard over processes and
survive a kill like training does.

The estimators are checked against the exact denoiser of a distribution over V^L (tests/brute):
there every masked-diffusion bound is tight, so an unbiased estimate of the bound has the exact
conditional log-likelihood as its mean."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from brute import ExactDenoiser
from flax import nnx

import dlm
from dlm.config import ConfigError, DiffusionConfig, Estimator, RLConfig, load_config
from dlm.mesh import make_mesh
from dlm.objectives import objective_for
from dlm.rl import estimators, grpo
from dlm.rl.tasks import repeat
from dlm.train.checkpoint import Checkpointer
from dlm.train.metrics import read_metrics
from dlm.train.state import create_train_state

V, L = 3, 4


def _target(den, x, given_mask):
    ok = (den.seqs[:, given_mask] == x[given_mask]).all(1)
    return (den.log_prob(x) - np.log(den.p[ok].sum())) / (~given_mask).sum()


@pytest.mark.parametrize("kind,rl", [("elbo", RLConfig(estimator=Estimator.ELBO, t_samples=2)),
                                     ("coupled", RLConfig(estimator=Estimator.COUPLED, t_samples=2, coupled_range=[0.0, 1.0])),
                                     ("sandwich_lower", RLConfig(estimator=Estimator.SANDWICH, t_samples=1))])
@pytest.mark.parametrize("given_positions", [(0, 1), (1, 3)])
def test_unbiased_estimators_average_to_the_conditional_log_likelihood_under_the_exact_denoiser(kind, rl, given_positions):
    den = ExactDenoiser(V, L, seed=5)
    x = np.array([2, 0, 1, 2])
    given_mask = np.isin(np.arange(L), given_positions)
    target = _target(den, x, given_mask)
    B = 8192
    x0 = jnp.broadcast_to(jnp.asarray(x), (B, L))
    given = jnp.broadcast_to(jnp.asarray(given_mask), (B, L))
    objective = objective_for(DiffusionConfig(), V, False)
    apply_fn = lambda xt, noise, attention=None, positions=None: den.logits(xt)
    e = jax.jit(lambda k: estimators.estimate(rl, objective, apply_fn, x0, given, k, False))(jax.random.key(3))
    per = np.asarray(e.lower, np.float64)
    mean, se = per.mean(), per.std(ddof=1) / np.sqrt(B)
    assert abs(mean - target) < 4 * se + 1e-6, (mean, se, target)
    unconditional = den.log_prob(x) / L
    assert abs(target - unconditional) > 0.05  # the condition matters: a joint likelihood would fail


def test_stochastic_commit_trajectories_have_probabilities_that_sum_to_one_and_match_the_decoder():
    """The parallel decoder with the stochastic threshold rule (commit_temperature > 0) on the exact
    denoiser of a distribution over 3^4 sequences, the first token given: the trace estimator
    rescoring every pass gives each trajectory (which pass committed each position, and the tokens)
    a log-probability that includes the commit and wait decisions. Over all 13 x 27 trajectories
    those probabilities sum to 1, and 40000 decoded rows fall on the trajectories with those
    frequencies: their total variation from them is within 3 times its sampling expectation."""
    import itertools

    from dlm.config import DecodeConfig, Score, check_decode
    from dlm.sampling import parallel as par

    den = ExactDenoiser(V, L, seed=5)
    P, N = 1, 40000
    dc = DecodeConfig(block_length=L - P, rule="threshold", score="margin", tau=0.5, commit_temperature=0.2)
    check_decode(dc)
    with pytest.raises(ConfigError, match="commit_temperature"):
        check_decode(DecodeConfig(rule="threshold", score="confidence", commit_temperature=0.2))
    passes = [f for f in itertools.product(range(L - P), repeat=L - P) if set(f) == set(range(max(f) + 1))]
    words = list(itertools.product(range(V), repeat=L - P))
    assert len(passes) == 13
    steps = np.array([[-1, *f] for f in passes for _ in words], np.int32)
    tokens = np.array([[1, *w] for _ in passes for w in words], np.int32)
    given = np.zeros_like(tokens, bool)
    given[:, :P] = True
    commit = estimators.CommitPolicy(Score.MARGIN, dc.tau, dc.commit_temperature, P, dc.block_length)
    est = estimators.trace(lambda xt, noise: den.logits(xt), jnp.asarray(tokens), jnp.asarray(given), jnp.asarray(steps),
                           jax.random.key(0), 6, 1.0, den.mask, False, commit)  # 6 samples: every pass of 1, 2 or 3
    prob = np.exp(np.asarray(est.lower, np.float64) * (L - P))
    np.testing.assert_allclose(prob.sum(), 1.0, rtol=1e-5)

    x = jnp.full((N, L), den.mask, jnp.int32).at[:, :P].set(1)
    out = par.parallel_decode(lambda tokens, positions, attention, kv, ret: den.logits(tokens), x, P, jax.random.key(2), dc,
                              mask_id=den.mask, eos_id=-1, temperature=1.0, float64=False, commit_steps=True)
    index = {(tuple(s), tuple(t)): i for i, (s, t) in enumerate(zip(steps.tolist(), tokens.tolist()))}
    hits = np.bincount([index[(tuple(s), tuple(t))] for s, t in zip(np.asarray(out["commit_step"]).tolist(),
                                                                     np.asarray(out["tokens"]).tolist())], minlength=len(prob))
    tv = 0.5 * np.abs(hits / N - prob).sum()
    expected = 0.5 * np.sqrt(2 * prob * (1 - prob) / (np.pi * N)).sum()
    assert tv < 3 * expected, (tv, expected)


def test_d1_estimates_the_one_step_mean_field_score_not_the_likelihood():
    """d1 scores each response token with every response token masked: under the exact denoiser
    its value is sum_k log p(o^k | the prompt) / n, the mean-field score, whatever the draws
    (no prompt masking here), and that differs from log p(o | prompt) / n."""
    den = ExactDenoiser(V, L, seed=5)
    x = np.array([2, 0, 1, 2])
    given_mask = np.isin(np.arange(L), (0,))
    x0, given = jnp.asarray(x)[None], jnp.asarray(given_mask)[None]
    apply_fn = lambda xt, noise, attention=None, positions=None: den.logits(xt)
    got = estimators.d1(apply_fn, x0, given, jax.random.key(0), V, 0.0, False).lower[0]
    ok = den.seqs[:, 0] == x[0]
    post = den.p * ok / den.p[ok].sum()
    mean_field = np.mean([np.log(post[den.seqs[:, k] == x[k]].sum()) for k in (1, 2, 3)])
    np.testing.assert_allclose(float(got), mean_field, rtol=1e-5)
    assert abs(mean_field - _target(den, x, given_mask)) > 0.05


def test_coupled_pairs_mask_every_response_position_exactly_once_and_never_the_prompt():
    seen = []

    def apply_fn(xt, noise, attention=None, positions=None):
        seen.append(xt)
        return jnp.zeros((*xt.shape, V))

    B, Lx, K = 64, 12, 3
    x0 = jax.random.randint(jax.random.key(1), (B, Lx), 0, V)
    given = jax.random.uniform(jax.random.key(2), (B, Lx)) < 0.3
    rl = RLConfig(estimator=Estimator.COUPLED, t_samples=K, coupled_range=[0.2, 0.8])
    estimators.coupled(apply_fn, x0, given, jax.random.key(4), rl, V, 1e-3)
    inputs = np.asarray(seen[0]).reshape(2, K, B, Lx)
    first, second = inputs[0] == V, inputs[1] == V
    g = np.asarray(given)[None]
    assert not (first & g).any() and not (second & g).any()
    np.testing.assert_array_equal(first ^ second, np.broadcast_to(~g, first.shape))
    assert not (first & second).any()
    x = np.broadcast_to(np.asarray(x0), first.shape)
    np.testing.assert_array_equal(inputs[0][~first], x[~first])  # what is not masked is the rollout's token
    np.testing.assert_array_equal(inputs[1][~second], x[~second])
    rate = first.sum(-1) / np.maximum((~np.asarray(given)).sum(-1), 1)  # [K, B]: each first mask's share of the response
    assert 0.1 < rate.mean() < 0.9 and rate.std() > 0.05


@pytest.mark.parametrize("scale", [False, True])
def test_group_advantages_have_zero_mean_per_group(scale):
    rng = np.random.default_rng(0)
    rewards = rng.random(48).astype(np.float32)
    rewards[:6] = 0.5  # a group that all scored alike: no signal
    a = grpo.group_advantages(rewards, 6, scale).reshape(8, 6)
    np.testing.assert_allclose(a.mean(1), 0.0, atol=1e-6)
    np.testing.assert_array_equal(a[0], 0.0)
    assert (np.sign(a[1:]) == np.sign(rewards.reshape(8, 6)[1:] - rewards.reshape(8, 6)[1:].mean(1, keepdims=True))).all()
    if scale:
        np.testing.assert_allclose(a[1:].std(1), 1.0, rtol=1e-4)


# ------------------------------------------------------------------ runs on a small 4x4 Sudoku model

START = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.grid=[4,4,2,2]", "data.seq_len=16",
         "data.sudoku.size=4", "data.sudoku.base_grids=200", "data.sudoku.validation=16", "train.steps=150",
         "train.lr=3e-3", "train.warmup_steps=10",
         "train.batch_size=32", "train.eval_windows=16", "train.checkpoint_every=150", "train.progress=false"]


def rl_args(start, cache, *extra):
    return ["train.mode=rl", f"train.init_from={start}", "train.steps=6", "train.batch_size=16", "train.lr=1e-3",
            "train.warmup_steps=0", "train.weight_decay=0.0", "train.ema_decay=0.0", "train.log_every=1",
            "train.checkpoint_every=1", "train.keep_checkpoints=10", "train.progress=false", "rl.group_size=4", "rl.pool=40",
            "rl.givens=[6,0]", "rl.reward=cells", "sampling.sampler=parallel", "sampling.temperature=1.0",
            "sampling.decode.rule=threshold", "sampling.decode.tau=0.9", "sampling.decode.score=margin",
            "sampling.decode.block_length=16", f"data.sudoku.cache_dir={cache}", *extra]


@pytest.fixture(scope="module")
def start(root, tmp_path_factory):
    """A 4x4 Sudoku model trained for 150 steps (its workdir) and a puzzle cache."""
    from dlm.train.trainer import train

    base = tmp_path_factory.mktemp("rl")
    work = base / "start"
    train(load_config(root / "configs/sudoku.yaml", [f"workdir={work}", f"data.sudoku.cache_dir={base / 'cache'}", *START]))
    return work, base / "cache"


def _config(root, start, workdir, *extra):
    work, cache = start
    return load_config(root / "configs/sudoku.yaml", [f"workdir={workdir}", *START, *rl_args(work, cache, *extra)])


def test_at_the_start_the_kl_is_zero_and_zero_advantages_leave_the_parameters_unchanged(root, start, tmp_path):
    from dlm.rl.trainer import RLTrainer

    cfg = _config(root, start, tmp_path / "rl", "rl.kl=0.5", "rl.inner_steps=2")
    trainer = RLTrainer(cfg)
    before = jax.tree.map(np.asarray, trainer.state.params)
    for a, b in zip(jax.tree.leaves(trainer.ref), jax.tree.leaves(before)):  # the reference is the start
        np.testing.assert_array_equal(np.asarray(a), b)
    prompts = repeat(trainer.task.prompts(0, 4), 4)
    tokens, _, _ = trainer.rollouts(trainer.state.params, prompts.canvas, jax.random.key(0))
    from dlm.rl.trainer import global_rows
    from dlm.mesh import BATCH, batch_sharding
    from jax.sharding import NamedSharding, PartitionSpec

    rows = batch_sharding(trainer.mesh)
    batch = {"tokens": global_rows(tokens.astype(np.int32), rows), "given": global_rows(prompts.given, rows),
             "advantages": global_rows(np.zeros(len(tokens), np.float32), NamedSharding(trainer.mesh, PartitionSpec(BATCH)))}
    state, metrics = trainer.step_fn(trainer.state, trainer.ref, batch)
    assert float(metrics["kl"]) == 0.0 and float(metrics["grad_norm"]) == 0.0 and float(metrics["ratio"]) == 1.0
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, state.params)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    # with advantages the same step moves them
    adv = np.asarray(grpo.group_advantages(trainer.task.rewards(tokens, prompts)["cells"], 4))
    assert np.abs(adv).max() > 0
    batch["advantages"] = global_rows(adv, NamedSharding(trainer.mesh, PartitionSpec(BATCH)))
    state, metrics = trainer.step_fn(state, trainer.ref, batch)
    assert float(metrics["grad_norm"]) > 0
    moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before))]
    assert max(moved) > 1e-4
    trainer.checkpointer.close()


def test_a_run_compiles_its_rollouts_and_step_once_logs_the_time_split_and_restores_as_a_model(root, start, tmp_path):
    from dlm.eval.tasks import solve_sudoku
    from dlm.rl.trainer import RLTrainer

    work = tmp_path / "rl"  # configs/rl_sudoku.yaml's estimator: the traces of a stochastic threshold rule
    trainer = RLTrainer(_config(root, start, work, "train.steps=4", "rl.estimator=trace", "sampling.decode.commit_temperature=0.05"))
    out = trainer.run()
    assert out["step"] == 4
    assert trainer.rollouts.compilations == 1 and trainer.step_fn._cache_size() == 1
    records = [r for r in read_metrics(work) if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["rollout_seconds"] > 0 and r["update_seconds"] > 0 and r["scoring_seconds"] >= 0
        assert r["rollouts_per_second"] == pytest.approx(16 / r["rollout_seconds"], rel=1e-6)
        assert 0 <= r["exact_solve"] <= r["cell_accuracy"] + 1e-6 <= 1 + 1e-6
    # the workdir is a run like any other: dlm.restore reads the last parameters, the task
    # evaluation decodes with them
    model, cfg = dlm.restore(work)
    state = Checkpointer(work).restore(create_train_state(cfg, 4, make_mesh(cfg.mesh), abstract=True)[1], step=4)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    from dlm.config import SamplingConfig

    puzzles, solutions = trainer.task.pools[0]
    r = solve_sudoku(model, cfg.diffusion, puzzles[:20], solutions[:20], SamplingConfig(sampler="parallel", temperature=0.0), batch=20)
    assert r["num_puzzles"] == 20
    # dlm-eval's NELBO report and benchmarks/tasks.py take it as the task's run (never training it further)
    from dlm.eval.command import nelbo_report

    assert nelbo_report(work, windows=8)["step"] == 4
    sys.path.insert(0, str(root / "benchmarks"))
    from tasks import train_if_needed

    train_if_needed(load_config(root / "configs/sudoku.yaml", [f"workdir={work}", f"data.sudoku.cache_dir={start[1]}", *START]))
    assert Checkpointer(work).latest_step() == 4


def test_rl_refuses_a_start_that_is_not_a_run_and_a_zero_temperature(root, start, tmp_path):
    from dlm.rl.trainer import RLTrainer

    with pytest.raises(ConfigError, match="sampling.temperature"):
        _config(root, start, tmp_path / "a", "sampling.temperature=0")
    with pytest.raises(ConfigError, match="holds no config.yaml"):
        RLTrainer(_config(root, start, tmp_path / "b", f"train.init_from={tmp_path / 'nowhere'}"))
    with pytest.raises(ConfigError, match="group_size"):
        _config(root, start, tmp_path / "c", "rl.group_size=3")


# ------------------------------------------------------------------ processes and kills

def _cmd(root, start, workdir, *extra):
    work, cache = start
    return [sys.executable, str(root / "train.py"), "--config", str(root / "configs/sudoku.yaml"), f"workdir={workdir}", *START,
            *rl_args(work, cache, *extra)]


def _env(devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(workdir, step):
    cfg = load_config(workdir / "config.yaml")
    _, abstract, _ = create_train_state(cfg, 4, make_mesh(cfg.mesh), abstract=True)
    ckpt = Checkpointer(workdir)
    try:
        return [np.asarray(x, np.float64) for x in jax.tree.leaves(ckpt.restore(abstract, step=step).params)]
    finally:
        ckpt.close()


def _rewards(workdir):
    return {r["step"]: (r["reward"], r["exact_solve"]) for r in read_metrics(workdir) if r["split"] == "train"}


def test_two_processes_match_one_process(root, start, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cmd(root, start, one, "train.steps=3", "rl.kl=0.1"), env=_env(8), check=True, capture_output=True,
                   timeout=600)
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(_cmd(root, start, two, "train.steps=3", "rl.kl=0.1", "--coordinator-address", address,
                                   "--num-processes", "2", "--process-id", str(i)), env=_env(4), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    # the same rollouts (draws keyed by row and position, not by device) and so the same rewards ...
    assert _rewards(one) == _rewards(two) and len(_rewards(one)) == 3
    # ... and parameters equal per tensor up to the float32 order of the gradient reductions
    for x, y, z in zip(_params(one, 3), _params(two, 3), _params(one, 1)):
        assert np.linalg.norm(y - x) <= 1e-4 * np.linalg.norm(x)
    assert any(np.linalg.norm(x - z) > 0 for x, z in zip(_params(one, 3), _params(one, 1)))


def _checkpoints(workdir):
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_sigkill_and_resume_matches_the_uninterrupted_run(root, start, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    args = ("train.steps=8", "rl.kl=0.1", "rl.inner_steps=2")
    subprocess.run(_cmd(root, start, ref, *args), env=_env(8), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cmd(root, start, killed, *args), env=_env(8), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 3 for s in _checkpoints(killed)) and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_checkpoints(killed)) < 8
    subprocess.run(_cmd(root, start, killed, *args), env=_env(8), check=True, capture_output=True, timeout=600)
    for x, y in zip(_params(ref, 8), _params(killed, 8)):
        np.testing.assert_array_equal(x, y)
    assert _rewards(ref) == {k: v for k, v in _rewards(killed).items()}


def test_training_can_start_from_another_runs_workdir_with_its_ema_parameters(root, start, tmp_path):
    """train.init_from names a run's workdir: the new run starts from the parameters that run
    evaluates with (its EMA), with a fresh optimizer; at lr 0 one step keeps them."""
    from dlm.train.trainer import train

    work, cache = start
    cfg = load_config(root / "configs/sudoku.yaml", [f"workdir={tmp_path / 'sft'}", f"data.sudoku.cache_dir={cache}", *START,
                                                     f"train.init_from={work}", "train.steps=1", "train.lr=0.0",
                                                     "train.checkpoint_every=1"])
    train(cfg)
    got, _ = dlm.restore(tmp_path / "sft", use_ema=False)
    ema, _ = dlm.restore(work, use_ema=True)
    raw, _ = dlm.restore(work, use_ema=False)
    for a, b, c in zip(jax.tree.leaves(nnx.state(got)), jax.tree.leaves(nnx.state(ema)), jax.tree.leaves(nnx.state(raw))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(b), np.asarray(c)) for b, c in zip(jax.tree.leaves(nnx.state(ema)),
                                                                               jax.tree.leaves(nnx.state(raw))))


def test_the_trace_estimator_rescoring_every_pass_is_the_replayed_trajectory_log_probability(root, start, tmp_path):
    """The parallel decoder's trace says which pass committed each position; with t_samples a
    multiple of a rollout's passes the trace estimate is exactly the sum, over its passes, of the
    tokens it committed scored at temperature T in the context of that pass (replayed here)."""
    from dlm.objectives import denoiser
    from dlm.rl.trainer import RLTrainer

    cfg = _config(root, start, tmp_path / "rl", "rl.estimator=trace", "sampling.decode.rule=topk", "sampling.decode.k=1",
                  "sampling.temperature=0.7")
    trainer = RLTrainer(cfg)
    prompts = repeat(trainer.task.prompts(0, 1), 16)  # one puzzle: every rollout takes one pass per blank
    tokens, nfe, steps = trainer.rollouts(trainer.state.params, prompts.canvas, jax.random.key(1))
    blanks = int((~prompts.given[0]).sum())
    assert (nfe == blanks).all() and (steps[prompts.given] == -1).all()
    for row, given in zip(steps, prompts.given):  # one commit per pass
        np.testing.assert_array_equal(np.sort(row[~given]), np.arange(blanks))
    model = nnx.merge(trainer.graphdef, trainer.state.params)
    apply_fn = denoiser(model)
    replay = np.zeros(len(tokens))
    for s in range(blanks):
        xt = np.where(~prompts.given & (steps >= s), trainer.mask_id, tokens)
        logp = jax.nn.log_softmax(apply_fn(jnp.asarray(xt), None).materialize() / 0.7, axis=-1)
        picked = np.take_along_axis(np.asarray(logp), tokens[..., None], -1)[..., 0]
        replay += np.where(steps == s, picked, 0.0).sum(-1)
    rl = RLConfig(estimator=Estimator.TRACE, t_samples=2 * blanks)
    got = estimators.estimate(rl, trainer.objective, apply_fn, jnp.asarray(tokens), jnp.asarray(prompts.given), jax.random.key(3),
                              False, jnp.asarray(steps), 0.7).lower
    np.testing.assert_allclose(np.asarray(got), replay / blanks, rtol=2e-5)
    trainer.checkpointer.close()
