import json

import numpy as np
import pytest

from dlm.config import ConfigError, DataConfig, MarkovConfig, Source, TokenizerKind
from dlm.data.pipeline import load_data, pack, train_iterator
from dlm.data.synthetic import MarkovChain
from dlm.data.tokenizers import ByteTokenizer, train_bpe


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é' + x  # ✓"
    ids = tok.encode(text)
    assert ids.max() < 256 and tok.decode(ids) == text
    assert tok.mask_id == 257 and tok.vocab_size == 257


def test_pack_separates_documents_with_eos():
    rows = pack([[1, 2, 3], [4, 5]], eos_id=9, seq_len=3)
    assert rows.tolist() == [[1, 2, 3], [9, 4, 5]]  # the final EOS is dropped with the remainder


def test_bpe_trains_and_round_trips(tmp_path):
    docs = ["def foo(bar):\n    return bar + 1\n"] * 50 + ["class Baz:\n    pass\n"] * 50
    tok = train_bpe(docs, 300)
    ids = tok.encode(docs[0])
    assert len(ids) < len(docs[0]) and tok.decode(ids) == docs[0]
    assert tok.eos_id < tok.vocab_size and tok.mask_id == tok.vocab_size


def _rows_data(n=40, L=8):
    from dlm.data.pipeline import Data

    rows = np.arange(n * L, dtype=np.int32).reshape(n, L)
    return Data(ByteTokenizer(), rows, rows[:2], 1.0)


def test_iterator_is_deterministic_and_resumable():
    data = _rows_data()
    a = train_iterator(data, 8, 4, seed=3)
    first = [next(a) for _ in range(5)]
    state = a.get_state()
    rest = [next(a) for _ in range(5)]
    b = train_iterator(data, 8, 4, seed=3)
    b.set_state(state)
    assert all((x == y).all() for x, y in zip(rest, [next(b) for _ in range(5)]))
    c = train_iterator(data, 8, 4, seed=3)
    assert all((x == y).all() for x, y in zip(first, [next(c) for _ in range(5)]))


def test_process_slices_make_the_same_global_batch():
    data = _rows_data()
    whole = train_iterator(data, 8, 4, seed=0)
    parts = [train_iterator(data, 8, 4, seed=0, process_index=p, process_count=2) for p in range(2)]
    for _ in range(12):  # crosses an epoch (40 rows / 4)
        assert (next(whole) == np.concatenate([next(p) for p in parts])).all()


def test_epochs_are_reshuffled_and_cover_all_rows():
    data = _rows_data(n=8, L=2)
    it = train_iterator(data, 2, 4, seed=0)
    e1 = np.concatenate([next(it), next(it)])[:, 0]
    e2 = np.concatenate([next(it), next(it)])[:, 0]
    assert sorted(e1.tolist()) == sorted(e2.tolist()) == list(range(0, 16, 2))


def test_too_little_data_for_one_batch():
    with pytest.raises(ConfigError, match="fewer than one batch"):
        next(train_iterator(_rows_data(n=3), 8, 4, seed=0))


@pytest.mark.parametrize("structure", ["dirichlet", "cycle"])
def test_markov_entropy_closed_form_matches_monte_carlo(structure):
    chain = MarkovChain.random(MarkovConfig(num_states=5, concentration=0.5, seed=2, structure=structure, branches=2, noise=0.05))
    L = 16
    x = chain.sample_rows(0, np.arange(20000), L)
    nll = -chain.log_prob(x) / L
    assert abs(nll.mean() - chain.entropy_per_token(L)) < 4 * nll.std() / np.sqrt(len(nll))
    # stationary start: the first symbol follows pi
    freq = np.bincount(x[:, 0], minlength=5) / len(x)
    assert np.abs(freq - chain.pi).max() < 0.02
    if structure == "cycle":  # one likely successor per state along a cycle through all states; two at 2 states
        likely = chain.P > 0.05
        assert sorted(likely.sum(1).tolist()) == [1, 1, 1, 2, 2]
        state, seen = 0, set()
        for _ in range(5):
            seen.add(state)
            state = int(np.argmax(np.where(likely[state], chain.P[state], 0)))
        assert len(seen) == 5 and np.allclose(chain.P.sum(1), 1.0) and chain.P.min() == pytest.approx(0.05 / 5)


def test_markov_rows_do_not_depend_on_slicing():
    chain = MarkovChain.random(MarkovConfig())
    a = chain.sample_rows(7, np.arange(10), 12)
    b = chain.sample_rows(7, np.arange(5, 10), 12)
    assert (a[5:] == b).all()


def test_local_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    with (tmp_path / "b.jsonl").open("w") as f:
        for i in range(200):
            f.write(json.dumps({"content": f"line {i} " * 5}) + "\n")
    cfg = DataConfig(source=Source.FILES, paths=[str(tmp_path / "b.jsonl")], text_field="content", seq_len=16,
                     validation_paths=[str(tmp_path / "a.txt")])
    data = load_data(cfg)
    assert data.train_rows.shape[1] == 16 and len(data.val_rows) > 0
    assert "line 0" in data.tokenizer.decode(data.train_rows.reshape(-1))
    bad = DataConfig(source=Source.FILES, paths=[str(tmp_path / "b.jsonl")], text_field="text", seq_len=16)
    with pytest.raises(ConfigError, match="no field 'text'"):
        load_data(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_data(DataConfig(source=Source.FILES, paths=[str(tmp_path / "nope.txt")]))


def test_builtin_corpus_split_is_deterministic():
    a = load_data(DataConfig(seq_len=128, max_documents=40))
    b = load_data(DataConfig(seq_len=128, max_documents=40))
    assert (a.val_rows == b.val_rows).all() and a.bytes_per_token == 1.0


def test_bpe_pipeline_saves_the_tokenizer(tmp_path):
    cfg = DataConfig(tokenizer=TokenizerKind.BPE, bpe_vocab_size=512, seq_len=64, max_documents=30)
    data = load_data(cfg, tmp_path)
    assert (tmp_path / "tokenizer.hf.json").exists()
    assert data.bytes_per_token > 1.5  # BPE tokens cover several bytes
    again = load_data(cfg, tmp_path)
    assert (again.val_rows == data.val_rows).all()


def test_bpe_is_trained_once_by_the_leader_and_read_by_the_others(tmp_path, monkeypatch):
    import dlm.data.pipeline as pipeline

    built = []
    real = pipeline.build_tokenizer
    monkeypatch.setattr(pipeline, "build_tokenizer", lambda *a: built.append(1) or real(*a))
    cfg = DataConfig(tokenizer=TokenizerKind.BPE, bpe_vocab_size=400, seq_len=64, max_documents=30)
    order = []

    def barrier():  # where process 1 waits, process 0 trains and writes the tokenizer
        order.append("barrier")
        order.append(load_data(cfg, tmp_path, leader=True))

    follower = load_data(cfg, tmp_path, leader=False, barrier=barrier)
    leader = order[1]
    assert built == [1] and order[0] == "barrier"
    assert (follower.val_rows == leader.val_rows).all() and (follower.train_rows == leader.train_rows).all()
    with pytest.raises(ConfigError, match="wrote no tokenizer"):
        load_data(cfg, tmp_path / "empty", leader=False, barrier=lambda: None)


def _files_cfg(paths, **kw):
    return DataConfig(source=Source.FILES, paths=[str(p) for p in paths], seq_len=16, **kw)


def test_bad_input_files_name_the_file(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("some text " * 200)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match="empty.txt' is empty"):
        load_data(_files_cfg([good, empty]))
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    with pytest.raises(ConfigError, match="folder.txt' is not a regular file"):
        load_data(_files_cfg([good, folder]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ConfigError, match="broken.jsonl' is not valid JSON lines"):
        load_data(_files_cfg([broken]))


def test_jsonl_line_without_the_text_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"doc {i} " * 20}) + "\n" for i in range(30)) + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match="Line 31 of .*d.jsonl' has no text in field 'text'"):
        load_data(_files_cfg([f]))


def test_non_utf8_bytes(tmp_path):
    f = tmp_path / "latin1.txt"
    raw = ("café naïve " * 300).encode("latin-1")
    f.write_bytes(raw)
    data = load_data(_files_cfg([f], validation_paths=[str(f)]))  # the byte tokenizer takes any bytes
    stream = data.val_rows.reshape(-1)
    assert bytes(stream[stream < 256].astype(np.uint8).tolist()) == raw[: len(stream[stream < 256])]
    with pytest.raises(ConfigError, match="latin1.txt' is not valid UTF-8"):
        load_data(_files_cfg([f], tokenizer=TokenizerKind.BPE, bpe_vocab_size=300))


def test_sudoku_source_draws_valid_grids_per_row_index(tmp_path):
    from dlm.config import SudokuConfig
    from dlm.tasks import sudoku

    cfg = DataConfig(source=Source.SUDOKU, seq_len=36, sudoku=SudokuConfig(size=6, base_grids=20, validation=8, cache_dir=str(tmp_path)))
    data = load_data(cfg, tmp_path)
    geo = sudoku.Geometry(6)
    rows = data.draw_rows(3, np.arange(50), 36)
    assert rows.shape == (50, 36) and data.vocab_size == 6 and data.tokenizer.mask_id == 6
    assert all(sudoku.check(geo, sudoku.decode(r, 6), np.zeros((6, 6), int)) for r in np.concatenate([rows, data.val_rows]))
    assert len({r.tobytes() for r in rows}) == 50  # symmetries make every row new
    np.testing.assert_array_equal(data.draw_rows(3, np.arange(10, 20), 36), rows[10:20])  # row k of a seed is fixed
    assert data.tokenizer.decode(rows[0][:6]) == "".join(str(d) for d in sudoku.decode(rows[0], 6)[0])
    assert list(tmp_path.glob("sudoku6_grids_seed0_n20.npy"))  # cached
