"""The training loop: data -> jitted step -> metrics -> evaluation -> checkpoints.

Resumes automatically from the newest checkpoint in the workdir (state, data iterator, rng, step),
so a resumed run sees exactly the batches and noise an uninterrupted one would have.
"""

from __future__ import annotations

import pathlib
import signal
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from dlm.config import Config, ConfigError, NonFinitePolicy, save_config
from dlm.data.pipeline import LoaderError, load_data, train_iterator, unigram_entropy_bits, validation_windows
from dlm.eval.likelihood import Evaluator
from dlm.mesh import check_batch, global_batch, make_mesh, mesh_context
from dlm.objectives import run_objective
from dlm.train.checkpoint import Checkpointer
from dlm.train.metrics import MetricWriter
from dlm.train.state import create_train_state, initial_params, make_train_step, start_from


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(msg)


class TrainingError(RuntimeError):
    """Training stopped on a fault (the message says which, and which checkpoint is intact)."""


class Preemption:
    """Stop requests: the loop finishes the step, checkpoints and exits cleanly.

    One process: SIGTERM / SIGINT set a flag that the next step reads. Several processes must
    agree on the step at which all of them save, or a signalled process would enter the save's
    barriers while the others run the next collective step. So there SIGTERM is left to JAX's
    preemption service (the cluster's preemption notice), and every step asks Orbax's multihost
    sync point (`reached_preemption`), which turns on at the same step on every process; a
    SIGINT is shared with an all-gather at logging steps, which every process runs at the same
    step. A process never acts on its own flag alone."""

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer
        self.multi = jax.process_count() > 1
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for s in (signal.SIGINT,) if self.multi else (signal.SIGTERM, signal.SIGINT):
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)

    def requested(self, step: int, log_step: bool) -> str | None:
        """The reason to stop after `step` (the same on every process), or None."""
        if not self.multi:
            return signal.Signals(self.signum).name if self.signum is not None else None
        if self.checkpointer.reached_preemption(step):
            return "a preemption notice (SIGTERM) to one of the processes"
        if log_step:
            from jax.experimental import multihost_utils

            if multihost_utils.process_allgather(np.array([self.signum is not None])).any():
                return "SIGINT to one of the processes"
        return None


def check_faults(cfg: Config, checkpointer, seen: int, count: int, step: int) -> int:
    """Act on `count` skipped non-finite updates by `step` (`seen` of them acted on before): stop
    with TrainingError under train.nonfinite=stop (the last good checkpoint intact), else say how
    many were skipped. Returns the new count seen."""
    if count <= seen:
        return seen
    if cfg.train.nonfinite == NonFinitePolicy.STOP:
        checkpointer.close()  # let an async save of a good state commit
        last = checkpointer.latest_step()
        where = f"checkpoint {last} in {checkpointer.directory} is intact" if last is not None else "no checkpoint was written"
        raise TrainingError(f"Non-finite loss or gradient at or before step {step}; training stopped and {where}.")
    _log(f"Skipped {count - seen} update(s) with a non-finite loss or gradient (total {count}) by step {step}.")
    return count


class Budget:
    """train.max_seconds: the wall-clock budget of one invocation. Every process stops after the
    same step: process 0's clock decides and the verdict is shared."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.time()

    def spent(self, step: int) -> str | None:
        if not self.seconds:
            return None
        over = time.time() - self.start >= self.seconds
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            over = bool(multihost_utils.broadcast_one_to_all(np.array(over)))
        return f"the wall-clock budget train.max_seconds={self.seconds:g}" if over else None


def stop_early(checkpointer, writer, bar, step: int, save, reason: str, t0: float, workdir) -> dict:
    """End a run that a preemption signal or the wall-clock budget stopped at `step`: save it
    (save(), unless that step is saved already), close the checkpointer, metrics and progress bar,
    say so, and return the run's result."""
    if checkpointer.latest_step() != step:
        save()
    checkpointer.close()
    writer.close()
    bar.close()
    msg = f"Stopped by {reason} at step {step}; checkpoint saved to {checkpointer.directory / str(step)}."
    tqdm.write(msg if jax.process_count() == 1 else f"process {jax.process_index()}: {msg}")
    return {"step": step, "preempted": True, "seconds": time.time() - t0, "workdir": str(workdir)}


class Trainer:
    """Owns the run: mesh, data, state, step function, checkpoints and metric writers."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.workdir = pathlib.Path(cfg.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = make_mesh(cfg.mesh)
        check_batch(cfg.train.batch_size, self.mesh, cfg.train.grad_accum)
        if jax.process_index() == 0:
            save_config(cfg, self.workdir / "config.yaml")
        barrier = None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            barrier = lambda: multihost_utils.sync_global_devices("dlm-tokenizer")
        self.data = load_data(cfg.data, self.workdir, cfg.train.seed, leader=jax.process_index() == 0, barrier=barrier)
        self.vocab_size = self.data.vocab_size
        self.val_rows = validation_windows(self.data, cfg.train.eval_windows)
        self.unigram_bits = unigram_entropy_bits(self.data.val_rows, self.vocab_size) / self.data.bytes_per_token
        self.iterator = train_iterator(self.data, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed,
                                       jax.process_index(), jax.process_count(), cfg.data.loader_threads, cfg.data.prefetch,
                                       cfg.data.loader_workers)
        self.checkpointer = Checkpointer(self.workdir, cfg.train.keep_checkpoints, cfg.train.async_checkpointing)
        self.start_step = 0
        resume = self.checkpointer.latest_step() is not None
        # resuming (or starting from imported parameters) restores into the abstract state: the
        # state is allocated once, by the restore
        self.graphdef, self.state, self.shardings = create_train_state(cfg, self.vocab_size, self.mesh,
                                                                       abstract=resume or bool(cfg.train.init_from))
        if resume:
            self.state = self.checkpointer.restore(self.state, self.iterator, log=_log)
            self.start_step = int(self.state.step)
            _log(f"Resumed from {self.checkpointer.directory}/{self.start_step}")
        elif cfg.train.init_from:
            source = self.workdir / cfg.train.init_from
            with mesh_context(self.mesh):
                params = initial_params(cfg, self.workdir, self.state.params)
            self.state = start_from(cfg, params, self.shardings)
            _log(f"Starting from the parameters in {source}")
        self.step_fn = make_train_step(cfg, self.graphdef, self.vocab_size, self.mesh, self.shardings)
        self.objective = run_objective(cfg, self.vocab_size)
        self.evaluator = Evaluator(self.graphdef, self.objective, self.val_rows, batch_size=cfg.train.batch_size,
                                   t_samples=cfg.train.eval_t_samples, seed=cfg.train.seed + 7,
                                   bytes_per_token=self.data.bytes_per_token, mesh=self.mesh, prime=cfg.diffusion.prime.l > 1)
        self.writer = MetricWriter(self.workdir)

    def unit(self) -> str:
        return self.data.unit

    def evaluate(self) -> dict:
        cfg = self.cfg.train
        params = self.state.ema if (cfg.eval_use_ema and self.state.ema is not None) else self.state.params
        out = self.evaluator(params)
        for k in ("bits_per_byte", "bits_per_token", "windows", "t_samples"):  # the metrics.jsonl record keeps its keys
            out.pop(k)
        return dict(out, unigram_bits=self.unigram_bits)

    def report(self, ev: dict, step: int) -> None:
        _log(f"step {step}: validation NELBO {ev['bits']:.3f} ± {ev['bits_stderr']:.3f} {self.unit()} "
             f"(unigram entropy {ev['unigram_bits']:.3f}, {ev['unigram_bits'] - ev['bits']:.3f} below it), "
             f"{ev['nelbo']:.4f} nats/token, perplexity {ev['perplexity']:.3f}"
             + (f"; Prime joint objective {ev['prime_joint_objective']:.4f} nats/token (not a bound)"
                if "prime_joint_objective" in ev else ""))

    def _check_faults(self, count: int, step: int) -> None:
        self.nonfinite_seen = check_faults(self.cfg, self.checkpointer, self.nonfinite_seen, count, step)

    def _data_fault(self, fault: Exception, step: int) -> TrainingError:
        """Reading batch `step` failed: checkpoint the steps taken and say so in one sentence. (With
        several processes the others are inside the next step, so a collective save would wait
        for ever; the last periodic checkpoint is what remains.)"""
        if step > self.start_step and self.checkpointer.latest_step() != step and jax.process_count() == 1:
            self.checkpointer.save(step, self.state, self.iterator)
        self.checkpointer.close()
        last = self.checkpointer.latest_step()
        kept = (f"checkpoint {last} in {self.checkpointer.directory} is intact" if last is not None
                else "no checkpoint was written")
        return TrainingError(f"{str(fault).rstrip('.')}; training stopped at step {step} and {kept}.")

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            close = getattr(self.iterator, "close", None)
            if close is not None:
                close()  # worker processes end with the run, however it ends

    def _run(self) -> dict:
        cfg = self.cfg.train
        tokens_per_step = cfg.batch_size * self.cfg.data.seq_len
        _log(self.data.description)
        _log(f"Validation unigram entropy: {self.unigram_bits:.3f} {self.unit()}")
        bar = tqdm(total=cfg.steps, initial=self.start_step, disable=not cfg.progress or jax.process_index() != 0,
                   dynamic_ncols=True, desc="train")
        losses, first, t0, t_log = [], self.start_step, time.time(), time.time()
        step = self.start_step
        self.nonfinite_seen = int(self.state.nonfinite)
        budget = Budget(cfg.max_seconds)
        with Preemption(self.checkpointer) as preempt:
            while step < cfg.steps:
                try:
                    rows = next(self.iterator)
                except (ConfigError, LoaderError) as e:
                    raise self._data_fault(e, step) from None
                batch = global_batch(rows, self.mesh)
                self.state, metrics = self.step_fn(self.state, batch)
                step += 1
                losses.append(metrics["loss"])
                log_now = step % cfg.log_every == 0 or step == cfg.steps
                if log_now:
                    host = jax.device_get(metrics)
                    vals = [float(x) for x in jax.device_get(losses)]
                    now = time.time()
                    tps = len(vals) * tokens_per_step / max(now - t_log, 1e-9)
                    t_log = now
                    self.writer.write(step, dict(host, losses=vals, first_step=first, tokens_per_second=tps))
                    bar.set_postfix(loss=f"{vals[-1]:.3f}", tok_s=f"{tps:,.0f}")
                    bar.update(step - bar.n)
                    losses, first = [], step
                    self._check_faults(int(host["nonfinite"]), step)
                save_now = step % cfg.checkpoint_every == 0 or step == cfg.steps
                if save_now and not log_now:
                    self._check_faults(int(self.state.nonfinite), step)  # never checkpoint past a fault under 'stop'
                if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                    ev = self.evaluate()
                    self.writer.write(step, ev, prefix="eval")
                    self.report(ev, step)
                if save_now:
                    self.checkpointer.save(step, self.state, self.iterator)
                reason = preempt.requested(step, log_now) or budget.spent(step)
                if reason:
                    if losses:
                        vals = [float(x) for x in jax.device_get(losses)]
                        self.writer.write(step, dict(losses=vals, first_step=first, loss=vals[-1]))
                    return stop_early(self.checkpointer, self.writer, bar, step,
                                      lambda: self.checkpointer.save(step, self.state, self.iterator), reason, t0, self.workdir)
        bar.close()
        ev = self.evaluate()
        self.writer.write(step, ev, prefix="eval")
        self.report(ev, step)
        if self.checkpointer.latest_step() != step:
            self.checkpointer.save(step, self.state, self.iterator)
        self.checkpointer.close()
        self.writer.close()
        elapsed = time.time() - t0
        return dict(ev, step=step, seconds=elapsed, workdir=str(self.workdir), nonfinite=int(self.state.nonfinite))


def train(cfg: Config) -> dict:
    """Train (or resume) the run described by `cfg`; returns the final validation metrics."""
    if cfg.train.steps < 1:
        raise ConfigError("train.steps must be at least 1.")
    return Trainer(cfg).run()
