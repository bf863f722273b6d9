"""The public surface: load_config, build_model, nelbo, generate, restore."""

from __future__ import annotations

import pathlib

from flax import nnx

from dlm.config import Config, ConfigError, DiffusionConfig, Source, TokenizerKind, load_config
from dlm.data.tokenizers import load_tokenizer
from dlm.diffusion.losses import diffusion_loss
from dlm.models.transformer import Transformer
from dlm.parallel.mesh import make_mesh, mesh_context
from dlm.sampling.api import generate
from dlm.train.checkpoint import Checkpointer
from dlm.train.state import create_train_state, make_model

__all__ = ["load_config", "build_model", "nelbo", "generate", "restore", "load_tokenizer"]


def default_vocab_size(cfg: Config) -> int:
    """Real-token vocabulary implied by the data config (the mask is one more id)."""
    if cfg.data.source == Source.MARKOV:
        return cfg.data.markov.num_states
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


def nelbo(model: Transformer, batch, diffusion: DiffusionConfig, rng):
    """Monte-Carlo NELBO (nats/token) of a batch [B, L] of clean tokens -> (loss, metrics).

    For a Prime model (diffusion.prime.l > 1) the loss is the one it trains on and
    metrics['nelbo'] is the valid bound."""
    apply_fn = lambda xt, t: model(xt, noise=t)
    if diffusion.process.value == "gamma_hybrid":
        from dlm.diffusion.hybrid import gamma_hybrid_loss

        return gamma_hybrid_loss(apply_fn, batch, rng, diffusion, model.vocab_size, model.cfg.noise_conditioning)
    if diffusion.process.value == "epsilon_hybrid":
        from dlm.diffusion.hybrid import epsilon_hybrid_loss

        return epsilon_hybrid_loss(apply_fn, batch, rng, diffusion, model.vocab_size, model.cfg.noise_conditioning)
    if diffusion.prime.l > 1:
        from dlm.diffusion.prime import Codec, prime_loss

        return prime_loss(apply_fn, batch, rng, diffusion, Codec(model.vocab_size, diffusion.prime.l), model.cfg.noise_conditioning)
    return diffusion_loss(apply_fn, batch, rng, diffusion, model.vocab_size, model.cfg.noise_conditioning)


def restore(workdir: str | pathlib.Path, *, use_ema: bool = True, mesh=None, step: int | None = None):
    """(model, config) of a trained run, parameters sharded over `mesh` (default: the run's mesh config)."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "config.yaml").exists():
        raise ConfigError(f"{str(workdir)!r} holds no config.yaml; point --workdir at a directory written by train.py.")
    cfg = load_config(workdir / "config.yaml")
    tok = load_tokenizer(workdir)
    if tok is None:
        raise ConfigError(f"{str(workdir)!r} holds no tokenizer.json; the run did not get past data loading.")
    ckpt = Checkpointer(workdir, create=False)
    if ckpt.latest_step() is None:
        raise ConfigError(f"No checkpoint found in {str(ckpt.directory)!r}; train first or point --workdir at a trained run.")
    mesh = mesh or make_mesh(cfg.mesh)
    graphdef, abstract, _ = create_train_state(cfg, tok.vocab_size, mesh, abstract=True)
    state = ckpt.restore(abstract, step=step)
    ckpt.close()
    params = state.ema if (use_ema and state.ema is not None) else state.params
    with mesh_context(mesh):
        model = nnx.merge(graphdef, params)
    return model, cfg


