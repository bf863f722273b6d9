"""Reading the ArrayRecord shards of `dlm.data.prepare` (data.source=shards).

Training rows stay on disk: `ShardRows` is a random-access view (one ArrayRecord reader per
shard) that the train iterator reads a batch at a time, so a process holds only the rows in
flight, whatever the corpus size. Validation rows are read into memory (a few thousand
windows). A shard directory is a stranger's file like any other: its metadata is checked before
anything is read (every field's type and range, the dtype against the vocabulary, shard names
plain files inside the directory at their recorded sizes, the tokenizer files matching their
hash, the config's seq_len and tokenizer agreeing with the shards), and every record as it is
read (its length, its tokens inside the vocabulary); any fault is one sentence naming the shard
and, where there is one, the row.
"""

from __future__ import annotations

import json
import math
import pathlib
import stat

import numpy as np

from dlm.config import ConfigError, DataConfig, TokenizerKind
from dlm.data.prepare import FORMAT_VERSION, SPLITS, token_dtype, tokenizer_sha256
from dlm.folders import plain_file_name


MAX_SEQ_LEN = 1 << 22
MAX_VOCAB = 1 << 31
MAX_COUNT = 1 << 62  # rows, tokens, bytes: far above any corpus


def _get(obj: dict, key: str, kind, where: str, low=None, high=None):
    """obj[key], which must be of `kind` (and within [low, high] for numbers); else one sentence."""
    if isinstance(obj, dict) and key not in obj:
        raise ConfigError(f"{where} has no {key!r}; prepare the shards again.")
    value = obj.get(key) if isinstance(obj, dict) else None
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if ok and isinstance(value, (int, float)):
        ok = (isinstance(value, int) or math.isfinite(value)) and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        want = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list"}.get(kind, "a number")
        bounds = f" in [{low}, {high}]" if low is not None and high is not None else f" of at least {low}" if low is not None else ""
        raise ConfigError(f"{where}: {key!r} is {value!r} where it must be {want}{bounds}; prepare the shards again.")
    return value


def _check_shard_file(d: pathlib.Path, name: str, split: str, where: str) -> int:
    """The size of shard `name`, a regular file directly inside `d`."""
    f = d / name
    if not plain_file_name(name):
        raise ConfigError(f"Shard {name!r} of the {split} split in {where} is not a plain file name inside the directory; "
                          "prepare the shards again.")
    if f.is_symlink() and f.resolve().parent != d.resolve():
        raise ConfigError(f"Shard {name!r} of the {split} split in {where} is a link to a file outside the directory; copy "
                          "the file itself there.")
    try:
        info = f.stat()
    except FileNotFoundError:
        raise ConfigError(f"Shard {name!r} of the {split} split is missing from {where}; copy it back or prepare the shards again.") from None
    except OSError as e:
        raise ConfigError(f"Shard {name!r} in {where} cannot be read ({e.strerror}); copy it again or prepare the shards again.") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"Shard {name!r} in {where} is not a regular file; copy it again or prepare the shards again.")
    return info.st_size


def read_metadata(path: str | pathlib.Path) -> dict:
    """The checked metadata of a shard directory: every field of the right type and range, the
    dtype the one prepare writes for the vocabulary, shards named as plain files inside the
    directory at their recorded sizes, rows adding up, tokenizer files matching their hash. Any
    fault is one ConfigError naming it."""
    d = pathlib.Path(path)
    where = repr(str(d))
    interrupted = " (an interrupted preparation was found beside it: run it again)" if any(
        d.parent.glob(f".{d.name}.dlm-partial-*")) else ""
    if not d.is_dir():
        raise ConfigError(f"data.path={where} is not a directory{interrupted}; point it at the --out directory of "
                          "python -m dlm.data.prepare.")
    meta_path = d / "metadata.json"
    if not meta_path.exists():
        raise ConfigError(f"{where} holds no metadata.json{interrupted}; write the shards with python -m dlm.data.prepare "
                          f"--config C --out {d}.")
    try:
        meta = json.loads(meta_path.read_bytes()[: 64 << 20])
    except (ValueError, OSError):
        raise ConfigError(f"{str(meta_path)!r} is not valid JSON; prepare the shards again.") from None
    here = f"metadata.json in {where}"
    if not isinstance(meta, dict):
        raise ConfigError(f"{here} is not a JSON object; prepare the shards again.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{where} holds shards of format {meta.get('format_version')!r}, and this dlm reads format {FORMAT_VERSION}; "
                          "prepare them again.")
    _get(meta, "seq_len", int, here, 1, MAX_SEQ_LEN)
    _get(meta, "bytes_per_token", (int, float), here, 1e-9)
    _get(meta, "data", dict, here)
    tok = _get(meta, "tokenizer", dict, here)
    vocab = _get(tok, "vocab_size", int, f"{here} (tokenizer)", 1, MAX_VOCAB)
    _get(tok, "eos_id", int, f"{here} (tokenizer)", 0, vocab - 1)
    _get(tok, "kind", str, f"{here} (tokenizer)")
    _get(tok, "sha256", str, f"{here} (tokenizer)")
    dtype = _get(meta, "dtype", str, here)
    if dtype != np.dtype(token_dtype(vocab)).name:
        raise ConfigError(f"{here} names dtype {dtype!r} for a vocabulary of {vocab} tokens, whose rows dlm.data.prepare writes as "
                          f"{np.dtype(token_dtype(vocab)).name}; prepare the shards again.")
    splits = _get(meta, "splits", dict, here)
    for split in SPLITS:
        info = _get(splits, split, dict, f"{here} (splits)")
        at = f"{here} ({split} split)"
        rows = _get(info, "rows", int, at, 1, MAX_COUNT)
        for key in ("tokens", "documents", "bytes"):
            _get(info, key, int, at, 0, MAX_COUNT)
        shards = _get(info, "shards", list, at)
        total = 0
        for i, s in enumerate(shards):
            name = _get(s, "file", str, f"{at}, shard {i}")
            total += _get(s, "rows", int, f"{at}, shard {i}", 0, MAX_COUNT)
            recorded = _get(s, "bytes", int, f"{at}, shard {i}", 0, MAX_COUNT)
            size = _check_shard_file(d, name, split, where)
            if size != recorded:
                raise ConfigError(f"Shard {name!r} in {where} is {size:,} bytes where metadata.json records {recorded:,} "
                                  "(truncated or changed); copy it again or prepare the shards again.")
        if total != rows:
            raise ConfigError(f"The {split} shards in {here} record {total} rows in all where the split records {rows}; "
                              "prepare the shards again.")
    if tokenizer_sha256(d) != tok["sha256"]:
        raise ConfigError(f"The tokenizer files in {where} do not match the hash in its metadata.json; prepare the shards again.")
    return meta


def check_config(cfg: DataConfig, meta: dict) -> None:
    """The run's data settings must describe the shards it reads: one sentence per disagreement."""
    where = repr(cfg.path)
    if cfg.seq_len != meta["seq_len"]:
        raise ConfigError(f"data.seq_len={cfg.seq_len} disagrees with the shards in {where}, which hold rows of {meta['seq_len']} tokens; "
                          f"set data.seq_len={meta['seq_len']} or prepare shards of {cfg.seq_len}.")
    kind, vocab = meta["tokenizer"]["kind"], meta["tokenizer"]["vocab_size"]
    if cfg.tokenizer.value != kind:
        raise ConfigError(f"data.tokenizer={cfg.tokenizer.value} disagrees with the shards in {where}, which were tokenised with a {kind} "
                          f"tokenizer; set data.tokenizer={kind}.")
    trained = meta["data"].get("bpe_vocab_size")
    if cfg.tokenizer == TokenizerKind.BPE and cfg.bpe_vocab_size != trained:
        raise ConfigError(f"data.bpe_vocab_size={cfg.bpe_vocab_size} disagrees with the shards in {where}, whose BPE was trained with "
                          f"data.bpe_vocab_size={trained} ({vocab} tokens); set data.bpe_vocab_size={trained}.")
    if cfg.tokenizer == TokenizerKind.PRETRAINED and cfg.pretrained_tokenizer != meta["data"].get("pretrained_tokenizer"):
        raise ConfigError(f"data.pretrained_tokenizer={cfg.pretrained_tokenizer!r} disagrees with the shards in {where}, tokenised with "
                          f"{meta['data'].get('pretrained_tokenizer')!r}; set it to that.")


class ShardRows:
    """Rows [N, seq_len] of one split, read on demand: rows[i] / rows[[i, j, ...]] -> int32 arrays.

    Each shard is opened when first read and its record count checked against metadata.json;
    every record's length and every token (below the vocabulary) is checked as it is read, and a
    shard that cannot be read is one ConfigError naming the shard and the row. Pickles as its
    paths, so worker processes open their own readers."""

    def __init__(self, directory: str | pathlib.Path, meta: dict, split: str):
        self.directory, self.split = str(directory), split
        self.seq_len, self.dtype = meta["seq_len"], np.dtype(meta["dtype"])
        self.vocab_size = meta["tokenizer"]["vocab_size"]
        shards = meta["splits"][split]["shards"]
        self.files = [s["file"] for s in shards]
        self.counts = [s["rows"] for s in shards]
        self.starts = np.cumsum([0] + self.counts)
        self.n = meta["splits"][split]["rows"]
        self._readers = {}

    @property
    def paths(self) -> list[str]:
        return [str(pathlib.Path(self.directory) / f) for f in self.files]

    def __getstate__(self):
        return dict(self.__dict__, _readers={})  # readers are reopened where the rows are unpickled

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.seq_len)

    def _corrupt(self, shard: int, row: int | None, what: str) -> ConfigError:
        at = f", row {row}," if row is not None else ""
        return ConfigError(f"Shard {self.files[shard]!r} in {self.directory!r}{at} {what}; copy it again or prepare the shards again.")

    def _reader(self, shard: int):
        reader = self._readers.get(shard)
        if reader is None:
            from array_record.python.array_record_module import ArrayRecordReader

            try:
                reader = ArrayRecordReader(self.paths[shard], options="readahead_buffer_size:0", file_reader_buffer_size=32768)
                count = reader.num_records()
            except Exception as e:  # Riegeli's own errors: a damaged footer or index
                raise self._corrupt(shard, None, f"cannot be opened as an ArrayRecord file ({type(e).__name__})") from None
            if count != self.counts[shard]:
                raise self._corrupt(shard, None, f"holds {count} rows where metadata.json records {self.counts[shard]}")
            self._readers[shard] = reader
        return reader

    def _read(self, shard: int, local: list[int]) -> list[bytes]:
        reader = self._reader(shard)
        try:
            return reader.read(local)
        except Exception:  # find the row that fails, to name it
            for r in local:
                try:
                    reader.read([r])
                except Exception as e:
                    raise self._corrupt(shard, r, f"cannot be read ({type(e).__name__})") from None
            raise self._corrupt(shard, None, "cannot be read") from None

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        if isinstance(index, slice):
            index = range(*index.indices(self.n))
        index = np.asarray(index, np.int64).reshape(-1)
        if not len(index):
            return np.zeros((0, self.seq_len), np.int32)
        if index.min() < 0 or index.max() >= self.n:
            raise IndexError(f"row index out of range for {self.n} rows")
        shard_of = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty((len(index), self.seq_len), np.int32)
        width = self.seq_len * self.dtype.itemsize
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            local = [int(i) for i in index[where] - self.starts[shard]]
            records = self._read(int(shard), local)
            for r, record in zip(local, records):
                if len(record) != width:
                    raise self._corrupt(shard, r, f"holds a record of {len(record)} bytes where a row of {self.seq_len} "
                                        f"{self.dtype.name} tokens takes {width}")
            rows = np.frombuffer(b"".join(records), self.dtype).reshape(len(local), self.seq_len)
            if rows.max(initial=0) >= self.vocab_size:
                r = local[int(np.argmax(rows.max(axis=1) >= self.vocab_size))]
                raise self._corrupt(shard, r, f"holds a token outside the vocabulary of {self.vocab_size}")
            out[where] = rows
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out.astype(dtype) if dtype is not None else out


def open_shards(cfg: DataConfig, workdir: pathlib.Path | None, leader: bool = True) -> dict:
    """A checked shard directory's parts: tokenizer (saved into the run's workdir so sampling and
    evaluation find it), training rows on disk, validation rows in memory, bytes per token and a
    description (dlm.data.pipeline.load_data makes them its Data)."""
    from dlm.data.tokenizers import load_tokenizer

    meta = read_metadata(cfg.path)
    check_config(cfg, meta)
    tok = load_tokenizer(cfg.path)
    if workdir is not None and leader:
        tok.save(pathlib.Path(workdir))
    train = ShardRows(cfg.path, meta, "train")
    val = ShardRows(cfg.path, meta, "validation")[:]
    t = meta["splits"]["train"]
    desc = (f"shards in {cfg.path}: {t['rows']:,} train rows ({t['tokens'] / 1e6:.1f}M tokens, {t['documents']:,} docs, "
            f"{len(t['shards'])} shards), {len(val):,} validation rows, vocab {tok.vocab_size}")
    return {"tokenizer": tok, "train_rows": train, "val_rows": val, "bytes_per_token": meta["bytes_per_token"], "description": desc}
