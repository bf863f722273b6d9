"""sample.py's choice of parameters (the config key sampling.use_ema and the --no-ema flag), and
a checkpoint that does not fit the config refused in one line by sample.py and train.py."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import dlm


def _run(root, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True)


def _tokens(path):
    return [json.loads(line)["tokens"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    work = tmp_path_factory.mktemp("sample_cli") / "run"
    t = _run(root, "train.py", "--config", "configs/test.yaml", f"workdir={work}", "train.steps=3", "data.max_documents=30")
    assert t.returncode == 0, t.stderr[-2000:]
    return work


def test_use_ema_false_samples_the_raw_parameters_like_no_ema(root, trained, tmp_path):
    work = trained
    # the run has an EMA that differs from its parameters, so the choice matters
    ema, _ = dlm.restore(work, use_ema=True)
    raw, _ = dlm.restore(work, use_ema=False)
    assert not np.array_equal(np.asarray(ema.head[...]), np.asarray(raw.head[...]))
    common = ["--workdir", str(work), "--num-samples", "2", "--steps", "4", "--seed", "3"]
    outs = {}
    for name, extra in (("flag", ["--no-ema"]), ("key", ["sampling.use_ema=false"])):
        out = tmp_path / f"{name}.jsonl"
        p = _run(root, "sample.py", *common, "--out", str(out), *extra)
        assert p.returncode == 0, p.stderr[-2000:]
        outs[name] = _tokens(out)
    assert outs["flag"] == outs["key"]


def test_a_checkpoint_of_another_model_is_one_line_from_sample_and_train(root, trained, tmp_path):
    """The mismatch is found from the checkpoint's metadata before Orbax reads an array: no
    'Event loop is closed' tracebacks from its aborted reads after the sentence."""
    work = tmp_path / "run"
    shutil.copytree(trained, work)
    config = (work / "config.yaml").read_text()
    (work / "config.yaml").write_text(config.replace("d_model: 32", "d_model: 48"))
    for args in (["sample.py", "--workdir", str(work), "--num-samples", "1"],
                 ["train.py", "--config", str(work / "config.yaml"), f"workdir={work}", "train.steps=6"]):
        p = _run(root, *args)
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
        assert lines[0].startswith("error: Checkpoint 3 in") and "is of shape (2, 32) there and of shape (2, 48) here" in lines[0]
