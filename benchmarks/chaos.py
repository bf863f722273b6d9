"""Chaos run: train while killing the process at random moments, resume each time, and compare
with an uninterrupted run.

    python benchmarks/chaos.py --kills 10 --out FILE [--config configs/test.yaml] [key=value ...]

Each kill is SIGKILL or SIGTERM (random), sent at a random moment of the run: during start-up,
mid-step, or during an async checkpoint save. After the last kill the run goes to the end.
Reports kills survived, lost steps (steps whose logged loss is missing or differs from the
uninterrupted run) and the largest absolute difference of the final parameters (raw and EMA).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

from common import ROOT, write_json


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--config", default=str(ROOT / "configs/test.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-delay", type=float, default=2.0, help="earliest kill, seconds after a start")
    parser.add_argument("--max-delay", type=float, default=14.0, help="latest kill, seconds after a start")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = ["train.steps=1500", "train.checkpoint_every=3", "train.log_every=1", "train.keep_checkpoints=2",
                 "data.max_documents=60", *args.overrides]
    rng = random.Random(args.seed)
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def cmd(workdir):
        return [sys.executable, str(ROOT / "train.py"), "--config", args.config, f"workdir={workdir}", *overrides]

    import jax
    import numpy as np
    from flax import nnx

    import dlm
    from dlm.train.checkpoint import Checkpointer
    from dlm.train.metrics import per_step_losses

    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ref, work = os.path.join(tmp, "ref"), os.path.join(tmp, "chaos")
        t0 = time.time()
        subprocess.run(cmd(ref), check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ref_seconds = time.time() - t0
        events = []
        for k in range(args.kills):
            before = Checkpointer(work).latest_step() if os.path.isdir(os.path.join(work, "checkpoints")) else None
            proc = subprocess.Popen(cmd(work), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            delay = rng.uniform(args.min_delay, args.max_delay)
            sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
            try:
                proc.wait(timeout=delay)
                finished_early = True
            except subprocess.TimeoutExpired:
                finished_early = False
                proc.send_signal(sig)
            out, _ = proc.communicate()
            resumed = next((l for l in out.splitlines() if l.startswith("Resumed from")), None)
            damaged = [l for l in out.splitlines() if " is damaged " in l]
            after = Checkpointer(work).latest_step() if os.path.isdir(os.path.join(work, "checkpoints")) else None
            events.append({"kill": k + 1, "signal": sig.name, "delay_seconds": round(delay, 2), "returncode": proc.returncode,
                           "finished_before_kill": finished_early, "resumed_from": resumed, "damaged": damaged,
                           "checkpoint_before": before, "checkpoint_after": after})
            print(f"kill {k + 1}: {sig.name} after {delay:.1f}s -> exit {proc.returncode}, checkpoint {before} -> {after}",
                  flush=True)
            if finished_early:
                break
        final = subprocess.run(cmd(work), env=env, capture_output=True, text=True)
        a, b = per_step_losses(ref), per_step_losses(work)
        lost = [s for s in sorted(a) if s not in b or b[s] != a[s]]
        diffs = {}
        for use_ema in (False, True):
            ma, _ = dlm.restore(ref, use_ema=use_ema)
            mb, _ = dlm.restore(work, use_ema=use_ema)
            diffs["ema" if use_ema else "params"] = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                                                        for x, y in zip(jax.tree.leaves(nnx.state(ma)), jax.tree.leaves(nnx.state(mb))))
        survived = sum(1 for e in events if not e["finished_before_kill"]) if final.returncode == 0 else 0
    record = {
        "kills_requested": args.kills, "kills": sum(1 for e in events if not e["finished_before_kill"]),
        "kills_survived": survived, "sigkill": sum(e["signal"] == "SIGKILL" for e in events),
        "sigterm": sum(e["signal"] == "SIGTERM" for e in events), "final_returncode": final.returncode,
        "steps": len(a), "lost_steps": len(lost), "lost_step_ids": lost[:20],
        "max_abs_param_diff": diffs["params"], "max_abs_ema_diff": diffs["ema"], "identical": diffs["params"] == 0.0 and diffs["ema"] == 0.0,
        "uninterrupted_seconds": ref_seconds, "seconds": time.time() - t_start, "events": events, "overrides": overrides,
    }
    write_json(args.out, record)
    print(f"{record['kills_survived']}/{record['kills']} kills survived, {record['lost_steps']} lost steps, "
          f"max |param diff| {record['max_abs_param_diff']}, max |EMA diff| {record['max_abs_ema_diff']}")


if __name__ == "__main__":
    main()
