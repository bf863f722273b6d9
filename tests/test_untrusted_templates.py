"""Chat templates from strangers: rendered in the sandbox within a time and size limit, and
every failure is one ConfigError sentence naming the folder; the fixtures' real templates still
render."""

import json
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import pytest

import dlm
from dlm.config import ConfigError
from dlm.data.tokenizers import CHAT_SECONDS
from hostile import bounded_memory

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pretrained"

HOSTILE = {
    "huge_range": "{% for i in range(10**9) %}x{% endfor %}",
    "huge_repeat": "{{ 'a' * 10**10 }}",
    "huge_list_repeat": "{{ (messages * 10**9) | length }}",
    "huge_ljust": "{{ 'a'.ljust(10**10) }}",
    "huge_format_field": "{{ '{:>9999999999}'.format('a') }}",
    "huge_format_argument": "{{ '{:>{}}'.format('a', 10**10) }}",
    "huge_percent_format": "{{ '%9999999999s' % 'a' }}",
    "silent_nested_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "loud_nested_loops": "{% for i in range(100000) %}{% for j in range(100000) %}ab{% endfor %}{% endfor %}",
    "python_internals": "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "division_by_zero": "{{ 1 / 0 }}",
    "raise_exception": "{{ raise_exception('Conversation roles must alternate') }}",
    "syntax_error": "{% for m in messages %}{{ m.content }",
    "bad_index": "{{ messages[5]['content'] }}",
}


@pytest.fixture(autouse=True)
def _memory():
    with bounded_memory():  # a hostile input may not make this process reserve 4 GiB more
        yield


def _folder(tmp_path, template):
    d = tmp_path / "llada"
    shutil.copytree(FIXTURES / "llada", d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_is_one_sentence_within_the_limits(tmp_path, name):
    tok = dlm.load_tokenizer(_folder(tmp_path, HOSTILE[name]))
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        tok.encode_chat("hello")
    assert time.perf_counter() - t0 < CHAT_SECONDS + 1.5
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("The chat template of ") and str(tmp_path) in msg
    # nothing near the gigabytes the template asks for was allocated (ru_maxrss is in KB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0 < 200_000


def test_fixture_templates_still_render(tmp_path):
    for family in ("llada", "dream"):
        tok = dlm.load_tokenizer(FIXTURES / family)
        text = tok.decode(tok.encode_chat("what is the answer?"))
        assert "what is the answer?" in text


def test_chat_cli_with_a_hostile_template_prints_one_error_line(root, tmp_path):
    d = _folder(tmp_path, HOSTILE["silent_nested_loops"])
    p = subprocess.run([sys.executable, "sample.py", "--pretrained", str(d), "--chat", "hi", "--num-samples", "1",
                        "--length", "12"], cwd=root, capture_output=True, text=True, timeout=120)
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: The chat template of "), p.stderr
