"""sample.py's choice of parameters: the config key sampling.use_ema and the --no-ema flag."""

import json
import os
import subprocess
import sys

import numpy as np

import dlm


def _run(root, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True)


def _tokens(path):
    return [json.loads(line)["tokens"] for line in path.read_text().splitlines()]


def test_use_ema_false_samples_the_raw_parameters_like_no_ema(root, tmp_path):
    work = tmp_path / "run"
    t = _run(root, "train.py", "--config", "configs/test.yaml", f"workdir={work}", "train.steps=3", "data.max_documents=30")
    assert t.returncode == 0, t.stderr[-2000:]
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
