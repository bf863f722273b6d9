"""User-facing failures are one clear sentence, from the command line too."""

import os
import subprocess
import sys

import pytest

import dlm
from dlm.config import ConfigError


def _run(root, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True)


def _one_sentence(stderr):
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_train_cli_errors(root):
    msg = _one_sentence(_run(root, "train.py", "--config", "configs/test.yaml", "model.num_layer=2").stderr)
    assert "model.num_layers" in msg
    msg = _one_sentence(_run(root, "train.py", "--config", "configs/test.yaml", "train.steps=many").stderr)
    assert "train.steps must be int" in msg
    p = _run(root, "train.py", "--config", "configs/test.yaml", "mesh.data=3")
    assert p.returncode == 2 and "does not fit the 8 available devices" in _one_sentence(p.stderr)


def test_sample_cli_errors(root, tmp_path):
    p = _run(root, "sample.py", "--workdir", str(tmp_path))
    assert p.returncode == 2 and "no config.yaml" in _one_sentence(p.stderr)
    # a workdir with a config but no checkpoint
    cfg = dlm.load_config(root / "configs/test.yaml", [f"workdir={tmp_path}"])
    from dlm.config import save_config
    from dlm.data.tokenizers import ByteTokenizer

    save_config(cfg, tmp_path / "config.yaml")
    ByteTokenizer().save(tmp_path)
    p = _run(root, "sample.py", "--workdir", str(tmp_path))
    assert p.returncode == 2 and "No checkpoint found" in _one_sentence(p.stderr)


def test_prompt_longer_than_the_context(root, tmp_path):
    work = tmp_path / "run"
    t = _run(root, "train.py", "--config", "configs/test.yaml", f"workdir={work}", "train.steps=2", "data.max_documents=30")
    assert t.returncode == 0, t.stderr[-2000:]
    p = _run(root, "sample.py", "--workdir", str(work), "--prompt", "x" * 40)
    assert p.returncode == 2 and "longer than the generation length 32" in _one_sentence(p.stderr)
    p = _run(root, "sample.py", "--workdir", str(work), "--prompt", "def ", "--num-samples", "2", "--steps", "4")
    assert p.returncode == 0, p.stderr
    assert "NFE" in p.stdout and (work / "samples.jsonl").exists()


def test_restore_without_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="config.yaml"):
        dlm.restore(tmp_path)


def test_eval_cli_on_a_missing_workdir_names_the_workdir(root, tmp_path):
    p = _run(root, "-m", "dlm.eval", "--workdir", str(tmp_path / "missing"))
    msg = _one_sentence(p.stderr)
    assert p.returncode == 2 and "--workdir" in msg and "--config" not in msg
