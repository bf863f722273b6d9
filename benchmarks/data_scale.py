"""Data at pretraining scale: prepare a >= 2 GB corpus into shards, then train from them.

    python benchmarks/data_scale.py --out benchmarks/results/data_scale.json [--gb 2] [--workdir /tmp/dlm-data-scale]

1. Writes a synthetic corpus of --gb GB of text (JSONL, documents of Zipf-distributed words of a
   random 20k-word lexicon, every document different) and a 20 MB one the same way.
2. Runs `python -m dlm.data.prepare` on each with 2 workers (a BPE of data.bpe_vocab_size
   tokens trained on the first 64 MB): prepare_tokens_per_second = tokens written / wall time
   of the whole command (tokenizer training included).
3. Times the grain loader alone over the large shards (train_iterator, the trainer's batches:
   configs/bench.yaml's 16 x 512): loader_tokens_per_second, the median of 5 runs of 200 batches.
4. Trains configs/bench.yaml for --steps steps from each shard set in its own process and reads
   that process's peak RSS from the kernel (wait4): peak_rss_bytes_large / _small, and
   train_tokens_per_second from metrics.jsonl (the median of the logged rates after the first).

Goals: loader >= 10x the trainer's consumption; training peak RSS on the large corpus within
300 MB of the small one (the corpus stays on disk: only the rows in flight are in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

from common import ROOT, write_json

MB = 2**20


def write_corpus(directory: pathlib.Path, total_bytes: int, seed: int, file_bytes: int = 256 * MB) -> int:
    """JSONL files of distinct documents; returns the text bytes written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = 1 / np.arange(1, 27)
    freq /= freq.sum()
    lexicon = np.array(["".join(rng.choice(letters, rng.integers(1, 10), p=freq)) for _ in range(20000)], dtype=object)
    zipf = 1 / np.arange(1, 20001) ** 1.1
    zipf /= zipf.sum()
    written, part, f, in_file = 0, 0, None, 0
    while written < total_bytes:
        if f is None or in_file >= file_bytes:
            if f is not None:
                f.close()
            f = (directory / f"part{part:03d}.jsonl").open("w")
            part, in_file = part + 1, 0
        words = lexicon[rng.choice(len(lexicon), size=1_000_000, p=zipf)]
        lengths = rng.integers(50, 1500, size=2000)  # words per document
        start = 0
        lines = []
        for n in lengths:
            if start + n > len(words):
                break
            text = " ".join(words[start:start + n]) + "."
            start += n
            lines.append(json.dumps({"text": text}))
            written += len(text)
        block = "\n".join(lines) + "\n"
        f.write(block)
        in_file += len(block)
    f.close()
    return written


def run_prepare(corpus: pathlib.Path, out: pathlib.Path, workers: int) -> dict:
    paths = sorted(str(p) for p in corpus.glob("*.jsonl"))
    cmd = [sys.executable, "-m", "dlm.data.prepare", "--config", str(ROOT / "configs/bench.yaml"), "--out", str(out),
           "--workers", str(workers), "--tokenizer-sample-mb", "64", "--no-progress", "--overwrite",
           "data.source=files", f"data.paths={json.dumps(paths)}", "data.tokenizer=bpe"]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    seconds = time.time() - t0
    meta = json.loads((out / "metadata.json").read_text())
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds, "rows": meta["splits"]["train"]["rows"],
            "shard_bytes": sum(sh["bytes"] for s in meta["splits"].values() for sh in s["shards"])}


def shard_overrides(shards: pathlib.Path) -> list[str]:
    return ["data.source=shards", f"data.path={shards}", "data.tokenizer=bpe"]


def loader_rate(shards: pathlib.Path, batches: int = 200, repeats: int = 5) -> float:
    from dlm.config import load_config
    from dlm.data.pipeline import load_data, train_iterator

    cfg = load_config(ROOT / "configs/bench.yaml", shard_overrides(shards))
    data = load_data(cfg.data)
    rates = []
    for r in range(repeats):
        it = train_iterator(data, cfg.data.seq_len, cfg.train.batch_size, seed=r, threads=cfg.data.loader_threads,
                            prefetch=cfg.data.prefetch)
        next(it)
        t0, n = time.perf_counter(), 0
        for _ in range(batches):
            n += next(it).size
        rates.append(n / (time.perf_counter() - t0))
    return float(np.median(rates))


def train_run(shards: pathlib.Path, workdir: pathlib.Path, steps: int) -> dict:
    """Train in a child process; its peak RSS comes from the kernel's accounting of that child."""
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/bench.yaml"), f"workdir={workdir}",
           *shard_overrides(shards), f"train.steps={steps}", "train.log_every=5", "train.eval_windows=32", "train.progress=false",
           f"train.checkpoint_every={steps}", "train.warmup_steps=5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"training from {shards} failed with exit code {proc.returncode}")
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_second"] for r in records if r.get("split") == "train" and "tokens_per_second" in r][1:]
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "tokens_per_second": float(np.median(rates))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--gb", type=float, default=2.0, help="size of the large corpus (GB of text)")
    parser.add_argument("--small-mb", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--workdir", default="/tmp/dlm-data-scale", help="scratch space (corpus, shards, runs); kept for reuse")
    args = parser.parse_args()
    work = pathlib.Path(args.workdir)
    large_bytes, small_bytes = int(args.gb * 1e9), int(args.small_mb * 1e6)

    sizes = {}
    for name, size, seed in (("large", large_bytes, 0), ("small", small_bytes, 1)):
        corpus = work / f"corpus_{name}"
        stamp = corpus / "bytes.txt"
        if not stamp.exists() or int(stamp.read_text()) < size:
            shutil.rmtree(corpus, ignore_errors=True)
            t0 = time.time()
            stamp_bytes = write_corpus(corpus, size, seed)
            stamp.write_text(str(stamp_bytes))
            print(f"wrote the {name} corpus: {stamp_bytes / 1e9:.3f} GB of text in {time.time() - t0:.0f}s", flush=True)
        sizes[name] = int(stamp.read_text())

    prep = {name: run_prepare(work / f"corpus_{name}", work / f"shards_{name}", args.workers) for name in ("large", "small")}
    for name, p in prep.items():
        print(f"prepare {name}: {p['tokens']:,} tokens in {p['seconds']:.0f}s = {p['tokens_per_second']:,.0f} tokens/s", flush=True)
    loader = loader_rate(work / "shards_large")
    print(f"grain loader alone: {loader:,.0f} tokens/s", flush=True)
    runs = {name: train_run(work / f"shards_{name}", work / f"run_{name}", args.steps) for name in ("large", "small")}
    for name, r in runs.items():
        print(f"train {name}: {r['tokens_per_second']:,.0f} tokens/s, peak RSS {r['peak_rss_bytes'] / MB:,.0f} MB", flush=True)
    train_rate = runs["large"]["tokens_per_second"]
    record = {
        "corpus_bytes": sizes["large"],
        "prepare_tokens_per_second": prep["large"]["tokens_per_second"],
        "loader_tokens_per_second": loader,
        "train_tokens_per_second": train_rate,
        "peak_rss_bytes_large": runs["large"]["peak_rss_bytes"],
        "peak_rss_bytes_small": runs["small"]["peak_rss_bytes"],
        "details": {
            "small_corpus_bytes": sizes["small"], "workers": args.workers, "steps": args.steps, "config": "configs/bench.yaml",
            "prepare": prep, "train": runs,
            "loader_over_train": loader / train_rate,
            "rss_difference_bytes": runs["large"]["peak_rss_bytes"] - runs["small"]["peak_rss_bytes"],
            "goals": {"loader_at_least_10x_train": loader >= 10 * train_rate,
                      "rss_within_300MB": runs["large"]["peak_rss_bytes"] - runs["small"]["peak_rss_bytes"] <= 300 * MB},
        },
    }
    write_json(args.out, record)


if __name__ == "__main__":
    main()
