"""dlm-eval: a run's NELBO as training logged it, and samples' entropy and generative perplexity."""

import json
import subprocess
import sys
from collections import Counter

import jax
import numpy as np
import pytest

import dlm
from flax import nnx
from dlm.config import ConfigError
from dlm.data.pipeline import load_data, validation_windows
from dlm.eval.likelihood import make_eval_fn
from dlm.objectives import objective_for
from dlm.eval.command import generative_perplexity, samples_report, scoring_windows
from dlm.train.metrics import read_metrics
from dlm.train.trainer import train

ARGS = ["data.max_documents=60", "train.steps=20", "train.eval_windows=24", "train.eval_t_samples=2"]


@pytest.fixture(scope="module")
def runs(root, tmp_path_factory):
    """(a masked-diffusion run, an autoregressive run) of the test model on the builtin corpus."""
    base = tmp_path_factory.mktemp("eval")
    flat, ar = base / "flat", base / "ar"
    train(dlm.load_config(root / "configs/test.yaml", [f"workdir={flat}", *ARGS]))
    train(dlm.load_config(root / "configs/test.yaml", [f"workdir={ar}", *ARGS, "diffusion.hyperschedule=autoregressive"]))
    return flat, ar


def test_dlm_eval_reproduces_the_final_validation_nelbo_of_training(root, runs, tmp_path):
    flat, _ = runs
    logged = read_metrics(flat, split="eval")[-1]
    out = tmp_path / "eval.json"
    p = subprocess.run([sys.executable, "-m", "dlm.eval", "--workdir", str(flat), "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["step"] == logged["step"] == 20
    assert abs(got["nelbo"] - logged["nelbo"]) <= 1e-6 and abs(got["nelbo_stderr"] - logged["nelbo_stderr"]) <= 1e-6
    assert abs(got["bits_per_byte"] - logged["bits"]) <= 1e-6 and got["windows"] == 24
    assert abs(got["perplexity"] - np.exp(logged["nelbo"])) <= 1e-5 * got["perplexity"]
    assert f"NELBO {got['nelbo']:.4f}" in p.stdout


def test_scoring_windows_score_every_token_once_with_its_preceding_context():
    stream = np.arange(23)
    w = scoring_windows(stream, 8)
    scored = np.concatenate([t[~g] for t, g in zip(w["tokens"], w["given"])])
    np.testing.assert_array_equal(scored, stream)
    for t, g in zip(w["tokens"], w["given"]):  # contiguous windows; the given part is a prefix
        assert (np.diff(t) == 1).all() and not g[np.argmin(g):].any()
    with pytest.raises(ConfigError, match="fewer than one window"):
        scoring_windows(stream[:5], 8)


def test_reference_bound_is_exact_and_real_text_is_likelier_than_its_shuffle(root, runs):
    flat, ar = runs
    cfg = dlm.load_config(ar / "config.yaml")
    rows = validation_windows(load_data(cfg.data, ar, cfg.train.seed), 24)
    model, _ = dlm.restore(ar)
    graphdef, params = nnx.split(model)
    objective = objective_for(cfg.diffusion, model.vocab_size, cfg.model.noise_conditioning)
    # the bound scores one position per time sample: with seq_len stratified samples it visits
    # every position once and is the likelihood, the same for any key (a single sample is not)
    for k, differ in ((cfg.data.seq_len, False), (1, True)):
        fn = make_eval_fn(graphdef, objective, k)
        a, b = (np.asarray(fn(params, rows[:8], jax.random.key(s))[0]) for s in (1, 2))
        assert (np.abs(a - b).max() > 1e-3) == differ, (k, a, b)

    real = [r[: 20 + i].tolist() for i, r in enumerate(rows[:12])]
    rng = np.random.default_rng(0)
    shuffled = [rng.permutation(t).tolist() for t in real]
    r_real = samples_report([{"tokens": t} for t in real], workdir=flat, reference=ar)
    r_shuf = samples_report([{"tokens": t} for t in shuffled], workdir=flat, reference=ar)
    counts = np.array(list(Counter(x for t in real for x in t).values()), float)
    p = counts / counts.sum()
    assert abs(r_real["unigram_entropy_bits"] - float(-(p * np.log2(p)).sum())) < 1e-9
    assert r_real["unigram_entropy_bits"] == r_shuf["unigram_entropy_bits"]
    n = sum(len(t) + 1 for t in real)  # each sample and its EOS
    assert r_real["gen_tokens"] == r_shuf["gen_tokens"] == n
    assert np.isfinite(r_real["gen_perplexity"]) and r_real["gen_perplexity"] < r_shuf["gen_perplexity"]


def test_samples_from_sample_py_get_entropy_and_generative_perplexity(root, runs, tmp_path):
    flat, ar = runs
    samples = tmp_path / "samples.jsonl"
    subprocess.run([sys.executable, str(root / "sample.py"), "--workdir", str(flat), "--num-samples", "8", "--steps", "8",
                    "--out", str(samples)], check=True, capture_output=True, timeout=600)
    out = tmp_path / "s.json"
    p = subprocess.run([sys.executable, "-m", "dlm.eval", "--samples", str(samples), "--workdir", str(flat), "--reference", str(ar),
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["samples"] == 8 and r["sample_tokens"] == 8 * 32 and r["gen_tokens"] == 8 * 33
    assert 0 < r["unigram_entropy_bits"] <= np.log2(258) and r["gen_perplexity"] > 1


def test_non_autoregressive_reference_is_one_sentence(runs):
    flat, _ = runs
    with pytest.raises(ConfigError, match="is not autoregressive .* train the reference with diffusion.hyperschedule=autoregressive"):
        generative_perplexity([np.arange(40)], flat)
