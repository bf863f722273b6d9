"""The public surface: load_config, build_model, nelbo, generate, restore."""

from __future__ import annotations

import pathlib

from flax import nnx

from dlm.config import Config, ConfigError, DiffusionConfig, Source, TokenizerKind, load_config
from dlm.data.tokenizers import load_tokenizer
from dlm.diffusion.losses import LN2
from dlm.mesh import make_mesh, mesh_context
from dlm.models.transformer import Transformer
from dlm.objectives import denoiser, objective_for
from dlm.sampling.generate import generate
from dlm.train.state import abstract_model_state, make_model, run_params

__all__ = ["load_config", "build_model", "nelbo", "generate", "restore", "load_tokenizer"]


def default_vocab_size(cfg: Config) -> int:
    """Real-token vocabulary implied by the data config (the mask is one more id)."""
    if cfg.data.source == Source.MARKOV:
        return cfg.data.markov.num_states
    if cfg.data.source == Source.SUDOKU:
        return cfg.data.sudoku.size
    if cfg.data.source == Source.SHARDS:
        from dlm.data.shards import read_metadata

        return read_metadata(cfg.data.path)["tokenizer"]["vocab_size"]
    if cfg.data.tokenizer == TokenizerKind.BYTE:
        return 257
    if cfg.data.tokenizer == TokenizerKind.BPE:
        return cfg.data.bpe_vocab_size
    raise ConfigError("Pass vocab_size= for a pretrained tokenizer (or restore a trained run).")


def build_model(cfg: Config, vocab_size: int | None = None, *, mesh=None, seed: int | None = None) -> Transformer:
    """A freshly initialised denoiser, its parameters sharded over `mesh` (default: all devices on data)."""
    mesh = mesh or make_mesh(cfg.mesh)
    V = vocab_size or default_vocab_size(cfg)
    with mesh_context(mesh):
        return nnx.jit(lambda: make_model(cfg, V, cfg.train.seed if seed is None else seed))()


def nelbo(model: Transformer, batch, diffusion: DiffusionConfig, rng, t_samples: int = 1, given=None):
    """Monte-Carlo NELBO (nats/token) of a batch [B, L] of clean tokens -> (value, metrics).

    With `given` [B, L] (bool; a condition such as a prompt) the estimate is of
    -log p(batch[~given] | batch[given]) per position not given.

    The estimate of the run's objective (its process, hyperschedule and Prime setting): each row
    at K = t_samples stratified times (dlm.objectives.Objective.bound), averaged over rows; the
    same draws as the evaluator and the trainer's validation for the same key. metrics holds
    'nelbo_per_sequence' [B] and, for Prime, 'prime_joint_objective' (not a bound)."""
    objective = objective_for(diffusion, model.mask_id, model.cfg.noise_conditioning, model.vocab_size)
    per, joint = objective.bound(denoiser(model), batch, rng, t_samples, given=given)
    value = per.mean()
    metrics = {"nelbo": value, "bits_per_token": value / LN2, "nelbo_per_sequence": per}
    if diffusion.prime.l > 1:
        metrics["prime_joint_objective"] = joint.mean()
    return value, metrics


def restore(workdir: str | pathlib.Path, *, use_ema: bool = True, mesh=None, step: int | None = None):
    """(model, config) of a trained run, parameters sharded over `mesh` (default: the run's mesh config)."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "config.yaml").exists():
        raise ConfigError(f"{str(workdir)!r} holds no config.yaml; point --workdir at a directory written by train.py.")
    cfg = load_config(workdir / "config.yaml")
    tok = load_tokenizer(workdir)
    if tok is None:
        raise ConfigError(f"{str(workdir)!r} holds no tokenizer.json; the run did not get past data loading.")
    mesh = mesh or make_mesh(cfg.mesh)
    graphdef, params = abstract_model_state(cfg, tok.vocab_size, mesh)
    with mesh_context(mesh):  # a converted workdir that has not been fine-tuned is read from its parameter folder
        params = run_params(workdir, cfg, params, use_ema=use_ema, step=step)
    with mesh_context(mesh):
        model = nnx.merge(graphdef, params)
    return model, cfg


