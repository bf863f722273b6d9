"""train.mode=rl: policy-gradient post-training of a denoiser on a task's rewards.

A step: the task's prompts for the step (dlm.rl.tasks), G rollouts of each drawn by the
configured decoder (sampling.*: any sampler and commit rule at temperature > 0), compiled once
at start and reused every step; the checker's rewards; group-relative advantages; then
rl.inner_steps updates of the clipped loss with a KL penalty to the frozen starting model
(dlm.rl.grpo), log-likelihoods estimated by rl.estimator (dlm.rl.estimators), in one jitted,
donated step sharded like training. The train state is training's (parameters, AdamW, optional
EMA, rng, fault count), so checkpoints, resume, preemption and the wall-clock budget work as
for training and dlm.restore, dlm-eval and benchmarks/tasks.py read the workdir unchanged; the
reference parameters are written once to <workdir>/reference. Every draw (prompts, rollouts,
estimator masks) is keyed by the step, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from dlm.config import Config, ConfigError, Estimator, save_config
from dlm.data.tokenizers import load_tokenizer
from dlm.mesh import (
    BATCH,
    batch_sharding,
    check_batch,
    make_mesh,
    mesh_context,
    on_mesh,
    replicated,
)
from dlm.models.transformer import mask_id_of
from dlm.objectives import denoiser, run_objective, with_moe_losses
from dlm.rl import grpo
from dlm.rl.estimators import CommitPolicy, Estimate, check_estimator, estimate
from dlm.rl.tasks import repeat, task_for
from dlm.sampling.generate import grid_arguments, program, sampler_for, setup_for
from dlm.train.checkpoint import Checkpointer, restore_params, save_params
from dlm.train.metrics import MetricWriter
from dlm.train.state import (
    TrainState,
    apply_gradients,
    create_train_state,
    initial_params,
    learning_rate,
    make_optimizer,
    start_from,
)
from dlm.train.trainer import Budget, Preemption, check_faults, stop_early


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(msg)


def global_rows(x: np.ndarray, sharding) -> jax.Array:
    """A host array that every process holds whole -> a global array placed by `sharding`."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def host(x) -> np.ndarray:
    """A replicated global array -> numpy (every process holds a whole copy)."""
    return np.asarray(x.addressable_data(0))


def pick(e: Estimate, advantages, mix: float):
    """The estimate a rollout's loss uses: sandwich's lower bound for A >= 0 and its mixture with
    the upper bound for A < 0; the estimate itself otherwise."""
    if e.upper is None:
        return e.lower
    return jnp.where(advantages >= 0, e.lower, mix * e.upper + (1.0 - mix) * e.lower)


class Rollouts:
    """The configured decoder compiled once for the step's canvas shape: (parameters, canvas,
    key) -> (tokens [N, L], passes per rollout [N], the decoding trace [N, L] for rl.estimator=trace
    or None) replicated on every process."""

    def __init__(self, cfg: Config, objective, model_cfg, vocab_size: int, length: int, prompt_len: int, graphdef,
                 params, mesh):
        s = cfg.sampling
        sampler = sampler_for(objective, s)
        setup = setup_for(sampler, objective, s, model_cfg, vocab_size, length, prompt_len=prompt_len)
        self.traced = cfg.rl.estimator == Estimator.TRACE
        if self.traced:
            setup = dataclasses.replace(setup, commit_steps=True)
        self.run = program(sampler, setup, graphdef, jax.tree.structure(params))
        self.cfg, self.mesh, self.mask_id = s, mesh, objective.mask_id
        with jax.enable_x64(s.x64):
            self.alphas, self.times, self.temperature = grid_arguments(s, objective)
        self.compiled = None
        self.compilations = 0

    def __call__(self, params, canvas: np.ndarray, key):
        rows = batch_sharding(self.mesh)
        with jax.enable_x64(self.cfg.x64), mesh_context(self.mesh):
            x = global_rows(canvas, rows)
            fixed = global_rows(canvas != self.mask_id, rows)
            args = (jax.tree.leaves(params), x, fixed, key, self.alphas, self.times, None, self.temperature)
            if self.compiled is None:
                rep = replicated(self.mesh)
                self.compiled = jax.jit(self.run, out_shardings=rep).lower(*args).compile()
                self.compilations += 1
            out = self.compiled(*args)
            tokens = host(out["tokens"])
            nfe = host(out["nfe_per_sample"]) if "nfe_per_sample" in out else np.full(len(canvas), float(host(out["nfe"])))
            steps = host(out["commit_step"]) if self.traced else None
        return tokens, nfe.astype(np.float64), steps


def make_rl_step(cfg: Config, graphdef, objective, mesh, shardings, ref_shardings, prompt_len: int = 0):
    """Jitted (state, reference params or None, batch) -> (state, metrics), state donated; a batch
    is {'tokens' [N, L], 'given' [N, L], 'advantages' [N]} and, for rl.estimator=trace, the
    rollouts' decoding trace 'commit_step' [N, L] (from a decoder whose blocks start at
    `prompt_len`)."""
    rl, tc = cfg.rl, cfg.train
    tx = make_optimizer(tc)
    cond = bool(cfg.model.noise_conditioning)
    mu = rl.inner_steps
    temperature = cfg.sampling.temperature
    commit = CommitPolicy.of(cfg.sampling.decode, prompt_len)

    def step(state: TrainState, ref, batch):
        tokens, given, adv, trace = batch["tokens"], batch["given"], batch["advantages"], batch.get("commit_step")

        def est(params, tokens, given, key, losses=None):
            model = nnx.merge(graphdef, params)
            return estimate(rl, objective, denoiser(model, losses), tokens, given, key, cond, trace, temperature, commit), model

        keys = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), mu)

        def no_grad(params):  # [mu, N] estimates (a loop: NNX merges parameters at the trace level they are used)
            out = [est(jax.lax.stop_gradient(params), tokens, given, keys[j])[0] for j in range(mu)]
            return jax.tree.map(lambda *a: jnp.stack(a), *out)

        old = no_grad(state.params) if mu > 1 else None  # the rollout policy on every inner step's draws
        refs = no_grad(ref) if ref is not None else None

        def loss_fn(params, j):
            losses = []
            e, model = est(params, tokens, given, keys[j], losses)
            phi = pick(e, adv, rl.sandwich_mix)
            phi_old = jax.lax.stop_gradient(phi) if old is None else pick(jax.tree.map(lambda a: a[j], old), adv, rl.sandwich_mix)
            phi_ref = None if refs is None else refs.lower[j]
            loss, metrics = grpo.policy_loss(phi, phi_old, phi_ref, adv, rl.clip, rl.kl)
            loss, metrics = with_moe_losses(model, loss, metrics, losses)
            return loss, dict(metrics, log_likelihood=e.lower.mean())

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def inner(carry, j):
            (loss, metrics), grads = grad_fn(carry[0], j)
            grads = jax.lax.with_sharding_constraint(grads, shardings.params)
            carry, grad_norm = apply_gradients(tx, carry, grads, loss, state.step * mu + j, tc.ema_decay)
            return carry, dict(metrics, loss=loss, grad_norm=grad_norm)

        carry = (state.params, state.opt_state, state.ema, state.nonfinite)
        (params, opt_state, ema, nonfinite), metrics = jax.lax.scan(inner, carry, jnp.arange(mu))
        metrics = jax.tree.map(lambda m: m.mean(0), metrics)
        metrics = dict(metrics, lr=learning_rate(tc)(state.step), nonfinite=nonfinite)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, rng=state.rng,
                          nonfinite=nonfinite), metrics

    rows = batch_sharding(mesh)
    batch_shardings = {"tokens": rows, "given": rows, "advantages": NamedSharding(mesh, PartitionSpec(BATCH))}
    if rl.estimator == Estimator.TRACE:
        batch_shardings["commit_step"] = rows
    with mesh_context(mesh):
        return jax.jit(on_mesh(step, mesh), in_shardings=(shardings, ref_shardings, batch_shardings),
                       out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


class RLTrainer:
    """Owns an RL run: mesh, task, state, reference, compiled rollouts and step, checkpoints, metrics."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.workdir = pathlib.Path(cfg.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = make_mesh(cfg.mesh)
        check_batch(cfg.train.batch_size, self.mesh)
        start = self.workdir / cfg.train.init_from
        if not (start / "config.yaml").exists():
            raise ConfigError(f"train.init_from={cfg.train.init_from!r} is {str(start)!r}, which holds no config.yaml; train.mode=rl "
                              "starts from a run's workdir (trained here or written by dlm.convert).")
        tok = load_tokenizer(start)
        if tok is None:
            raise ConfigError(f"{str(start)!r} holds no tokenizer.json; the start run did not get past data loading.")
        if jax.process_index() == 0:
            save_config(cfg, self.workdir / "config.yaml")
            if load_tokenizer(self.workdir) is None:
                tok.save(self.workdir)
        self.vocab_size = tok.vocab_size
        self.objective = run_objective(cfg, self.vocab_size)
        check_estimator(cfg.rl, self.objective, cfg.model.noise_conditioning)
        self.mask_id = mask_id_of(cfg.model, cfg.model.vocab_size or self.vocab_size)
        self.task = task_for(cfg, self.mask_id)
        self.checkpointer = Checkpointer(self.workdir, cfg.train.keep_checkpoints, cfg.train.async_checkpointing)
        resume = self.checkpointer.latest_step() is not None
        self.graphdef, self.state, self.shardings = create_train_state(cfg, self.vocab_size, self.mesh, abstract=True)
        reference = self.workdir / "reference"
        self.ref = None
        abstract = self.state
        with mesh_context(self.mesh):
            if resume:
                self.state = self.checkpointer.restore(abstract, log=_log)
                _log(f"Resumed from {self.checkpointer.directory}/{int(self.state.step)}")
                if cfg.rl.kl > 0:
                    self.ref = restore_params(reference, abstract.params)
            else:
                params = initial_params(cfg, self.workdir, self.state.params)
                if cfg.rl.kl > 0:
                    self.ref = jax.tree.map(jnp.copy, params)
                    if not reference.exists():
                        save_params(reference, self.ref)
                self.state = start_from(cfg, params, self.shardings)
                _log(f"Starting from the parameters of {start}")
        self.start_step = int(self.state.step)
        self.step_fn = make_rl_step(cfg, self.graphdef, self.objective, self.mesh, self.shardings,
                                    self.shardings.params if self.ref is not None else None, self.task.prompt_len)
        length = cfg.data.seq_len
        self.rollouts = Rollouts(cfg, self.objective, cfg.model, cfg.model.vocab_size or self.vocab_size, length,
                                 self.task.prompt_len, self.graphdef, self.state.params, self.mesh)
        self.writer = MetricWriter(self.workdir)
        self.rollout_key = jax.random.key(cfg.train.seed + 11)

    def one_step(self, step: int):
        """Rollouts, rewards and the update of `step` -> (metrics on device, host statistics)."""
        cfg, G = self.cfg, self.cfg.rl.group_size
        t0 = time.time()
        prompts = repeat(self.task.prompts(step, cfg.train.batch_size // G), G)
        tokens, nfe, trace = self.rollouts(self.state.params, prompts.canvas, jax.random.fold_in(self.rollout_key, step))
        t1 = time.time()
        rewards = self.task.rewards(tokens, prompts)
        advantages = grpo.group_advantages(rewards[cfg.rl.reward.value], G, cfg.rl.scale_rewards)
        rows = batch_sharding(self.mesh)
        batch = {"tokens": global_rows(tokens.astype(np.int32), rows), "given": global_rows(prompts.given, rows),
                 "advantages": global_rows(advantages, NamedSharding(self.mesh, PartitionSpec(BATCH)))}
        if trace is not None:
            batch["commit_step"] = global_rows(trace.astype(np.int32), rows)
        t2 = time.time()
        self.state, metrics = self.step_fn(self.state, self.ref, batch)
        metrics = jax.block_until_ready(metrics)
        t3 = time.time()
        flat = rewards[cfg.rl.reward.value].reshape(-1, G)
        stats = {"reward": float(rewards[cfg.rl.reward.value].mean()), "exact_solve": float(rewards["exact"].mean()),
                 "cell_accuracy": float(rewards["cells"].mean()), "rollout_nfe": float(nfe.mean()),
                 "groups_without_signal": float((flat.std(1) == 0).mean()),
                 "rollout_seconds": t1 - t0, "scoring_seconds": t2 - t1, "update_seconds": t3 - t2,
                 "rollouts_per_second": len(tokens) / max(t1 - t0, 1e-9)}
        return metrics, stats

    def run(self) -> dict:
        cfg = self.cfg.train
        bar = tqdm(total=cfg.steps, initial=self.start_step, disable=not cfg.progress or jax.process_index() != 0,
                   dynamic_ncols=True, desc="rl")
        step, t_start = self.start_step, time.time()
        self.nonfinite_seen = int(self.state.nonfinite)
        budget, window, last = Budget(cfg.max_seconds), [], {}
        with Preemption(self.checkpointer) as preempt:
            while step < cfg.steps:
                metrics, stats = self.one_step(step)
                step += 1
                window.append(stats)
                log_now = step % cfg.log_every == 0 or step == cfg.steps
                if log_now:
                    host_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    last = dict(host_metrics, **mean, first_step=step - len(window), elapsed_seconds=time.time() - t_start)
                    self.writer.write(step, last)
                    bar.set_postfix(reward=f"{mean['reward']:.3f}", solve=f"{mean['exact_solve']:.2f}",
                                    roll_s=f"{mean['rollouts_per_second']:.0f}",
                                    split=f"{mean['rollout_seconds']:.1f}/{mean['scoring_seconds']:.1f}/{mean['update_seconds']:.1f}s")
                    bar.update(step - bar.n)
                    window = []
                    self._check_faults(int(host_metrics["nonfinite"]), step)
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    self.checkpointer.save(step, self.state)
                reason = preempt.requested(step, log_now) or budget.spent(step)
                if reason:
                    return stop_early(self.checkpointer, self.writer, bar, step, lambda: self.checkpointer.save(step, self.state),
                                      reason, t_start, self.workdir)
        bar.close()
        if self.checkpointer.latest_step() != step:
            self.checkpointer.save(step, self.state)
        self.checkpointer.close()
        self.writer.close()
        return dict(last, step=step, seconds=time.time() - t_start, workdir=str(self.workdir), nonfinite=int(self.state.nonfinite))

    def _check_faults(self, count: int, step: int) -> None:
        self.nonfinite_seen = check_faults(self.cfg, self.checkpointer, self.nonfinite_seen, count, step)


def train_rl(cfg: Config) -> dict:
    """Post-train (or resume) the run described by `cfg` (train.mode=rl); returns the last logged metrics."""
    return RLTrainer(cfg).run()
