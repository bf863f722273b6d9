"""Orbax checkpoints of the train state and the data-iterator position.

Layout: <workdir>/checkpoints/<step>/{state, data}. Orbax writes each checkpoint into a
temporary folder and renames it when complete, so a kill mid-save leaves the older ones
restorable. The data item is the iterator's global batch index (the same for any process
count), written as JSON. Restores take an abstract target whose shardings come from the
*current* mesh, so a checkpoint restores onto any mesh and any number of processes; leaves of
the target that are `ocp.PLACEHOLDER` are not read at all (sampling reads only the parameters
it uses). Paths go through etils.epath, so a `gs://` workdir works like a local one.

Damage is told apart from other failures. A checkpoint whose files are missing, truncated or
fail their checksums or metadata parsing (`is_corruption`) is reported in one line, moved to
<workdir>/damaged/ and the next older one is used. Any other error (a storage outage, a
permission, memory) leaves every checkpoint where it is and stops with `RestoreError`.
"""

from __future__ import annotations

import gc
import json
import re
import sys
import time

import jax
import orbax.checkpoint as ocp
from etils import epath

from dlm.config import ConfigError

# Status codes with which TensorStore reports bytes that are not there or do not decode.
_CORRUPT_STATUS = re.compile(r"\b(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND)\b|truncated|corrupt|checksum|decompress", re.IGNORECASE)


class RestoreError(RuntimeError):
    """A checkpoint could not be read for a reason other than damage; it was left in place."""


def is_corruption(error: BaseException) -> bool:
    """True when an exception (or one it was raised from) says the checkpoint's bytes are damaged:
    a missing file, metadata that does not parse, or TensorStore reading past the end of a
    truncated file or failing to decode it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, EOFError)):
            return True
        if isinstance(error, ValueError) and _CORRUPT_STATUS.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _collect_abandoned_reads() -> None:
    """When one array of a damaged checkpoint cannot be read, Orbax gives up on the others and
    leaves their failed reads to the garbage collector, which would print each one's traceback
    ("Exception ignored in: <coroutine ...>"), and reads still in flight call back into its
    closed event loop ("Event loop is closed"). The damage is reported once, in one sentence:
    let them finish and collect them now, quietly (any other unraisable exception is still
    printed)."""
    previous, quiet = sys.unraisablehook, []

    def hook(unraisable):
        abandoned = "coroutine" in repr(unraisable.object)
        late = unraisable.object is None and "Event loop is closed" in str(unraisable.exc_value)  # a read's callback
        if abandoned or late:
            quiet.append(1)
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:  # reads still in flight finish a moment later: collect until a few rounds find none
        idle, deadline = 0, time.time() + 2.0
        while idle < 3 and time.time() < deadline:
            before = len(quiet)
            gc.collect()
            idle = idle + 1 if len(quiet) == before else 0
            time.sleep(0.02)
    finally:
        sys.unraisablehook = previous


def _names(path) -> tuple[str, ...]:
    """A pytree key path as names (attribute, dict key or index alike)."""
    return tuple(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def _path(workdir) -> epath.Path:
    p = epath.Path(workdir)
    return p if "://" in str(workdir) else p.resolve()


def save_params(path, params) -> None:
    """One parameter tree (an imported model's) as an Orbax checkpoint at `path`, written
    synchronously with at most the largest array (at least 1 GB) in flight: the default lets
    Orbax copy many arrays to host buffers at once, gigabytes on top of an imported model."""
    largest = max(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=max(1, -(-largest // 10**9))))
    ckptr.save(_path(path), args=ocp.args.StandardSave(params), force=True)
    ckptr.close()


def restore_params(path, abstract_params):
    """The parameter tree saved by save_params, placed by the shardings of `abstract_params`."""
    path = _path(path)
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist; train.init_from names a parameter checkpoint written by dlm.convert.")
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(path, abstract_params)
    except ValueError as e:
        raise ConfigError(f"The parameters in {str(path)!r} do not match the model of the config ({str(e).splitlines()[0][:120]}).") from None
    finally:
        ckptr.close()


class Checkpointer:
    def __init__(self, workdir, keep: int = 3, async_save: bool = True, create: bool = True):
        self.workdir = _path(workdir)
        self.directory = self.workdir / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"),
                                             item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                            "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator=None) -> None:
        items = {"state": ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonSave({"next_index": int(data_iterator.get_state()["next_index"])})
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the same step once any process got a preemption signal
        (Orbax's multihost sync point; a plain flag on one process)."""
        return self.manager.reached_preemption(step)

    def _check_tree(self, step: int, abstract_state) -> None:
        """Compare the checkpoint's stored tree with the target before reading any array: a
        mismatch found by Orbax half way through its reads leaves callbacks that fire into its
        closed event loop (tracebacks after the error). Unreadable metadata is left to the
        restore, which says what is damaged."""
        try:
            stored = self.manager.item_metadata(step)["state"]
        except Exception:
            return
        if stored is None:
            return
        have = {_names(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(stored) if hasattr(leaf, "shape")}
        for p, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
            if not hasattr(leaf, "shape"):
                continue  # a placeholder: not read
            name = _names(p)
            if have.get(name) != tuple(leaf.shape):
                there = "missing" if name not in have else f"of shape {have[name]}"
                raise ConfigError(f"Checkpoint {step} in {str(self.directory)!r} does not match the model and optimizer of the "
                                  f"config ({'/'.join(name)} is {there} there and of shape {tuple(leaf.shape)} here); restore it "
                                  "with the config it was trained with.")

    def _restore_step(self, step: int, abstract_state, data_iterator):
        self._check_tree(step, abstract_state)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        items = {"state": ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonRestore()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:
            if "MISSING" not in str(e) and "mismatch" not in str(e).lower() and "not compatible" not in str(e):
                raise
            raise ConfigError(f"Checkpoint {step} in {str(self.directory)!r} does not match the model and optimizer of the "
                              "config (its parameter tree differs); restore it with the config it was trained with.") from None
        if data_iterator is not None:
            state = dict(data_iterator.get_state())
            state["next_index"] = int(out["data"]["next_index"])
            data_iterator.set_state(state)
        return out["state"]

    def restore(self, abstract_state, data_iterator=None, step: int | None = None, log=print):
        """Restore the state (and position the iterator) at `step`, default the newest that is intact."""
        if step is not None:
            return self._restore_step(step, abstract_state, data_iterator)
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise ConfigError(f"No checkpoint found in {str(self.directory)!r}; train first or point --workdir at a trained run.")
        for i, s in enumerate(steps):
            try:
                return self._restore_step(s, abstract_state, data_iterator)
            except ConfigError:
                raise
            except Exception as e:
                reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                if not is_corruption(e):
                    raise RestoreError(f"Restoring checkpoint {s} in {self.directory} failed ({type(e).__name__}: {reason}); "
                                       "nothing in it looks damaged, so it was left in place: fix the cause and run again.") from e
                nxt = f"restoring checkpoint {steps[i + 1]} instead" if i + 1 < len(steps) else "no older checkpoint is left"
                damaged = f"Checkpoint {s} in {self.directory} is damaged ({type(e).__name__}: {reason}); {nxt}."
            _collect_abandoned_reads()  # here, once the exception and its frames are released
            log(damaged)
            self._set_aside(s)
        raise ConfigError(f"Every checkpoint in {str(self.directory)!r} is damaged; they were moved to {str(self.workdir / 'damaged')!r}.")

    def _set_aside(self, step: int) -> None:
        """Move a damaged checkpoint out of the manager's folder (kept for inspection, never deleted)."""
        if jax.process_index() == 0:
            dest = self.workdir / "damaged"
            dest.mkdir(exist_ok=True)
            target = dest / str(step)
            n = 1
            while target.exists():
                target, n = dest / f"{step}.{n}", n + 1
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"dlm-set-aside-{step}")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
