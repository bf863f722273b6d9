"""SIGKILL mid-run, resume, and end exactly where an uninterrupted run ends.

The run trains from pre-tokenised shards (data.source=shards): the grain iterator over
ArrayRecord rows is checkpointed with the state, so a resumed run reads the same batches."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

import dlm
from dlm.data.prepare import prepare
from dlm.train.metrics import per_step_losses

STEPS = 60
ARGS = [f"train.steps={STEPS}", "train.checkpoint_every=5", "train.log_every=1", "train.keep_checkpoints=2",
        "data.max_documents=60", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def _cmd(root, workdir, shards):
    return [sys.executable, str(root / "train.py"), "--config", str(root / "configs/test.yaml"), f"workdir={workdir}", *ARGS,
            "data.source=shards", f"data.path={shards}"]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    return env


def _checkpoints(workdir):
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_sigkill_and_resume_matches_uninterrupted_run(root, tmp_path):
    ref, killed, shards = tmp_path / "ref", tmp_path / "killed", tmp_path / "shards"
    prepare(dlm.load_config(root / "configs/test.yaml", ["data.max_documents=60"]).data, shards, workers=1, rows_per_shard=5000,
            progress=False)
    subprocess.run(_cmd(root, ref, shards), check=True, env=_env(), capture_output=True)

    proc = subprocess.Popen(_cmd(root, killed, shards), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 10 for s in _checkpoints(killed)) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = max(_checkpoints(killed))
    assert at_kill < STEPS
    out = subprocess.run(_cmd(root, killed, shards), check=True, env=_env(), capture_output=True, text=True)
    assert "Resumed from" in out.stderr + out.stdout

    a, b = per_step_losses(ref), per_step_losses(killed)
    assert sorted(a) == sorted(b) == list(range(STEPS))
    assert [a[i] for i in range(STEPS)] == [b[i] for i in range(STEPS)]
    for use_ema in (False, True):
        ma, _ = dlm.restore(ref, use_ema=use_ema)
        mb, _ = dlm.restore(killed, use_ema=use_ema)
        from flax import nnx

        for x, y in zip(jax.tree.leaves(nnx.state(ma)), jax.tree.leaves(nnx.state(mb))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
