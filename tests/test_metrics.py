"""Metric records: JSONL per split, floats from device scalars, the last record of a step wins."""

import jax.numpy as jnp
import numpy as np

from dlm.train.metrics import MetricWriter, per_step_losses, read_metrics


def test_metrics_round_trip_and_resumed_steps_take_the_last_record(tmp_path):
    w = MetricWriter(tmp_path)
    w.write(4, {"loss": jnp.float32(2.5), "losses": [3.0, 2.9, 2.7, 2.5], "first_step": 0})
    w.write(4, {"nelbo": np.float64(2.25), "bits": 3.2}, prefix="eval")
    w.write(6, {"losses": [2.4, 2.3], "first_step": 4})
    w.close()
    w = MetricWriter(tmp_path)  # a resumed run repeats steps 4 and 5 with other values
    w.write(6, {"losses": [2.2, 2.1], "first_step": 4})
    w.close()
    train, ev = read_metrics(tmp_path), read_metrics(tmp_path, "eval")
    assert [r["step"] for r in train] == [4, 6, 6] and [r["step"] for r in ev] == [4]
    assert isinstance(train[0]["loss"], float) and train[0]["loss"] == 2.5 and ev[0]["nelbo"] == 2.25
    assert per_step_losses(tmp_path) == {0: 3.0, 1: 2.9, 2: 2.7, 3: 2.5, 4: 2.2, 5: 2.1}
    assert any((tmp_path / "tensorboard").iterdir())
    assert read_metrics(tmp_path / "absent") == [] and per_step_losses(tmp_path / "absent") == {}
