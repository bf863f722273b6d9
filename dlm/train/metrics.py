"""Metrics to JSONL and TensorBoard (process 0 only)."""

from __future__ import annotations

import json
import pathlib
import time

import jax


class MetricWriter:
    def __init__(self, workdir: pathlib.Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if self.enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:  # TensorBoard output is optional; JSONL is always written
                self.tb = None

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": prefix, "time": time.time()}
        record.update({k: (float(v) if not isinstance(v, (list, str)) else v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if not isinstance(v, (list, str)):
                    self.tb.add_scalar(f"{prefix}/{k}", float(v), int(step))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str | pathlib.Path, split: str = "train") -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("split") == split]


def per_step_losses(workdir) -> dict[int, float]:
    """step -> loss, the last record winning (a resumed run re-logs the steps it repeats)."""
    out = {}
    for r in read_metrics(workdir):
        for i, loss in enumerate(r.get("losses", [])):
            out[r["first_step"] + i] = loss
    return out
