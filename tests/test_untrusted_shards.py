"""Shard directories from strangers: metadata of the wrong types or ranges, a dtype that does not
match the rows, shard names that leave the directory, FIFOs, garbage of the right size, records
of the wrong length, tokens outside the vocabulary. Every one is one ConfigError sentence naming
the shard (and the row, where there is one), in bounded time and memory; never another
exception, never rows read wrongly."""

import copy
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dlm.config import load_config
from dlm.data.pipeline import load_data
from dlm.data.prepare import WRITER_OPTIONS, prepare
from dlm.data.shards import ShardRows, read_metadata
from hostile import bounded_memory, cli_error, one_sentence, run_cli

SEQ_LEN = 32


@pytest.fixture(autouse=True)
def _memory():
    with bounded_memory():
        yield


@pytest.fixture(scope="module")
def shards(root, tmp_path_factory):
    """A byte-tokenised shard directory with several train shards, and its rows."""
    base = tmp_path_factory.mktemp("hostile-shards")
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i} " * (5 + i % 30)}) + "\n" for i in range(300)))
    cfg = load_config(root / "configs/test.yaml", ["data.source=files", f"data.paths=[{corpus}]", f"data.seq_len={SEQ_LEN}",
                                                   "data.validation_mod=10"])
    prepare(cfg.data, base / "good", workers=1, rows_per_shard=200, progress=False)
    meta = read_metadata(base / "good")
    return base / "good", meta, ShardRows(base / "good", meta, "train")[:]


def _copy(shards, tmp_path) -> pathlib.Path:
    d = tmp_path / "s"
    shutil.copytree(shards[0], d)
    return d


def _with_metadata(d: pathlib.Path, meta) -> pathlib.Path:
    (d / "metadata.json").write_text(json.dumps(meta))
    return d


def _read_all(root, d):
    """Everything training reads: the checked directory, the validation rows, every train row."""
    data = load_data(load_config(root / "configs/test.yaml", ["data.source=shards", f"data.path={d}",
                                                              f"data.seq_len={SEQ_LEN}"]).data)
    return data.train_rows[:]


def _set(meta: dict, path: str, value):
    node = meta
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return meta


DELETE = object()

BAD_FIELDS = [
    ("seq_len", "32"), ("seq_len", -1), ("seq_len", 10**12), ("seq_len", True), ("seq_len", None), ("seq_len", DELETE),
    ("dtype", "uint8"), ("dtype", "float32"), ("dtype", "uint32"), ("dtype", 2), ("dtype", DELETE),
    ("tokenizer.vocab_size", 0), ("tokenizer.vocab_size", "257"), ("tokenizer.vocab_size", 2**40),
    ("tokenizer.eos_id", -1), ("tokenizer.eos_id", 257), ("tokenizer", DELETE), ("tokenizer", [1]),
    ("bytes_per_token", 0), ("bytes_per_token", "1.0"), ("bytes_per_token", DELETE), ("data", DELETE), ("data", "x"),
    ("splits", DELETE), ("splits", []), ("splits.validation", DELETE), ("splits.train.rows", -5), ("splits.train.rows", "3"),
    ("splits.train.rows", 1), ("splits.train.shards", {}), ("splits.train.shards.0", "train-00000.array_record"),
    ("splits.train.shards.0.rows", -1), ("splits.train.shards.0.rows", 10**6), ("splits.train.shards.0.bytes", -1),
    ("splits.train.shards.0.file", "../good/train-00000.array_record"), ("splits.train.shards.0.file", "/etc/passwd"),
    ("splits.train.shards.0.file", "sub/train-00000.array_record"), ("splits.train.shards.0.file", ""),
    ("splits.train.shards.0.file", "."), ("splits.train.shards.0.file", None), ("splits.train.tokens", -1),
    ("splits.train.tokens", 10**30), ("bytes_per_token", float("nan")),
]


@pytest.mark.parametrize("path,value", BAD_FIELDS, ids=[f"{p}={v if v is not DELETE else 'missing'}" for p, v in BAD_FIELDS])
def test_metadata_field_of_the_wrong_type_or_range_is_one_sentence(shards, tmp_path, path, value):
    d = _with_metadata(_copy(shards, tmp_path), _set(copy.deepcopy(shards[1]), path, value))
    one_sentence(lambda: read_metadata(d))


@pytest.mark.parametrize("text", ["[1, 2]", "null", "{", "\"metadata\"", "{\"format_version\": 1}"])
def test_metadata_that_is_not_an_object_of_this_format_is_one_sentence(shards, tmp_path, text):
    d = _copy(shards, tmp_path)
    (d / "metadata.json").write_text(text)
    one_sentence(lambda: read_metadata(d))


def test_uint8_named_for_uint16_rows_is_refused_not_read_as_raw_bytes(shards, tmp_path):
    d = _with_metadata(_copy(shards, tmp_path), _set(copy.deepcopy(shards[1]), "dtype", "uint8"))
    assert "'uint8' for a vocabulary of 257 tokens" in one_sentence(lambda: read_metadata(d))


def test_a_shard_that_is_a_fifo_or_leaves_the_directory_is_refused_without_reading_it(shards, tmp_path):
    d = _copy(shards, tmp_path)
    name = shards[1]["splits"]["train"]["shards"][0]["file"]
    (d / name).unlink()
    os.mkfifo(d / name)
    assert "not a regular file" in one_sentence(lambda: read_metadata(d))
    (d / name).unlink()
    outside = tmp_path / "outside.array_record"
    shutil.copy(shards[0] / name, outside)
    (d / name).symlink_to(outside)
    assert "is a link to a file outside the directory" in one_sentence(lambda: read_metadata(d))


def _rewrite_shard(d: pathlib.Path, index: int, records: list[bytes]) -> str:
    """Replace train shard `index` with a valid ArrayRecord file of `records`, recording its new size."""
    from array_record.python.array_record_module import ArrayRecordWriter

    meta = json.loads((d / "metadata.json").read_text())
    entry = meta["splits"]["train"]["shards"][index]
    writer = ArrayRecordWriter(str(d / entry["file"]), WRITER_OPTIONS)
    for r in records:
        writer.write(r)
    writer.close()
    entry["bytes"] = (d / entry["file"]).stat().st_size
    _with_metadata(d, meta)
    return entry["file"]


def test_records_of_the_wrong_length_name_the_shard_and_the_row(root, shards, tmp_path):
    d = _copy(shards, tmp_path)
    rows = shards[1]["splits"]["train"]["shards"][1]["rows"]
    good = np.ones(SEQ_LEN, np.uint16).tobytes()
    name = _rewrite_shard(d, 1, [good] * 7 + [good[:-2]] + [good] * (rows - 8))
    msg = one_sentence(lambda: _read_all(root, d))
    assert f"Shard {name!r}" in msg and "row 7, holds a record of 62 bytes where a row of 32 uint16 tokens takes 64" in msg


def test_tokens_outside_the_vocabulary_name_the_shard_and_the_row(root, shards, tmp_path):
    d = _copy(shards, tmp_path)
    rows = shards[1]["splits"]["train"]["shards"][0]["rows"]
    bad = np.full(SEQ_LEN, 60000, np.uint16).tobytes()
    name = _rewrite_shard(d, 0, [np.ones(SEQ_LEN, np.uint16).tobytes()] * (rows - 1) + [bad])
    msg = one_sentence(lambda: _read_all(root, d))
    assert f"Shard {name!r}" in msg and f"row {rows - 1}, holds a token" in msg and "outside the vocabulary of 257" in msg


def test_a_shard_with_fewer_rows_than_recorded_is_one_sentence(root, shards, tmp_path):
    d = _copy(shards, tmp_path)
    name = _rewrite_shard(d, 0, [np.ones(SEQ_LEN, np.uint16).tobytes()] * 3)
    assert f"Shard {name!r}" in one_sentence(lambda: _read_all(root, d))


@pytest.mark.parametrize("split", ["train", "validation"])
def test_garbage_of_the_same_size_is_one_sentence_naming_the_shard(root, shards, tmp_path, split):
    d = _copy(shards, tmp_path)
    name = shards[1]["splits"][split]["shards"][0]["file"]
    size = (d / name).stat().st_size
    (d / name).write_bytes(np.random.default_rng(0).bytes(size))
    assert f"Shard {name!r}" in one_sentence(lambda: _read_all(root, d))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_flipped_bytes_are_read_unchanged_or_refused_in_one_sentence(shards, tmp_path_factory, data):
    """Bytes changed anywhere in a shard: every row reads as it was, or one sentence; nothing else."""
    d = tmp_path_factory.mktemp("flip") / "s"
    shutil.copytree(shards[0], d)
    meta = shards[1]
    name = meta["splits"]["train"]["shards"][0]["file"]
    blob = bytearray((d / name).read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    (d / name).write_bytes(bytes(blob))
    rows = ShardRows(d, meta, "train")
    try:
        got = rows[:]
    except Exception as e:  # only a ConfigError of one sentence naming the shard
        from dlm.config import ConfigError

        assert isinstance(e, ConfigError), repr(e)
        assert "\n" not in str(e) and f"Shard {name!r}" in str(e)
        return
    n = meta["splits"]["train"]["shards"][0]["rows"]
    changed = np.flatnonzero((got[:n] != shards[2][:n]).any(axis=1))
    assert got.max() < 257  # a changed row is still tokens of the vocabulary (ArrayRecord has no per-record checksum)
    np.testing.assert_array_equal(got[n:], shards[2][n:])
    assert len(changed) <= 8


def test_training_on_a_garbage_shard_prints_one_error_line(root, shards, tmp_path):
    d = _copy(shards, tmp_path)
    name = shards[1]["splits"]["train"]["shards"][1]["file"]
    (d / name).write_bytes(np.random.default_rng(1).bytes((d / name).stat().st_size))
    p = run_cli(["train.py", "--config", "configs/test.yaml", f"workdir={tmp_path / 'run'}", "data.source=shards",
                 f"data.path={d}", f"data.seq_len={SEQ_LEN}", "train.steps=50", "train.progress=false"], cwd=root, timeout=300)
    msg = cli_error(p)
    assert f"Shard {name!r}" in msg and "training stopped at step" in msg, msg
