"""Peak host memory of `sample.py` on the bench model, against the parameters it needs.

Trains the bench model (configs/bench.yaml) for one step if --workdir holds no checkpoint, then
measures the peak RSS of fresh processes:
- `sample.py --workdir W`, sampling a short batch (restores the parameters from the checkpoint);
- `dlm.restore(W)` alone;
- a model built in memory (`dlm.build_model`) and sampled the same way, with no checkpoint read;
- the runtime alone (jax and dlm imported, a tiny jitted call).
The restore's cost is its peak minus the runtime's; the goal is at most the parameters plus
one copy (each array read once into its device buffer), where reading the whole train state
(parameters, Adam moments, EMA) costs several.

    python benchmarks/sample_memory.py --out runs/sample_memory.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from common import ROOT, write_json

SAMPLE = ["--num-samples", "2", "--steps", "4", "--length", "64", "--seed", "0"]

BUILD = """
import resource, sys
import dlm
from dlm.config import SamplingConfig
cfg = dlm.load_config(sys.argv[1])
model = dlm.build_model(cfg)
dlm.generate(model, None, SamplingConfig(steps=4, num_samples=2, seed=0), length=64)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

RESTORE = """
import resource, sys
import dlm
dlm.restore(sys.argv[1])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

RUNTIME = """
import resource
import jax, jax.numpy as jnp
import dlm
jax.jit(lambda x: x + 1)(jnp.ones(4)).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

MEASURE = """
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if p.returncode:
    sys.exit(p.stderr[-2000:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def peak_rss(cmd: list[str]) -> int:
    """Peak RSS in bytes of a command run in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/bench.yaml"))
    parser.add_argument("--workdir", default=str(ROOT / "runs/bench_sample_memory"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import dlm
    from dlm.train.checkpoint import Checkpointer

    if Checkpointer(args.workdir).latest_step() is None:
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", args.config, f"workdir={args.workdir}",
                        "train.steps=1", "train.batch_size=8", "train.eval_windows=8", "data.max_documents=200",
                        "train.progress=false"], check=True, cwd=ROOT)
    model, cfg = dlm.restore(args.workdir)
    import jax
    from flax import nnx

    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    config = f"{args.workdir}/config.yaml"
    record = {"config": args.config, "param_bytes": param_bytes,
              "train_state_bytes": param_bytes * (3 + (cfg.train.ema_decay > 0)),  # params, Adam mu and nu, EMA
              "peak_rss_sample_py": peak_rss([sys.executable, str(ROOT / "sample.py"), "--workdir", args.workdir, *SAMPLE,
                                              "--out", "/dev/null"]),
              "peak_rss_built_in_memory": peak_rss([sys.executable, "-c", BUILD, config]),
              "peak_rss_runtime": peak_rss([sys.executable, "-c", RUNTIME])}
    record["peak_rss_restore_only"] = peak_rss([sys.executable, "-c", RESTORE, args.workdir])
    record["restore_bytes"] = record["peak_rss_restore_only"] - record["peak_rss_runtime"]
    record["restore_in_param_copies"] = record["restore_bytes"] / param_bytes
    record["sample_py_above_runtime_in_param_copies"] = (record["peak_rss_sample_py"] - record["peak_rss_runtime"]) / param_bytes
    record["restore_within_params_plus_one_copy"] = record["restore_bytes"] <= 2 * param_bytes
    write_json(args.out, record)


if __name__ == "__main__":
    main()
