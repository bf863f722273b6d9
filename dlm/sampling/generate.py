"""generate(): prompts in, one compiled sampling loop, tokens and statistics out.

The loop follows from the run's objective (dlm.objectives: its exact sampler family) and the
sampling config:

- `sampling.sampler=parallel`: the parallel decoder (dlm.sampling.parallel), flat absorbing models;
- `sampling.sampler=acs`, or the hyperschedule family (block / autoregressive / slide schedules,
  epsilon-hybrid): the hyperschedule loop with its KV cache (dlm.sampling.hyper);
- otherwise the objective's ancestral loop: whole tokens (MDLM), Prime digits, or the
  gamma-hybrid analytic kernel (dlm.sampling.ancestral).

Each sampler below is one function (setup, module, x, fixed, key, alphas, times, pad) -> dict of
arrays with one key per meaning: tokens, nfe (forward passes of the batch), steps (loop steps),
idle_steps (steps that needed no forward pass), and where they apply cache_writes (passes that
wrote settled keys/values) and nfe_per_sample (passes each row needed).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import pickle
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dlm.config import ConfigError, DecodeCache, DiffusionConfig, Sampler, SamplingConfig, check_buckets, check_decode
from dlm.diffusion import hyperschedules as hs
from dlm.diffusion.prime import Codec
from dlm.diffusion.schedules import make_schedule
from dlm.mesh import BATCH, batch_shards, batch_sharding, mesh_context
from dlm.models.attention import FULL, restrict
from dlm.objectives import Objective, SamplerFamily, objective_for
from dlm.sampling.ancestral import ancestral_loop, gamma_loop, prime_ancestral_loop, time_grid
from dlm.sampling.draws import categorical_at, position_keys
from dlm.sampling.hyper import Plan, hyper_loop, make_plan
from dlm.sampling.blocks import block_decode
from dlm.sampling.parallel import parallel_decode


def prepare_prompts(prompt, num_samples: int, length: int, mask_id: int, vocab_size: int):
    """prompt: None, a 1-D list of ids (a prefix), or an [L] / [B, L] infill spec with mask_id at the
    positions to generate. Returns (x [B, L] int32, fixed [B, L] bool)."""
    x = np.full((num_samples, length), mask_id, np.int32)
    if prompt is None:
        return x, np.zeros_like(x, bool)
    p = np.asarray(prompt, np.int64)
    if p.ndim == 1 and p.shape[0] > length:
        raise ConfigError(f"The prompt has {p.shape[0]} tokens, longer than the generation length {length}; shorten it or raise sampling.length (at most data.seq_len).")
    if p.ndim == 2 and p.shape[1] != length:
        raise ConfigError(f"The infill spec has length {p.shape[1]} but the generation length is {length}.")
    bad = (p < 0) | ((p >= vocab_size) & (p != mask_id))
    if bad.any():
        raise ConfigError(f"The prompt holds token ids outside the vocabulary [0, {vocab_size}) (e.g. {int(p[bad][0])}); mask_id {mask_id} marks positions to fill.")
    if p.ndim == 1:
        x[:, : p.shape[0]] = p
    else:
        x[:] = np.broadcast_to(p, x.shape)
    return x, x != mask_id


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every sampler reads besides the arrays."""

    cfg: SamplingConfig
    objective: Objective
    vocab_size: int
    length: int
    model_cfg: object  # the denoiser's ModelConfig
    plan: Plan | None = None
    prompt_len: int = 0
    eos_id: int = -1
    commit_steps: bool = False  # the parallel decoder also returns its trace: the pass that committed each position

    @property
    def cond(self) -> bool:
        return self.model_cfg.noise_conditioning

    @property
    def mask_id(self) -> int:
        return self.objective.mask_id

    def kv_shape(self, batch: int) -> tuple:
        """The shape of a cache of every position's keys (or values): [layers, B, L, KV heads, head dim]."""
        m = self.model_cfg
        return (m.num_layers, batch, self.length, m.num_kv_heads or m.num_heads, m.d_model // m.num_heads)


def ancestral(s: Setup, module, x, fixed, key, alphas, times, pad=None):
    apply_fn = lambda xt, t: module()(xt, noise=t)
    tokens, nfe, row_nfe = ancestral_loop(apply_fn, x, fixed, key, alphas, s.cfg, s.vocab_size, s.cond, s.mask_id, pad)
    return {"tokens": tokens, "nfe": nfe, "steps": jnp.int32(s.cfg.steps), "idle_steps": s.cfg.steps - nfe,
            "nfe_per_sample": row_nfe}


def prime_digits(s: Setup, module, x, fixed, key, alphas, times, pad=None):
    apply_fn = lambda yt, t: module()(yt, noise=t)
    codec = Codec(s.vocab_size, s.objective.diffusion.prime.l)
    tokens, nfe, idle = prime_ancestral_loop(apply_fn, x, fixed, key, alphas, s.cfg, codec, s.cond, pad)
    return {"tokens": tokens, "nfe": nfe, "steps": jnp.int32(s.cfg.steps), "idle_steps": idle}


def gamma_analytic(s: Setup, module, x, fixed, key, alphas, times, pad=None):
    apply_fn = lambda xt, t: module()(xt, noise=t)
    tokens, nfe = gamma_loop(apply_fn, x, fixed, key, times, alphas, s.cfg, s.vocab_size, s.objective.diffusion.gamma, pad)
    return {"tokens": tokens, "nfe": nfe, "steps": jnp.int32(s.cfg.steps), "idle_steps": jnp.int32(0)}


def hyperschedule(s: Setup, module, x, fixed, key, alphas, times, pad=None):
    cfg, objective, cond = s.cfg, s.objective, s.cond
    acs = cfg.sampler == Sampler.ACS

    def model_fn(tokens, positions, attention, noise, kv_cache, return_kv):
        return module()(tokens, positions=positions, attention=attention, noise=noise if cond else None,
                        kv_cache=kv_cache, return_kv=return_kv)

    m = s.model_cfg
    decode = objective.decodes_clean and not acs  # ACS keeps its corrected tokens
    key, k_dec = jax.random.split(key)
    tokens, nfe, writes, _ = hyper_loop(model_fn, x, fixed, key, s.plan, make_schedule(objective.diffusion).alpha,
                                        mask_id=s.mask_id, kv_shape=s.kv_shape(x.shape[0]), kv_dtype=jnp.dtype(m.dtype.value),
                                        temperature=cfg.temperature, float64=cfg.float64, noise_conditioning=cond,
                                        cache=cfg.cache, eta=cfg.eta if acs else 0.0,
                                        draw_logits=None if acs else objective.reveal_logits, pad=pad)
    steps = s.plan.num_steps
    idle = steps - nfe
    if decode:
        t0 = jnp.zeros(tokens.shape, jnp.float32) if cond else None
        dec = categorical_at(position_keys(k_dec, tokens.shape, pad), module()(tokens, noise=t0), cfg.temperature, cfg.float64)
        tokens, nfe = jnp.where(fixed, tokens, dec), nfe + 1
    return {"tokens": tokens, "nfe": nfe, "steps": jnp.int32(steps), "idle_steps": idle, "cache_writes": writes}


def parallel(s: Setup, module, x, fixed, key, alphas, times, pad=None):
    mask_id, cond = s.mask_id, s.cond

    def model_fn(tokens, positions, attention, kv_cache, return_kv):
        t = jnp.where(tokens == mask_id, 1.0, 0.0) if cond else None  # a clean/masked flag for noise-conditioned models
        return module()(tokens, positions=positions, attention=attention, noise=t, kv_cache=kv_cache, return_kv=return_kv,
                        head=False)  # LazyLogits: the decoder computes the block's logits only

    out = parallel_decode(model_fn, x, s.prompt_len, key, s.cfg.decode, mask_id=mask_id, vocab_size=s.vocab_size, eos_id=s.eos_id,
                          shift=s.model_cfg.shift_logits,
                          temperature=s.cfg.temperature, float64=s.cfg.float64, kv_dtype=jnp.dtype(s.model_cfg.dtype.value),
                          commit_steps=s.commit_steps)
    res = {"tokens": out["tokens"], "nfe": out["nfe"], "steps": out["steps"], "idle_steps": jnp.int32(0),
           "nfe_per_sample": out["row_nfe"]}
    if s.commit_steps:
        res["commit_step"] = out["commit_step"]
    return res


def blocks(s: Setup, module, x, fixed, key, alphas, times, pad=None):
    """The block hyperschedule decoded with the parallel decoder's commit rules (dlm.sampling.blocks)."""
    m = s.model_cfg

    def model_fn(tokens, positions, attention, kv_cache, return_kv):
        return module()(tokens, positions=positions, attention=attention, kv_cache=kv_cache, return_kv=return_kv)

    bw = s.objective.diffusion.block_width
    out = block_decode(model_fn, x, fixed, key, s.cfg.decode, block_width=bw, sub=min(s.cfg.decode.block_length, bw),
                       prompt_len=s.prompt_len, mask_id=s.mask_id, eos_id=s.eos_id, kv_shape=s.kv_shape(x.shape[0]),
                       kv_dtype=jnp.dtype(m.dtype.value), temperature=s.cfg.temperature, float64=s.cfg.float64,
                       cache=s.cfg.cache, pad=pad, ar_heads=m.shift_logits)
    return {"tokens": out["tokens"], "nfe": out["nfe"], "steps": out["nfe"], "idle_steps": jnp.int32(0),
            "cache_writes": out["cache_writes"], "nfe_per_sample": out["row_nfe"]}


EXACT: dict[SamplerFamily, Callable] = {SamplerFamily.TOKENS: ancestral, SamplerFamily.DIGITS: prime_digits,
                                        SamplerFamily.GAMMA: gamma_analytic, SamplerFamily.HYPERSCHEDULE: hyperschedule}


def block_model(objective: Objective) -> bool:
    """A block-diffusion model: the block hyperschedule over the absorbing process (SDAR, Fast-dLLM
    v2, LLaDA2 and block models trained here), decoded block by block with a cache of settled blocks."""
    d = objective.diffusion
    return (objective.sampler == SamplerFamily.HYPERSCHEDULE and d.hyperschedule == hs.Kind.BLOCK
            and d.process.value == "absorbing")


def sampler_for(objective: Objective, cfg: SamplingConfig) -> Callable:
    """The sampler function for a run's objective under `cfg.sampler`."""
    if cfg.sampler == Sampler.PARALLEL:
        if block_model(objective):
            return blocks
        if objective.sampler != SamplerFamily.TOKENS:
            raise ConfigError("sampling.sampler=parallel decodes flat absorbing models (MDLM) and block-diffusion models (the block "
                              "hyperschedule, absorbing); this model's hyperschedule, process or Prime setting needs "
                              "sampler=ancestral.")
        return parallel
    if cfg.sampler == Sampler.ACS:
        if objective.sampler == SamplerFamily.GAMMA:
            raise ConfigError("sampling.sampler=acs corrects epsilon-hybrid models; sample gamma_hybrid models with "
                              "sampler=ancestral (the analytic sampler).")
        return hyperschedule
    return EXACT[objective.sampler]


class _Compiled:
    """The compiled samplers of this process, least recently used first out (at most `size`)."""

    def __init__(self, size: int = 16):
        self.size, self.entries, self.compilations = size, collections.OrderedDict(), 0

    def get(self, key):
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        return None

    def put(self, key, compiled):
        self.compilations += 1
        self.entries[key] = compiled
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


_COMPILED = _Compiled()


def compilations() -> int:
    """How many samplers generate() has compiled in this process (a second call with the same
    model structure, settings and shapes reuses the first one's)."""
    return _COMPILED.compilations


def _cache_key(sampler, setup, graphdef, treedef, args, mesh, x64: bool):
    """What the compiled sampler depends on: the loop, its settings (all but the seed and a
    positive temperature's value) and the model's structure (hashed through pickle: they hold
    configs and a plan's arrays), and every argument's shape, dtype and sharding."""
    avals = tuple((tuple(a.shape), str(a.dtype), getattr(a, "sharding", None)) for a in jax.tree.leaves(args))
    # the seed only makes the key and a positive temperature is traced, both arguments: samplers
    # that differ in them alone are one program (temperature 0 is the argmax program)
    static = dataclasses.replace(setup, cfg=dataclasses.replace(setup.cfg, seed=0, temperature=float(setup.cfg.temperature > 0)))
    settings = hashlib.sha256(pickle.dumps((static, graphdef))).hexdigest()
    return (sampler.__name__, settings, treedef, avals, mesh, x64)


def left_pad(prompts, length: int, mask_id: int, vocab_size: int, pad_id: int):
    """Prompts of different lengths, one per row, right-aligned at the longest (P): returns
    (x [B, length], fixed [B, length], pad [B]) where row b holds pad[b] = P - len(prompt b)
    padding tokens, its prompt, then masks."""
    rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    if not rows:
        raise ConfigError("prompts is empty; pass at least one prompt.")
    P = max(len(r) for r in rows)
    if P >= length:
        raise ConfigError(f"The longest prompt has {P} tokens, not less than the generation length {length}; raise sampling.length.")
    x = np.full((len(rows), length), mask_id, np.int32)
    pad = np.zeros(len(rows), np.int32)
    for b, r in enumerate(rows):
        bad = (r < 0) | (r >= vocab_size) | (r == mask_id)
        if bad.any():
            raise ConfigError(f"Prompt {b} holds token {int(r[bad][0])}, not a token of the vocabulary [0, {vocab_size}) other than the mask {mask_id}.")
        pad[b] = P - len(r)
        x[b, : pad[b]] = pad_id
        x[b, pad[b]:P] = r
    fixed = np.zeros_like(x, bool)
    fixed[:, :P] = True
    return x, fixed, pad


def _length_bucket(cfg: SamplingConfig, x, fixed, pad, pad_id: int, width: int = 1):
    """The canvas left-padded up to the smallest of cfg.length_buckets that holds it: (x, fixed,
    pad, columns added). The padding is hidden and every loop keys its draws by position past
    it (the parallel decoder within blocks that start after the prompt; the ancestral and
    hyperschedule loops by position from each row's first token, the hyperschedule's steps from
    the first step at which a real position is active), so it changes no token. `width`: the
    added columns must be whole blocks of the hyperschedule (its block width)."""
    L = x.shape[1]
    bucket = next((b for b in cfg.length_buckets if b >= L), L)
    if bucket == L:
        return x, fixed, pad, 0
    extra = bucket - L
    if extra % width:
        raise ConfigError(f"sampling.length_buckets: the bucket {bucket} pads the canvas of {L} positions with {extra}, not a "
                          f"multiple of the block width {width}; use buckets that are multiples of diffusion.block_width.")
    B = x.shape[0]
    x = np.concatenate([np.full((B, extra), pad_id, x.dtype), x], 1)
    fixed = np.concatenate([np.ones((B, extra), bool), fixed], 1)
    pad = (np.zeros(B, np.int32) if pad is None else pad) + extra
    return x, fixed, pad, extra


class Padded:
    """A denoiser behind left padding: row b's first pad[b] positions are hidden from every
    query and its tokens take positions counted from its first real token, so a padded row
    computes what it computes alone. Keys read from a KV cache are at the cache's indices
    (the sequence's first positions)."""

    def __init__(self, model, pad):
        self.model, self.pad = model, pad

    def __call__(self, tokens, *, positions=None, attention=FULL, kv_cache=None, **kw):
        B, L = tokens.shape[:2]
        pad = self.pad[:, None]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(L), (B, L))
        keys = positions
        if kv_cache is not None:
            C = kv_cache[0].shape[2]
            keys = jnp.concatenate([jnp.broadcast_to(jnp.arange(C), (B, C)), positions], axis=1)
        return self.model(tokens, positions=jnp.maximum(positions - pad, 0), attention=restrict(attention, keys >= pad),
                          kv_cache=kv_cache, **kw)


def setup_for(sampler: Callable, objective: Objective, cfg: SamplingConfig, model_cfg, vocab_size: int, length: int, *,
              prompt_len: int = 0,
              eos_id: int = -1, plan: Plan | None = None) -> Setup:
    """The Setup of `sampler` over `length` positions of `vocab_size` logit columns: the parallel decoder's settings checked
    against the positions it decodes (after a given prefix of `prompt_len`), the hyperschedule
    loop's plan (`plan`, or the objective's hyperschedule over `length`)."""
    if sampler is parallel and 0 < length - prompt_len < cfg.decode.block_length:  # a short generation is one block
        cfg = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, block_length=length - prompt_len))
    setup = Setup(cfg, objective, vocab_size, length, model_cfg, eos_id=eos_id)
    if sampler is parallel:
        check_decode(cfg.decode, length - prompt_len if cfg.decode.suffix_dropout else length)
        return dataclasses.replace(setup, prompt_len=prompt_len)
    if sampler is blocks:
        bw, dc = objective.diffusion.block_width, cfg.decode
        if model_cfg.noise_conditioning:
            raise ConfigError("sampling.sampler=parallel decodes block models without noise conditioning; sample this model "
                              "with sampling.sampler=ancestral.")
        if length % bw or bw % min(dc.block_length, bw):
            raise ConfigError(f"Block decoding needs diffusion.block_width={bw} to divide the canvas length {length} and "
                              f"sampling.decode.block_length={dc.block_length} (the sub-block) to divide the block width or "
                              "to be at least it.")
        if dc.suffix_dropout or dc.cache != DecodeCache.NONE:
            raise ConfigError("A block model's keys and values are cached block by block (sampling.cache); sampling.decode.cache "
                              "and sampling.decode.suffix_dropout are for bidirectional models: leave them at none and false.")
        check_decode(dc)
        return dataclasses.replace(setup, prompt_len=prompt_len)
    if sampler is hyperschedule:
        if plan is None:
            kind = objective.diffusion.hyperschedule
            width = hs.width_for(kind, length, objective.diffusion.block_width)
            if length % width:
                raise ConfigError(f"diffusion.block_width={width} must divide the generation length {length}.")
            plan = make_plan(hs.Hyperschedule(kind, length, width=width, steps=cfg.steps), cfg.grid)
        return dataclasses.replace(setup, plan=plan)
    return setup


def program(sampler: Callable, setup: Setup, graphdef, treedef) -> Callable:
    """The function that generate() compiles: (parameter leaves, x, fixed, key, alphas, times,
    pad or None, temperature or None) -> the sampler's dict (also what dlm.plan compiles for a
    pod). The temperature is a traced scalar when setup.cfg.temperature > 0 (None at 0, the
    argmax program), so that samplers that differ in it alone are one program."""

    def run(leaves, x, fixed, key, alphas, times, pad, temperature):
        # The module is rebuilt from plain arrays where it is used, so that NNX sees Variables
        # created at the trace level of the loop body, not at the level of this jit.
        module = lambda: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        if pad is not None:
            merged = module
            module = lambda: Padded(merged(), pad)
        s = setup
        if temperature is not None:
            s = dataclasses.replace(setup, cfg=dataclasses.replace(setup.cfg, temperature=temperature))
        return sampler(s, module, x, fixed, key, alphas, times, pad)

    return run


def traced_temperature(cfg: SamplingConfig, x64: bool):
    """The temperature argument of program(): None at 0, else a scalar at the widest float."""
    return None if cfg.temperature == 0 else jnp.asarray(cfg.temperature, jnp.float64 if x64 else jnp.float32)


def grid_arguments(cfg: SamplingConfig, objective: Objective):
    """program()'s (alphas, times, temperature) arguments: the time grid at the widest float, the
    objective's schedule on it and the traced temperature. Call it under jax.enable_x64(cfg.x64)."""
    times = jnp.asarray(time_grid(cfg.steps, cfg.grid), jnp.float64 if cfg.x64 else jnp.float32)
    return make_schedule(objective.diffusion).alpha(times), times, traced_temperature(cfg, cfg.x64)


def generate(model: nnx.Module, prompt=None, cfg: SamplingConfig | None = None, *, diffusion: DiffusionConfig | None = None,
             num_samples: int | None = None, length: int | None = None, mesh=None, key=None, plan=None,
             eos_id: int = -1, prompts=None, pad_id: int | None = None) -> dict:
    """Sample from a denoiser. Returns {'tokens' [B, L] np.int32, 'nfe', 'steps', 'idle_step_ratio',
    'seconds' (the run, compiled), 'compile_seconds' (0 when a sampler compiled by an earlier call
    with the same model structure, settings and shapes is reused)}, plus 'cache_writes' from the hyperschedule
    loop and 'nfe_per_sample' (the passes each row needed) from the token ancestral loop and the
    parallel decoder.

    `prompts`: one prompt per row, of different lengths: they are left-padded to the longest
    (pad_id, default eos_id or 0) with the padding hidden and positions counted from each
    row's first token, so every row gets what it gets alone at temperature 0 (for a block
    hyperschedule only when the prompts' lengths differ by whole blocks: its blocks sit at
    canvas columns); random draws are keyed by row and by position from the row's first token,
    so at temperature > 0 a row's draws depend on its index in the batch, not on the padding.

    `diffusion` is the run's DiffusionConfig (default: flat MDLM); its objective picks the loop.
    `plan` runs the hyperschedule loop on that plan (e.g. a truncated one, for timing, or the flat
    one as the loop's baseline). `eos_id` (-1: none)
    drives the parallel decoder's early termination. `model` is a Transformer (possibly with
    sharded parameters); `mesh`, when given, shards the batch over (data, expert, fsdp).
    """
    cfg = cfg or SamplingConfig()
    if cfg.eta < 0:
        raise ConfigError(f"sampling.eta={cfg.eta} must be >= 0.")
    if cfg.temperature < 0:
        raise ConfigError(f"sampling.temperature={cfg.temperature} must be >= 0 (0 decodes by argmax).")
    check_buckets(cfg)
    V = model.vocab_size
    objective = objective_for(diffusion or DiffusionConfig(), model.mask_id, model.cfg.noise_conditioning, V)
    sampler = sampler_for(objective, cfg)
    if plan is not None and sampler is not parallel:
        sampler = hyperschedule
    length = length or cfg.length or None
    if length is None:
        raise ConfigError("Pass a generation length (sampling.length or length=...).")
    if prompts is not None:
        if prompt is not None:
            raise ConfigError("Pass either prompt (one prompt or an infill spec for every row) or prompts (one per row), not both.")
        x, fixed, pad = left_pad(prompts, length, objective.mask_id, V, pad_id if pad_id is not None else max(eos_id, 0))
        B = len(x)
    else:
        B = num_samples or cfg.num_samples
        x, fixed = prepare_prompts(prompt, B, length, objective.mask_id, V)
        pad = None
    width = 1
    if sampler in (hyperschedule, blocks) and objective.diffusion.hyperschedule != hs.Kind.FLAT:
        width = hs.width_for(objective.diffusion.hyperschedule, length, objective.diffusion.block_width)
    if plan is None:  # a given plan is over its own length
        x, fixed, pad, extra_cols = _length_bucket(cfg, x, fixed, pad, pad_id if pad_id is not None else max(eos_id, 0), width)
    else:
        extra_cols = 0
    length += extra_cols
    if model.cfg.shift_logits and sampler is hyperschedule:
        raise ConfigError("This model predicts each position from the one before (shift_logits, Dream); sample it with "
                          "sampling.sampler=ancestral or parallel, not the hyperschedule loop.")
    P = 0
    if sampler in (parallel, blocks):
        P = int((~fixed).argmax(1).min()) if (~fixed).any() else length  # the given prefix of every row
        if cfg.decode.suffix_dropout and fixed[:, P:].any():
            raise ConfigError("sampling.decode.suffix_dropout (DPad) drops masked suffix positions after a prompt prefix; "
                              "an infill spec with given tokens after the first position to fill needs suffix_dropout=false.")
    setup = setup_for(sampler, objective, cfg, model.cfg, V, length, prompt_len=P, eos_id=eos_id, plan=plan)

    shards = 1 if mesh is None else batch_shards(mesh)
    rows = next((b for b in cfg.batch_buckets if b >= B), B)
    extra = rows - B + (-rows) % shards  # copies of row 0: random draws are indexed by row, so the others are unchanged
    if extra:
        x, fixed = np.concatenate([x, np.repeat(x[:1], extra, 0)]), np.concatenate([fixed, np.repeat(fixed[:1], extra, 0)])
        if pad is not None:
            pad = np.concatenate([pad, np.repeat(pad[:1], extra, 0)])
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)
    key = jax.random.key(cfg.seed) if key is None else key

    run = program(sampler, setup, graphdef, treedef)
    start = time.time()
    with jax.enable_x64(cfg.x64):
        alphas, times, temperature = grid_arguments(cfg, objective)
        with mesh_context(mesh) if mesh is not None else contextlib.nullcontext():
            if mesh is not None:
                x, fixed = jax.device_put(x, batch_sharding(mesh)), jax.device_put(fixed, batch_sharding(mesh))
                if pad is not None:
                    pad = jax.device_put(pad, NamedSharding(mesh, PartitionSpec(BATCH)))
            args = (leaves, jnp.asarray(x), jnp.asarray(fixed), key, alphas, times, None if pad is None else jnp.asarray(pad),
                    temperature)
            cache_key = _cache_key(sampler, setup, graphdef, treedef, args, mesh, cfg.x64)
            compiled = _COMPILED.get(cache_key)
            if compiled is None:
                compiled = jax.jit(run).lower(*args).compile()
                _COMPILED.put(cache_key, compiled)
                compile_s = time.time() - start
            else:
                compile_s = 0.0
            start = time.time()
            out = jax.block_until_ready(compiled(*args))
        out = jax.device_get(out)
    seconds = time.time() - start
    steps = int(out["steps"])
    result = {"tokens": np.asarray(out["tokens"])[:B, extra_cols:], "nfe": int(out["nfe"]), "steps": steps,
              "idle_step_ratio": int(out["idle_steps"]) / max(steps, 1), "seconds": seconds, "compile_seconds": compile_s}
    if "cache_writes" in out:
        result["cache_writes"] = int(out["cache_writes"])
    if "nfe_per_sample" in out:
        result["nfe_per_sample"] = np.asarray(out["nfe_per_sample"])[:B].tolist()
    return result
