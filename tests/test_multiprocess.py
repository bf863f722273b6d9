"""Real multi-process training: 2 processes x 4 CPU devices over loopback (gloo collectives)
give the same per-step losses as 1 process x 8 devices, and their checkpoint restores in a
1-process run."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

import dlm
from dlm.train.metrics import per_step_losses

STEPS = 8
ARGS = [f"train.steps={STEPS}", "train.checkpoint_every=4", "data.max_documents=60", "train.eval_windows=16"]


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


def test_two_processes_match_one_process_and_restore_in_one(root, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cmd(root, one), env=_env(8), check=True, capture_output=True, timeout=600)

    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(_cmd(root, two, "--coordinator-address", address, "--num-processes", "2",
                                   "--process-id", str(i)), env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]

    a, b = per_step_losses(one), per_step_losses(two)
    assert sorted(a) == sorted(b) == list(range(STEPS))
    np.testing.assert_allclose([b[i] for i in range(STEPS)], [a[i] for i in range(STEPS)], rtol=1e-5)

    # The 2-process checkpoint restores here (1 process, 8 devices) and matches the 1-process run.
    ma, _ = dlm.restore(one, use_ema=False)
    mb, _ = dlm.restore(two, use_ema=False)
    for x, y in zip(jax.tree.leaves(nnx.state(ma)), jax.tree.leaves(nnx.state(mb))):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)
    # and a 1-process train.py resumes the 2-process run
    p = subprocess.run(_cmd(root, two, f"train.steps={STEPS + 4}"), env=_env(8), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and f"checkpoints/{STEPS}" in p.stdout + p.stderr
