"""Reading the ArrayRecord shards of `dlm.data.prepare` (data.source=shards).

Training rows stay on disk: `ShardRows` is a random-access view (grain's
ArrayRecordDataSource) that the train iterator reads a batch at a time, so a process holds only
the rows in flight, whatever the corpus size. Validation rows are read into memory (a few
thousand windows). The directory is checked before anything is read: metadata present and of
this format, every shard present at its recorded size, the tokenizer files matching their hash,
and the config's seq_len and tokenizer agreeing with the shards.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from dlm.config import ConfigError, DataConfig, TokenizerKind
from dlm.data.prepare import FORMAT_VERSION, tokenizer_sha256


def read_metadata(path: str | pathlib.Path) -> dict:
    """The checked metadata of a shard directory; any fault is one ConfigError naming it."""
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
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{str(meta_path)!r} is not valid JSON; prepare the shards again.") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{where} holds shards of format {meta.get('format_version')!r}, and this dlm reads format {FORMAT_VERSION}; "
                          "prepare them again.")
    for split, info in meta["splits"].items():
        for s in info["shards"]:
            f = d / s["file"]
            if not f.exists():
                raise ConfigError(f"Shard {s['file']!r} of the {split} split is missing from {where}; copy it back or prepare the shards again.")
            size = f.stat().st_size
            if size != s["bytes"]:
                raise ConfigError(f"Shard {s['file']!r} in {where} is {size:,} bytes where metadata.json records {s['bytes']:,} "
                                  "(truncated or changed); copy it again or prepare the shards again.")
    if tokenizer_sha256(d) != meta["tokenizer"]["sha256"]:
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

    Pickles as its paths, so grain worker processes can open their own readers."""

    def __init__(self, directory: str | pathlib.Path, meta: dict, split: str):
        self.directory, self.split = str(directory), split
        self.seq_len, self.dtype = meta["seq_len"], np.dtype(meta["dtype"])
        self.paths = [str(pathlib.Path(directory) / s["file"]) for s in meta["splits"][split]["shards"]]
        self.n = meta["splits"][split]["rows"]
        self._source = None

    @property
    def source(self):
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource(self.paths)
            if len(self._source) != self.n:
                raise ConfigError(f"The {self.split} shards in {self.directory!r} hold {len(self._source)} rows where metadata.json "
                                  f"records {self.n}; prepare the shards again.")
        return self._source

    def __getstate__(self):
        return dict(self.__dict__, _source=None)  # readers are reopened where the rows are unpickled

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.seq_len)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        if isinstance(index, slice):
            index = range(*index.indices(self.n))
        index = [int(i) for i in np.asarray(index).reshape(-1)]
        if not index:
            return np.zeros((0, self.seq_len), np.int32)
        records = self.source.__getitems__(index)
        return np.frombuffer(b"".join(records), self.dtype).reshape(len(index), self.seq_len).astype(np.int32)

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
