"""Decoders judged by a task with a checkable answer: Sudoku exact-solve rate against forward passes.

    python benchmarks/tasks.py --task sudoku --out results/sudoku.json            # 9x9 (configs/sudoku.yaml)
    python benchmarks/tasks.py --task sudoku --size 6 --out results/sudoku6.json  # 6x6, the quick check

Trains the masked-diffusion model from the task's config if its workdir holds no checkpoint, and
an autoregressive-hyperschedule model of the same size on the same budget (the same config with
diffusion.hyperschedule=autoregressive). Then, on held-out puzzles with a unique solution (a
seed never used in training), for each tier (30 givens for 9x9, and minimal puzzles, where no
given can be removed) and each decoder: exact-solve rate with a 95% Wilson interval, cell
accuracy, NFE per puzzle and puzzles/s. Decoders (all at temperature 0, givens fixed):
random_order (the exact ancestral sampler: vanilla MDLM, one cell per step in expectation, in
random order), greedy_confidence / greedy_margin / greedy_entropy (one cell per step, the best
by that score), topk2 / topk5, threshold_<tau>_<score> with and without trace credit, and
autoregressive (the AR model, left to right). Writes JSON and a PNG of accuracy against NFE.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from common import ROOT, write_json

DECODERS = {
    "random_order": dict(sampler="ancestral"),
    "greedy_confidence": dict(rule="topk", k=1, score="confidence"),
    "greedy_margin": dict(rule="topk", k=1, score="margin"),
    "greedy_entropy": dict(rule="topk", k=1, score="entropy"),
    "topk2": dict(rule="topk", k=2, score="confidence"),
    "topk5": dict(rule="topk", k=5, score="confidence"),
    **{f"threshold_{tau}_{score}{'_credit' if credit else ''}": dict(rule="threshold", tau=tau, score=score, credit=credit)
       for credit in (False, True) for score in ("confidence", "margin") for tau in (0.9, 0.7)},
    "autoregressive": dict(sampler="ancestral", model="autoregressive"),
}

CURVES = {"top-k (k = 1, 2, 5)": ["greedy_confidence", "topk2", "topk5"],
          **{f"threshold {s}{' + credit' if c else ''} (tau 0.9, 0.7)": [f"threshold_{t}_{s}{'_credit' if c else ''}" for t in (0.9, 0.7)]
             for c in (False, True) for s in ("confidence", "margin")}}


def train_if_needed(cfg) -> float:
    """Train the run of `cfg` unless its workdir holds a checkpoint; the training seconds (from metrics)."""
    from dlm.train.checkpoint import Checkpointer
    from dlm.train.metrics import read_metrics
    from dlm.train.trainer import train

    if Checkpointer(cfg.workdir).latest_step() is None:
        t0 = time.time()
        train(cfg)
        (pathlib.Path(cfg.workdir) / "train_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
    path = pathlib.Path(cfg.workdir) / "train_seconds.txt"
    if path.exists():
        return float(path.read_text())
    records = read_metrics(cfg.workdir)
    return float(records[-1]["time"] - records[0]["time"]) if records else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["sudoku"], required=True)
    parser.add_argument("--size", type=int, default=9, choices=[6, 9])
    parser.add_argument("--config", default=None, help="default: configs/sudoku.yaml (9) or configs/sudoku6.yaml (6)")
    parser.add_argument("--num-puzzles", type=int, default=1000, help="held-out puzzles per tier")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--decoders", default=None, help="a comma-separated subset of the decoders")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides for both models, e.g. train.steps=600")
    args = parser.parse_args()

    import jax
    from flax import nnx

    import dlm
    from dlm.config import DecodeConfig, SamplingConfig, Sampler, load_config
    from dlm.eval.tasks import solve_sudoku
    from dlm.tasks import sudoku

    config = args.config or str(ROOT / ("configs/sudoku.yaml" if args.size == 9 else "configs/sudoku6.yaml"))
    cfg = load_config(config, args.overrides)
    ar_cfg = load_config(config, [*args.overrides, "diffusion.hyperschedule=autoregressive", f"workdir={cfg.workdir}_ar"])
    if cfg.data.sudoku.size != args.size:
        parser.error(f"--size {args.size} disagrees with data.sudoku.size={cfg.data.sudoku.size} of {config}.")
    names = list(DECODERS) if args.decoders is None else args.decoders.split(",")
    unknown = [n for n in names if n not in DECODERS]
    if unknown:
        parser.error(f"unknown decoder {unknown[0]!r}; choose from {', '.join(DECODERS)}.")

    seconds = {"mdlm": train_if_needed(cfg)}
    if "autoregressive" in names:
        seconds["autoregressive"] = train_if_needed(ar_cfg)
    model, cfg = dlm.restore(cfg.workdir)
    ar = dlm.restore(ar_cfg.workdir) if "autoregressive" in names else None

    geo = sudoku.Geometry(args.size)
    sc = cfg.data.sudoku
    tiers = {"30": 30, "minimal": 0} if args.size == 9 else {"half": geo.cells // 2, "minimal": 0}
    results = []
    for t, (tier, givens) in enumerate(tiers.items()):
        puzzles, solutions = sudoku.cached(geo, sc.seed + 2_000_003 + t, args.num_puzzles, givens, sc.cache_dir)
        mean_givens = float((puzzles != 0).sum((1, 2)).mean())
        for name in names:
            spec = dict(DECODERS[name])
            which = spec.pop("model", "mdlm")
            m, c = (model, cfg) if which == "mdlm" else ar
            sampler = spec.pop("sampler", "parallel")
            sampling = SamplingConfig(sampler=Sampler(sampler), temperature=0.0, steps=geo.cells, float64=False,
                                      decode=DecodeConfig(block_length=geo.cells, **spec))
            r = solve_sudoku(m, c.diffusion, puzzles, solutions, sampling, batch=args.batch)
            results.append({"tier": tier, "decoder": name, "mean_givens": mean_givens, **r})
            print(f"{tier:8s} {name:32s} solve {r['exact_solve']:6.1%} [{r['exact_solve_ci'][0]:.1%}, {r['exact_solve_ci'][1]:.1%}]  "
                  f"cells {r['cell_accuracy']:6.1%}  NFE {r['nfe']:5.1f}  {r['puzzles_per_second']:7.1f} puzzles/s", flush=True)

    record = {"task": args.task, "size": args.size, "train_seconds": seconds["mdlm"], "train_seconds_autoregressive": seconds.get("autoregressive"),
              "config": config, "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model)))),
              "results": results}
    record["summary"] = summarise(results)
    if args.out:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from plot import accuracy_vs_nfe

        png = str(pathlib.Path(args.out).with_suffix(".png"))
        panels = [{"title": f"Sudoku {args.size}x{args.size}, tier {tier} ({args.num_puzzles} puzzles)",
                   "points": [(r["decoder"], r["nfe"], r["exact_solve"]) for r in results if r["tier"] == tier], "curves": CURVES}
                  for tier in tiers]
        accuracy_vs_nfe(png, panels, title="Exact-solve rate against forward passes")
        record["plot"] = png
    write_json(args.out, record)


def summarise(results) -> dict:
    """Per tier: the best one-cell-per-step decoder, and the best threshold setting with the NFE it
    takes and its gap to that decoder."""
    out = {}
    for tier in dict.fromkeys(r["tier"] for r in results):
        rows = {r["decoder"]: r for r in results if r["tier"] == tier}
        greedy = [rows[n] for n in ("greedy_confidence", "greedy_margin", "greedy_entropy") if n in rows]
        thresholds = [r for n, r in rows.items() if n.startswith("threshold_")]
        if not greedy or not thresholds:
            continue
        best = max(greedy, key=lambda r: r["exact_solve"])
        thr = max(thresholds, key=lambda r: (r["exact_solve"], -r["nfe"]))
        out[tier] = {"best_one_cell_per_step": best["decoder"], "its_exact_solve": best["exact_solve"], "its_nfe": best["nfe"],
                     "best_threshold": thr["decoder"], "threshold_exact_solve": thr["exact_solve"], "threshold_nfe": thr["nfe"],
                     "gap_points": 100 * (best["exact_solve"] - thr["exact_solve"]), "nfe_ratio": best["nfe"] / thr["nfe"]}
    return out


if __name__ == "__main__":
    main()
