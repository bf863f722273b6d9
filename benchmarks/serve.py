"""Load test of the OpenAI-compatible server on localhost against one-request-at-a-time decoding.

    python benchmarks/serve.py --out benchmarks/results/serve.json [--config configs/quickstart.yaml | --workdir W]
        [--clients 1,8,32] [--requests 8,32,96] [--max-tokens 64] [--prompt-lengths 8,120]

The model (a run's, or a freshly initialised one of --config) is served in this process
(uvicorn in a thread, the engine in its own); clients are `openai.AsyncOpenAI` streams-off
completions with prompts of mixed lengths (token ids, uniform in --prompt-lengths), greedy, the
parallel decoder with blocks of 32, threshold 0.9 and the dual cache. For 1, 8 and 32 concurrent
clients it records completed tokens per second, p50 / p99 latency (the median of --repeats runs)
and failed requests (all runs); the
baseline decodes the same requests one at a time with dlm.generate() (length buckets as the
engine's, so it compiles once per bucket too; compilation excluded). The engine is warmed up first
(every length and batch bucket the requests reach) and the compilations after warm-up are counted.

Throughput on a CPU is bounded by FLOPs: `batch_scaling` decodes the same requests in process
at batch 1 and at the largest batch and reports the seconds per row-pass of each; their ratio is
the most that batching can gain on this machine for this model.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import pathlib
import statistics
import sys
import time

import numpy as np

from common import ROOT  # noqa: F401  (puts the repository on sys.path)


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else None


async def load(url: str, requests: list, clients: int, max_tokens: int, extra: dict, time_limit: float) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    queue = list(enumerate(requests))
    latencies, tokens, failed = [], 0, 0
    start = time.perf_counter()

    async def worker():
        nonlocal tokens, failed
        while queue and time.perf_counter() - start < time_limit:
            _, prompt = queue.pop(0)
            t0 = time.perf_counter()
            try:
                r = await client.completions.create(model="dlm", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                    extra_body=extra)
                tokens += r.usage.completion_tokens
                latencies.append(time.perf_counter() - t0)
            except Exception as e:  # counted, and the first one shown
                if not failed:
                    print(f"  a request failed: {type(e).__name__}: {e}", file=sys.stderr)
                failed += 1

    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return {"clients": clients, "requests": len(latencies) + failed, "failed": failed, "completed_tokens": tokens,
            "seconds": wall, "tokens_per_second": tokens / wall, "p50_latency": percentile(latencies, 50),
            "p99_latency": percentile(latencies, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="configs/quickstart.yaml", help="A config whose model is initialised at random.")
    parser.add_argument("--workdir", default=None, help="A trained run to serve instead.")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", default="8,32,96", help="Requests at each client count.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-lengths", default="8,120", help="Prompt lengths are uniform in [lo, hi].")
    parser.add_argument("overrides", nargs="*", help="model.* / data.* keys over --config, e.g. model.d_model=64 model.num_layers=2")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each client count; the median throughput's run is kept.")
    parser.add_argument("--time-limit", type=float, default=300.0, help="Seconds per client count (no new requests after).")
    args = parser.parse_args()


    import dlm
    from dlm.config import DecodeCache, Sampler, load_config
    from dlm.sampling import generate as gen
    from dlm.serve.server import Server, serve_in_thread

    if args.workdir:
        model, cfg = dlm.restore(args.workdir)
        tok = dlm.load_tokenizer(args.workdir)
        name = args.workdir
    else:
        cfg = load_config(ROOT / args.config, args.overrides)
        model = dlm.build_model(cfg, seed=0)
        from dlm.data.tokenizers import ByteTokenizer

        tok = ByteTokenizer()
        name = " ".join([args.config, *args.overrides]) + " (random init)"
    context = cfg.data.seq_len
    dc = dataclasses.replace(cfg.sampling.decode, block_length=32, tau=0.9, cache=DecodeCache.DUAL)
    clients = [int(c) for c in args.clients.split(",")]
    counts = [int(c) for c in args.requests.split(",")]
    lo, hi = (int(v) for v in args.prompt_lengths.split(","))
    G = args.max_tokens
    rng = np.random.default_rng(0)
    V = min(model.vocab_size, getattr(tok, "vocab_size", model.vocab_size))
    pool = [rng.integers(0, min(V, 256), int(rng.integers(lo, hi + 1))).tolist() for _ in range(max(counts))]
    buckets = [b for b in (64, 128, 192, 256, 384, 512, 1024, 2048) if b < context] + [context]
    batches = [1, 2, 4, 8, 16, 32]

    server = Server(model, tok, name="dlm", context=context, decode=dc, temperature=0.0, length_buckets=buckets,
                    batch_buckets=batches, float64=cfg.sampling.float64, diffusion=cfg.diffusion)
    engine = server.engine
    used = sorted({engine.length_bucket(len(p) + G) for p in pool})
    t0 = time.perf_counter()
    engine.warmup(dc, lengths=used, batches=batches)
    warmup_seconds = time.perf_counter() - t0
    print(f"{name}: warm-up compiled {engine.compilations} programs in {warmup_seconds:.1f}s (length buckets {used})")

    # baseline: the same requests one at a time through dlm.generate (programs compiled first)
    sc = dataclasses.replace(cfg.sampling, sampler=Sampler.PARALLEL, decode=dc, temperature=0.0, length_buckets=used)
    base_requests = pool[: counts[-1] if len(counts) else 32][:32]
    for p in base_requests:  # compile every bucket the requests reach
        gen.generate(model, cfg=sc, prompts=[p], length=len(p) + G, eos_id=getattr(tok, "eos_id", -1))  # compiles
    eos = getattr(tok, "eos_id", -1)

    def completed(tokens):  # what the server's usage counts: the tokens up to EOS, EOS included
        stop = np.flatnonzero(np.asarray(tokens) == eos) if eos >= 0 else []
        return int(stop[0]) + 1 if len(stop) else len(tokens)

    base_runs = []
    for _ in range(args.repeats):
        lat, count, t0 = [], 0, time.perf_counter()
        for p in base_requests:
            t1 = time.perf_counter()
            out = gen.generate(model, cfg=sc, prompts=[p], length=len(p) + G, eos_id=eos)["tokens"][0, len(p):]
            lat.append(time.perf_counter() - t1)
            count += completed(out)
        wall = time.perf_counter() - t0
        base_runs.append({"requests": len(base_requests), "tokens_per_second": count / wall,
                          "p50_latency": percentile(lat, 50), "p99_latency": percentile(lat, 99)})
    base_runs.sort(key=lambda r: r["tokens_per_second"])
    baseline = base_runs[len(base_runs) // 2]
    baseline["tokens_per_second_runs"] = [r["tokens_per_second"] for r in base_runs]
    print(f"one at a time (dlm.generate): {baseline['tokens_per_second']:.0f} tokens/s, p50 {baseline['p50_latency']:.3f}s")

    # batch scaling in process: seconds per row-pass at batch 1 and at the largest batch, one bucket
    same = [p for p in pool if engine.length_bucket(len(p) + G) == used[0]]
    scaling = {}
    for B in batches:
        rows = (same * B)[:B]
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            reqs = [engine.submit(p, G, decode=dc) for p in rows]
            engine.run()
            runs.append((time.perf_counter() - t0) / sum(r.passes for r in reqs))
        scaling[B] = statistics.median(runs)
    ceiling = scaling[1] / min(scaling.values())
    from common import matmul_peak_flops

    peak = matmul_peak_flops()
    print("seconds per row-pass by batch: " + ", ".join(f"{B}: {v * 1e3:.2f} ms" for B, v in scaling.items())
          + f" (batching can gain at most x{ceiling:.2f} here; matmul peak {peak['peak_flops'] / 1e9:.0f} GFLOP/s)")

    base, stop = serve_in_thread(server)
    warm = engine.compilations
    url = base + "/v1"
    extra = {"block_length": dc.block_length, "threshold": dc.tau, "cache": dc.cache.value}
    levels = []
    for c, n in zip(clients, counts):
        runs = sorted((asyncio.run(load(url, pool[:n], c, G, extra, args.time_limit)) for _ in range(args.repeats)),
                      key=lambda r: r["tokens_per_second"])
        r = runs[len(runs) // 2]  # the median run
        r["tokens_per_second_runs"] = [x["tokens_per_second"] for x in runs]
        r["failed"] = sum(x["failed"] for x in runs)
        r["ratio_to_one_at_a_time"] = r["tokens_per_second"] / baseline["tokens_per_second"]
        levels.append(r)
        print(f"{c:3d} clients: {r['requests']} requests, {r['failed']} failed, {r['tokens_per_second']:.0f} tokens/s "
              f"(x{r['ratio_to_one_at_a_time']:.2f}), p50 {r['p50_latency']:.3f}s, p99 {r['p99_latency']:.3f}s")
    after = engine.compilations - warm
    stop()
    print(f"compilations after warm-up: {after}")

    import jax

    report = {"model": name, "device": str(jax.devices()[0].device_kind), "cpu_devices": len(jax.devices()),
              "decoder": {"block_length": dc.block_length, "threshold": dc.tau, "cache": dc.cache.value, "temperature": 0.0},
              "max_tokens": G, "prompt_lengths": [lo, hi], "length_buckets": used, "batch_buckets": batches,
              "warmup_seconds": warmup_seconds, "compilations_after_warmup": after, "one_at_a_time": baseline,
              "levels": levels, "seconds_per_row_pass": {str(k): v for k, v in scaling.items()},
              "batching_ceiling": ceiling,
              "matmul_peak_flops": peak["peak_flops"], "goal": "throughput >= 4x one at a time at 32 clients"}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        xs = [r["clients"] for r in levels]
        a.plot(xs, [r["tokens_per_second"] for r in levels], "o-", label="server (continuous batching)")
        a.axhline(baseline["tokens_per_second"], color="gray", ls="--", label="one at a time (dlm.generate)")
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent clients")
        a.set_ylabel("completed tokens / s")
        a.legend()
        b.plot(xs, [r["p50_latency"] for r in levels], "o-", label="p50")
        b.plot(xs, [r["p99_latency"] for r in levels], "s-", label="p99")
        b.set_xscale("log", base=2)
        b.set_xlabel("concurrent clients")
        b.set_ylabel("latency (s)")
        b.legend()
        fig.suptitle(f"{name}, {G} tokens per request")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=100)
    except ImportError:
        pass
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
