"""Tokenize -> pack into seq_len rows with EOS separators -> deterministic, resumable batches.

Rows are an int32 array [N, L] (data.format=stream), or with data.format=pairs a dict
{"tokens": [N, L] int32, "given": [N, L] bool}: `given` marks the condition (the prompt, or
any set of positions), which the objectives never mask and never score.

The order of rows is a seeded grain shuffle (a new permutation every epoch). Global batch k holds
rows order[k*B : (k+1)*B]; process p of n reads only its contiguous slice of that batch, so the
global batch is the same for any process count. The iterator's state goes into checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import sys
from typing import Callable

import numpy as np

from dlm.config import ConfigError, DataConfig, DataFormat, Source
from dlm.data import sources
from dlm.data.synthetic import MarkovChain
from dlm.data.tokenizers import SymbolTokenizer, build_tokenizer, letters, load_tokenizer


def pack(token_docs, eos_id: int, seq_len: int) -> np.ndarray:
    """Concatenate documents, each followed by EOS, and cut into [N, seq_len] rows (remainder dropped)."""
    parts = []
    for d in token_docs:
        parts.append(np.asarray(d, np.int32))
        parts.append(np.asarray([eos_id], np.int32))
    stream = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def pair_rows(tok, pairs, seq_len: int, where: str) -> dict:
    """Prompt/response records -> {"tokens", "given"} [N, seq_len]: prompt, response, EOS, then EOS
    padding (the LLaDA SFT layout: the padding is part of the response, so the model learns where
    an answer ends). A record that does not fit, or has no response, is one error."""
    if tok.eos_id < 0:
        raise ConfigError(f"The {tok.kind} tokenizer has no EOS token, which pairs rows end with; use the byte, bpe or a pretrained tokenizer.")
    tokens = np.full((len(pairs), seq_len), tok.eos_id, np.int32)
    given = np.zeros((len(pairs), seq_len), bool)
    for i, (prompt, response) in enumerate(pairs):
        p, r = tok.encode(prompt), tok.encode(response)
        if len(r) == 0:
            raise ConfigError(f"Record {i + 1} of {where} has an empty response; every prompt/response pair needs a response to train on.")
        if len(p) >= seq_len:
            raise ConfigError(f"Record {i + 1} of {where} has a prompt of {len(p)} tokens, which leaves no room for a response in "
                              f"data.seq_len={seq_len}; raise data.seq_len or shorten the prompt.")
        if len(p) + len(r) + 1 > seq_len:
            raise ConfigError(f"Record {i + 1} of {where} needs {len(p) + len(r) + 1} tokens (prompt, response and EOS), more than "
                              f"data.seq_len={seq_len}; raise data.seq_len or shorten the record.")
        tokens[i, : len(p)], tokens[i, len(p): len(p) + len(r)] = p, r
        given[i, : len(p)] = True
    return {"tokens": tokens, "given": given}


def prefix_pairs(tokens: np.ndarray, prompt_length: int) -> dict:
    """Pairs rows whose condition is the first `prompt_length` positions of every row."""
    given = np.zeros(tokens.shape, bool)
    given[:, :prompt_length] = True
    return {"tokens": tokens, "given": given}


def split_batch(rows):
    """(tokens, given | None) of rows or a batch: an array, or a pairs dict (host or device arrays)."""
    return (rows["tokens"], rows["given"]) if isinstance(rows, dict) else (rows, None)


def row_tokens(rows) -> np.ndarray:
    """The tokens of rows (an array, or a pairs dict)."""
    return split_batch(rows)[0]


def take_rows(rows, index):
    """rows[index] for an array or a pairs dict."""
    return {k: v[index] for k, v in rows.items()} if isinstance(rows, dict) else rows[index]


def num_rows(rows) -> int:
    return len(row_tokens(rows))


def scored_tokens(rows) -> np.ndarray:
    """The tokens the objectives score (all of them, or the responses of pairs rows), flattened."""
    return rows["tokens"][~rows["given"]] if isinstance(rows, dict) else np.asarray(rows).reshape(-1)


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
    """Entropy (bits/symbol) of the empirical unigram distribution of the scored tokens of the rows."""
    counts = np.bincount(scored_tokens(rows), minlength=vocab_size).astype(np.float64)
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
    if cfg.source == Source.ADDITION:
        return addition_data(cfg, workdir if leader else None)
    if cfg.source == Source.SHARDS:
        from dlm.data.shards import open_shards

        return Data(**open_shards(cfg, workdir, leader))
    if cfg.format == DataFormat.PAIRS:
        return text_pairs_data(cfg, workdir, leader, barrier)

    train_docs, val_docs = sources.load_documents(cfg)
    tok = shared_tokenizer(cfg, train_docs, workdir, leader, barrier)
    train = pack(tok.encode_batch(train_docs), tok.eos_id, cfg.seq_len)
    val = pack(tok.encode_batch(val_docs), tok.eos_id, cfg.seq_len)
    if len(val) == 0:
        raise ConfigError(f"The validation split holds fewer than data.seq_len={cfg.seq_len} tokens; use more validation text or a shorter seq_len.")
    nbytes = sum(len(d.encode("utf-8", errors="surrogateescape")) + 1 for d in val_docs)
    ntok = sum(len(x) + 1 for x in tok.encode_batch(val_docs))
    desc = (f"{cfg.source.value} corpus: {len(train_docs)} train docs ({train.size / 1e6:.2f}M tokens, {len(train)} rows), "
            f"{len(val_docs)} validation docs ({val.size / 1e3:.1f}k tokens), vocab {tok.vocab_size}")
    return Data(tok, train, val, nbytes / ntok, None, desc)


def shared_tokenizer(cfg: DataConfig, train_docs, workdir, leader: bool, barrier):
    """The run's tokenizer: the leader reloads it from the workdir or builds it (a BPE is trained
    on `train_docs`) and saves it; after `barrier()` the other processes read the leader's."""
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
    return tok


def text_pairs_data(cfg: DataConfig, workdir, leader: bool, barrier) -> Data:
    """Prompt/response records of JSONL files or an HF dataset, one per row (`pair_rows`)."""
    train_pairs, val_pairs = sources.load_pairs(cfg)
    tok = shared_tokenizer(cfg, [p + r for p, r in train_pairs], workdir, leader, barrier)
    train = pair_rows(tok, train_pairs, cfg.seq_len, "the training pairs")
    val = pair_rows(tok, val_pairs, cfg.seq_len, "the validation pairs")
    response_docs = [r for _, r in val_pairs]
    nbytes = sum(len(r.encode("utf-8", errors="surrogateescape")) + 1 for r in response_docs)
    ntok = int((~val["given"]).sum())  # the response tokens with their EOS padding
    desc = (f"{cfg.source.value} prompt/response pairs: {len(train_pairs)} train, {len(val_pairs)} validation, vocab {tok.vocab_size}; "
            f"loss and NELBO on responses only")
    return Data(tok, train, val, nbytes / ntok, None, desc)


def addition_data(cfg: DataConfig, workdir: pathlib.Path | None) -> Data:
    """Endless uniform addition problems (row k of a seed is always the same); held-out problems of
    another seed for validation. format=pairs makes the operands the condition."""
    from dlm.tasks import addition

    ac = cfg.addition
    layout = addition.Layout(ac.digits)
    tok = SymbolTokenizer(addition.ALPHABET)
    pairs = cfg.format == DataFormat.PAIRS

    def as_rows(a, b):
        tokens = addition.rows(a, b)
        return prefix_pairs(tokens, layout.prompt_length) if pairs else tokens

    def draw_rows(seed, rows, seq_len):
        a = np.empty((len(rows), ac.digits), np.int64)
        b = np.empty_like(a)
        for j, r in enumerate(rows):
            a[j], b[j] = (x[0] for x in addition.problems(layout, 1, np.random.default_rng([seed, int(r)])))
        return as_rows(a, b)

    val = as_rows(*addition.problems(layout, ac.validation, np.random.default_rng(ac.seed + 1_000_003)))
    if workdir is not None:
        tok.save(workdir)
    desc = f"Addition of two {ac.digits}-digit numbers (least significant digit first), {cfg.format.value} rows, {ac.validation} held-out problems"
    return Data(tok, None, val, 1.0, None, desc, draw_rows=draw_rows, unit="bits/digit")


def sudoku_data(cfg: DataConfig, workdir: pathlib.Path | None) -> Data:
    """Solved grids as rows of n * n cell tokens: training rows are random symmetries of
    `base_grids` generated grids (row k of seed s is always the same), validation rows are
    held-out grids of another seed."""
    from dlm.tasks import sudoku

    sc = cfg.sudoku
    geo = sudoku.Geometry(sc.size)
    pairs = cfg.format == DataFormat.PAIRS
    tok = SymbolTokenizer("".join(str(d) for d in range(1, sc.size + 1)) + ("." if pairs else ""))
    base = sudoku.cached_grids(geo, sc.seed, sc.base_grids, sc.cache_dir)

    def as_row(grid, rng):
        if not pairs:
            return sudoku.encode(grid, tok.mask_id)
        return sudoku.encode_pair(geo, grid, rng, blank_id=sc.size)

    def stack(rows):
        return prefix_pairs(np.stack(rows), geo.cells) if pairs else np.stack(rows)

    held_out = sudoku.cached_grids(geo, sc.seed + 1_000_003, sc.validation, sc.cache_dir)
    val = stack([as_row(g, np.random.default_rng([sc.seed + 1_000_003, i])) for i, g in enumerate(held_out)])

    def draw_rows(seed, rows, seq_len):
        out = []
        for r in rows:
            rng = np.random.default_rng([seed, int(r)])
            out.append(as_row(sudoku.augment(geo, base[rng.integers(len(base))], rng), rng))
        return stack(out)

    if workdir is not None:
        tok.save(workdir)
    desc = (f"Sudoku {sc.size}x{sc.size}: random symmetries of {len(base)} solved grids, {len(held_out)} held-out grids"
            + (" (pairs: a random-givens puzzle, then its grid)" if pairs else ""))
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
            if num_rows(data.train_rows) < global_batch:
                raise ConfigError(f"The training data holds {num_rows(data.train_rows)} rows of {seq_len} tokens, fewer than one batch "
                                  f"of train.batch_size={global_batch}; add data or lower the batch size.")
            import grain  # imported where used: the device check's image has no grain

            self.order = grain.MapDataset.range(num_rows(data.train_rows)).seed(seed).shuffle().repeat()

    def portable(self) -> "_Batches":
        """A copy holding only what reading needs (the training rows), to send to worker processes."""
        out = copy.copy(self)
        out.data = dataclasses.replace(self.data, tokenizer=None, val_rows=None, markov=None)
        return out

    def __call__(self, k: int) -> np.ndarray:
        rows = np.arange(k * self.B + self.offset, k * self.B + self.offset + self.b)
        if self.data.train_rows is None:
            return self.data.draw_rows(self.seed, rows, self.seq_len)
        return take_rows(self.data.train_rows, [self.order[int(r)] for r in rows])


def train_iterator(data: Data, seq_len: int, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                   threads: int = 1, prefetch: int = 2, workers: int = 0):
    """An iterator of this process's [B / process_count, seq_len] int32 batches (pairs: dicts of
    tokens and given), read `prefetch` batches ahead; get_state/set_state ({"next_index": k}, the
    global batch index) resume it. workers=0: grain reads with `threads` threads in this
    process; workers > 0 (shards only): that many spawned processes read whole batches."""
    batches = _Batches(data, seq_len, global_batch, seed, process_index, process_count)
    if workers:
        return ProcessBatches(batches, workers, prefetch)
    import grain

    ds = grain.MapDataset.range(sys.maxsize).map(batches)
    return iter(ds.to_iter_dataset(read_options=grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))


class LoaderError(RuntimeError):
    """The batch reader cannot go on (the message says why and what to do)."""


_WORKER_BATCHES = None


def _worker_init(batches, parent: int) -> None:
    import signal
    import threading

    global _WORKER_BATCHES
    _WORKER_BATCHES = batches
    # Ctrl-C in the terminal reaches the whole process group: it is the trainer's to handle (it
    # checkpoints and stops). SIGTERM stays: the executor ends its workers with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A reader outlives no trainer: once the parent is gone (killed, say) the worker exits."""
    import os
    import time

    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _worker_batch(k: int):
    return _WORKER_BATCHES(k)


class ProcessBatches:
    """Batches k, k + 1, ... of a random-access batch map (a pure function of k), computed by
    worker processes `prefetch` ahead and yielded in order. The state is the next index alone,
    so a checkpoint resumes under any worker count (and a thread-read iterator's checkpoint
    resumes here, and back).

    A worker that dies (the OOM killer, a signal) is noticed at once: the workers are started
    again and batch k is read again, so training goes on with the same batches. A batch that
    takes down a worker `RESTARTS` times is a LoaderError. Workers exit with their parent."""

    RESTARTS = 3

    def __init__(self, batches: _Batches, workers: int, prefetch: int):
        import collections

        self.batches, self.workers = batches.portable(), workers
        self.prefetch, self.next_index, self.pending = max(prefetch, workers), 0, collections.deque()
        self.deaths = collections.Counter()
        self.pool = self._start()

    def _start(self):
        import multiprocessing as mp
        import os
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                   initargs=(self.batches, os.getpid()))

    def __iter__(self):
        return self

    def __next__(self):
        from concurrent.futures.process import BrokenProcessPool

        while True:
            try:
                while len(self.pending) < self.prefetch:
                    self.pending.append(self.pool.submit(_worker_batch, self.next_index + len(self.pending)))
                out = self.pending[0].result()
            except BrokenProcessPool:
                self._restart()
                continue
            self.pending.popleft()
            self.next_index += 1
            return out

    def _restart(self) -> None:
        k = self.next_index
        self.deaths[k] += 1
        self.close()
        if self.deaths[k] >= self.RESTARTS:
            raise LoaderError(f"A loader worker process died {self.deaths[k]} times while reading batch {k} "
                              f"(data.loader_workers={self.workers}); give the workers more memory, lower data.prefetch, "
                              "or read with threads (data.loader_workers=0).")
        print(f"A loader worker process died; started {self.workers} new ones, reading from batch {k} again.",
              file=sys.stderr, flush=True)
        self.pool = self._start()

    def get_state(self) -> dict:
        return {"next_index": self.next_index}

    def set_state(self, state: dict) -> None:
        for f in self.pending:  # batches read for the old position are dropped
            f.cancel()
        self.pending.clear()
        self.next_index = int(state["next_index"])

    def close(self) -> None:
        for f in self.pending:
            f.cancel()
        self.pending.clear()
        processes = list((getattr(self.pool, "_processes", None) or {}).values())  # no public terminate
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:  # batches in flight are not waited for (a reader stuck on a read would hang the exit)
            if p.is_alive():
                p.terminate()


def windows(rows, n: int):
    """n evenly spaced rows (all of them if there are fewer), in memory: evaluation windows."""
    if n >= num_rows(rows):
        return rows[:] if hasattr(rows, "paths") else rows
    return take_rows(rows, np.linspace(0, num_rows(rows) - 1, n).astype(int))


def validation_windows(data: Data, n: int):
    """n evenly spaced validation rows (all of them if there are fewer)."""
    return windows(data.val_rows, n)
