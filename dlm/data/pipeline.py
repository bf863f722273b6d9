"""Tokenize -> pack into seq_len rows with EOS separators -> deterministic, resumable batches.

The order of rows is a seeded grain shuffle (a new permutation every epoch). Global batch k holds
rows order[k*B : (k+1)*B]; process p of n reads only its contiguous slice of that batch, so the
global batch is the same for any process count. The iterator's state goes into checkpoints.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Callable

import grain
import numpy as np

from dlm.config import ConfigError, DataConfig, Source
from dlm.data import sources
from dlm.data.synthetic import MarkovChain
from dlm.data.tokenizers import SymbolTokenizer, build_tokenizer, letters, load_tokenizer

_READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def pack(token_docs, eos_id: int, seq_len: int) -> np.ndarray:
    """Concatenate documents, each followed by EOS, and cut into [N, seq_len] rows (remainder dropped)."""
    parts = []
    for d in token_docs:
        parts.append(np.asarray(d, np.int32))
        parts.append(np.asarray([eos_id], np.int32))
    stream = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


@dataclasses.dataclass
class Data:
    """Packed data and what is needed to report it: rows [N, L], tokenizer, bytes per token."""

    tokenizer: object
    train_rows: np.ndarray | None  # None: drawn fresh by draw_rows
    val_rows: np.ndarray
    bytes_per_token: float
    markov: MarkovChain | None = None
    description: str = ""
    draw_rows: Callable | None = None  # (seed, row indices, seq_len) -> rows [n, seq_len]: endless synthetic data
    unit: str = "bits/byte"  # what NELBOs are reported in

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def unigram_entropy_bits(rows: np.ndarray, vocab_size: int) -> float:
    """Entropy (bits/symbol) of the empirical unigram distribution of the rows."""
    counts = np.bincount(rows.reshape(-1), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def load_data(cfg: DataConfig, workdir: pathlib.Path | None = None, seed: int = 0, leader: bool = True,
              barrier=None) -> Data:
    """Build the tokenizer (or reload the one saved in `workdir`) and pack both splits.

    With several processes, only the leader (process 0) builds the tokenizer (a BPE is trained
    once) and writes it to the shared workdir; `barrier()` is then called on every process, and
    the others read the leader's tokenizer after it."""
    if cfg.source == Source.MARKOV:
        chain = MarkovChain.random(cfg.markov)
        tok = SymbolTokenizer(letters(cfg.markov.num_states))
        val = chain.sample_rows(seed + 1_000_003, np.arange(cfg.markov.num_validation), cfg.seq_len)
        train = None
        if cfg.markov.num_train:
            train = chain.sample_rows(seed, np.arange(cfg.markov.num_train), cfg.seq_len)
        desc = (f"Markov source: K={chain.K}, entropy {chain.entropy_per_token(cfg.seq_len):.4f} nats/token "
                f"at length {cfg.seq_len}")
        if workdir is not None and leader:
            tok.save(workdir)
        return Data(tok, train, val, 1.0, chain, desc, draw_rows=chain.sample_rows, unit="bits/token")
    if cfg.source == Source.SUDOKU:
        return sudoku_data(cfg, workdir if leader else None)

    train_docs, val_docs = sources.load_documents(cfg)
    tok = None
    if leader:
        tok = load_tokenizer(workdir) if workdir is not None else None
        if tok is None:
            tok = build_tokenizer(cfg, train_docs)
            if workdir is not None:
                tok.save(workdir)
    if barrier is not None:
        barrier()
    if tok is None:
        tok = load_tokenizer(workdir) if workdir is not None else None
        if tok is None:
            raise ConfigError(f"Process 0 wrote no tokenizer into {str(workdir)!r}; the workdir must be storage that every process shares.")
    train = pack(tok.encode_batch(train_docs), tok.eos_id, cfg.seq_len)
    val = pack(tok.encode_batch(val_docs), tok.eos_id, cfg.seq_len)
    if len(val) == 0:
        raise ConfigError(f"The validation split holds fewer than data.seq_len={cfg.seq_len} tokens; use more validation text or a shorter seq_len.")
    nbytes = sum(len(d.encode("utf-8", errors="surrogateescape")) + 1 for d in val_docs)
    ntok = sum(len(x) + 1 for x in tok.encode_batch(val_docs))
    desc = (f"{cfg.source.value} corpus: {len(train_docs)} train docs ({train.size / 1e6:.2f}M tokens, {len(train)} rows), "
            f"{len(val_docs)} validation docs ({val.size / 1e3:.1f}k tokens), vocab {tok.vocab_size}")
    return Data(tok, train, val, nbytes / ntok, None, desc)


def sudoku_data(cfg: DataConfig, workdir: pathlib.Path | None) -> Data:
    """Solved grids as rows of n * n cell tokens: training rows are random symmetries of
    `base_grids` generated grids (row k of seed s is always the same), validation rows are
    held-out grids of another seed."""
    from dlm.tasks import sudoku

    sc = cfg.sudoku
    geo = sudoku.Geometry(sc.size)
    tok = SymbolTokenizer("".join(str(d) for d in range(1, sc.size + 1)))
    base = sudoku.cached_grids(geo, sc.seed, sc.base_grids, sc.cache_dir)
    val = sudoku.encode(sudoku.cached_grids(geo, sc.seed + 1_000_003, sc.validation, sc.cache_dir), tok.mask_id)

    def draw_rows(seed, rows, seq_len):
        out = np.empty((len(rows), seq_len), np.int32)
        for j, r in enumerate(rows):
            rng = np.random.default_rng([seed, int(r)])
            out[j] = sudoku.encode(sudoku.augment(geo, base[rng.integers(len(base))], rng), tok.mask_id)
        return out

    if workdir is not None:
        tok.save(workdir)
    desc = f"Sudoku {sc.size}x{sc.size}: random symmetries of {len(base)} solved grids, {len(val)} held-out grids"
    return Data(tok, None, val, 1.0, None, desc, draw_rows=draw_rows, unit="bits/cell")


class _Batches:
    """Random-access map: global batch index k -> this process's rows of batch k."""

    def __init__(self, data: Data, seq_len: int, global_batch: int, seed: int, process_index: int, process_count: int):
        if global_batch % process_count:
            raise ConfigError(f"train.batch_size={global_batch} must be divisible by the {process_count} processes.")
        self.data, self.seq_len, self.B, self.seed = data, seq_len, global_batch, seed
        self.b = global_batch // process_count
        self.offset = process_index * self.b
        if data.train_rows is not None:
            if len(data.train_rows) < global_batch:
                raise ConfigError(f"The training data holds {len(data.train_rows)} rows of {seq_len} tokens, fewer than one batch "
                                  f"of train.batch_size={global_batch}; add data or lower the batch size.")
            self.order = grain.MapDataset.range(len(data.train_rows)).seed(seed).shuffle().repeat()

    def __call__(self, k: int) -> np.ndarray:
        rows = np.arange(k * self.B + self.offset, k * self.B + self.offset + self.b)
        if self.data.train_rows is None:
            return self.data.draw_rows(self.seed, rows, self.seq_len)
        return self.data.train_rows[[self.order[int(r)] for r in rows]]


def train_iterator(data: Data, seq_len: int, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1):
    """A grain iterator of this process's [B / process_count, seq_len] int32 batches; get_state/set_state resume it."""
    ds = grain.MapDataset.range(sys.maxsize).map(_Batches(data, seq_len, global_batch, seed, process_index, process_count))
    return iter(ds.to_iter_dataset(read_options=_READ))


def validation_windows(data: Data, n: int) -> np.ndarray:
    """n evenly spaced validation rows (all of them if there are fewer)."""
    rows = data.val_rows
    if n >= len(rows):
        return rows
    return rows[np.linspace(0, len(rows) - 1, n).astype(int)]
