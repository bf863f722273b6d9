"""TrainState and the pure, jitted train step.

The model lives as (graphdef, params): the step merges them inside jit, so the loop passes
only arrays and donates the whole state.
"""

from __future__ import annotations

import pathlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dlm.config import Config, TrainConfig
from dlm.data.pipeline import split_batch
from dlm.diffusion import batch as rows
from dlm.mesh import batch_sharding, mesh_context, on_mesh, replicated
from dlm.models.transformer import Transformer
from dlm.objectives import denoiser, run_objective, with_moe_losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # nnx.State of the denoiser
    opt_state: Any
    ema: Any  # nnx.State (same tree as params) or None
    rng: jax.Array  # uint32 [2] key data
    nonfinite: jax.Array  # int32 []: updates skipped because the loss or gradient was not finite


def learning_rate(cfg: TrainConfig):
    """lr * (n + 1) / warmup during warmup (step 0 already learns), then cosine decay to lr * min_lr_ratio."""
    warm = max(cfg.warmup_steps, 1)
    cosine = optax.cosine_decay_schedule(cfg.lr, max(cfg.steps - warm, 1), alpha=cfg.min_lr_ratio)
    return lambda n: jnp.where(n < warm, cfg.lr * (n + 1) / warm, cosine(n - warm))


def decays(path) -> bool:
    """Whether the parameter at a tree path gets weight decay: every matrix of the blocks, the
    output head and the noise-conditioning layers do; RMSNorm scales (`*_scale`, stacked to
    [layers, d] by the layer scan, so their rank says nothing) and the embedding tables (token,
    position, grid: `embed`, `*_embed`) do not. An embedding is a lookup table: decoupled decay
    would shrink the rows of rare tokens (and the mask row) every step whether or not they were used.
    A sigmoid router's expert_bias (aux-loss-free balancing) gets no gradient and no decay either."""
    name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    return not (name.endswith("_scale") or name == "embed" or name.endswith("_embed") or name == "expert_bias")


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW (decay by parameter path: see `decays`) with gradient clipping."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def make_model(cfg: Config, vocab_size: int, seed: int):
    return Transformer(cfg.model, vocab_size, rngs=nnx.Rngs(params=seed), subtokens=cfg.diffusion.prime.l)


def model_graphdef(cfg: Config, vocab_size: int):
    return nnx.split(nnx.eval_shape(lambda: make_model(cfg, vocab_size, 0)))[0]


def abstract_model_state(cfg: Config, vocab_size: int, mesh):
    """(graphdef, parameters as ShapeDtypeStructs with their shardings on `mesh`), from the
    parameters' logical axis names: nothing is compiled or allocated (a restore target)."""
    with mesh_context(mesh):
        graphdef, params = nnx.split(nnx.eval_shape(lambda: make_model(cfg, vocab_size, 0)))
        shardings = nnx.get_named_sharding(params, mesh)
    return graphdef, jax.tree.map(lambda p, sh: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sh), params, shardings)


def init_state(cfg: Config, vocab_size: int, tx) -> TrainState:
    """Build a fresh state (call inside jit under the mesh so every array is born sharded)."""
    return state_of(cfg, nnx.state(make_model(cfg, vocab_size, cfg.train.seed)), tx)


def state_of(cfg: Config, params, tx) -> TrainState:
    """Step 0 of a run that starts from `params`: a fresh optimizer state, EMA = params."""
    ema = jax.tree.map(jnp.copy, params) if cfg.train.ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema=ema,
                      rng=jax.random.key_data(jax.random.key(cfg.train.seed + 1)), nonfinite=jnp.zeros((), jnp.int32))


def param_shardings(cfg: Config, vocab_size: int, mesh):
    """NamedShardings of the parameters on `mesh`, from their logical axis names."""
    return jax.tree.map(lambda p: p.sharding, abstract_model_state(cfg, vocab_size, mesh)[1])


def shard_like_params(tree, params_sharding, replicated_sharding, what: str = "optimizer state"):
    """Shardings for a tree that holds copies of the parameter tree (Adam's mu and nu, an EMA,
    gradients) and scalars (step counts): every subtree shaped like the parameters takes their
    shardings, every scalar is replicated. Anything else is an error: a parameter-sized leaf
    that is neither would silently be replicated on every device."""
    treedef = jax.tree.structure(params_sharding)
    like = lambda x: jax.tree.structure(x) == treedef

    def one(x):
        if like(x):
            return params_sharding
        if getattr(x, "ndim", None) == 0:
            return replicated_sharding
        raise ValueError(f"A {what} leaf of shape {getattr(x, 'shape', None)} is neither a scalar nor inside a copy of the "
                         "parameter tree, so dlm cannot give it the parameters' sharding.")

    return jax.tree.map(one, tree, is_leaf=like)


def state_shardings(cfg: Config, vocab_size: int, mesh, abstract_state) -> TrainState:
    """The shardings of a train state (`abstract_state`: its shapes), set from the parameters'
    logical axes: parameters, EMA and every parameter-shaped optimizer leaf (Adam's moments)
    sharded like the parameter, scalars (step, Adam's count, rng, fault count) replicated.
    Nothing is left to XLA's propagation: an optimizer initialised inside jit from sharded
    parameters comes out replicated otherwise."""
    params = param_shardings(cfg, vocab_size, mesh)
    rep = replicated(mesh)
    return TrainState(step=rep, params=params, opt_state=shard_like_params(abstract_state.opt_state, params, rep),
                      ema=None if abstract_state.ema is None else params, rng=rep, nonfinite=rep)


def create_train_state(cfg: Config, vocab_size: int, mesh, *, abstract: bool = False):
    """(graphdef, state or its abstract ShapeDtypeStructs with shardings, state shardings).

    The init is compiled with the state's shardings (`state_shardings`) as its output
    shardings, so the state is created sharded, never first on one device; the abstract state
    (a restore target) carries the same shardings.
    """
    tx = make_optimizer(cfg.train)
    with mesh_context(mesh):
        graphdef = model_graphdef(cfg, vocab_size)
        shapes = jax.eval_shape(lambda: init_state(cfg, vocab_size, tx))
        shardings = state_shardings(cfg, vocab_size, mesh, shapes)
        if abstract:
            state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
        else:
            state = jax.jit(lambda: init_state(cfg, vocab_size, tx), out_shardings=shardings)()
    return graphdef, state, shardings


def run_params(workdir, cfg: Config, abstract_params, *, use_ema: bool = True, step: int | None = None):
    """The parameters of the run in `workdir` (its config `cfg`), placed by the shardings of
    `abstract_params`: the EMA (when `use_ema` and the run keeps one) or the raw parameters of
    checkpoint `step` (default the newest intact one), or, for a dlm.convert workdir that has
    not been trained yet, its imported parameters (train.init_from). Only those arrays are read."""
    import orbax.checkpoint as ocp

    from dlm.config import ConfigError
    from dlm.train.checkpoint import Checkpointer, restore_params

    workdir = pathlib.Path(workdir)
    ckpt = Checkpointer(workdir, create=False)
    if ckpt.latest_step() is None:
        ckpt.close()
        if not cfg.train.init_from or step is not None:
            raise ConfigError(f"No checkpoint found in {str(ckpt.directory)!r}; train first or point --workdir at a trained run.")
        return restore_params(workdir / cfg.train.init_from, abstract_params)
    skip = lambda tree: jax.tree.map(lambda _: ocp.PLACEHOLDER, tree)
    has_ema = cfg.train.ema_decay > 0
    use_ema = use_ema and has_ema
    wanted = TrainState(step=ocp.PLACEHOLDER, params=skip(abstract_params) if use_ema else abstract_params,
                        opt_state=skip(jax.eval_shape(make_optimizer(cfg.train).init, abstract_params)),
                        ema=(abstract_params if use_ema else skip(abstract_params)) if has_ema else None, rng=ocp.PLACEHOLDER,
                        nonfinite=ocp.PLACEHOLDER)
    try:
        state = ckpt.restore(wanted, step=step)
    finally:  # also when the restore fails: no checkpoint manager (and its event loop) left open
        ckpt.close()
    return state.ema if use_ema else state.params


def initial_params(cfg: Config, workdir, abstract_params):
    """The parameters train.init_from names, relative to `workdir` or absolute: a parameter
    checkpoint folder (dlm.convert's) or the workdir of another run (its config.yaml says which
    parameters: the EMA when the run keeps one and evaluates with it)."""
    from dlm.config import ConfigError, load_config
    from dlm.train.checkpoint import restore_params

    source = pathlib.Path(workdir) / cfg.train.init_from
    if (source / "config.yaml").exists():
        start = load_config(source / "config.yaml")
        try:
            return run_params(source, start, abstract_params, use_ema=start.train.eval_use_ema)
        except ValueError as e:
            if isinstance(e, ConfigError) and "does not match" not in str(e):
                raise
            raise ConfigError(f"The run in {str(source)!r} has another model than this config ({str(e).splitlines()[0][:160]}); "
                              "start from a run of the same model.model settings.") from None
    return restore_params(source, abstract_params)


def start_from(cfg: Config, params, shardings) -> TrainState:
    """The train state of a run that starts from given parameters (fine-tuning from dlm.convert's
    import), placed by the state's `shardings`; the parameters' buffers are donated to it."""
    tx = make_optimizer(cfg.train)
    return jax.jit(lambda p: state_of(cfg, p, tx), out_shardings=shardings, donate_argnums=0)(params)


def loss_and_grads(graphdef, objective, params, batch, key, grad_accum: int = 1, grad_shardings=None):
    """((loss, metrics), grads) of a batch; with grad_accum = N a scan over N micro-batches (rows
    j, j + N, ... : each device keeps its rows) whose mean loss, metrics and gradients are the
    large batch's, since every draw is the large batch's (dlm.diffusion.batch). `grad_shardings`
    (the parameters' shardings) pins the gradients, and the accumulator, to them: reduce-scattered
    over fsdp like the parameters rather than left to XLA's propagation."""
    pin = (lambda g: g) if grad_shardings is None else (lambda g: jax.lax.with_sharding_constraint(g, grad_shardings))
    tokens, given = split_batch(batch)

    def loss_fn(params, tokens, given):
        model, losses = nnx.merge(graphdef, params), []
        loss, metrics = objective.loss(denoiser(model, losses), tokens, key, given=given)
        return with_moe_losses(model, loss, metrics, losses)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        out, grads = grad_fn(params, tokens, given)
        return out, pin(grads)
    B, L = tokens.shape
    n = grad_accum
    split = lambda a: None if a is None else a.reshape(B // n, n, *a.shape[1:])
    tokens_n, given_n = split(tokens), split(given)

    def micro(grads, j):
        pick = lambda a: None if a is None else jax.lax.dynamic_index_in_dim(a, j, axis=1, keepdims=False)
        with rows.micro_batch(j, n, B):
            (loss, metrics), g = grad_fn(params, pick(tokens_n), pick(given_n))
        return pin(jax.tree.map(jnp.add, grads, pin(g))), (loss, metrics)

    grads, (losses, metrics) = jax.lax.scan(micro, pin(jax.tree.map(jnp.zeros_like, params)), jnp.arange(n))
    mean = lambda x: jnp.mean(x, axis=0)
    return (mean(losses), jax.tree.map(mean, metrics)), jax.tree.map(lambda g: g / n, grads)


def apply_gradients(tx, carry, grads, loss, n, ema_decay: float):
    """One optimizer update of carry = (params, opt_state, ema or None, fault count) from `grads`
    -> (the new carry, the gradient norm); the EMA takes its n-th step (warm-up
    min(decay, (1 + n) / (10 + n))). A non-finite loss or gradient leaves parameters, optimizer and
    EMA untouched and counts the fault, all inside jit."""
    params, opt_state, ema, nonfinite = carry
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_ema = ema
    if ema is not None:
        n = jnp.asarray(n).astype(jnp.float32)
        d = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
        new_ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, new_params)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    count = nonfinite + (~ok).astype(jnp.int32)
    return (keep(new_params, params), keep(new_opt, opt_state), keep(new_ema, ema), count), grad_norm


def make_train_step(cfg: Config, graphdef, vocab_size: int, mesh, shardings):
    """Jitted (state, batch) -> (state, metrics), state donated; a batch is tokens [B, L], or a pairs
    dict of tokens and given (dlm.data.pipeline)."""
    tx = make_optimizer(cfg.train)
    lr_fn = learning_rate(cfg.train)
    ema_decay = cfg.train.ema_decay
    objective = run_objective(cfg, vocab_size)
    inject = jnp.asarray(sorted(cfg.train.inject_nonfinite_at) or [-1], jnp.int32)

    def step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        poison = jnp.where(jnp.any(inject == state.step), jnp.nan, 1.0)
        (loss, metrics), grads = loss_and_grads(graphdef, objective, state.params, batch, key, cfg.train.grad_accum,
                                                shardings.params)
        loss = loss * poison
        (params, opt_state, ema, count), grad_norm = apply_gradients(
            tx, (state.params, state.opt_state, state.ema, state.nonfinite), grads, loss, state.step, ema_decay)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=lr_fn(state.step), nonfinite=count)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, rng=state.rng,
                          nonfinite=count), metrics

    with mesh_context(mesh):
        return jax.jit(on_mesh(step, mesh), in_shardings=(shardings, batch_sharding(mesh)),
                       out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
