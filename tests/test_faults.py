"""Faults during training: preemption signals, damaged checkpoints, non-finite losses."""

import errno
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

# a damaged checkpoint is reported once: Orbax's abandoned reads of it print no tracebacks
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


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


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    """A finished 10-step run with checkpoints 5 and 10."""
    work = tmp_path_factory.mktemp("trained") / "run"
    Trainer(_cfg(root, work, "train.steps=10", "train.checkpoint_every=5")).run()
    return work


def _damage_newest(work: pathlib.Path, how: str) -> int:
    ck = Checkpointer(work)
    newest = ck.latest_step()
    files = sorted((p for p in (work / "checkpoints" / str(newest) / "state").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    target = files[-1]  # the largest file holds the array data
    if how == "truncate":
        # cut short right after it begins: OCDBT may leave unreferenced bytes at the end of a data
        # file, so keeping its first half did not always damage anything that is read (seen once
        # in five full runs, reproduced from that run's checkpoint)
        target.write_bytes(target.read_bytes()[:8])
    elif how == "metadata":
        meta = work / "checkpoints" / str(newest) / "state" / "_METADATA"
        meta.write_text(meta.read_text()[:40])
    else:
        target.unlink()
    return newest


@pytest.mark.parametrize("how", ["truncate", "delete", "metadata"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(root, tmp_path, trained, how):
    import shutil

    work = tmp_path / "run"
    shutil.copytree(trained, work)
    assert _damage_newest(work, how) == 10
    logged = []
    trainer_cfg = _cfg(root, work, "train.steps=10", "train.checkpoint_every=5")
    import dlm.train.trainer as trainer_mod

    original = trainer_mod._log
    trainer_mod._log = lambda m: (logged.append(m), original(m))
    try:
        t = Trainer(trainer_cfg)
    finally:
        trainer_mod._log = original
    assert t.start_step == 5
    damaged = [m for m in logged if " is damaged " in m]
    assert len(damaged) == 1 and "Checkpoint 10" in damaged[0] and "restoring checkpoint 5" in damaged[0]
    assert (work / "damaged" / "10").exists()  # set aside, not deleted
    t.run()  # and training carries on to the end, writing step 10 again
    assert Checkpointer(work).latest_step() == 10


@pytest.mark.parametrize("error", [OSError(errno.ECONNRESET, "Connection reset by peer"),
                                   ValueError("UNAVAILABLE: the storage service is unavailable; try again"),
                                   MemoryError()], ids=["oserror", "unavailable", "memory"])
def test_a_restore_error_that_is_not_damage_leaves_the_checkpoint_and_stops(root, tmp_path, trained, monkeypatch, error):
    import shutil

    import orbax.checkpoint as ocp

    from dlm.train.checkpoint import RestoreError

    work = tmp_path / "run"
    shutil.copytree(trained, work)
    cfg = _cfg(root, work, "train.steps=10", "train.checkpoint_every=5")

    def fail(*a, **k):
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, "restore", fail)
    with pytest.raises(RestoreError) as info:
        Trainer(cfg)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and msg.startswith("Restoring checkpoint 10 in ") and "left in place" in msg
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "5"]
    assert not (work / "damaged").exists()
    monkeypatch.undo()
    assert Trainer(cfg).start_step == 10  # the error is gone: the newest checkpoint is still there to resume


def test_nonfinite_loss_is_skipped_and_counted(root, tmp_path):
    from dlm.mesh import make_mesh
    from dlm.train.state import create_train_state

    work = tmp_path / "run"
    skip = _cfg(root, work, "train.steps=6", "train.checkpoint_every=5", "train.inject_nonfinite_at=[3,4]", "train.nonfinite=skip")
    result = Trainer(skip).run()
    assert result["nonfinite"] == 2
    losses = per_step_losses(work)
    assert np.isnan(losses[3]) and np.isnan(losses[4]) and np.isfinite(losses[5])
    ref = tmp_path / "ref"
    Trainer(_cfg(root, ref, "train.steps=3")).run()

    _, abstract, _ = create_train_state(skip, 257, make_mesh(skip.mesh), abstract=True)
    state = Checkpointer(work).restore(abstract, step=5)
    clean = Checkpointer(ref).restore(abstract, step=3)
    assert (int(state.step), int(state.nonfinite)) == (5, 2) and (int(clean.step), int(clean.nonfinite)) == (3, 0)
    # the two skipped steps changed nothing else: parameters, Adam moments and count, EMA and rng
    # after 5 steps with steps 3 and 4 skipped are those of 3 clean steps, bit for bit
    for name in ("params", "opt_state", "ema", "rng"):
        for a, b in zip(jax.tree.leaves(getattr(state, name)), jax.tree.leaves(getattr(clean, name))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_nonfinite_loss_stops_with_an_intact_checkpoint(root, tmp_path):
    work = tmp_path / "run"
    cfg = _cfg(root, work, "train.steps=20", "train.checkpoint_every=5", "train.log_every=4",
               "train.inject_nonfinite_at=[7]", "train.nonfinite=stop")
    with pytest.raises(TrainingError, match="checkpoint 5 .* is intact"):
        Trainer(cfg).run()
    ck = Checkpointer(work)
    assert ck.latest_step() == 5
    from dlm.mesh import make_mesh
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
