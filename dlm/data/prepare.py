"""dlm-prepare: tokenise a corpus once into ArrayRecord shards that training streams with grain.

    python -m dlm.data.prepare --config configs/owt.yaml --out data/owt [--workers 8] [data.key=value ...]

The config's `data` section names the corpus (builtin, files, hf, tfds), the tokenizer and
seq_len. A BPE tokenizer is trained once, in this process, on the first
`--tokenizer-sample-mb` of training text, before the workers start. Worker processes tokenise
chunks of documents; this process packs them in order exactly as training in memory does
(each document followed by EOS, cut into rows of seq_len, the remainder dropped), so NELBOs do
not move, and writes one ArrayRecord record per row (uint16 tokens when the vocabulary fits,
else uint32), `--rows-per-shard` rows a shard, one shard series per split.

The directory then holds `train-NNNNN.array_record`, `validation-NNNNN.array_record`, the
tokenizer (`tokenizer.json`, plus `tokenizer.hf.json` for BPE / pretrained) and
`metadata.json` (written last): tokenizer kind, vocabulary, EOS and sha256, seq_len, dtype, and
per split the rows, tokens, documents and bytes, each shard's rows and size in bytes, and the
bytes per validation token (for bits/byte). Everything is written into a temporary folder beside
DIR and moved into place at the end (`dlm.folders.writing`): an interrupted run leaves DIR as
it was, and the next run starts over. The same config writes byte-identical shards.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import pathlib
import sys
import time

import numpy as np

from dlm.config import ConfigError, DataConfig, DataFormat, Source, TokenizerKind, load_config
from dlm.folders import writing

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
WRITER_OPTIONS = "group_size:1,uncompressed"  # one record a group: random access to any row
CHUNK_BYTES = 1 << 21  # text per worker task


def token_dtype(vocab_size: int):
    """The narrowest unsigned dtype that holds every real token id."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokenizer_sha256(directory: pathlib.Path) -> str:
    """sha256 over the tokenizer files of a directory (what a shard set and a run must agree on)."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.hf.json"):
        f = directory / name
        if f.exists():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


DEFAULT_TOKENIZER_SAMPLE_MB = 256.0


def fingerprint(cfg: DataConfig, tokenizer_sample_mb: float = DEFAULT_TOKENIZER_SAMPLE_MB) -> dict:
    """The settings that decide the shards' content (not the loader's threads): the data config,
    and for a BPE trained here the size of the text it is trained on."""
    d = dataclasses.asdict(cfg)
    for k in ("path", "loader_threads", "prefetch", "loader_workers", "markov", "sudoku", "addition", "format", "prompt_field", "response_field"):
        d.pop(k, None)
    if cfg.tokenizer == TokenizerKind.BPE:
        d["tokenizer_sample_mb"] = float(tokenizer_sample_mb)
    return json.loads(json.dumps(d, default=lambda v: v.value if hasattr(v, "value") else str(v)))


def _same_data(stored: dict | None, current: dict) -> bool:
    """Whether shards' stored fingerprint is `current`; shards written before the BPE sample
    size was recorded were made with the default."""
    if stored is None:
        return False
    if "tokenizer_sample_mb" in current and "tokenizer_sample_mb" not in stored:
        stored = dict(stored, tokenizer_sample_mb=DEFAULT_TOKENIZER_SAMPLE_MB)
    return stored == current


# ---------------------------------------------------------------------------------------------
# worker processes: a chunk of documents -> token streams per split

_TOK = None


def _init_worker(tokenizer_dir: str) -> None:
    global _TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    from dlm.data.tokenizers import load_tokenizer

    _TOK = load_tokenizer(tokenizer_dir)


def _encode_chunk(chunk):
    """[(is_validation, text)] -> per split (tokens with EOS after each document, documents, bytes)."""
    out = []
    for is_val in (False, True):
        docs = [d for v, d in chunk if v == is_val]
        if not docs:
            out.append((np.zeros(0, np.uint32), 0, 0))
            continue
        parts = []
        for ids in _TOK.encode_batch(docs):
            parts.append(np.asarray(ids, np.uint32))
            parts.append(np.asarray([_TOK.eos_id], np.uint32))
        nbytes = sum(len(d.encode("utf-8", errors="surrogateescape")) + 1 for d in docs)
        out.append((np.concatenate(parts), len(docs), nbytes))
    return out


# ---------------------------------------------------------------------------------------------
# this process: packing rows and writing shards


class ShardWriter:
    """Rows of one split -> `{split}-NNNNN.array_record` files of at most rows_per_shard rows."""

    def __init__(self, directory: pathlib.Path, split: str, seq_len: int, dtype, rows_per_shard: int):
        self.dir, self.split, self.L, self.dtype, self.per = directory, split, seq_len, dtype, rows_per_shard
        self.buffer = np.zeros(0, np.uint32)
        self.shards: list[dict] = []
        self.writer = None
        self.rows_in_shard = 0
        self.rows = self.tokens = self.documents = self.bytes = 0

    def _open(self):
        from array_record.python.array_record_module import ArrayRecordWriter

        name = f"{self.split}-{len(self.shards):05d}.array_record"
        self.shards.append({"file": name, "rows": 0})
        self.writer = ArrayRecordWriter(str(self.dir / name), WRITER_OPTIONS)
        self.rows_in_shard = 0

    def _close_shard(self):
        if self.writer is not None:
            self.writer.close()
            self.shards[-1]["rows"] = self.rows_in_shard
            self.shards[-1]["bytes"] = (self.dir / self.shards[-1]["file"]).stat().st_size
            self.writer = None

    def add(self, tokens: np.ndarray, documents: int, nbytes: int) -> None:
        self.tokens += len(tokens)
        self.documents += documents
        self.bytes += nbytes
        stream = np.concatenate([self.buffer, tokens]) if len(self.buffer) else tokens
        n = len(stream) // self.L
        for row in stream[: n * self.L].reshape(n, self.L).astype(self.dtype):
            if self.writer is None or self.rows_in_shard == self.per:
                self._close_shard()
                self._open()
            self.writer.write(row.tobytes())
            self.rows_in_shard += 1
            self.rows += 1
        self.buffer = stream[n * self.L:].copy()

    def close(self) -> dict:
        self._close_shard()
        return {"rows": self.rows, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes, "shards": self.shards}


def _chunks(docs, chunk_bytes: int):
    chunk, size = [], 0
    for is_val, d in docs:
        chunk.append((is_val, d))
        size += len(d)
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _train_tokenizer(cfg: DataConfig, directory: pathlib.Path, sample_bytes: int):
    """Build the tokenizer once (a BPE on the first `sample_bytes` of training text) and save it."""
    from dlm.data import sources
    from dlm.data.tokenizers import build_tokenizer

    sample = None
    if cfg.tokenizer == TokenizerKind.BPE:
        sample, size = [], 0
        for is_val, d in sources.stream_documents(cfg):
            if is_val:
                continue
            sample.append(d)
            size += len(d)
            if size >= sample_bytes:
                break
    tok = build_tokenizer(cfg, sample)
    tok.save(directory)
    return tok


def _inputs(cfg: DataConfig) -> list[str]:
    """The local files and folders `cfg` reads (the output may not be, hold or lie inside one)."""
    named = [*cfg.paths, *cfg.validation_paths, cfg.hf_name, cfg.pretrained_tokenizer]
    return [str(p) for p in named if p and pathlib.Path(p).exists()]


def _stored_metadata(meta_path: pathlib.Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise ConfigError(f"{str(meta_path)!r} is not a shard directory's metadata; choose another --out.")
    return meta


def prepare(cfg: DataConfig, out: str | pathlib.Path, workers: int = 2, rows_per_shard: int = 16384,
            tokenizer_sample_mb: float = DEFAULT_TOKENIZER_SAMPLE_MB, overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenise, pack and write the shards of `cfg`'s corpus as `out`; returns the metadata.

    Written by `dlm.folders.writing` (a temporary folder beside `out`, moved into place when
    complete): a non-empty `out` is replaced only with overwrite and only when dlm wrote every
    file in it; an `out` that is, holds or lies inside one of the corpus's files is refused."""
    if cfg.source in (Source.MARKOV, Source.SUDOKU, Source.ADDITION, Source.SHARDS):
        raise ConfigError(f"data.source={cfg.source.value} is not a text corpus; dlm.data.prepare tokenises builtin, files, hf or tfds sources.")
    if cfg.format != DataFormat.STREAM:
        raise ConfigError("dlm.data.prepare packs documents into rows (data.format=stream); prompt/response pairs are read in memory.")
    if workers < 1 or rows_per_shard < 1:
        raise ConfigError("--workers and --rows-per-shard must be at least 1.")
    out = pathlib.Path(out)
    meta_path = out / "metadata.json"
    if meta_path.is_file() and not overwrite:
        meta = _stored_metadata(meta_path)
        if _same_data(meta.get("data"), fingerprint(cfg, tokenizer_sample_mb)):
            print(f"{out} already holds the shards of this data config; nothing to do (--overwrite rewrites them).")
            return meta
        raise ConfigError(f"{str(out)!r} holds shards of another data config; pass --overwrite to replace them or choose another --out.")
    t0 = time.time()
    with writing(out, inputs=_inputs(cfg), overwrite=overwrite) as partial:
        meta, tok_seconds = _write_shards(cfg, partial, workers, rows_per_shard, tokenizer_sample_mb, progress)
    splits = meta["splits"]
    total = splits["train"]["tokens"] + splits["validation"]["tokens"]
    print(f"Wrote {splits['train']['rows']:,} train and {splits['validation']['rows']:,} validation rows of {cfg.seq_len} tokens "
          f"({len(splits['train']['shards'])} + {len(splits['validation']['shards'])} shards) to {out} in {time.time() - t0:.1f}s: "
          f"{total / max(tok_seconds, 1e-9):,.0f} tokens/s with {workers} worker{'s' if workers != 1 else ''}.")
    meta["seconds"] = time.time() - t0
    meta["tokenize_seconds"] = tok_seconds
    return meta


def _write_shards(cfg: DataConfig, partial: pathlib.Path, workers: int, rows_per_shard: int, tokenizer_sample_mb: float,
                  progress: bool) -> tuple[dict, float]:
    """The tokenizer, the shards and metadata.json into `partial`; (the metadata, tokenising seconds)."""
    from tqdm.auto import tqdm

    from dlm.data import sources

    tok = _train_tokenizer(cfg, partial, int(tokenizer_sample_mb * 2**20))
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(partial, s, cfg.seq_len, dtype, rows_per_shard) for s in SPLITS}
    bar = tqdm(desc="prepare", unit=" docs", disable=not progress, dynamic_ncols=True)
    t_tok = time.time()
    ctx = mp.get_context("spawn")  # no inherited tokenizer threads or JAX state in the workers
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(partial),)) as pool:
        pending = []
        chunks = _chunks(sources.stream_documents(cfg), CHUNK_BYTES)

        def drain(k):
            while len(pending) > k:
                result = pending.pop(0).get()
                for split, (tokens, docs, nbytes) in zip(SPLITS, result):
                    writers[split].add(tokens, docs, nbytes)
                    bar.update(docs)
                n_tok = writers["train"].tokens + writers["validation"].tokens
                bar.set_postfix(tok_s=f"{n_tok / max(time.time() - t_tok, 1e-9):,.0f}", rows=writers["train"].rows)

        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            drain(2 * workers)  # at most 2 chunks per worker in flight: bounded memory
        drain(0)
    bar.close()
    splits = {s: w.close() for s, w in writers.items()}
    tok_seconds = time.time() - t_tok
    for s in SPLITS:
        if splits[s]["rows"] == 0:
            raise ConfigError(f"The {s} split holds {splits[s]['tokens']} tokens, fewer than one row of data.seq_len={cfg.seq_len}; "
                              "use more text or a shorter seq_len.")
    val = splits["validation"]
    meta = {
        "format_version": FORMAT_VERSION,
        "seq_len": cfg.seq_len,
        "dtype": np.dtype(dtype).name,
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eos_id": int(tok.eos_id), "sha256": tokenizer_sha256(partial)},
        "bytes_per_token": val["bytes"] / val["tokens"],
        "splits": splits,
        "data": fingerprint(cfg, tokenizer_sample_mb),
    }
    (partial / "metadata.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return meta, tok_seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Tokenise a corpus into ArrayRecord shards for data.source=shards.",
                                     epilog="Overrides: dotted data keys, e.g. data.tokenizer=bpe data.seq_len=1024")
    parser.add_argument("--config", required=True, help="YAML config whose data section names the corpus.")
    parser.add_argument("--out", required=True, help="Directory for the shards (train with data.source=shards data.path=DIR).")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)), help="Tokenising processes.")
    parser.add_argument("--rows-per-shard", type=int, default=16384)
    parser.add_argument("--tokenizer-sample-mb", type=float, default=256.0, help="Training text a BPE tokenizer is trained on.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace shards of another data config (only a folder dlm wrote; any other file blocks it).")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        prepare(cfg.data, args.out, args.workers, args.rows_per_shard, args.tokenizer_sample_mb, args.overwrite,
                progress=not args.no_progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
