"""Real multi-process training: 2 processes x 4 CPU devices over loopback (gloo collectives).

- The same per-step losses as 1 process x 8 devices, the same first-step gradients element by
  element, and parameters equal per tensor after training (not element by element: Adam turns
  the float32 reduction-order difference of a gradient element near zero into a visible
  relative change of that one parameter, see test_sharding). The 2-process checkpoint restores
  and resumes in one process.
- A preemption notice (SIGTERM) to one process at a random step: both processes stop and save at
  the same step and exit 0, and resuming ends bit-identical to an uninterrupted 2-process run
  (gloo's reductions have a fixed order for a fixed topology, so 2-process runs repeat exactly).
"""

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import dlm
from dlm.mesh import make_mesh
from dlm.train.checkpoint import Checkpointer
from dlm.train.metrics import per_step_losses, read_metrics
from dlm.train.state import create_train_state

STEPS = 16
ARGS = [f"train.steps={STEPS}", "data.max_documents=60", "train.eval_windows=16"]
EVERY_STEP = ["train.checkpoint_every=1", f"train.keep_checkpoints={STEPS + 1}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(root, workdir, *extra):
    return [sys.executable, str(root / "train.py"), "--config", str(root / "configs/test.yaml"), f"workdir={workdir}",
            *ARGS, *extra]


def _env(devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def _start_two(root, workdir, *extra):
    address = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen(_cmd(root, workdir, *extra, "--coordinator-address", address, "--num-processes", "2",
                                  "--process-id", str(i)), env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(2)]


def _finish(procs):
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    return [o[0] + o[1] for o in outs]


@pytest.fixture(scope="module")
def runs(root, tmp_path_factory):
    """(1 process x 8 devices, 2 processes x 4 devices) runs of the same config, checkpointed every step."""
    base = tmp_path_factory.mktemp("multiprocess")
    one, two = base / "one", base / "two"
    subprocess.run(_cmd(root, one, *EVERY_STEP), env=_env(8), check=True, capture_output=True, timeout=600)
    _finish(_start_two(root, two, *EVERY_STEP))
    return one, two


def _restore(workdir, step):
    cfg = dlm.load_config(workdir / "config.yaml")
    _, abstract, _ = create_train_state(cfg, 257, make_mesh(cfg.mesh), abstract=True)
    return Checkpointer(workdir).restore(abstract, step=step)


def test_two_processes_match_one_process_and_restore_in_one(root, runs, tmp_path):
    one, two = runs
    a, b = per_step_losses(one), per_step_losses(two)
    assert sorted(a) == sorted(b) == list(range(STEPS))
    np.testing.assert_allclose([b[i] for i in range(STEPS)], [a[i] for i in range(STEPS)], rtol=1e-5)

    # Adam's first moment after one step is (1 - b1) x the first (clipped) gradient: it agrees
    # element by element, relative to the tensor's largest entry (a wrong slice or a lost
    # process's gradient would change it by O(1)).
    s1, s2 = _restore(one, 1), _restore(two, 1)
    mu1, mu2 = s1.opt_state[1][0].mu, s2.opt_state[1][0].mu
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(mu1), jax.tree.leaves(mu2)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.abs(x).max() > 0, path
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5 * np.abs(x).max(), err_msg=jax.tree_util.keystr(path))

    # After all steps: every parameter tensor within 1e-4 relative norm, and they all moved.
    ma, _ = dlm.restore(one, use_ema=False)
    mb, _ = dlm.restore(two, use_ema=False)
    init = _restore(one, 1).params  # one step in: every tensor has moved away from it since
    for (path, x), y, z in zip(jax.tree_util.tree_leaves_with_path(nnx.state(ma)), jax.tree.leaves(nnx.state(mb)),
                               jax.tree.leaves(init)):
        x, y, z = (np.asarray(v, np.float64) for v in (x, y, z))
        assert np.linalg.norm(y - x) <= 1e-4 * np.linalg.norm(x), jax.tree_util.keystr(path)
        assert np.linalg.norm(x - z) > 1e-3 * np.linalg.norm(x), jax.tree_util.keystr(path)

    # and a 1-process train.py resumes the 2-process run
    work = tmp_path / "two"
    shutil.copytree(two, work)
    p = subprocess.run(_cmd(root, work, f"train.steps={STEPS + 4}"), env=_env(8), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and f"checkpoints/{STEPS}" in p.stdout + p.stderr, p.stderr[-3000:]


def test_sigterm_to_one_process_stops_both_at_one_step_and_resume_is_exact(root, runs, tmp_path):
    _, two = runs
    work = tmp_path / "preempted"
    at = random.Random(os.urandom(8)).randint(2, STEPS // 2)
    procs = _start_two(root, work, "train.checkpoint_every=1000")
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(work)) < at and procs[1].poll() is None:
        time.sleep(0.02)
    procs[1].send_signal(subprocess.signal.SIGTERM)
    outs = _finish(procs)
    stops = [re.findall(r"process (\d): Stopped by a preemption notice .* at step (\d+);", o) for o in outs]
    assert [len(s) for s in stops] == [1, 1], (at, outs)
    (p0, step0), (p1, step1) = stops[0][0], stops[1][0]
    assert (p0, p1) == ("0", "1") and step0 == step1, (at, stops)
    step = int(step0)
    assert at <= step < STEPS, (at, step)
    assert Checkpointer(work).latest_step() == step and sorted(per_step_losses(work)) == list(range(step))

    _finish(_start_two(root, work))  # resume to the end
    a, b = per_step_losses(two), per_step_losses(work)
    assert [a[i] for i in range(STEPS)] == [b[i] for i in range(STEPS)], at
    ref, got = _restore(two, STEPS), _restore(work, STEPS)
    for name in ("params", "opt_state", "ema"):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(getattr(ref, name)), jax.tree.leaves(getattr(got, name))):
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=f"{name} {jax.tree_util.keystr(path)} (signal at {at})")


def test_two_processes_training_from_shards_match_one_process(root, tmp_path):
    """data.source=shards: each process reads its slice of every global batch from the ArrayRecord
    shards, and 2 x 4 devices train to the losses of 1 x 8."""
    from dlm.data.prepare import prepare

    shards = tmp_path / "shards"
    prepare(dlm.load_config(root / "configs/test.yaml", ["data.max_documents=60"]).data, shards, workers=1, progress=False)
    args = ["train.steps=6", "train.checkpoint_every=1000", "data.source=shards", f"data.path={shards}"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cmd(root, one, *args), env=_env(8), check=True, capture_output=True, timeout=600)
    _finish(_start_two(root, two, *args))
    a, b = per_step_losses(one), per_step_losses(two)
    assert sorted(a) == sorted(b) == list(range(6))
    np.testing.assert_allclose([b[i] for i in range(6)], [a[i] for i in range(6)], rtol=1e-5)
