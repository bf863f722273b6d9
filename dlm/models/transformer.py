"""Bidirectional transformer denoiser (Flax NNX).

RoPE (plus optional learned absolute or 2-D grid position embeddings), RMSNorm, SwiGLU, optional
per-token noise conditioning (adaLN shift/scale), blocks
created with nnx.vmap and run with nnx.scan (compile time flat in depth), optional remat.
Parameters are float32 and carry logical axis names (embed, heads, kv, mlp, vocab, layers,
cond); matmuls take `dtype` inputs and accumulate in float32; logits are float32.

    model(tokens [B, L], *, positions=None, attention=FULL, noise=None) -> logits [B, L, V]
    model(tokens, ..., kv_cache=(k, v), return_kv=True) -> (logits, (k_new, v_new))
    model(tokens, ..., head=False) -> LazyLogits (dlm.models.logits: the losses' chunked logits)

`noise` is the per-token time t [B, L] (only read when noise_conditioning is on).
KV cache: `kv_cache` holds keys/values [layers, B, Lc, H, D] (after RoPE) of earlier tokens; the
queries attend to [cache | own keys], so the attention spec is over Lc + L keys. `return_kv`
also returns the keys/values of this call's tokens, to be written into a cache.
The mask token is id V and is never predicted (SUBS).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dlm.config import ModelConfig, Remat
from dlm.models.attention import FULL, AttentionSpec, attention as attend
from dlm.models.logits import LazyLogits, rows_for

COND_DIM = 128
PAD_MULTIPLE = 128  # vocab tables are padded so that any tensor-parallel size divides them


def mlp_width(cfg: ModelConfig) -> int:
    return cfg.mlp_dim or int(math.ceil(8 * cfg.d_model / 3 / 32) * 32)


def _pad(n: int) -> int:
    return int(math.ceil(n / PAD_MULTIPLE) * PAD_MULTIPLE)


def _param(rngs, shape, std, names):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), out_sharding=names)


def rope_tables(positions, head_dim: int, theta: float):
    """positions [B, L] -> (cos, sin) [B, L, 1, head_dim/2]."""
    freqs = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    ang = positions.astype(jnp.float32)[..., None] * freqs
    return jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]


def apply_rope(x, cos, sin):
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rms_norm(x, scale, eps=1e-6):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale).astype(x.dtype)


def timestep_embedding(t, dim: int = COND_DIM):
    """Sinusoidal embedding of 1000 * t: [...] -> [..., dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    ang = 1000.0 * t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


def _dense(x, w, dt, out=None):
    """x [..., d_in] @ w [d_in, ...] as one 2-D matmul (XLA:CPU runs 2-D dots far faster than
    batched ones), inputs in `dt`, accumulated in float32, returned in `out` (default `dt`)."""
    w2 = w.reshape(w.shape[0], -1).astype(dt)
    y = jnp.matmul(x.reshape(-1, x.shape[-1]).astype(dt), w2, preferred_element_type=jnp.float32)
    return y.astype(out or dt).reshape(*x.shape[:-1], *w.shape[1:])


class Block(nnx.Module):
    """Pre-norm block: x + Attn(norm(x)), then x + SwiGLU(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, H = cfg.d_model, cfg.num_heads
        hd, ff = d // H, mlp_width(cfg)
        out_std = 1.0 / math.sqrt(2 * cfg.num_layers)
        self.attn_scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("embed",))
        self.wq = _param(rngs, (d, H, hd), d**-0.5, ("embed", "heads", "kv"))
        self.wk = _param(rngs, (d, H, hd), d**-0.5, ("embed", "heads", "kv"))
        self.wv = _param(rngs, (d, H, hd), d**-0.5, ("embed", "heads", "kv"))
        self.wo = _param(rngs, (H, hd, d), d**-0.5 * out_std, ("heads", "kv", "embed"))
        self.mlp_scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("embed",))
        self.w_gate = _param(rngs, (d, ff), d**-0.5, ("embed", "mlp"))
        self.w_up = _param(rngs, (d, ff), d**-0.5, ("embed", "mlp"))
        self.w_down = _param(rngs, (ff, d), ff**-0.5 * out_std, ("mlp", "embed"))
        if cfg.noise_conditioning:
            self.ada = nnx.Param(jnp.zeros((COND_DIM, 4, d), jnp.float32), out_sharding=("cond", None, "embed"))
        else:
            self.ada = None
        self.dtype = jnp.dtype(cfg.dtype.value)
        self.attention_impl = cfg.attention
        self.attention_chunk = cfg.attention_chunk

    def __call__(self, x, cos, sin, spec, cond, kv=None):
        """-> (x, (k, v)) with this call's keys/values; `kv` = cached (k, v) [B, Lc, H, D] prepended."""
        dt = self.dtype
        if self.ada is not None:
            shift1, scale1, shift2, scale2 = jnp.moveaxis(_dense(cond, self.ada[...], dt), -2, 0)
        h = rms_norm(x, self.attn_scale[...]).astype(dt)
        if self.ada is not None:
            h = h * (1 + scale1) + shift1
        q = apply_rope(_dense(h, self.wq[...], dt), cos, sin)
        k = apply_rope(_dense(h, self.wk[...], dt), cos, sin)
        v = _dense(h, self.wv[...], dt)
        new_kv = (k, v)
        if kv is not None:
            k, v = (jnp.concatenate([c.astype(dt), n], axis=1) for c, n in zip(kv, new_kv))
        a = attend(q, k, v, spec, self.attention_impl, self.attention_chunk)
        x = x + _dense(a.reshape(*a.shape[:2], -1), self.wo[...].reshape(-1, x.shape[-1]), dt, x.dtype)
        h = rms_norm(x, self.mlp_scale[...]).astype(dt)
        if self.ada is not None:
            h = h * (1 + scale2) + shift2
        h = jax.nn.silu(_dense(h, self.w_gate[...], dt)) * _dense(h, self.w_up[...], dt)
        return x + _dense(h, self.w_down[...], dt, x.dtype), new_kv


class Transformer(nnx.Module):
    """`subtokens` = l > 1 makes it an MDM-Prime denoiser: the input is [B, L, l] sub-tokens in
    {0..b-1} plus the mask b, embedded by one shared (b+1) x (d/l) table and concatenated; the
    output is still the joint over the V tokens."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs, subtokens: int = 1):
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.subtokens = subtokens
        d = cfg.d_model
        if subtokens > 1:
            from dlm.diffusion.prime import base_for

            rows = base_for(vocab_size, subtokens) + 1
            self.embed = _param(rngs, (_pad(rows), d // subtokens), cfg.embed_init_std, ("vocab", None))
        else:
            self.embed = _param(rngs, (_pad(vocab_size + 1), d), cfg.embed_init_std, ("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        # additive position information beside RoPE: absolute positions, and a task's 2-D grid
        std = cfg.embed_init_std
        self.pos_embed = _param(rngs, (cfg.learned_positions, d), std, (None, "embed")) if cfg.learned_positions else None
        if cfg.grid:
            rows, cols, box_rows, box_cols = cfg.grid[:4]
            self.row_embed = _param(rngs, (rows, d), std, (None, "embed"))
            self.col_embed = _param(rngs, (cols, d), std, (None, "embed"))
            self.box_embed = _param(rngs, (rows // box_rows * (cols // box_cols), d), std, (None, "embed"))
        else:
            self.row_embed = self.col_embed = self.box_embed = None
        pages = cfg.grid[4] if len(cfg.grid) == 5 else 1
        self.page_embed = _param(rngs, (pages, d), std, (None, "embed")) if pages > 1 else None
        self.final_scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("embed",))
        self.head = _param(rngs, (d, _pad(vocab_size)), d**-0.5, ("embed", "vocab"))
        if cfg.noise_conditioning:
            self.t_in = _param(rngs, (COND_DIM, COND_DIM), COND_DIM**-0.5, ("cond", None))
            self.t_out = _param(rngs, (COND_DIM, COND_DIM), COND_DIM**-0.5, (None, "cond"))
        else:
            self.t_in = self.t_out = None

    def __call__(self, tokens, *, positions=None, attention: AttentionSpec = FULL, noise=None, kv_cache=None,
                 return_kv: bool = False, head: bool = True):
        """head=False returns LazyLogits (the normed hidden states and the head, for the chunked
        losses) instead of the logits."""
        cfg = self.cfg
        B, L = tokens.shape[:2]
        dt = jnp.dtype(cfg.dtype.value)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(L), (B, L))
        x = jnp.take(self.embed[...], tokens, axis=0)  # [B, L, d] (Prime: [B, L, l, d/l]) float32 residual stream
        x = x.reshape(B, L, cfg.d_model)
        x = x + self._position_embedding(positions)
        cos, sin = rope_tables(positions, cfg.d_model // cfg.num_heads, cfg.rope_theta)
        cond = None
        if self.t_in is not None:
            if noise is None:
                raise ValueError("This model is noise-conditioned: pass noise=t (per-token times [B, L]).")
            e = timestep_embedding(jnp.broadcast_to(noise, (B, L)))
            cond = _dense(jax.nn.silu(_dense(e, self.t_in[...], jnp.float32)), self.t_out[...], jnp.float32).astype(dt)

        if kv_cache is not None or return_kv:
            def body(block, x, kv):
                x, new_kv = block(x, cos, sin, attention, cond, kv)
                return x, (new_kv if return_kv else None)

            scan = nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                            transform_metadata={nnx.PARTITION_NAME: "layers"})
            x, new_kv = scan(self.blocks, x, kv_cache)
            logits = self._head(x)
            return (logits, new_kv) if return_kv else logits

        def body(block, x):
            return block(x, cos, sin, attention, cond)[0]

        if cfg.remat == Remat.FULL:
            body = nnx.remat(body, policy=jax.checkpoint_policies.nothing_saveable)
        elif cfg.remat == Remat.DOTS:
            body = nnx.remat(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        scan = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
                        transform_metadata={nnx.PARTITION_NAME: "layers"})
        return self._head(scan(self.blocks, x), lazy=not head)

    def _position_embedding(self, positions):
        """[B, L, d] learned absolute and grid (row, column, box of a row-major cell, and page when
        several grids follow one another) embeddings; 0 without."""
        out = jnp.zeros((), jnp.float32)
        if self.pos_embed is not None:
            out = out + jnp.take(self.pos_embed[...], positions, axis=0)
        if self.row_embed is not None:
            rows, cols, box_rows, box_cols = self.cfg.grid[:4]
            cell = positions % (rows * cols)
            if self.page_embed is not None:
                out = out + jnp.take(self.page_embed[...], positions // (rows * cols), axis=0)
            r, c = cell // cols, cell % cols
            box = (r // box_rows) * (cols // box_cols) + c // box_cols
            out = out + (jnp.take(self.row_embed[...], r, axis=0) + jnp.take(self.col_embed[...], c, axis=0)
                         + jnp.take(self.box_embed[...], box, axis=0))
        return out

    def _head(self, x, lazy: bool = False):
        """Float32 logits [B, L, V] of the final hidden states, or (lazy) the LazyLogits that the
        losses compute chunk by chunk."""
        h = rms_norm(x, self.final_scale[...]).astype(jnp.dtype(self.cfg.dtype.value))
        logits = LazyLogits(h, self.head[...], self.vocab_size, rows_for(self.vocab_size, self.cfg.logits_chunk))
        return logits if lazy else logits.materialize()
