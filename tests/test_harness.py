"""The lm-eval-harness adapter (python -m dlm.eval.harness) on a converted LLaDA fixture: a local
generation task and a local multiple-choice (loglikelihood) task from YAML over JSONL, run end to
end offline; its loglikelihood is minus the conditional bound dlm.nelbo(..., given=) on the same
draws, and its generations are the engine's."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import dlm
from dlm.eval.harness import DlmLM
from hostile import cli_error, run_cli

FOLDER = os.path.join(os.path.dirname(__file__), "fixtures", "pretrained", "llada")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from dlm.convert import import_folder

    out = tmp_path_factory.mktemp("harness") / "llada"
    import_folder(FOLDER, out)
    return out


@pytest.fixture(scope="module")
def lm(workdir):
    model, cfg = dlm.restore(workdir)
    cfg.sampling.decode.block_length = 4
    return DlmLM(model, cfg, dlm.load_tokenizer(workdir), t_samples=4, seed=3)


class _Req:
    def __init__(self, *args):
        self.args = args


@pytest.mark.parametrize("context, continuation", [("they do", " all"), ("", "they"), ("come " * 40, "for they")])
def test_loglikelihood_is_minus_the_conditional_bound_summed_over_the_response(lm, context, continuation):
    ll, greedy = lm.loglikelihood([_Req(context, continuation)])[0]
    tokens, given = lm.pair(context, continuation)
    _, metrics = dlm.nelbo(lm.model, tokens, lm.cfg.diffusion, jax.random.key(3), t_samples=4, given=given)
    n = int((~given).sum())
    assert tokens.shape[1] <= lm.context and n == len(lm.encode(continuation))
    np.testing.assert_allclose(ll, -float(metrics["nelbo_per_sequence"][0]) * n, rtol=1e-6)
    assert isinstance(greedy, bool) and lm.stderr[-1] > 0


def test_is_greedy_when_the_continuation_is_the_greedy_decode(lm):
    ids = lm.encode("they do")
    greedy = lm.engine.generate([ids], 4, decode=lm.cfg.sampling.decode)[0]
    text = lm.tok.decode(greedy)
    assert lm.encode(text) == greedy.tolist()  # the pair's continuation is these ids (context and continuation are encoded apart)
    assert lm.loglikelihood([_Req("they do", text)])[0][1] is True
    other = [t for t in range(lm.tok.vocab_size) if t != greedy[0] and lm.tok.decode([t]).strip()][0]
    assert lm.loglikelihood([_Req("they do", lm.tok.decode([other]) + text[1:])])[0][1] is False


def test_rolling_loglikelihood_is_dlm_evals_window_bound(lm):
    from dlm.eval.command import scoring_windows

    text = "they do come for all " * 20  # 100 tokens, longer than the 64-token context: two windows
    got = lm.loglikelihood_rolling([_Req(text)])[0]
    rows = scoring_windows(np.asarray(lm.encode(text)), lm.context)
    want = 0.0
    for i in range(len(rows["tokens"])):
        _, m = dlm.nelbo(lm.model, rows["tokens"][i:i + 1], lm.cfg.diffusion, jax.random.key(3), t_samples=4,
                         given=rows["given"][i:i + 1])
        want += float(m["nelbo_per_sequence"][0]) * int((~rows["given"][i]).sum())
    np.testing.assert_allclose(got, -want, rtol=1e-5)


def test_generate_until_is_the_engines_greedy_text_cut_at_until(lm):
    ids = lm.encode("they do")
    full = lm.tok.decode(lm.engine.generate([ids], 12, decode=lm.cfg.sampling.decode)[0])
    word = full.split()[1]
    out = lm.generate_until([_Req("they do", {"until": [word], "max_gen_toks": 12}),
                             _Req("they do", {"until": [], "max_gen_toks": 12})])
    assert out[0] == full[:full.index(word)] and out[1] == full


TASKS = """
task: dlm_local_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
GEN = TASKS + """output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""
CHOICE = TASKS + """output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def test_command_runs_local_generation_and_multiple_choice_tasks_offline(workdir, tmp_path, root):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    gen_data, mc_data = tmp_path / "gen.jsonl", tmp_path / "mc.jsonl"
    gen_data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                for q, a in [("they do", "all"), ("come for", "they"), ("all of", "them")]))
    mc_data.write_text("".join(json.dumps({"question": q, "choices": c, "label": 0}) + "\n"
                               for q, c in [("they do", [" all", " for"]), ("come", [" they", " do", " all"])]))
    (tasks / "gen.yaml").write_text(GEN.format(name="gen", data=gen_data))
    (tasks / "mc.yaml").write_text(CHOICE.format(name="mc", data=mc_data))
    out = tmp_path / "results.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"))
    p = subprocess.run([sys.executable, "-m", "dlm.eval.harness", "--workdir", str(workdir), "--tasks",
                        "dlm_local_gen,dlm_local_mc", "--include-path", str(tasks), "--t-samples", "2", "--out", str(out),
                        "sampling.decode.block_length=4"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert 0.0 <= results["dlm_local_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["dlm_local_mc"]["acc,none"] <= 1.0
    assert report["loglikelihood_stderr_mean"] > 0


@pytest.mark.parametrize("args, words", [
    (["--tasks", "x"], "--workdir"),
    (["--workdir", FOLDER, "--tasks", "x", "model.d_model=8"], "sampling.* overrides only"),
    (["--workdir", FOLDER, "--tasks", "x", "--t-samples", "0"], "at least 1"),
])
def test_command_refuses_bad_arguments_in_one_line(args, words):
    p = run_cli(["-m", "dlm.eval.harness", *args])
    if words == "--workdir":  # argparse's own usage error
        assert p.returncode == 2 and "--workdir" in p.stderr
    else:
        assert words in cli_error(p)


def test_block_hyperschedule_runs_score_whole_blocks_and_do_not_generate(root):
    """A block-hyperschedule run's pairs lose their oldest context tokens to make whole blocks,
    and its loglikelihood is still minus its conditional bound; generation (the parallel
    decoder) is refused in one sentence."""
    from dlm.config import ConfigError, load_config
    from dlm.data.tokenizers import ByteTokenizer

    cfg = load_config(root / "configs/test.yaml", ["diffusion.hyperschedule=block", "diffusion.block_width=8"])
    lm = DlmLM(dlm.build_model(cfg, seed=0), cfg, ByteTokenizer(), t_samples=2, seed=1)
    ll, _ = lm.loglikelihood([_Req("abcdefghijk", "xyz")])[0]
    tokens, given = lm.pair("abcdefghijk", "xyz")
    assert tokens.shape[1] == 8 and tokens[0].tolist() == list(b"fghijkxyz"[1:]) and int((~given).sum()) == 3
    _, m = dlm.nelbo(lm.model, tokens, cfg.diffusion, jax.random.key(1), t_samples=2, given=given)
    np.testing.assert_allclose(ll, -float(m["nelbo_per_sequence"][0]) * 3, rtol=1e-6)
    with pytest.raises(ConfigError, match="flat absorbing runs"):
        lm.generate_until([_Req("abc", {"until": [], "max_gen_toks": 4})])
