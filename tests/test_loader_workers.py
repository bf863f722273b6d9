"""Reader processes (data.loader_workers) that die: a killed worker is noticed within seconds,
the workers start again and training goes on with the same batches (the same per-step losses as
an uninterrupted run); a batch that keeps killing its worker stops the run with one sentence;
no worker outlives its trainer, however the trainer ends."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import dlm
from dlm.data.pipeline import LoaderError, ProcessBatches, load_data, train_iterator
from dlm.data.prepare import prepare
from dlm.train.metrics import per_step_losses

SEQ_LEN = 32
STEPS = 40


def children(pid: int) -> list[int]:
    """The reader processes `pid` has spawned (children of any of its threads that run
    multiprocessing's spawn_main; not its resource tracker)."""
    out = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(c for c in set(out) if b"spawn_main" in _cmdline(c))


def _cmdline(pid: int) -> bytes:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture(scope="module")
def shards(root, tmp_path_factory):
    d = tmp_path_factory.mktemp("loader") / "shards"
    prepare(dlm.load_config(root / "configs/test.yaml", ["data.max_documents=60"]).data, d, workers=1, rows_per_shard=500,
            progress=False)
    return d


def _data(root, shards):
    return load_data(dlm.load_config(root / "configs/test.yaml", ["data.source=shards", f"data.path={shards}"]).data)


def test_a_killed_worker_is_replaced_and_the_batches_go_on_unchanged(root, shards):
    data = _data(root, shards)
    before = set(children(os.getpid()))
    threads = train_iterator(data, data.train_rows.seq_len, 8, seed=3, threads=1)
    workers = train_iterator(data, data.train_rows.seq_len, 8, seed=3, workers=2, prefetch=4)
    try:
        for _ in range(3):
            np.testing.assert_array_equal(next(workers), next(threads))
        victim = sorted(set(children(os.getpid())) - before)[0]
        os.kill(victim, signal.SIGKILL)
        t0 = time.time()
        for _ in range(6):
            np.testing.assert_array_equal(next(workers), next(threads))
        assert time.time() - t0 < 30
        assert victim not in children(os.getpid())
    finally:
        workers.close()
    assert wait_until(lambda: set(children(os.getpid())) <= before, 10)


class KillsItsWorker:
    """A batch map whose batch 2 kills the process reading it (a row that always runs out of memory)."""

    def portable(self):
        return self

    def __call__(self, k):
        if k == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return np.full((2, 4), k)


def test_a_batch_that_keeps_killing_its_worker_is_one_sentence(capfd):
    before = set(children(os.getpid()))
    it = ProcessBatches(KillsItsWorker(), workers=2, prefetch=2)
    try:
        assert [int(next(it)[0, 0]) for _ in range(2)] == [0, 1]
        t0 = time.time()
        with pytest.raises(LoaderError) as e:
            next(it)
        assert time.time() - t0 < 60
    finally:
        it.close()
    msg = str(e.value)
    assert "\n" not in msg and "died 3 times while reading batch 2" in msg and msg.endswith(".")
    assert capfd.readouterr().err.count("started 2 new ones, reading from batch 2 again") == 2
    assert wait_until(lambda: set(children(os.getpid())) <= before, 10)


def _env():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def _train(root, workdir, shards, *extra):
    return [sys.executable, str(root / "train.py"), "--config", str(root / "configs/test.yaml"), f"workdir={workdir}",
            "data.source=shards", f"data.path={shards}", "data.max_documents=60", f"train.steps={STEPS}", "train.log_every=1",
            "train.checkpoint_every=10", "train.eval_every=0", *extra]


def _logged_step(workdir) -> int:
    return max(per_step_losses(workdir), default=-1)


def test_killing_a_reader_of_a_two_worker_run_three_times_loses_nothing(root, shards, tmp_path):
    """The acceptance run: 3 tries, each killing one of the 2 reader processes at another step;
    within 30 s the trainer has gone on (or exited); a run that exited resumes from its
    checkpoint; every try ends with the uninterrupted run's per-step losses, and no reader is
    left behind."""
    ref = tmp_path / "ref"
    subprocess.run(_train(root, ref, shards, "data.loader_workers=2"), env=_env(), check=True, capture_output=True, timeout=600)
    expected = per_step_losses(ref)
    assert sorted(expected) == list(range(STEPS))
    for attempt, at_step in enumerate((3, 15, 28)):
        work = tmp_path / f"try{attempt}"
        log = (tmp_path / f"try{attempt}.log").open("w")
        proc = subprocess.Popen(_train(root, work, shards, "data.loader_workers=2"), env=_env(), stdout=log, stderr=log)
        assert wait_until(lambda: _logged_step(work) >= at_step or proc.poll() is not None, 300)
        readers = children(proc.pid)
        assert proc.poll() is None and len(readers) >= 2, "the run ended before a reader could be killed"
        os.kill(readers[0], signal.SIGKILL)
        step_at_kill = _logged_step(work)
        t_kill = time.time()
        assert wait_until(lambda: _logged_step(work) > step_at_kill + 4 or proc.poll() is not None, 30), \
            f"try {attempt}: neither went on nor exited within 30 s of the kill"
        code = proc.wait(timeout=600)
        log.close()
        if code != 0:  # it stopped: resuming from its checkpoint must give the same run
            subprocess.run(_train(root, work, shards, "data.loader_workers=2"), env=_env(), check=True, capture_output=True,
                           timeout=600)
        assert per_step_losses(work) == expected, f"try {attempt} (killed at step {step_at_kill}, went on after " \
                                                  f"{time.time() - t_kill:.1f}s)"
        assert wait_until(lambda: not any(alive(r) for r in readers), 10), "a reader outlived its trainer"


def test_readers_exit_when_their_trainer_is_killed(root, shards, tmp_path):
    work = tmp_path / "run"
    proc = subprocess.Popen(_train(root, work, shards, "data.loader_workers=2", "train.steps=100000"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _logged_step(work) >= 2 or proc.poll() is not None, 300)
        readers = children(proc.pid)
        assert proc.poll() is None and len(readers) >= 2
    finally:
        proc.kill()
        proc.wait()
    assert wait_until(lambda: not any(alive(r) for r in readers), 10), f"a reader of {readers} outlived its trainer"
