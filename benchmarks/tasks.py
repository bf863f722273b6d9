"""Decoders judged by tasks with a checkable answer: exact-solve rate against forward passes.

    python benchmarks/tasks.py --task sudoku --out results/sudoku.json            # 9x9 (configs/sudoku.yaml)
    python benchmarks/tasks.py --task sudoku --size 6 --out results/sudoku6.json  # 6x6, the quick check
    python benchmarks/tasks.py --task addition --out results/addition.json        # configs/addition.yaml

Trains the masked-diffusion model from the task's config if its workdir holds no checkpoint, and
an autoregressive-hyperschedule model of the same size on the same budget (its config's steps:
the same steps and batch for 6x6 Sudoku and addition, and for 9x9 Sudoku 600 steps, the same
time as the diffusion model's 1500; --ar-steps overrides; every position trained at once:
diffusion.layout=double) in <workdir>_ar. The AR model reads the problem as a prompt: for addition both models do
(data.format=pairs, operands then sum); for Sudoku the diffusion model fills the blanks in place
while the AR model is trained on prompt/response pairs (a puzzle of random givens, then its grid:
configs/sudoku_ar.yaml), since left to right it could not otherwise see the givens after a cell.

Then, on held-out problems (seeds never used in training), for each tier (Sudoku: 30 givens for
9x9, half the cells for 6x6, and minimal puzzles, where no given can be removed; addition:
uniform operands, and operands whose carry ripples through at least n - 1 columns) and each
decoder: exact-solve rate with a 95% Wilson interval, cell (digit) accuracy, NFE per problem and
problems/s. Decoders (all at temperature 0, the givens or prompt fixed): random_order (the exact
ancestral sampler: vanilla MDLM, one position per step in expectation, in random order),
greedy_confidence / greedy_margin / greedy_entropy (one position per step, the best by that
score), topk2 / topk5, threshold_<tau>_<score> with and without trace credit, left_to_right (the
diffusion model decoding one position per step in reading order: block length 1), and
autoregressive (the AR model, left to right). Writes JSON and a PNG of accuracy against NFE.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from common import ROOT, write_json

TAUS = (0.99, 0.95, 0.9, 0.7)
DECODERS = {
    "random_order": dict(sampler="ancestral"),
    "greedy_confidence": dict(rule="topk", k=1, score="confidence"),
    "greedy_margin": dict(rule="topk", k=1, score="margin"),
    "greedy_entropy": dict(rule="topk", k=1, score="entropy"),
    "topk2": dict(rule="topk", k=2, score="confidence"),
    "topk5": dict(rule="topk", k=5, score="confidence"),
    **{f"threshold_{tau}_{score}{'_credit' if credit else ''}": dict(rule="threshold", tau=tau, score=score, credit=credit)
       for credit in (False, True) for score in ("confidence", "margin") for tau in TAUS},
    "left_to_right": dict(rule="topk", k=1, score="confidence", block_length=1),
    "autoregressive": dict(sampler="ancestral", model="autoregressive"),
}

CURVES = {"top-k (k = 1, 2, 5)": ["greedy_confidence", "topk2", "topk5"],
          **{f"threshold {s}{' + credit' if c else ''} (tau {', '.join(map(str, TAUS))})": [f"threshold_{t}_{s}{'_credit' if c else ''}" for t in TAUS]
             for c in (False, True) for s in ("confidence", "margin")}}

CONFIGS = {("sudoku", 9): ("configs/sudoku.yaml", "configs/sudoku_ar.yaml"), ("sudoku", 6): ("configs/sudoku6.yaml", "configs/sudoku6_ar.yaml"),
           ("addition", None): ("configs/addition.yaml", "configs/addition_ar.yaml")}


def decoder_sampling(name: str, length: int):
    """The SamplingConfig of decoder `name` (DECODERS) over canvases of `length`, at temperature 0."""
    from dlm.config import DecodeConfig, Sampler, SamplingConfig

    spec = {k: v for k, v in DECODERS[name].items() if k not in ("model", "sampler")}
    spec.setdefault("block_length", length)
    return SamplingConfig(sampler=Sampler(DECODERS[name].get("sampler", "parallel")), temperature=0.0, steps=length,
                          float64=False, decode=DecodeConfig(**spec))


def train_if_needed(cfg) -> float:
    """Train the run of `cfg` unless its workdir holds a checkpoint; the training seconds (from metrics)."""
    from dlm.config import ConfigError, load_config, to_dict
    from dlm.train.checkpoint import Checkpointer
    from dlm.train.metrics import read_metrics
    from dlm.train.trainer import train

    saved = pathlib.Path(cfg.workdir) / "config.yaml"
    post_trained = False
    if saved.exists():
        ours, theirs = to_dict(cfg), to_dict(load_config(saved))
        post_trained = theirs["train"]["mode"] == "rl"  # an RL run of this task's model: read, never trained here
        differ = [f"{s}.{k}" for s in ours if isinstance(ours[s], dict) and s not in ("train", "sampling", "rl")
                  for k in ours[s] if ours[s][k] != theirs[s].get(k)] + (
                      ["train.steps"] if ours["train"]["steps"] != theirs["train"]["steps"] and not post_trained else [])
        if differ:
            raise ConfigError(f"{cfg.workdir!r} holds a run of another configuration ({', '.join(differ)} differ); delete it or "
                              "pass workdir=... for this one.")
    if Checkpointer(cfg.workdir).latest_step() is None:
        if post_trained:
            raise ConfigError(f"{cfg.workdir!r} is an RL run (train.mode=rl) without a checkpoint yet; run it first.")
        t0 = time.time()
        train(cfg)
        (pathlib.Path(cfg.workdir) / "train_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
    path = pathlib.Path(cfg.workdir) / "train_seconds.txt"
    if path.exists():
        return float(path.read_text())
    records = read_metrics(cfg.workdir)
    return float(records[-1]["time"] - records[0]["time"]) if records else float("nan")


def tiers_of(task: str, cfg, num: int) -> dict:
    """{tier: (problems, note)}: the held-out problems of each tier (seeds never used in training)."""
    import numpy as np

    from dlm.tasks import addition, sudoku

    if task == "sudoku":
        geo, sc = sudoku.Geometry(cfg.data.sudoku.size), cfg.data.sudoku
        givens = {"30": 30, "minimal": 0} if geo.size == 9 else {"half": geo.cells // 2, "minimal": 0}
        out = {}
        for t, (tier, g) in enumerate(givens.items()):
            puzzles, solutions = sudoku.cached(geo, sc.seed + 2_000_003 + t, num, g, sc.cache_dir)
            out[tier] = ((puzzles, solutions), {"mean_givens": float((puzzles != 0).sum((1, 2)).mean())})
        return out
    layout, seed = addition.Layout(cfg.data.addition.digits), cfg.data.addition.seed
    out = {}
    for t, (tier, make) in enumerate({"uniform": addition.problems, "long_carry": addition.long_carry}.items()):
        a, b = make(layout, num, np.random.default_rng(seed + 2_000_003 + t))
        out[tier] = ((a, b), {"mean_carry_run": float(addition.carry_run(a, b).mean())})
    return out


def solve(task: str, model, cfg, problems, sampling, batch: int) -> dict:
    from dlm.config import DataFormat
    from dlm.eval.tasks import solve_addition, solve_sudoku

    if task == "sudoku":
        return solve_sudoku(model, cfg.diffusion, *problems, sampling, batch=batch, prefix=cfg.data.format == DataFormat.PAIRS)
    return solve_addition(model, cfg.diffusion, *problems, sampling, batch=batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["sudoku", "addition"])
    parser.add_argument("--size", type=int, default=9, choices=[6, 9], help="Sudoku grid size")
    parser.add_argument("--config", default=None, help="the diffusion model's config (default: the task's, see CONFIGS)")
    parser.add_argument("--ar-config", default=None, help="the autoregressive model's config (default: the task's)")
    parser.add_argument("--ar-steps", type=int, default=None, help="training steps of the AR model (default: its config's)")
    parser.add_argument("--num-puzzles", type=int, default=1000, help="held-out problems per tier")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--decoders", default=None, help="a comma-separated subset of the decoders")
    parser.add_argument("--out", default=None)
    parser.add_argument("--replot", default=None, help="only redraw the PNG of an earlier JSON record (next to it)")
    parser.add_argument("overrides", nargs="*", help="config overrides for both models, e.g. train.steps=600")
    args = parser.parse_args()
    if args.replot:
        import json

        print(plot(json.loads(pathlib.Path(args.replot).read_text()), str(pathlib.Path(args.replot).with_suffix(".png"))))
        return

    if args.task is None:
        parser.error("--task is required (sudoku or addition).")
    import jax
    from flax import nnx

    import dlm
    from dlm.config import load_config

    default, default_ar = CONFIGS[(args.task, args.size if args.task == "sudoku" else None)]
    config, ar_config = args.config or str(ROOT / default), args.ar_config or str(ROOT / default_ar)
    cfg = load_config(config, args.overrides)
    steps = args.ar_steps or load_config(ar_config, args.overrides).train.steps
    ar_cfg = load_config(ar_config, [*args.overrides, f"workdir={cfg.workdir}_ar", f"train.steps={steps}",
                                     f"train.checkpoint_every={steps}"])
    if args.task == "sudoku" and cfg.data.sudoku.size != args.size:
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

    tiers = tiers_of(args.task, cfg, args.num_puzzles)
    results = []
    for tier, (problems, note) in tiers.items():
        for name in names:
            m, c = (model, cfg) if DECODERS[name].get("model", "mdlm") == "mdlm" else ar
            sampling = decoder_sampling(name, c.data.seq_len)
            r = solve(args.task, m, c, problems, sampling, args.batch)
            results.append({"tier": tier, "decoder": name, **note, **r})
            print(f"{tier:10s} {name:32s} solve {r['exact_solve']:6.1%} [{r['exact_solve_ci'][0]:.1%}, {r['exact_solve_ci'][1]:.1%}]  "
                  f"cells {r['cell_accuracy']:6.1%}  NFE {r['nfe']:5.1f}  {r['puzzles_per_second']:7.1f} puzzles/s", flush=True)

    count = lambda m: int(sum(x.size for x in jax.tree.leaves(nnx.state(m))))
    record = {"task": args.task, "size": args.size if args.task == "sudoku" else cfg.data.addition.digits,
              "train_seconds": seconds["mdlm"], "train_seconds_autoregressive": seconds.get("autoregressive"),
              "train_steps": cfg.train.steps, "train_steps_autoregressive": ar_cfg.train.steps if ar else None,
              "config": config, "ar_config": ar_config if ar else None, "params": count(model),
              "params_autoregressive": count(ar) if ar else None, "results": results}
    record["summary"] = summarise(results)
    if args.out:
        record["plot"] = plot(record, str(pathlib.Path(args.out).with_suffix(".png")))
    write_json(args.out, record)


def plot(record: dict, png: str) -> str:
    """The accuracy-against-NFE PNG of a record, one panel per tier."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from plot import accuracy_vs_nfe

    what = f"Sudoku {record['size']}x{record['size']}" if record["task"] == "sudoku" else f"Addition of {record['size']}-digit numbers"
    results = record["results"]
    panels = [{"title": f"{what}, tier {tier} ({next(r['num_puzzles'] for r in results if r['tier'] == tier)} problems)",
               "points": [(r["decoder"], r["nfe"], r["exact_solve"]) for r in results if r["tier"] == tier], "curves": CURVES}
              for tier in dict.fromkeys(r["tier"] for r in results)]
    accuracy_vs_nfe(png, panels, title="Exact-solve rate against forward passes")
    return png


def summarise(results) -> dict:
    """Per tier: the best one-position-per-step decoder; the best threshold setting overall and the
    best among those needing at most half its NFE (the goal: within 3 points at 2x fewer NFE),
    each with its gap in points and its NFE ratio; whether every threshold setting lies on or
    above the top-k line (k = 1, 2, 5, linear in log NFE) at its NFE; and the AR model beside them."""
    import numpy as np

    out = {}
    for tier in dict.fromkeys(r["tier"] for r in results):
        rows = {r["decoder"]: r for r in results if r["tier"] == tier}
        greedy = [rows[n] for n in ("greedy_confidence", "greedy_margin", "greedy_entropy") if n in rows]
        thresholds = [r for n, r in rows.items() if n.startswith("threshold_")]
        if not greedy or not thresholds:
            continue
        best = max(greedy, key=lambda r: r["exact_solve"])

        def describe(r):
            return {"decoder": r["decoder"], "exact_solve": r["exact_solve"], "nfe": r["nfe"],
                    "gap_points": 100 * (best["exact_solve"] - r["exact_solve"]), "nfe_ratio": best["nfe"] / r["nfe"]}

        entry = {"best_one_per_step": {"decoder": best["decoder"], "exact_solve": best["exact_solve"], "nfe": best["nfe"]},
                 "best_threshold": describe(max(thresholds, key=lambda r: (r["exact_solve"], -r["nfe"])))}
        half = [r for r in thresholds if r["nfe"] <= best["nfe"] / 2]
        if half:
            entry["best_threshold_at_half_nfe"] = describe(max(half, key=lambda r: (r["exact_solve"], -r["nfe"])))
        topk = sorted((rows[n]["nfe"], rows[n]["exact_solve"]) for n in ("greedy_confidence", "topk2", "topk5") if n in rows)
        if len(topk) == 3:
            xs, ys = np.log([x for x, _ in topk]), [y for _, y in topk]
            entry["threshold_vs_topk_line_points"] = {
                r["decoder"]: round(100 * (r["exact_solve"] - float(np.interp(np.log(r["nfe"]), xs, ys))), 1)
                for r in thresholds if xs[0] <= np.log(r["nfe"]) <= xs[-1]}
        if "autoregressive" in rows:
            entry["autoregressive"] = {"exact_solve": rows["autoregressive"]["exact_solve"], "nfe": rows["autoregressive"]["nfe"]}
        out[tier] = entry
    return out


if __name__ == "__main__":
    main()
