"""config.json from strangers: every field dlm reads is checked for type and range before
anything is built, and a bad one is one ConfigError sentence naming the key."""

import json
import pathlib
import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dlm.config import ConfigError
from dlm.interop.hf import open_checkpoint
from hostile import bounded_memory, one_sentence

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pretrained"


def _folder(tmp_path, family="llada", **changes):
    d = tmp_path / family
    if not d.exists():
        shutil.copytree(FIXTURES / family, d)
    cfg = json.loads((FIXTURES / family / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(autouse=True)
def _memory():
    with bounded_memory():  # a hostile input may not make this process reserve 4 GiB more
        yield


@pytest.mark.parametrize("key,value", [("d_model", "64"), ("d_model", 64.0), ("d_model", None), ("n_heads", 0),
                                       ("n_heads", [4]), ("n_layers", 10**6), ("n_layers", -2), ("n_layers", True),
                                       ("mlp_hidden_size", 2**40), ("embedding_size", {"a": 1}), ("mask_token_id", 10**9),
                                       ("rope_theta", "big"), ("rope_theta", -1.0), ("rms_norm_eps", "x"),
                                       ("n_kv_heads", 3), ("max_sequence_length", 2**40)])
def test_llada_config_field_of_the_wrong_type_or_range_isone_sentence(tmp_path, key, value):
    msg = one_sentence(lambda: open_checkpoint(_folder(tmp_path, **{key: value})))
    assert key in msg or "heads" in msg or "mask_token_id" in msg


@pytest.mark.parametrize("family,key", [("dream", "hidden_size"), ("dream", "num_hidden_layers"), ("mdlm", "n_blocks"),
                                        ("mdlm", "cond_dim")])
def test_other_families_check_their_fields(tmp_path, family, key):
    for value in ("8", 2.5, 0, 10**7, None):
        one_sentence(lambda: open_checkpoint(_folder(tmp_path, family, **{key: value})))


def test_config_that_is_not_an_object(tmp_path):
    d = _folder(tmp_path)
    for text in ("[1, 2]", '"llada"', "3", "\\xff"):
        (d / "config.json").write_text(text)
        one_sentence(lambda: open_checkpoint(d))
    (d / "config.json").write_text(json.dumps({"architectures": [1, None], "model_type": ["x"]}))
    assert "none of the families" in one_sentence(lambda: open_checkpoint(d))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size",
                            "mask_token_id", "rope_theta", "rms_norm_eps", "max_sequence_length"]),
       value=st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5)
       | st.lists(st.integers(), max_size=2))
def test_any_value_of_a_field_opens_or_isone_sentence(tmp_path, key, value):
    try:
        open_checkpoint(_folder(tmp_path, **{key: value}))
    except ConfigError as e:
        assert "\n" not in str(e)
