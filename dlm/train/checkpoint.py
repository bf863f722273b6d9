"""Orbax checkpoints of the train state and the data-iterator state.

Layout: <workdir>/checkpoints/<step>/{state, data}. Orbax writes each checkpoint into a
temporary folder and renames it when complete, so a kill mid-save leaves the previous ones
restorable. Restores take an abstract target whose shardings come from the *current* mesh, so a
checkpoint restores onto any mesh.
"""

from __future__ import annotations

import pathlib

import grain
import orbax.checkpoint as ocp

from dlm.config import ConfigError


class Checkpointer:
    def __init__(self, workdir: str | pathlib.Path, keep: int = 3, async_save: bool = True, create: bool = True):
        self.directory = pathlib.Path(workdir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator=None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """Restore the state (and the iterator in place) at `step` (default: the newest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"No checkpoint found in {str(self.directory)!r}; train first or point --workdir at a trained run.")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
        except ValueError as e:
            if "MISSING" not in str(e) and "mismatch" not in str(e).lower():
                raise
            raise ConfigError(f"Checkpoint {step} in {str(self.directory)!r} does not match the model and optimizer of the "
                              "config (its parameter tree differs); restore it with the config it was trained with.") from None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
