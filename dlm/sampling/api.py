"""Exact ancestral sampling for masked diffusion (MDLM / MD4).

On a time grid 1 = t_0 > t_1 > ... > t_N = 0, a still-masked token is revealed between t and s < t
with probability (alpha_s - alpha_t) / (1 - alpha_t), taking a draw from the denoiser's
categorical mu_theta(x_t); visible tokens never change (carry-over). At s = 0 every remaining
mask is revealed. When no token changed and the model is not noise-conditioned, the input is the
same and the last forward pass is reused (no extra NFE).

Prompts and infilling are one mechanism: `fixed[b, i]` positions hold given tokens and are
never masked. The loop is one `lax.while_loop` with static shapes; under a mesh the batch is
sharded over (data, fsdp) and the parameters stay sharded as trained.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlm.config import ConfigError, DiffusionConfig, Sampler, SamplingConfig, TimeGrid
from dlm.diffusion.schedules import make_schedule
from dlm.parallel.mesh import batch_sharding, mesh_context


def time_grid(steps: int, grid: TimeGrid) -> np.ndarray:
    """[steps + 1] times from 1 down to 0; the cosine grid t_i = cos(pi/2 * i/N) takes smaller steps near t = 1."""
    i = np.arange(steps + 1, dtype=np.float64) / steps
    if grid == TimeGrid.COSINE:
        return np.cos(0.5 * math.pi * i)
    return 1.0 - i


def fine_uniform(bits):
    """Uniform on (0, 1) from two uint32 words [..., 2] without float64: w = (i1 + (i2 + 1/2) 2^-23) 2^-23
    from two 23-bit integers, so values near 0 have a resolution of 2^-46 (float32's own uniform
    stops at 2^-23); at most 1 - 2^-24."""
    i1 = (bits[..., 0] >> 9).astype(jnp.float32)
    i2 = (bits[..., 1] >> 9).astype(jnp.float32)
    w = (i1 + (i2 + 0.5) * 2.0**-23) * 2.0**-23
    return jnp.minimum(w, 1.0 - 2.0**-24)


def gumbel(key, shape, precise: bool):
    """Standard Gumbel noise -log(E), E ~ Exp(1). precise: float64 when jax_enable_x64 is on, else
    E = -log1p(-w) with w from fine_uniform, which reaches g = 32.6 (float64: about 37) where plain
    float32 noise stops at 15.9 — the tail that decides whether tokens of probability below e^-16
    are ever drawn."""
    if not precise or jax.config.jax_enable_x64:
        dt = jnp.float64 if precise else jnp.float32
        u = jax.random.uniform(key, shape, dt, minval=jnp.finfo(dt).tiny, maxval=1.0)
        return -jnp.log(-jnp.log(u))
    w = fine_uniform(jax.random.bits(key, (*shape, 2), jnp.uint32))
    return -jnp.log(-jnp.log1p(-w))


def categorical(key, logits, temperature: float, float64: bool):
    """Gumbel-max draw from softmax(logits / temperature); argmax at temperature 0.

    float64-grade noise (see gumbel) keeps the tail probabilities that float32 Gumbel noise
    cannot reach."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    g = gumbel(key, logits.shape, float64)
    dt = g.dtype
    return jnp.argmax(logits.astype(dt) / temperature + g, axis=-1).astype(jnp.int32)


def ancestral_loop(apply_fn, x, fixed, key, alphas, cfg: SamplingConfig, vocab_size: int, noise_conditioning: bool):
    """x [B, L] with the mask id (= vocab_size) at positions to generate; alphas [N + 1] = alpha(t_i).

    apply_fn(x, t_tokens | None) -> logits [B, L, V]. Returns (tokens, nfe)."""
    mask_id = vocab_size
    B, L = x.shape
    steps = alphas.shape[0] - 1
    fdt = alphas.dtype
    x = jnp.where(fixed, x, mask_id)

    def forward(x, i):
        t = jnp.full((B, L), 1.0 - alphas[i], jnp.float32) if noise_conditioning else None
        return apply_fn(x, t).astype(jnp.float32)

    def body(carry):
        i, x, logits, changed, nfe, key = carry
        key, k_cat, k_rev = jax.random.split(key, 3)
        recompute = changed | noise_conditioning
        logits = jax.lax.cond(recompute, lambda: forward(x, i), lambda: logits)
        nfe = nfe + recompute.astype(jnp.int32)
        a_t, a_s = alphas[i], alphas[i + 1]
        p_reveal = jnp.where(i + 1 == steps, 1.0, (a_s - a_t) / (1.0 - a_t))
        draw = categorical(k_cat, logits, cfg.temperature, cfg.float64)
        reveal = (x == mask_id) & (jax.random.uniform(k_rev, (B, L), fdt) < p_reveal)
        return i + 1, jnp.where(reveal, draw, x), logits, reveal.any(), nfe, key

    init = (jnp.int32(0), x, jnp.zeros((B, L, vocab_size), jnp.float32), jnp.bool_(True), jnp.int32(0), key)
    _, x, _, _, nfe, _ = jax.lax.while_loop(lambda c: c[0] < steps, body, init)
    return x, nfe


def gamma_loop(apply_fn, x, fixed, key, times, alphas, cfg: SamplingConfig, vocab_size: int, gamma: float):
    """Analytic (Tweedie) sampler of the gamma-hybrid process: x_1 from the prior (mask with
    probability 1 - a(1), else a uniform token), then at every step t -> s each non-prompt
    position draws from sum_x0 mu(x0 | x_t) q(x_s | x_t, x0) (dlm.diffusion.hybrid.gamma_reverse_probs).
    times/alphas [N + 1] from t = 1 to 0. apply_fn(x, t_tokens) -> logits. Returns (tokens, nfe)."""
    from dlm.diffusion.hybrid import gamma_levels, gamma_reverse_probs

    mask_id = vocab_size
    B, L = x.shape
    steps = alphas.shape[0] - 1
    key, k_m, k_u = jax.random.split(key, 3)
    a1, b1, _, _ = gamma_levels(alphas[0].astype(jnp.float32), gamma)
    z = jnp.where(jax.random.uniform(k_m, (B, L)) < a1, jax.random.randint(k_u, (B, L), 0, vocab_size, jnp.int32), mask_id)
    z = z.astype(jnp.int32)
    z = jnp.where(fixed, x, z)

    def body(i, carry):
        z, key = carry
        key, k = jax.random.split(key)
        t_tok = jnp.where(fixed, 0.0, times[i].astype(jnp.float32))
        logits = apply_fn(z, t_tok).astype(jnp.float32)
        if cfg.temperature > 0:
            logits = logits / cfg.temperature
        a_t, a_s = (jnp.full((B, L), a, jnp.float32) for a in (alphas[i], alphas[i + 1]))
        probs = gamma_reverse_probs(logits, z, a_t, a_s, gamma, mask_id)
        # the kernel is already tempered through mu; at temperature 0 take its mode
        draw = categorical(k, jnp.log(jnp.maximum(probs, 1e-30)), 1.0 if cfg.temperature > 0 else 0.0, cfg.float64)
        return jnp.where(fixed, x, draw), key

    z, _ = jax.lax.fori_loop(0, steps, body, (z, key))
    return z, jnp.int32(steps)


def prime_ancestral_loop(apply_fn, x, fixed, key, alphas, cfg: SamplingConfig, codec, noise_conditioning: bool):
    """Digit-level ancestral sampling for MDM-Prime.

    x [B, L] tokens (fixed positions hold prompt tokens). Each step draws x_hat from the carried-over
    joint p(x | y_t) and every still-masked sub-token takes x_hat's digit with probability
    (alpha_s - alpha_t) / (1 - alpha_t). The forward pass is reused while y does not change.
    Returns (tokens, nfe, idle_steps)."""
    from dlm.diffusion.prime import carry_over

    B, L = x.shape
    steps = alphas.shape[0] - 1
    m = codec.mask_id
    y = jnp.where(fixed[..., None], codec.encode(x), m)

    def forward(y, i):
        t = jnp.full((B, L), 1.0 - alphas[i], jnp.float32) if noise_conditioning else None
        return carry_over(apply_fn(y, t).astype(jnp.float32), y, codec)

    def body(carry):
        i, y, logits, changed, nfe, idle, key = carry
        key, k_cat, k_rev = jax.random.split(key, 3)
        recompute = changed | noise_conditioning
        logits = jax.lax.cond(recompute, lambda: forward(y, i), lambda: logits)
        nfe = nfe + recompute.astype(jnp.int32)
        a_t, a_s = alphas[i], alphas[i + 1]
        p_reveal = jnp.where(i + 1 == steps, 1.0, (a_s - a_t) / (1.0 - a_t))
        digits = codec.encode(categorical(k_cat, logits, cfg.temperature, cfg.float64))  # [B, L, l]
        reveal = (y == m) & (jax.random.uniform(k_rev, y.shape, alphas.dtype) < p_reveal)
        changed = reveal.any()
        return i + 1, jnp.where(reveal, digits, y), logits, changed, nfe, idle + (~changed).astype(jnp.int32), key

    init = (jnp.int32(0), y, jnp.zeros((B, L, codec.vocab_size), jnp.float32), jnp.bool_(True), jnp.int32(0), jnp.int32(0), key)
    _, y, _, _, nfe, idle, _ = jax.lax.while_loop(lambda c: c[0] < steps, body, init)
    return codec.decode(y), nfe, idle


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


def generate(model: nnx.Module, prompt=None, cfg: SamplingConfig | None = None, *, diffusion: DiffusionConfig | None = None,
             num_samples: int | None = None, length: int | None = None, mesh=None, key=None, plan=None,
             eos_id: int = -1) -> dict:
    """Sample from a denoiser. Returns {'tokens' [B, L] np.int32, 'nfe', 'steps', 'idle_step_ratio',
    'seconds' (the run, compiled), 'compile_seconds', 'cache_writes'}.

    Flat absorbing models use the exact ancestral loop; other hyperschedules, hybrid processes and
    the ACS sampler the hyperschedule loop (dlm.sampling.hyper), with the KV cache unless
    cfg.cache is off. `plan` overrides the hyperschedule plan (e.g. a truncated one, for timing).
    sampler=parallel runs the parallel decoder (dlm.sampling.parallel, cfg.decode) after a prompt
    prefix; `eos_id` (-1: none) drives its early termination.

    A Prime model (model.subtokens > 1) is sampled digit by digit (prime_ancestral_loop).

    `model` is a Transformer (possibly with sharded parameters); `mesh`, when given, shards the
    batch over (data, fsdp).
    """
    cfg = cfg or SamplingConfig()
    diffusion = diffusion or DiffusionConfig()
    V = model.vocab_size
    mask_id = V
    length = length or cfg.length or None
    if length is None:
        raise ConfigError("Pass a generation length (sampling.length or length=...).")
    B = num_samples or cfg.num_samples
    x, fixed = prepare_prompts(prompt, B, length, mask_id, V)
    shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    pad = (-B) % shards
    if pad:
        x, fixed = np.concatenate([x, np.repeat(x[:1], pad, 0)]), np.concatenate([fixed, np.repeat(fixed[:1], pad, 0)])
    schedule = make_schedule(diffusion)
    grid = time_grid(cfg.steps, cfg.grid)
    graphdef, params = nnx.split(model)
    cond = model.cfg.noise_conditioning
    key = jax.random.key(cfg.seed) if key is None else key

    leaves, treedef = jax.tree.flatten(params)
    prime_l = getattr(model, "subtokens", 1)

    if cfg.eta < 0:
        raise ConfigError(f"sampling.eta={cfg.eta} must be >= 0.")
    if cfg.temperature < 0:
        raise ConfigError(f"sampling.temperature={cfg.temperature} must be >= 0 (0 decodes by argmax).")
    hybrid = diffusion.process.value == "epsilon_hybrid"
    gamma = diffusion.process.value == "gamma_hybrid"
    parallel = cfg.sampler == Sampler.PARALLEL
    if parallel:
        from dlm.config import check_decode

        P = int(fixed[0].sum())
        if not (fixed[:, :P].all() and not fixed[:, P:].any()):
            raise ConfigError("sampling.sampler=parallel takes a prompt prefix (a list of token ids), not an infill spec.")
        if diffusion.hyperschedule.value != "flat" or prime_l > 1 or hybrid or gamma:
            raise ConfigError("sampling.sampler=parallel decodes flat absorbing models (MDLM); this model's hyperschedule, "
                              "process or Prime setting needs sampler=ancestral.")
        check_decode(cfg.decode, length - P)
    acs = cfg.sampler == Sampler.ACS
    if gamma and acs:
        raise ConfigError("sampling.sampler=acs corrects epsilon-hybrid models; sample gamma_hybrid models with sampler=ancestral "
                          "(the analytic sampler).")
    if plan is None and not gamma and (diffusion.hyperschedule.value != "flat" or acs or hybrid):
        from dlm.diffusion import hyperschedules as hs
        from dlm.sampling.hyper import make_plan

        kind = hs.Kind(diffusion.hyperschedule.value)
        width = hs.width_for(kind, length, diffusion.block_width)
        if length % width:
            raise ConfigError(f"diffusion.block_width={width} must divide the generation length {length}.")
        plan = make_plan(hs.Hyperschedule(kind, length, width=width, steps=cfg.steps), cfg.grid)
    mcfg = model.cfg
    kv_shape = (mcfg.num_layers, B + pad, length, mcfg.num_heads, mcfg.d_model // mcfg.num_heads)

    def run(leaves, x, fixed, key, alphas, times):
        # The module is rebuilt from plain arrays where it is used, so that NNX sees Variables
        # created at the trace level of the loop body, not at the level of this jit.
        module = lambda: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        apply_fn = lambda xt, t: module()(xt, noise=t)
        if parallel:
            from dlm.sampling.parallel import parallel_decode

            def par_fn(tokens, positions, attention, kv_cache, return_kv):
                t = jnp.where(tokens == mask_id, 1.0, 0.0) if cond else None  # a clean/masked flag for noise-conditioned models
                return module()(tokens, positions=positions, attention=attention, noise=t, kv_cache=kv_cache, return_kv=return_kv)

            out = parallel_decode(par_fn, x, P, key, cfg.decode, mask_id=mask_id, eos_id=eos_id, temperature=cfg.temperature,
                                  float64=cfg.float64, kv_dtype=jnp.dtype(mcfg.dtype.value))
            return out["tokens"], out["nfe"], out["steps"], out["row_nfe"]
        if gamma:
            tokens, nfe = gamma_loop(apply_fn, x, fixed, key, times, alphas, cfg, V, diffusion.gamma)
            return tokens, nfe, jnp.int32(0), jnp.int32(0)
        if plan is not None:
            from dlm.sampling.hyper import hyper_loop

            def model_fn(tokens, positions, attention, noise, kv_cache, return_kv):
                return module()(tokens, positions=positions, attention=attention, noise=noise if cond else None,
                                kv_cache=kv_cache, return_kv=return_kv)

            draw_logits = None
            if hybrid and not acs:  # the exact sampler reveals y ~ (1 - eps) mu + eps / V ...
                from dlm.diffusion.hybrid import y_log_probs

                draw_logits = lambda logits: y_log_probs(logits, diffusion.epsilon)
            key, k_dec = jax.random.split(key)
            tokens, nfe, commits, _ = hyper_loop(model_fn, x, fixed, key, plan, schedule.alpha, mask_id=mask_id, kv_shape=kv_shape,
                                                 kv_dtype=jnp.dtype(mcfg.dtype.value), temperature=cfg.temperature,
                                                 float64=cfg.float64, noise_conditioning=cond, cache=cfg.cache,
                                                 eta=cfg.eta if acs else 0.0, draw_logits=draw_logits)
            if hybrid and not acs:  # ... and then decodes x ~ mu(. | y) (ACS keeps its corrected tokens)
                t0 = jnp.zeros(tokens.shape, jnp.float32) if cond else None
                dec = categorical(k_dec, module()(tokens, noise=t0), cfg.temperature, cfg.float64)
                tokens, nfe = jnp.where(fixed, tokens, dec), nfe + 1
            return tokens, nfe, plan.num_steps - nfe, commits
        if prime_l > 1:
            from dlm.diffusion.prime import Codec

            tokens, nfe, idle = prime_ancestral_loop(apply_fn, x, fixed, key, alphas, cfg, Codec(V, prime_l), cond)
            return tokens, nfe, idle, jnp.int32(0)
        tokens, nfe = ancestral_loop(apply_fn, x, fixed, key, alphas, cfg, V, cond)
        return tokens, nfe, cfg.steps - nfe, jnp.int32(0)

    start = time.time()
    with jax.enable_x64(cfg.float64):
        times = jnp.asarray(grid, jnp.float64 if cfg.float64 else jnp.float32)
        alphas = schedule.alpha(times)
        if mesh is not None:
            with mesh_context(mesh):
                x, fixed = jax.device_put(x, batch_sharding(mesh)), jax.device_put(fixed, batch_sharding(mesh))
                args = (leaves, x, fixed, key, alphas, times)
                compiled = jax.jit(run).lower(*args).compile()
                compile_s, start = time.time() - start, time.time()
                tokens, nfe, idle, commits = jax.block_until_ready(compiled(*args))
        else:
            args = (leaves, jnp.asarray(x), jnp.asarray(fixed), key, alphas, times)
            compiled = jax.jit(run).lower(*args).compile()
            compile_s, start = time.time() - start, time.time()
            tokens, nfe, idle, commits = jax.block_until_ready(compiled(*args))
        tokens = np.asarray(jax.device_get(tokens))[:B]
    seconds = time.time() - start
    steps = cfg.steps if plan is None else plan.num_steps
    extra = {}
    if parallel:  # the decoder's step count travels in the idle slot, per-row passes in the cache-write slot
        steps, idle = int(idle), 0
        extra = {"nfe_per_sample": np.asarray(commits)[:B].tolist()}
        commits = 0
    return {"tokens": tokens, "nfe": int(nfe), "steps": steps, "idle_step_ratio": int(idle) / max(steps, 1),
            "seconds": seconds, "compile_seconds": compile_s, "cache_writes": int(commits), **extra}
