"""Safetensors files and indexes from strangers: every malformed header or index is one
ConfigError sentence, raised before anything is allocated; no other exception, no hang."""

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dlm.config import ConfigError
from dlm.interop.safetensors import Folder, SafetensorsFile, write
from hostile import bounded_memory, one_sentence


def _raw(path, header, data=b"", header_bytes=None):
    blob = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _one_sentence(fn):
    return one_sentence(fn, seconds=2.0)


@pytest.fixture(autouse=True)
def _memory():
    with bounded_memory():  # a hostile input may not make this process reserve 4 GiB more
        yield


T = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}

BAD_HEADERS = {
    "not_an_object": [1, 2, 3],
    "entry_not_an_object": {"w": [1]},
    "dtype_not_a_string": {"w": dict(T, dtype=4)},
    "unknown_dtype": {"w": dict(T, dtype="F128")},
    "negative_shape": {"w": dict(T, shape=[-2, -2])},
    "float_shape": {"w": dict(T, shape=[2.0, 2])},
    "bool_shape": {"w": dict(T, shape=[True, 16])},
    "string_shape": {"w": dict(T, shape="2,2")},
    "huge_shape": {"w": dict(T, shape=[2**16, 2**16])},
    "negative_offsets": {"w": dict(T, shape=[4], data_offsets=[-16, 0])},
    "reversed_offsets": {"w": dict(T, data_offsets=[16, 0])},
    "three_offsets": {"w": dict(T, data_offsets=[0, 8, 16])},
    "float_offsets": {"w": dict(T, data_offsets=[0.0, 16.0])},
    "past_the_end": {"w": dict(T, shape=[8], data_offsets=[0, 32])},
    "bytes_disagree_with_shape": {"w": dict(T, shape=[3])},
    "overlap": {"a": dict(T, shape=[3], data_offsets=[0, 12]), "b": dict(T, shape=[2], data_offsets=[8, 16])},
    "metadata_not_strings": {"__metadata__": {"format": 1}, "w": T},
    "null_entry": {"w": None},
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_malformed_header_is_one_sentence(tmp_path, name):
    path = _raw(tmp_path / "model.safetensors", BAD_HEADERS[name], np.arange(4, dtype=np.float32).tobytes())
    msg = _one_sentence(lambda: SafetensorsFile(path))
    assert "model.safetensors" in msg


def test_duplicate_keys_and_non_json_headers(tmp_path):
    dup = b'{"w": ' + json.dumps(T).encode() + b', "w": ' + json.dumps(T).encode() + b"}"
    path = _raw(tmp_path / "a.safetensors", None, bytes(16), header_bytes=dup)
    assert "'w' twice" in _one_sentence(lambda: SafetensorsFile(path))
    for blob in (b"\xff\xfe", b"[" * 100_000, b'{"w": '):
        path = _raw(tmp_path / "b.safetensors", None, bytes(16), header_bytes=blob)
        _one_sentence(lambda: SafetensorsFile(path))


def test_valid_file_still_reads(tmp_path):
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.int64)
    write(tmp_path / "m.safetensors", [("a", a.shape, a.dtype, lambda: a), ("b", b.shape, b.dtype, lambda: b),
                                       ("empty", (0, 3), np.float32, lambda: np.zeros((0, 3), np.float32))],
          metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(f.read("a"), a)
    np.testing.assert_array_equal(f.read("b"), b)
    assert f.read("empty").shape == (0, 3) and f.metadata == {"format": "pt"}


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)
FIELD = {"dtype": st.sampled_from(["F32", "BF16", "I64", "X"]) | JSON,
         "shape": st.lists(st.integers(-3, 2**40), max_size=4) | JSON,
         "data_offsets": st.lists(st.integers(-64, 2**40), min_size=0, max_size=3) | JSON}
ENTRY = st.fixed_dictionaries({}, optional=FIELD) | JSON


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(min_size=1, max_size=6), ENTRY, max_size=4) | JSON)
def test_any_header_is_read_or_refused_in_one_sentence(tmp_path, header):
    """Whatever the header holds, opening the file either works, and then every tensor reads back
    its own bytes, or raises one ConfigError sentence; never another exception."""
    data = bytes(range(64))
    path = _raw(tmp_path / "h.safetensors", header, data)
    try:
        f = SafetensorsFile(path)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    for name in f.keys():
        begin, end = f.tensors[name]["data_offsets"]
        assert f.read(name).tobytes() == data[begin:end]


def _index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("fname", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/x.safetensors", "..", ""])
def test_index_may_only_name_files_inside_the_folder(tmp_path, fname):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    a = np.zeros(4, np.float32)
    write(tmp_path / "outside.safetensors", [("w", a.shape, a.dtype, lambda: a)])  # a valid file beside the folder
    _index(folder, {"w": fname})
    assert "plain file name" in _one_sentence(lambda: Folder(folder))


def test_index_naming_a_fifo_or_a_folder_does_not_block(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    os.mkfifo(folder / "pipe.safetensors")
    (folder / "dir.safetensors").mkdir()
    for name in ("pipe.safetensors", "dir.safetensors"):
        _index(folder, {"w": name})
        assert "not a regular file" in _one_sentence(lambda: Folder(folder))


@pytest.mark.parametrize("index", [[1, 2], {"weight_map": [1]}, {"weight_map": {"w": 3}}, "x"])
def test_malformed_index_is_one_sentence(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _one_sentence(lambda: Folder(tmp_path))
