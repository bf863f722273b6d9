"""Faults during training: preemption signals, damaged checkpoints, non-finite losses."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dlm.config import load_config
from dlm.train.checkpoint import Checkpointer
from dlm.train.metrics import per_step_losses, read_metrics
from dlm.train.trainer import Trainer, TrainingError


def _cfg(root, workdir, *over):
    return load_config(root / "configs/test.yaml", [f"workdir={workdir}", "data.max_documents=60", *over])


def _env():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_exits_zero(root, tmp_path, sig):
    work = tmp_path / "run"
    cmd = [sys.executable, str(root / "train.py"), "--config", str(root / "configs/test.yaml"), f"workdir={work}",
           "train.steps=100000", "train.checkpoint_every=1000000", "data.max_documents=60"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(work)) < 5:
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = [l for l in (out + err).splitlines() if "checkpoint saved to" in l]
    assert len(lines) == 1 and sig.name in lines[0], out + err
    step = Checkpointer(work).latest_step()
    assert step is not None and lines[0].rstrip(".").endswith(str(work / "checkpoints" / str(step)))
    assert sorted(per_step_losses(work)) == list(range(step))  # every step up to the checkpoint is logged


def _damage_newest(work: pathlib.Path, how: str) -> int:
    ck = Checkpointer(work)
    newest = ck.latest_step()
    files = sorted((p for p in (work / "checkpoints" / str(newest) / "state").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    target = files[-1]  # the largest file holds the array data
    if how == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.unlink()
    return newest


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(root, tmp_path, how):
    work = tmp_path / "run"
    Trainer(_cfg(root, work, "train.steps=20", "train.checkpoint_every=10")).run()
    assert _damage_newest(work, how) == 20
    logged = []
    trainer_cfg = _cfg(root, work, "train.steps=20", "train.checkpoint_every=10")
    import dlm.train.trainer as trainer_mod

    original = trainer_mod._log
    trainer_mod._log = lambda m: (logged.append(m), original(m))
    try:
        t = Trainer(trainer_cfg)
    finally:
        trainer_mod._log = original
    assert t.start_step == 10
    damaged = [m for m in logged if " is damaged " in m]
    assert len(damaged) == 1 and "Checkpoint 20" in damaged[0] and "restoring checkpoint 10" in damaged[0]
    assert (work / "damaged" / "20").exists()  # set aside, not deleted
    t.run()  # and training carries on to the end, writing step 20 again
    assert Checkpointer(work).latest_step() == 20


def test_nonfinite_loss_is_skipped_and_counted(root, tmp_path):
    work = tmp_path / "run"
    result = Trainer(_cfg(root, work, "train.steps=8", "train.inject_nonfinite_at=[3,4]", "train.nonfinite=skip")).run()
    assert result["nonfinite"] == 2
    losses = per_step_losses(work)
    assert np.isnan(losses[3]) and np.isnan(losses[4]) and np.isfinite(losses[5])
    ref = tmp_path / "ref"
    Trainer(_cfg(root, ref, "train.steps=3")).run()
    # steps 3 and 4 changed nothing: the state after 5 steps with two skipped = 3 clean steps + step 5's batch
    from dlm.train.state import create_train_state

    cfg = _cfg(root, work, "train.steps=8")
    from dlm.parallel.mesh import make_mesh

    _, abstract, _ = create_train_state(cfg, 257, make_mesh(cfg.mesh), abstract=True)
    state = Checkpointer(work).restore(abstract)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert int(state.nonfinite) == 2 and int(state.step) == 8


def test_nonfinite_loss_stops_with_an_intact_checkpoint(root, tmp_path):
    work = tmp_path / "run"
    cfg = _cfg(root, work, "train.steps=20", "train.checkpoint_every=5", "train.log_every=4",
               "train.inject_nonfinite_at=[7]", "train.nonfinite=stop")
    with pytest.raises(TrainingError, match="checkpoint 5 .* is intact"):
        Trainer(cfg).run()
    ck = Checkpointer(work)
    assert ck.latest_step() == 5
    from dlm.parallel.mesh import make_mesh
    from dlm.train.state import create_train_state

    _, abstract, _ = create_train_state(cfg, 257, make_mesh(cfg.mesh), abstract=True)
    state = ck.restore(abstract)
    assert int(state.step) == 5 and int(state.nonfinite) == 0


def test_train_cli_reports_the_stop_in_one_line(root, tmp_path):
    cmd = [sys.executable, "train.py", "--config", "configs/test.yaml", f"workdir={tmp_path}", "data.max_documents=60",
           "train.steps=12", "train.inject_nonfinite_at=[2]", "train.nonfinite=stop"]
    p = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True)
    assert p.returncode == 1
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "no checkpoint was written" in errors[0]
