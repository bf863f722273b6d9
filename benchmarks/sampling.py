"""Sampling speed (and, for the parallel suite, quality).

    python benchmarks/sampling.py --suite hyperschedules --out FILE [--length 1024] [key=value ...]
    python benchmarks/sampling.py --suite parallel --out FILE [--lengths 256,1024] [--models markov,sudoku,corpus]
    python benchmarks/sampling.py --suite blocks --out FILE [--markov-samples 128,32]

blocks: a block-diffusion model of the Markov source (configs/block_markov.yaml, blocks of 32,
length 1024) decoded block by block with the KV cache of settled blocks (blocks_suite).

hyperschedules: per hyperschedule (autoregressive, block(16), slide(16), flat), tokens/s with
the KV cache of settled tokens and without it (a full forward pass over all positions with the
role mask at every step), on the bench model (configs/bench.yaml; random weights: speed does not
depend on them) at the given generation length, one sample, compiled before timing. Every step of
the uncached loop costs one full forward pass whatever the step, so it is timed over its first
--uncached-steps steps (tokens/s = tokens revealed in them / seconds); the cached loop runs the
whole generation. flat has no settled tokens before the end, so the cache does not apply to it.

parallel: the parallel decoders (dlm.sampling.parallel) on models trained first if their
workdirs hold no checkpoint: (a) configs/parallel_markov.yaml, a sparse Markov source whose exact
likelihood is known; (s) the 9x9 Sudoku model of configs/sudoku.yaml (runs/sudoku, shared with
benchmarks/tasks.py), where quality is what a decoder exists for: the exact-solve rate of
held-out 30-given puzzles (--sudoku-puzzles, 95% interval), decoded by infill at temperature 0
with the --sudoku-score score, blocks of 81 (one block: the cache rows use blocks of 27, three
rows of the grid; suffix dropout needs a prompt prefix and does not apply); and, on request
(--models ...,corpus), (b) configs/parallel_corpus.yaml, the builtin corpus, whose samples at
~3.5 bits/byte mean nothing (every decoder's output is whitespace under the confidence score,
vanilla's included; see the README), so it is no longer a default. Markov and corpus methods, all with
blocks of 32, one temperature (--temperature, default 1, float64 Gumbel; 0 is the papers' greedy
decoding) and the same EOS early termination: vanilla (one token per step, full recompute), topk
(2 per step), threshold (tau 0.9), threshold + credit,
+ suffix dropout, + prefix cache, all combined (dual cache). For each model, generation length
and method: NFE per sample (the passes a sample needs; a batch runs until its slowest row is
done), tokens committed per forward pass, useful tokens/s (generated, before the first EOS) and
seconds per sample at batch 1 (medians of --speed-samples runs, default 5; vanilla on the faster of
the einsum and chunked attention for the length), and quality over a batch of samples: on (a) the exact per-token NLL of the
samples under the true chain (and the excess over the conditional entropy of each step's state,
a lower-variance view of the same), on (b) the samples' NELBO under the model and their unigram
entropy. Times exclude compilation. JSON plus a PNG of quality against speed (legend in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from common import peak_rss_bytes, write_json

SCHEDULES = [("autoregressive", 1, 1), ("block", 16, 16), ("slide", 16, 1), ("flat", 0, 128)]


def hyperschedules_suite(args) -> dict:
    import jax

    import dlm
    from dlm.config import SamplingConfig, load_config
    from dlm.diffusion import hyperschedules as hs
    from dlm.mesh import make_mesh
    from dlm.sampling.hyper import make_plan

    L = args.length
    results = []
    model = None
    for kind, width, steps in SCHEDULES:
        cfg = load_config(args.config, [f"data.seq_len={L}", f"diffusion.hyperschedule={kind}"]
                          + ([f"diffusion.block_width={width}"] if width else []) + args.overrides)
        if model is None:
            model = dlm.build_model(cfg, mesh=make_mesh(devices=jax.devices()[:1]), seed=0)
        plan = make_plan(hs.Hyperschedule(hs.Kind(kind), L, width=width or L, steps=steps))
        row = {"hyperschedule": kind, "width": width or L, "steps_per_block": steps, "plan_steps": plan.num_steps}
        modes = [("cached", True, plan), ("uncached", False, plan.truncate(args.uncached_steps))] if kind != "flat" else \
            [("uncached", False, plan)]
        for name, cache, p in modes:
            sc = SamplingConfig(steps=steps, num_samples=args.num_samples, cache=cache, seed=0)
            out = dlm.generate(model, None, sc, diffusion=cfg.diffusion, length=L, plan=p)
            tokens = int((out["tokens"] < model.vocab_size).sum())
            row[name] = {"steps_run": p.num_steps, "tokens": tokens, "seconds": out["seconds"], "nfe": out["nfe"],
                         "cache_writes": out["cache_writes"], "compile_seconds": out["compile_seconds"],
                         "tokens_per_second": tokens / out["seconds"], "seconds_per_step": out["seconds"] / p.num_steps}
            print(f"{kind:15s} {name:9s} steps {p.num_steps:5d} tokens {tokens:6d}  {out['seconds']:8.2f} s  "
                  f"{tokens / out['seconds']:9.1f} tokens/s  nfe {out['nfe']}", flush=True)
        row["cache_applies"] = kind != "flat"
        if kind != "flat":
            row["speedup"] = row["cached"]["tokens_per_second"] / row["uncached"]["tokens_per_second"]
            print(f"{kind:15s} cache speed-up x{row['speedup']:.1f}", flush=True)
        results.append(row)
    return {"suite": "hyperschedules", "config": args.config, "length": L, "num_samples": args.num_samples,
            "device": str(jax.devices()[0].device_kind), "parameters": int(sum(x.size for x in jax.tree.leaves(
                __import__("flax").nnx.state(model, __import__("flax").nnx.Param)))),
            "results": results, "peak_rss_bytes": peak_rss_bytes()}


METHODS = [
    ("vanilla", dict(rule="topk", k=1)),
    ("topk", dict(rule="topk", k=2)),
    ("threshold", dict(rule="threshold", tau=0.9)),
    ("threshold+credit", dict(rule="threshold", tau=0.9, credit=True)),
    ("+suffix_dropout", dict(rule="threshold", tau=0.9, credit=True, suffix_dropout=True)),
    ("+prefix_cache", dict(rule="threshold", tau=0.9, credit=True, suffix_dropout=True, cache="prefix")),
    ("all_combined", dict(rule="threshold", tau=0.9, credit=True, suffix_dropout=True, cache="dual")),
]


ATTENTION_CANDIDATES = ["einsum", "chunked"]  # the vanilla baseline's attention: the faster of these


def with_attention(model, implementation: str):
    """A copy of a model whose blocks use another attention implementation (same parameters)."""
    from flax import nnx

    m = nnx.clone(model)
    m.blocks.attention_impl = implementation
    return m


def ensure_model(config: str, workdir: str):
    import dlm
    from dlm.config import load_config
    from dlm.train.trainer import Trainer

    import pathlib

    if not list(pathlib.Path(workdir).glob("checkpoints/*")):
        print(f"training {config} into {workdir}", flush=True)
        Trainer(load_config(config, [f"workdir={workdir}", "train.progress=false"])).run()
    return dlm.restore(workdir)


SUDOKU_METHODS = [
    ("vanilla", dict(rule="topk", k=1)),
    ("topk", dict(rule="topk", k=2)),
    ("threshold", dict(rule="threshold", tau=0.9)),
    ("threshold+credit", dict(rule="threshold", tau=0.9, credit=True)),
    ("threshold_blocks27", dict(rule="threshold", tau=0.9, block_length=27)),
    ("+prefix_cache", dict(rule="threshold", tau=0.9, block_length=27, cache="prefix")),
    ("+dual_cache", dict(rule="threshold", tau=0.9, block_length=27, cache="dual")),
]


def sudoku_rows(args) -> list[dict]:
    """The parallel methods on the 9x9 Sudoku model: exact-solve rate against NFE and puzzles/s."""
    from dlm.config import DecodeConfig, SamplingConfig
    from dlm.eval.tasks import solve_sudoku
    from dlm.tasks import sudoku

    model, cfg = ensure_model(args.sudoku_config, args.sudoku_workdir)
    geo, sc = sudoku.Geometry(cfg.data.sudoku.size), cfg.data.sudoku
    puzzles, solutions = sudoku.cached(geo, sc.seed + 2_000_003, args.sudoku_puzzles, 30, sc.cache_dir)
    rows = []
    methods = [m for m in SUDOKU_METHODS if args.methods is None or m[0] in args.methods.split(",") or m[0] == "vanilla"]
    for method, over in methods:
        over = dict(over)
        dcfg = DecodeConfig(block_length=over.pop("block_length", geo.cells), score=args.sudoku_score, **over)
        sampling = SamplingConfig(sampler="parallel", decode=dcfg, temperature=0.0, steps=geo.cells, float64=False)
        r = solve_sudoku(model, cfg.diffusion, puzzles, solutions, sampling, batch=min(100, len(puzzles)))
        one = solve_sudoku(model, cfg.diffusion, puzzles[: args.speed_samples], solutions[: args.speed_samples], sampling, batch=1)
        row = {"model": "sudoku", "length": geo.cells, "method": method, "decode": {**over, "block_length": dcfg.block_length},
               "num_samples": len(puzzles), "nfe": r["nfe"], "tokens_per_forward": float((puzzles == 0).sum((1, 2)).mean()) / r["nfe"],
               "exact_solve": r["exact_solve"], "exact_solve_ci": r["exact_solve_ci"], "cell_accuracy": r["cell_accuracy"],
               "batch_puzzles_per_second": r["puzzles_per_second"], "puzzles_per_second": one["puzzles_per_second"],
               "seconds_per_sample": 1.0 / one["puzzles_per_second"]}
        rows.append(row)
        print(f"sudoku {geo.cells:5d} {method:18s} nfe {r['nfe']:7.1f}  cells/pass {row['tokens_per_forward']:5.2f}  "
              f"{row['puzzles_per_second']:7.2f} puzzles/s (batch 1)  solve {r['exact_solve']:.1%} "
              f"[{r['exact_solve_ci'][0]:.1%}, {r['exact_solve_ci'][1]:.1%}]", flush=True)
    return rows


def parallel_suite(args) -> dict:
    import math

    import jax
    import numpy as np
    from flax import nnx

    import dlm
    from dlm.config import DecodeConfig, SamplingConfig
    from dlm.data.synthetic import MarkovChain
    from dlm.eval.likelihood import evaluate, make_eval_fn
    from dlm.objectives import objective_for

    lengths = [int(v) for v in args.lengths.split(",")]
    todo = [("markov", args.markov_config, args.markov_workdir), ("corpus", args.corpus_config, args.corpus_workdir)]
    methods = [m for m in METHODS if args.methods is None or m[0] in args.methods.split(",") or m[0] == "vanilla"]
    results = sudoku_rows(args) if "sudoku" in args.models.split(",") else []
    for name, config, workdir in [t for t in todo if t[0] in args.models.split(",")]:
        model, cfg = ensure_model(config, workdir)
        tok = dlm.load_tokenizer(workdir)
        eos = getattr(tok, "eos_id", -1) if name == "corpus" else -1
        chain = MarkovChain.random(cfg.data.markov) if name == "markov" else None
        graphdef, params = nnx.split(model)
        for G in lengths:
            B = (args.markov_samples if name == "markov" else args.corpus_samples)[0 if G <= 256 else 1]
            eval_fn = make_eval_fn(graphdef, objective_for(cfg.diffusion, model.vocab_size, model.cfg.noise_conditioning), 4) \
                if name == "corpus" else None
            for method, over in methods:
                dcfg = DecodeConfig(block_length=32, score=args.score, **over)
                sc = SamplingConfig(sampler="parallel", decode=dcfg, num_samples=B, temperature=args.temperature, float64=True, seed=args.seed)
                out = dlm.generate(model, None, sc, length=G, eos_id=eos)  # quality: B samples at once
                toks = out["tokens"]
                first_eos = np.array([np.flatnonzero(r == eos)[0] if eos >= 0 and (r == eos).any() else G for r in toks])
                # speed: batch 1, as a user decoding one sequence sees it; medians of --speed-samples
                # runs (compiled once). Vanilla runs on each attention implementation and keeps
                # the faster, so that the speed-ups are against the best baseline for the length.
                by_impl = {}
                for impl in (ATTENTION_CANDIDATES if method == "vanilla" else [None]):
                    m = model if impl is None else with_attention(model, impl)
                    speed = []
                    for i in range(args.speed_samples):
                        one = dataclasses.replace(sc, num_samples=1, seed=args.seed + 1000 + i)
                        o = dlm.generate(m, None, one, length=G, eos_id=eos)
                        r = o["tokens"][0]
                        speed.append((o["seconds"], int(np.flatnonzero(r == eos)[0]) if eos >= 0 and (r == eos).any() else G, o["nfe"]))
                    by_impl[impl or model.cfg.attention] = speed
                impl = min(by_impl, key=lambda k: np.median([v[0] for v in by_impl[k]]))
                speed = by_impl[impl]
                secs = float(np.median([v[0] for v in speed]))
                rate = float(np.median([v[1] / v[0] for v in speed]))
                nfe = float(np.mean(out["nfe_per_sample"]))
                row = {"model": name, "length": G, "method": method, "decode": over, "num_samples": B,
                       "nfe": nfe, "nfe_batch": out["nfe"], "tokens_per_forward": G / nfe,
                       "seconds_per_sample": secs, "useful_tokens_per_second": rate, "attention": impl,
                       "speed_runs": [{"seconds": a, "useful_tokens": b, "nfe": c} for a, b, c in speed],
                       "median_seconds_by_attention": {k: float(np.median([v[0] for v in runs])) for k, runs in by_impl.items()},
                       "batch_seconds": out["seconds"], "batch_useful_tokens_per_second": int(first_eos.sum()) / out["seconds"],
                       "compile_seconds": out["compile_seconds"]}
                if chain is not None:
                    nll = -chain.log_prob(toks) / G
                    h_state = -(chain.P * np.log(np.maximum(chain.P, 1e-300))).sum(1)
                    excess = (-np.log(chain.P[toks[:, :-1], toks[:, 1:]]) - h_state[toks[:, :-1]]).mean()
                    row.update({"true_nll": float(nll.mean()), "true_nll_stderr": float(nll.std(ddof=1) / math.sqrt(B)),
                                "excess_nll": float(excess), "entropy_rate": float(chain.entropy_rate)})
                    q = f"true NLL {row['true_nll']:.4f} ± {row['true_nll_stderr']:.4f}"
                else:
                    ev = evaluate(eval_fn, params, toks, batch_size=B, seed=0)
                    useful_toks = np.concatenate([r[:n] for r, n in zip(toks, first_eos)])
                    counts = np.bincount(useful_toks, minlength=model.vocab_size).astype(float)
                    pr = counts[counts > 0] / counts.sum()
                    row.update({"sample_nelbo_bits": ev["nelbo"] / math.log(2), "sample_nelbo_stderr_bits": ev["nelbo_stderr"] / math.log(2),
                                "sample_unigram_entropy_bits": float(-(pr * np.log2(pr)).sum())})
                    q = f"NELBO {row['sample_nelbo_bits']:.3f} bits, entropy {row['sample_unigram_entropy_bits']:.3f}"
                results.append(row)
                print(f"{name:6s} {G:5d} {method:18s} nfe {nfe:7.1f}  tpf {row['tokens_per_forward']:5.2f}  "
                      f"{row['useful_tokens_per_second']:9.1f} tok/s  {row['seconds_per_sample']:7.2f} s/sample  {q}", flush=True)
    speed_key = {"sudoku": "puzzles_per_second"}
    quality_key = {"markov": "true_nll", "sudoku": "exact_solve", "corpus": "sample_unigram_entropy_bits"}
    for r in results:  # ratios against vanilla of the same model and length
        base = next(v for v in results if v["model"] == r["model"] and v["length"] == r["length"] and v["method"] == "vanilla")
        sk = speed_key.get(r["model"], "useful_tokens_per_second")
        r["speedup_vs_vanilla"] = r[sk] / base[sk]
        r["nfe_reduction_vs_vanilla"] = base["nfe"] / r["nfe"]
        qk = quality_key[r["model"]]
        r["quality_change_vs_vanilla"] = r[qk] / base[qk] - 1.0 if base[qk] else float("nan")
        if r["model"] == "sudoku":
            r["exact_solve_change_points"] = 100 * (r["exact_solve"] - base["exact_solve"])
    record = {"suite": "parallel", "lengths": lengths, "sudoku_score": args.sudoku_score, "score": args.score, "block_length": 32, "temperature": args.temperature, "device": str(jax.devices()[0].device_kind), "results": results}
    if args.out:
        import pathlib

        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record["plot"] = parallel_plot(record, str(pathlib.Path(args.out).with_suffix(".png")))
    return record


def parallel_plot(record: dict, png: str) -> str:
    """The parallel suite's speed-quality PNG of a record: one panel per model."""
    from plot import speed_quality

    results = record["results"]
    quality = {"markov": ("true_nll", "true NLL of the samples (nats/token)"),
               "sudoku": ("exact_solve", "exact-solve rate, 30-given puzzles"),
               "corpus": ("sample_unigram_entropy_bits", "sample unigram entropy (bits/byte)")}
    speed = {"sudoku": "puzzles_per_second"}
    panels = [{"title": f"{name} model", "ylabel": quality[name][1],
               "xlabel": "puzzles/s (batch 1, log scale)" if name == "sudoku" else "useful tokens/s (batch 1, log scale)",
               "points": [(r["method"], r["length"], r[speed.get(name, "useful_tokens_per_second")], r[quality[name][0]])
                          for r in results if r["model"] == name]}
              for name in [m for m in ("sudoku", "markov", "corpus") if any(r["model"] == m for r in results)]]
    what = [f"Sudoku: score {record['sudoku_score']}, temperature 0"] if any(r["model"] == "sudoku" for r in results) else []
    if any(r["model"] != "sudoku" for r in results):
        which = "Markov/corpus" if any(r["model"] == "corpus" for r in results) else "Markov"
        what.insert(0, f"{which}: score {record['score']}, temperature {record['temperature']}")
    speed_quality(png, panels, title=f"Parallel decoding: speed and quality ({'; '.join(what)})")
    return png


BLOCK_METHODS = [
    ("one_per_step", dict(rule="topk", k=1)),
    ("threshold_0.9", dict(rule="threshold", tau=0.9)),
    ("threshold_0.7", dict(rule="threshold", tau=0.7)),
    ("threshold_0.9+credit", dict(rule="threshold", tau=0.9, credit=True)),
    ("factor_1", dict(rule="factor", factor=1.0)),
]


def blocks_suite(args) -> dict:
    """A block-diffusion model of the Markov source decoded block by block (dlm.sampling.blocks),
    each method with the KV cache of settled blocks; one token per step is the baseline. Per
    method: NFE per sample, the true NLL of the samples under the chain, seconds per sample at
    batch 1 (medians of --speed-samples runs) and, for one per step and the first threshold, the
    same without the cache (every step a full block-causal pass; its tokens are the cached run's,
    which tests/test_blocks.py checks, so it is timed at batch 1 only and reports the cached run's
    quality)."""
    import math

    import jax
    import numpy as np

    import dlm
    from dlm.config import DecodeConfig, SamplingConfig
    from dlm.data.synthetic import MarkovChain

    model, cfg = ensure_model(args.block_config, args.block_workdir)
    chain = MarkovChain.random(cfg.data.markov)
    G, B = cfg.data.seq_len, args.markov_samples[1]
    rows = []
    methods = [m for m in BLOCK_METHODS if args.methods is None or m[0] in args.methods.split(",") or m[0] == "one_per_step"]
    for method, over in methods:
        for cache in ((True, False) if method in ("one_per_step", "threshold_0.9") else (True,)):
            dcfg = DecodeConfig(block_length=cfg.diffusion.block_width, score=args.score, **over)
            sc = SamplingConfig(sampler="parallel", decode=dcfg, num_samples=B, temperature=args.temperature, float64=True,
                                seed=args.seed, cache=cache)
            if cache:
                out = dlm.generate(model, None, sc, diffusion=cfg.diffusion, length=G)
                nll = -chain.log_prob(out["tokens"]) / G
            # else: the cached run's tokens, passes and quality (tests/test_blocks.py), timed at batch 1 below
            speed = []
            for i in range(args.speed_samples):
                o = dlm.generate(model, None, dataclasses.replace(sc, num_samples=1, seed=args.seed + 1000 + i),
                                 diffusion=cfg.diffusion, length=G)
                speed.append(o["seconds"])
            nfe = float(np.mean(out["nfe_per_sample"]))
            row = {"method": method, "cache": cache, "decode": over, "num_samples": B, "length": G,
                   "nfe": nfe, "nfe_batch": int(out["nfe"]), "tokens_per_forward": G / nfe,
                   "true_nll": float(nll.mean()), "true_nll_stderr": float(nll.std(ddof=1) / math.sqrt(B)),
                   "entropy_rate": float(chain.entropy_rate), "seconds_per_sample": float(np.median(speed)),
                   "speed_runs": speed, "compile_seconds": out["compile_seconds"]}
            rows.append(row)
            print(f"blocks {method:22s} cache {str(cache):5s} nfe {nfe:7.1f}  tok/pass {row['tokens_per_forward']:5.2f}  "
                  f"{row['seconds_per_sample']:7.2f} s/sample  true NLL {row['true_nll']:.4f} ± {row['true_nll_stderr']:.4f}",
                  flush=True)
    base = next(r for r in rows if r["method"] == "one_per_step" and r["cache"])
    for r in rows:
        r["nfe_reduction_vs_one_per_step"] = base["nfe"] / r["nfe"]
        r["true_nll_change_vs_one_per_step"] = r["true_nll"] / base["true_nll"] - 1.0
        r["speedup_vs_one_per_step"] = base["seconds_per_sample"] / r["seconds_per_sample"]
    record = {"suite": "blocks", "config": args.block_config, "block_width": cfg.diffusion.block_width, "length": G,
              "temperature": args.temperature, "score": args.score, "device": str(jax.devices()[0].device_kind), "results": rows}
    if args.out:
        import pathlib

        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record["plot"] = blocks_plot(record, str(pathlib.Path(args.out).with_suffix(".png")))
    return record


def blocks_plot(record: dict, png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in record["results"]:
        marker = "o" if r["cache"] else "x"
        ax.errorbar(r["nfe"], r["true_nll"], yerr=r["true_nll_stderr"], fmt=marker, capsize=3,
                    label=f"{r['method']} ({'KV cache' if r['cache'] else 'no cache'})")
    rate = record["results"][0]["entropy_rate"]
    ax.axhline(rate, color="gray", ls="--", lw=1, label=f"entropy rate {rate:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("forward passes per sample (log)")
    ax.set_ylabel("true NLL of the samples (nats/token)")
    ax.set_title(f"block decoding, blocks of {record['block_width']}, length {record['length']}, T={record['temperature']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def main():
    from dlm.config import Score

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["hyperschedules", "parallel", "blocks"], required=True)
    parser.add_argument("--config", default="configs/bench.yaml")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--uncached-steps", type=int, default=32, help="steps timed for the uncached baseline")
    parser.add_argument("--lengths", default="256,1024", help="parallel: generation lengths")
    parser.add_argument("--markov-config", default="configs/parallel_markov.yaml")
    parser.add_argument("--markov-workdir", default="runs/parallel_markov")
    parser.add_argument("--block-config", default="configs/block_markov.yaml", help="blocks: the block-diffusion model")
    parser.add_argument("--block-workdir", default="runs/block_markov")
    parser.add_argument("--corpus-config", default="configs/parallel_corpus.yaml")
    parser.add_argument("--corpus-workdir", default="runs/parallel_corpus")
    parser.add_argument("--markov-samples", default="128,8", help="parallel: samples at length <= 256, and longer")
    parser.add_argument("--corpus-samples", default="8,4")
    parser.add_argument("--speed-samples", type=int, default=5, help="parallel: batch-1 runs timed per method (medians)")
    parser.add_argument("--score", default="confidence", choices=[s.value for s in Score], help="parallel: the score of every method")
    parser.add_argument("--temperature", type=float, default=1.0, help="parallel: the temperature of every method (0: argmax)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="markov,sudoku", help="parallel: which models (markov, sudoku, corpus)")
    parser.add_argument("--sudoku-config", default="configs/sudoku.yaml")
    parser.add_argument("--sudoku-workdir", default="runs/sudoku")
    parser.add_argument("--sudoku-puzzles", type=int, default=500, help="parallel: held-out 30-given puzzles")
    parser.add_argument("--sudoku-score", default="margin", choices=[s.value for s in Score], help="parallel: the Sudoku methods' score")
    parser.add_argument("--methods", default=None, help="parallel: a subset of methods (vanilla always runs)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--replot", default=None, help="parallel: only redraw the PNG of an earlier JSON record (next to it)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.replot:
        import pathlib

        print(parallel_plot(json.loads(pathlib.Path(args.replot).read_text()), str(pathlib.Path(args.replot).with_suffix(".png"))))
        return
    args.markov_samples = [int(v) for v in args.markov_samples.split(",")]
    args.corpus_samples = [int(v) for v in args.corpus_samples.split(",")]
    if args.temperature < 0:  # generate() rejects it too, but only after the models are trained
        parser.error(f"--temperature {args.temperature} must be >= 0 (0 decodes by argmax).")
    suites = {"hyperschedules": hyperschedules_suite, "parallel": parallel_suite, "blocks": blocks_suite}
    record = suites[args.suite](args)
    write_json(args.out, record)


if __name__ == "__main__":
    main()
