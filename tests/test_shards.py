"""Pre-tokenised ArrayRecord shards (dlm.data.prepare) and training from them (data.source=shards)."""

import json
import pathlib

import numpy as np
import pytest

import dlm
from dlm.config import ConfigError, load_config
from dlm.data.pipeline import load_data, train_iterator
from dlm.data.prepare import prepare

SEQ_LEN = 32


def write_corpus(directory: pathlib.Path, docs: int = 400, seed: int = 0) -> list[str]:
    """JSONL files of random 'sentences' over a small word list (two files, so documents cross files)."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(300)]
    paths = []
    for f in range(2):
        path = directory / f"part{f}.jsonl"
        with path.open("w") as out:
            for _ in range(docs // 2):
                text = " ".join(rng.choice(words, rng.integers(5, 120))) + "."
                out.write(json.dumps({"text": text}) + "\n")
        paths.append(str(path))
    return paths


def corpus_config(root, paths, *extra):
    return load_config(root / "configs/test.yaml", [f"data.paths={json.dumps(paths)}", "data.source=files", "data.tokenizer=bpe",
                                                    "data.bpe_vocab_size=400", f"data.seq_len={SEQ_LEN}", "data.validation_mod=10",
                                                    *extra])


@pytest.fixture(scope="module")
def corpus(root, tmp_path_factory):
    """(config, shard directory) of a small BPE corpus, prepared with 2 workers into 4+ shards."""
    base = tmp_path_factory.mktemp("shards")
    cfg = corpus_config(root, write_corpus(base))
    prepare(cfg.data, base / "a", workers=2, rows_per_shard=300, progress=False)
    return cfg, base


def test_prepare_twice_writes_identical_files(corpus):
    cfg, base = corpus
    prepare(cfg.data, base / "b", workers=1, rows_per_shard=300, progress=False)  # another worker count too
    a = sorted(p.name for p in (base / "a").iterdir())
    assert a == sorted(p.name for p in (base / "b").iterdir())
    assert sum(n.startswith("train-") for n in a) >= 3
    for name in a:
        assert (base / "a" / name).read_bytes() == (base / "b" / name).read_bytes(), name


def test_shard_rows_equal_in_memory_packing_and_give_the_same_nelbo(root, corpus):
    cfg, base = corpus
    memory = load_data(cfg.data)
    shards = load_data(load_config(root / "configs/test.yaml", ["data.source=shards", f"data.path={base / 'a'}", "data.tokenizer=bpe",
                                                                "data.bpe_vocab_size=400", f"data.seq_len={SEQ_LEN}"]).data)
    train = shards.train_rows[:]
    assert train.shape == memory.train_rows.shape and len(train) > 1000
    np.testing.assert_array_equal(train, memory.train_rows)
    np.testing.assert_array_equal(shards.val_rows, memory.val_rows)
    assert shards.bytes_per_token == memory.bytes_per_token
    import jax

    model = dlm.build_model(cfg, shards.vocab_size, seed=3)
    key = jax.random.key(0)
    a, _ = dlm.nelbo(model, shards.val_rows[:64], cfg.diffusion, key)
    b, _ = dlm.nelbo(model, memory.val_rows[:64], cfg.diffusion, key)
    assert float(a) == float(b)


def test_process_slices_are_disjoint_and_make_the_global_batch_and_an_epoch_reads_every_row_once(root, corpus):
    cfg, base = corpus
    data = load_data(load_config(root / "configs/test.yaml", ["data.source=shards", f"data.path={base / 'a'}", "data.tokenizer=bpe",
                                                              "data.bpe_vocab_size=400", f"data.seq_len={SEQ_LEN}"]).data)
    rows = data.train_rows[:]
    index = {r.tobytes(): i for i, r in enumerate(rows)}
    B = 16
    whole = train_iterator(data, SEQ_LEN, B, seed=5)
    parts = [train_iterator(data, SEQ_LEN, B, seed=5, process_index=p, process_count=2, threads=2) for p in range(2)]
    seen = []
    for _ in range(len(rows) // B):
        g = next(whole)
        a, b = next(parts[0]), next(parts[1])
        np.testing.assert_array_equal(np.concatenate([a, b]), g)
        ia, ib = {index[r.tobytes()] for r in a}, {index[r.tobytes()] for r in b}
        assert not ia & ib
        seen += [index[r.tobytes()] for r in g]
    assert len(seen) == len(set(seen))  # no row twice within an epoch (rows of the corpus are all distinct here)
    assert len(set(index.values())) == len(rows)


def _one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.endswith(".") and len(msg) < 400


def _shard_cfg(root, path, *extra):
    return load_config(root / "configs/test.yaml", ["data.source=shards", f"data.path={path}", "data.tokenizer=bpe",
                                                    "data.bpe_vocab_size=400", f"data.seq_len={SEQ_LEN}", *extra])


@pytest.mark.parametrize("fault, expected", [
    ("missing", "'train-00001.array_record' of the train split is missing"),
    ("truncated", "'train-00001.array_record' in .* is [0-9,]+ bytes where metadata.json records"),
    ("seq_len", "data.seq_len=64 disagrees with the shards"),
    ("tokenizer", "data.tokenizer=byte disagrees with the shards"),
    ("vocab", "data.bpe_vocab_size=512 disagrees with the shards"),
    ("interrupted", "is not a directory \\(an interrupted preparation was found beside it"),
    ("tokenizer_file", "tokenizer files in .* do not match the hash"),
])
def test_faulty_shard_directory_is_one_sentence(root, corpus, tmp_path, fault, expected):
    import re
    import shutil

    _, base = corpus
    d = tmp_path / "s"
    shutil.copytree(base / "a", d)
    extra = []
    if fault == "missing":
        (d / "train-00001.array_record").unlink()
    elif fault == "truncated":
        f = d / "train-00001.array_record"
        f.write_bytes(f.read_bytes()[:-1000])
    elif fault == "seq_len":
        extra = ["data.seq_len=64"]
    elif fault == "tokenizer":
        extra = ["data.tokenizer=byte"]
    elif fault == "vocab":
        extra = ["data.bpe_vocab_size=512"]
    elif fault == "interrupted":  # a killed first preparation: its temporary folder beside the target
        d.rename(tmp_path / ".s.dlm-partial-x1y2")
    elif fault == "tokenizer_file":
        f = d / "tokenizer.hf.json"
        f.write_text(f.read_text().replace('"merges"', '"merges" ', 1))
    with pytest.raises(ConfigError) as e:
        load_data(_shard_cfg(root, d, *extra).data)
    assert re.search(expected, str(e.value)), str(e.value)
    assert _one_sentence(str(e.value)), str(e.value)


def test_interrupted_preparation_is_removed_by_the_next_run_which_writes_the_same_shards(corpus, tmp_path):
    import subprocess
    import sys

    from dlm.folders import PARTIAL

    cfg, base = corpus
    out = tmp_path / "c"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / ".c.dlm-partial-abc123"  # what a killed preparation leaves beside its target
    left.mkdir()
    (left / PARTIAL).write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": int(gone.stdout)}))
    (left / "train-00000.array_record").write_bytes(b"half a shard")
    prepare(cfg.data, out, workers=2, rows_per_shard=300, progress=False)
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    for p in (base / "a").iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_worker_process_loader_reads_the_thread_loaders_batches_and_resumes_from_its_state(root, corpus):
    _, base = corpus
    data = load_data(_shard_cfg(root, base / "a").data)
    threads = train_iterator(data, SEQ_LEN, 16, seed=2, threads=2)
    workers = train_iterator(data, SEQ_LEN, 16, seed=2, workers=2, prefetch=3)
    try:
        for _ in range(6):
            np.testing.assert_array_equal(next(workers), next(threads))
        state = threads.get_state()
        assert workers.get_state()["next_index"] == state["next_index"] == 6
        expected = [next(threads) for _ in range(3)]
        workers.set_state({"next_index": 2})  # back, across prefetched batches
        np.testing.assert_array_equal(next(workers), _batch(data, 2))
        workers.set_state({"next_index": 6})
        for e in expected:
            np.testing.assert_array_equal(next(workers), e)
    finally:
        workers.close()


def _batch(data, k):
    it = train_iterator(data, SEQ_LEN, 16, seed=2)
    for _ in range(k):
        next(it)
    return next(it)


def test_hf_dataset_streamed_by_prepare_gives_the_rows_of_the_in_memory_hf_loader(root, tmp_path):
    """data.source=hf through a local dataset folder (what a hub download or cache is): prepare
    streams it record by record, the in-memory path loads it whole; the rows agree."""
    folder = tmp_path / "hfdata"
    folder.mkdir()
    paths = write_corpus(tmp_path, docs=120, seed=4)
    pathlib.Path(paths[0]).rename(folder / "train.jsonl")
    pathlib.Path(paths[1]).rename(folder / "validation.jsonl")
    cfg = load_config(root / "configs/test.yaml", ["data.source=hf", f"data.hf_name={folder}", f"data.seq_len={SEQ_LEN}"])
    prepare(cfg.data, tmp_path / "s", workers=2, progress=False)
    memory = load_data(cfg.data)
    shards = load_data(load_config(root / "configs/test.yaml", ["data.source=shards", f"data.path={tmp_path / 's'}",
                                                                f"data.seq_len={SEQ_LEN}"]).data)
    np.testing.assert_array_equal(shards.train_rows[:], memory.train_rows)
    np.testing.assert_array_equal(shards.val_rows, memory.val_rows)


def test_prepare_with_another_bpe_sample_size_is_not_taken_for_the_same_shards(corpus, tmp_path):
    """The BPE is trained on the first tokenizer_sample_mb of text, so that size is part of what
    the shards hold: the same config with another size is refused without --overwrite, not
    reported as already prepared."""
    cfg, _ = corpus
    out = tmp_path / "s"
    prepare(cfg.data, out, workers=1, rows_per_shard=300, tokenizer_sample_mb=0.001, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert prepare(cfg.data, out, workers=1, rows_per_shard=300, tokenizer_sample_mb=0.001, progress=False)  # the same: nothing to do
    with pytest.raises(ConfigError, match="another data config"):
        prepare(cfg.data, out, workers=1, rows_per_shard=300, tokenizer_sample_mb=1.0, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
