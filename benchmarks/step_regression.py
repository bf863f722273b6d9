"""Seconds per sampling step, this tree against a baseline commit, back to back.

    python benchmarks/step_regression.py --baseline a6efd70 --out benchmarks/results/step_regression.json \
        [--length 1024] [--repeats 3]

Checks the baseline out into a temporary git worktree and runs `benchmarks/sampling.py --suite
hyperschedules` (every hyperschedule loop, cached and uncached, on the bench model) and the
ancestral loop and the parallel decoder (per pass: no cache, prefix and dual caches) from the
baseline and from this tree in turn, --repeats times each, alternating so that drift on a noisy
machine hits both alike. Records the median seconds per step (per pass for the parallel decoder) of each (loop, mode) for both,
and their ratio (this tree / baseline: below 1 is faster). Run it alone: two heavy jobs at once
halve each other's speed. The worktree is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


# The other loops, through dlm.generate calls that both trees understand, at 256 tokens (a
# random model commits little per pass, so longer canvases take minutes): the ancestral (flat
# MDLM) loop's seconds per step, and the parallel decoder's seconds per pass (top-4 per pass,
# blocks of 32, prompt 64) without a cache and with the prefix and dual caches.
LOOPS = """
import dataclasses, json, sys
import dlm
from dlm.config import CommitRule, DecodeCache, Sampler, SamplingConfig, load_config
L, steps = 256, 64
cfg = load_config("configs/bench.yaml", [f"data.seq_len={L}"])
model = dlm.build_model(cfg, seed=0)
out = {}
sc = SamplingConfig(steps=steps, num_samples=1, seed=0)
for _ in range(2):  # the first call compiles
    r = dlm.generate(model, None, sc, length=L)
out["ancestral", "uncached"] = r["seconds"] / steps
prompt = list(range(64))
for cache in ("none", "prefix", "dual"):
    dc = dataclasses.replace(sc.decode, block_length=32, rule=CommitRule.TOPK, k=4, cache=DecodeCache(cache), early_stop=False)
    pc = dataclasses.replace(sc, sampler=Sampler.PARALLEL, decode=dc, temperature=0.0)
    for _ in range(2):
        r = dlm.generate(model, prompt, pc, length=L)
    out["parallel", "cached " + cache if cache != "none" else "uncached"] = r["seconds"] / r["nfe"]
print(json.dumps([[k[0], k[1], v] for k, v in out.items()]))
"""


def run_suite(tree: pathlib.Path, length: int, out: pathlib.Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(tree))
    env.pop("XLA_FLAGS", None)
    subprocess.run([sys.executable, "benchmarks/sampling.py", "--suite", "hyperschedules", "--length", str(length),
                    "--out", str(out)], cwd=tree, env=env, check=True, capture_output=True, text=True)
    rows = json.loads(out.read_text())["results"]
    times = {(r["hyperschedule"], mode): r[mode]["seconds_per_step"] for r in rows for mode in ("cached", "uncached") if mode in r}
    loops = subprocess.run([sys.executable, "-c", LOOPS], cwd=tree, env=env, check=True, capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
    times.update({(name, mode): v for name, mode, v in json.loads(loops)})
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="A commit to compare with (e.g. a6efd70).")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    work = pathlib.Path(tempfile.mkdtemp(prefix="dlm-steps-"))
    base_tree = work / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.baseline], cwd=ROOT, check=True,
                   capture_output=True)
    runs = {"baseline": [], "tree": []}
    try:
        for i in range(args.repeats):
            for name, tree in (("baseline", base_tree), ("tree", ROOT)):
                runs[name].append(run_suite(tree, args.length, work / f"{name}{i}.json"))
                print(f"run {i + 1}/{args.repeats} {name}: " + ", ".join(f"{s} {m} {v * 1e3:.2f} ms"
                                                                        for (s, m), v in runs[name][-1].items()), flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)
    rows = []
    for key in runs["tree"][0]:
        base = statistics.median(r[key] for r in runs["baseline"])
        tree = statistics.median(r[key] for r in runs["tree"])
        rows.append({"hyperschedule": key[0], "mode": key[1], "baseline_seconds_per_step": base, "seconds_per_step": tree,
                     "ratio": tree / base, "baseline_runs": [r[key] for r in runs["baseline"]],
                     "runs": [r[key] for r in runs["tree"]]})
        print(f"{key[0]:15s} {key[1]:9s} baseline {base * 1e3:8.2f} ms  this tree {tree * 1e3:8.2f} ms  "
              f"ratio {tree / base:.3f}", flush=True)
    record = {"baseline": args.baseline, "tree": head, "length": args.length, "repeats": args.repeats,
              "config": "configs/bench.yaml", "results": rows}
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
