"""Post-training from rewards against continued SFT, on the same wall-clock budget.

    python benchmarks/rl.py --task sudoku --out results/rl_sudoku.json                 # 9x9, configs/rl_sudoku.yaml
    python benchmarks/rl.py --task addition --out results/rl_addition.json             # configs/rl_addition.yaml
    python benchmarks/rl.py --task sudoku --estimators elbo,d1,coupled,sandwich,trace --budget 600 --out F

From the committed recipe's SFT model (configs/sudoku.yaml / addition.yaml, trained first if its
workdir holds no checkpoint, as benchmarks/tasks.py does), two arms run for --budget seconds of
wall clock each (compilation included), one after the other:

- rl: train.mode=rl with the task's RL config (configs/rl_<task>.yaml), one run per estimator;
- sft: the recipe's own training continued from the same parameters (train.init_from=the SFT
  workdir: its EMA, a fresh optimizer) at the recipe's final learning rate (lr * min_lr_ratio),
  constant, the EMA kept as in the recipe.

Then exact-solve on --num-puzzles held-out problems per tier (the tiers and seeds of
benchmarks/tasks.py: problems neither training nor RL saw) before and after, per decoder, at
temperature 0: greedy_margin (one cell per step, by margin), threshold_0.9_margin and
random_order (the exact ancestral sampler), each with its 95% Wilson interval and its forward
passes; and, for the plot, the solve rate of both arms' checkpoints against wall time on
--curve-puzzles problems of the first tier. Writes JSON

    {"task", "budget_seconds", "estimator", "start": [ROW], "arms": {"rl": [ROW], "sft": [ROW]},
     "estimators": {name: [ROW]}, "curves": ..., "goals": ...}
    ROW = {"tier", "decoder", "exact_solve", "exact_solve_ci", "nfe", "num_puzzles"}

and a PNG of solve rate against wall time beside it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from common import ROOT, write_json

DECODERS = ("greedy_margin", "threshold_0.9_margin", "random_order")
CONFIGS = {"sudoku": ("configs/sudoku.yaml", "configs/rl_sudoku.yaml"), "addition": ("configs/addition.yaml", "configs/rl_addition.yaml")}


def evaluate(task: str, workdir, tiers: dict, decoders, num: int, step=None) -> list[dict]:
    """ROWs of the run in `workdir` (checkpoint `step`, default the newest) on every tier and decoder."""
    import dlm
    from dlm.eval.command import cfg_ema
    from tasks import decoder_sampling, solve

    model, cfg = dlm.restore(workdir, use_ema=cfg_ema(pathlib.Path(workdir)), step=step)
    rows = []
    for tier, (problems, _) in tiers.items():
        problems = tuple(p[:num] for p in problems)
        for name in decoders:
            r = solve(task, model, cfg, problems, decoder_sampling(name, cfg.data.seq_len), 100)
            rows.append({"tier": tier, "decoder": name, "exact_solve": r["exact_solve"], "exact_solve_ci": r["exact_solve_ci"],
                         "nfe": r["nfe"], "num_puzzles": r["num_puzzles"], "cell_accuracy": r["cell_accuracy"]})
    return rows


def run_arm(cfg, what: str) -> dict:
    """Run an arm for its budget (train.max_seconds) unless its workdir holds a finished one: the
    wall-clock start, the seconds it took and its checkpoint steps with their elapsed seconds."""
    from dlm.config import ConfigError, TrainMode
    from dlm.train.metrics import read_metrics

    work = pathlib.Path(cfg.workdir)
    done = work / "arm.json"
    if done.exists():
        return json.loads(done.read_text())
    if work.exists():
        raise ConfigError(f"{str(work)!r} holds an unfinished {what} arm; remove it (or pass --tag) to run the arm again.")
    t0 = time.time()
    if cfg.train.mode == TrainMode.RL:
        from dlm.rl.trainer import train_rl

        train_rl(cfg)
    else:
        from dlm.train.trainer import train

        train(cfg)
    seconds = time.time() - t0
    records = read_metrics(work)
    times = {int(r["step"]): r["time"] - t0 for r in records if r["split"] == "train"}
    steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    info = {"seconds": seconds, "steps": steps, "elapsed": {str(s): times.get(s, seconds) for s in steps},
            "last_metrics": next((r for r in reversed(records) if r["split"] == "train"), {})}
    done.write_text(json.dumps(info))
    return info


def curve(task, workdir, info, tiers, decoders, num, points: int) -> list[dict]:
    """Solve rate of evenly spaced checkpoints against their wall time (every tier)."""
    steps = info["steps"]
    pick = sorted({steps[round(i * (len(steps) - 1) / max(points - 1, 1))] for i in range(points)}) if steps else []
    out = []
    for s in pick:
        for row in evaluate(task, workdir, tiers, decoders, num, step=s):
            out.append(dict(row, step=s, seconds=info["elapsed"][str(s)]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--budget", type=float, default=300.0, help="wall-clock seconds of each arm (the issue allows up to 1800)")
    parser.add_argument("--estimators", default=None,
                        help="comma-separated RL estimators, one RL arm each (the first is 'rl'; default: the RL config's)")
    parser.add_argument("--num-puzzles", type=int, default=500, help="held-out problems per tier")
    parser.add_argument("--curve-puzzles", type=int, default=200)
    parser.add_argument("--curve-points", type=int, default=5)
    parser.add_argument("--no-sft", action="store_true", help="skip the continued-SFT arm")
    parser.add_argument("--tag", default="", help="suffix of the arms' workdirs (runs/<arm>_<task>_<budget>s<tag>)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--replot", default=None, help="only redraw the PNG of an earlier JSON record (next to it)")
    parser.add_argument("overrides", nargs="*", help="overrides of the RL config, e.g. train.lr=1e-5")
    args = parser.parse_args()
    if args.replot:
        print(plot(json.loads(pathlib.Path(args.replot).read_text()), str(pathlib.Path(args.replot).with_suffix(".png"))))
        return

    from dlm.config import load_config
    from tasks import tiers_of, train_if_needed

    sft_config, rl_config = (str(ROOT / c) for c in CONFIGS[args.task])
    cfg = load_config(sft_config)
    train_if_needed(cfg)
    start = pathlib.Path(cfg.workdir)
    tiers = tiers_of(args.task, cfg, args.num_puzzles)
    budget = f"{args.budget:g}"
    estimators = (args.estimators or load_config(rl_config).rl.estimator.value).split(",")
    print(f"start: {start}", flush=True)
    record = {"task": args.task, "budget_seconds": args.budget, "estimator": estimators[0],
              "start": evaluate(args.task, start, tiers, DECODERS, args.num_puzzles)}
    _print("start", record["start"])

    arms, infos = {}, {}
    for est in estimators:
        rl = load_config(rl_config, [f"workdir=runs/rl_{args.task}_{est}_{budget}s{args.tag}", f"train.init_from=../{start.name}",
                                     f"rl.estimator={est}", f"train.max_seconds={args.budget}", "train.progress=false",
                                     "train.checkpoint_every=20", *args.overrides])  # RL steps are few: points for the curve
        infos[est] = (rl.workdir, run_arm(rl, f"RL ({est})"))
        arms[est] = evaluate(args.task, rl.workdir, tiers, DECODERS, args.num_puzzles)
        _print(f"rl ({est}, {infos[est][1]['steps'][-1]} steps)", arms[est])
    record["estimators"] = arms
    record["arms"] = {"rl": arms[record["estimator"]]}
    if not args.no_sft:
        t = cfg.train
        sft = load_config(sft_config, [f"workdir=runs/sft_{args.task}_{budget}s{args.tag}", f"train.init_from=../{start.name}",
                                       "train.steps=1000000", f"train.max_seconds={args.budget}", f"train.lr={t.lr * t.min_lr_ratio}",
                                       "train.warmup_steps=10", "train.min_lr_ratio=1.0", "train.eval_every=0",
                                       "train.checkpoint_every=100", "train.keep_checkpoints=1000", "train.progress=false"])
        infos["sft"] = (sft.workdir, run_arm(sft, "continued-SFT"))
        record["arms"]["sft"] = evaluate(args.task, sft.workdir, tiers, DECODERS, args.num_puzzles)
        _print(f"sft ({infos['sft'][1]['steps'][-1]} steps)", record["arms"]["sft"])
    curve_decoders = ("greedy_margin", "threshold_0.9_margin")
    record["curves"] = {name: curve(args.task, work, info, tiers, curve_decoders, args.curve_puzzles, args.curve_points)
                        for name, (work, info) in infos.items()}
    record["curves"]["start"] = [dict(r, step=0, seconds=0.0) for r in evaluate(args.task, start, tiers, curve_decoders,
                                                                                   args.curve_puzzles)]
    record["runs"] = {name: {"workdir": str(work), "seconds": info["seconds"], "steps": info["steps"][-1],
                             "last_metrics": info["last_metrics"]} for name, (work, info) in infos.items()}
    record["goals"] = goals(record)
    print(json.dumps(record["goals"], indent=1))
    if args.out:
        record["plot"] = plot(record, str(pathlib.Path(args.out).with_suffix(".png")))
    write_json(args.out, record)


def _print(what: str, rows) -> None:
    for r in rows:
        lo, hi = r["exact_solve_ci"]
        print(f"{what:28s} {r['tier']:10s} {r['decoder']:22s} solve {r['exact_solve']:6.1%} [{lo:.1%}, {hi:.1%}]  NFE {r['nfe']:5.1f}",
              flush=True)


def goals(record: dict) -> dict:
    """RL minus continued SFT in points per tier and decoder (the goal: >= 10 somewhere) and, for
    Sudoku, the threshold decoder after RL against the one-cell-per-step decoder before it."""
    key = lambda rows: {(r["tier"], r["decoder"]): r for r in rows}
    start, rl = key(record["start"]), key(record["arms"]["rl"])
    out = {}
    if "sft" in record["arms"]:
        sft = key(record["arms"]["sft"])
        gaps = {f"{t}/{d}": round(100 * (rl[(t, d)]["exact_solve"] - sft[(t, d)]["exact_solve"]), 1) for (t, d) in rl}
        out["rl_minus_sft_points"] = gaps
        out["rl_beats_sft_by_10_points"] = any(g >= 10 for g in gaps.values())
    if record["task"] == "sudoku" and ("30", "threshold_0.9_margin") in rl:
        after, before = rl[("30", "threshold_0.9_margin")], start[("30", "greedy_margin")]
        out["threshold_after_rl_vs_greedy_before"] = {
            "threshold_0.9_after": after["exact_solve"], "greedy_before": before["exact_solve"],
            "points": round(100 * (after["exact_solve"] - before["exact_solve"]), 1), "nfe_ratio": before["nfe"] / after["nfe"],
            "reached": after["exact_solve_ci"][1] >= before["exact_solve"]}
    return out


def plot(record: dict, png: str) -> str:
    """Solve rate of each arm's checkpoints against wall time: a panel per tier and curve decoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = record["curves"]
    rows = [r for rs in curves.values() for r in rs]
    panels = list(dict.fromkeys((r["tier"], r["decoder"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    start = {(r["tier"], r["decoder"]): r for r in curves.get("start", [])}
    for ax, (tier, dec) in zip(axes[0], panels):
        for name, rs in curves.items():
            if name == "start":
                continue
            pts = sorted((r["seconds"], r["exact_solve"]) for r in rs if (r["tier"], r["decoder"]) == (tier, dec))
            if (tier, dec) in start:
                pts = [(0.0, start[(tier, dec)]["exact_solve"])] + pts
            ax.plot([p[0] / 60 for p in pts], [100 * p[1] for p in pts], marker="o",
                    label="continued SFT" if name == "sft" else f"RL ({name})", linestyle="--" if name == "sft" else "-")
        ax.set_title(f"{record['task']}, tier {tier}\n{dec}", fontsize=10)
        ax.set_xlabel("wall time (minutes, this CPU)")
        ax.set_ylabel("exact solve (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


if __name__ == "__main__":
    main()
