"""Bidirectional transformer denoiser (Flax NNX).

RoPE (plus optional learned absolute or 2-D grid position embeddings), RMSNorm, SwiGLU, optional
per-token noise conditioning (adaLN shift/scale), blocks
created with nnx.vmap and run with nnx.scan (compile time flat in depth), optional remat.
The options of published architectures (dlm.models.families names the presets): grouped-query
attention (num_kv_heads), QKV biases, LayerNorm, a GELU MLP with biases, the DiT block with
adaLN shift/scale/gate from a conditioning vector (MDLM), a mask id inside the vocabulary, and
shifted logits (Dream: position i is predicted from position i - 1).
Parameters are float32 and carry logical axis names (embed, heads, kv, mlp, vocab, layers,
cond); matmuls take `dtype` inputs and accumulate in float32; logits are float32.

    model(tokens [B, L], *, positions=None, attention=FULL, noise=None) -> logits [B, L, V]
    model(tokens, ..., kv_cache=(k, v), return_kv=True) -> (logits, (k_new, v_new))
    model(tokens, ..., head=False) -> LazyLogits (dlm.models.logits: the losses' chunked logits)

`noise` is the per-token time t [B, L] (only read when noise_conditioning is on).
KV cache: `kv_cache` holds keys/values [layers, B, Lc, H, D] (after RoPE) of earlier tokens; the
queries attend to [cache | own keys], so the attention spec is over Lc + L keys. `return_kv`
also returns the keys/values of this call's tokens, to be written into a cache.
The mask token (id V by default, or model.mask_id inside the vocabulary) is never predicted (SUBS).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dlm.config import ModelConfig, Remat
from dlm.mesh import constrain
from dlm.models.attention import FULL, AttentionSpec, attention as attend
from dlm.models.logits import LazyLogits, rows_for
from dlm.models.moe import Routing, losses_of, moe_feedforward

COND_DIM = 128
PAD_MULTIPLE = 128  # vocab tables are padded so that any tensor-parallel size divides them


def mlp_width(cfg: ModelConfig) -> int:
    if cfg.mlp_dim:
        return cfg.mlp_dim
    return 4 * cfg.d_model if cfg.mlp == "gelu" else int(math.ceil(8 * cfg.d_model / 3 / 32) * 32)


def kv_heads(cfg: ModelConfig) -> int:
    return cfg.num_kv_heads or cfg.num_heads


def mask_id_of(cfg: ModelConfig, vocab_size: int) -> int:
    """The mask id of a model over `vocab_size` logit columns: model.mask_id, or vocab_size."""
    return cfg.mask_id if cfg.mask_id >= 0 else vocab_size


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
    """Rotate the first 2 x cos.shape[-1] dimensions of each head (all of them, or partial RoPE's
    share) in two halves; the rest pass through."""
    r = 2 * cos.shape[-1]
    x1, x2 = jnp.split(x[..., :r].astype(jnp.float32), 2, axis=-1)
    rot = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return rot if r == x.shape[-1] else jnp.concatenate([rot, x[..., r:]], axis=-1)


def rotary_dim(cfg: ModelConfig) -> int:
    """The dimensions of a head that RoPE rotates (model.rope_fraction of them)."""
    return round(cfg.rope_fraction * (cfg.d_model // cfg.num_heads))


def rms_norm(x, scale, eps=1e-6):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale).astype(x.dtype)


def layer_norm(x, scale, eps=1e-5):
    """LayerNorm without bias, in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale).astype(x.dtype)


def norm(cfg: ModelConfig, x, scale):
    return (layer_norm if cfg.norm == "layer" else rms_norm)(x, scale, cfg.norm_eps)


def timestep_embedding(t, dim: int = COND_DIM, scale: float = 1000.0):
    """Sinusoidal embedding of scale * t: [...] -> [..., dim] (cos, then sin; base 10000). dlm's
    noise conditioning embeds 1000 t; MDLM's sigma_map embeds sigma itself (scale 1, dim 256)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    ang = scale * jnp.asarray(t, jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


def _zeros(shape, names):
    return nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=names)


def _dense(x, w, dt, out=None):
    """x [..., d_in] @ w [d_in, ...] as one 2-D matmul (XLA:CPU runs 2-D dots far faster than
    batched ones), inputs in `dt`, accumulated in float32, returned in `out` (default `dt`)."""
    w2 = w.reshape(w.shape[0], -1).astype(dt)
    y = jnp.matmul(x.reshape(-1, x.shape[-1]).astype(dt), w2, preferred_element_type=jnp.float32)
    return y.astype(out or dt).reshape(*x.shape[:-1], *w.shape[1:])


class Block(nnx.Module):
    """Pre-norm block: x + Attn(norm(x)), then x + MLP(norm(x)); the DiT block modulates each norm
    (x (1 + scale) + shift) and gates each branch from the conditioning vector."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False):
        d, H, KV = cfg.d_model, cfg.num_heads, kv_heads(cfg)
        hd, ff = d // H, mlp_width(cfg)
        out_std = 1.0 / math.sqrt(2 * cfg.num_layers)
        self.attn_scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("embed",))
        self.wq = _param(rngs, (d, H, hd), d**-0.5, ("embed", "heads", "kv"))
        self.wk = _param(rngs, (d, KV, hd), d**-0.5, ("embed", "heads", "kv"))
        self.wv = _param(rngs, (d, KV, hd), d**-0.5, ("embed", "heads", "kv"))
        if cfg.qkv_bias:
            self.bq, self.bk, self.bv = (_zeros((n, hd), ("heads", "kv")) for n in (H, KV, KV))
        else:
            self.bq = self.bk = self.bv = None
        if cfg.qk_norm:
            self.q_norm, self.k_norm = (nnx.Param(jnp.ones((hd,), jnp.float32), out_sharding=("kv",)) for _ in range(2))
        else:
            self.q_norm = self.k_norm = None
        self.wo = _param(rngs, (H, hd, d), d**-0.5 * out_std, ("heads", "kv", "embed"))
        self.mlp_scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("embed",))
        if moe:  # routed experts (and shared ones) instead of the dense feed-forward
            E, fe = cfg.moe.experts, cfg.moe.expert_dim or ff
            self.router = _param(rngs, (d, E), d**-0.5, ("embed", None))
            self.expert_bias = _zeros((E,), (None,)) if cfg.moe.expert_bias else None
            self.experts_gate = _param(rngs, (E, d, fe), d**-0.5, ("expert", "embed", "mlp"))
            self.experts_up = _param(rngs, (E, d, fe), d**-0.5, ("expert", "embed", "mlp"))
            self.experts_down = _param(rngs, (E, fe, d), fe**-0.5 * out_std, ("expert", "mlp", "embed"))
            ff = cfg.moe.shared_experts * fe  # the shared experts: one dense SwiGLU of this width, or none
        else:
            self.router = self.experts_gate = self.experts_up = self.experts_down = self.expert_bias = None
        self.w_gate = _param(rngs, (d, ff), d**-0.5, ("embed", "mlp")) if cfg.mlp == "swiglu" and ff else None
        self.w_up = _param(rngs, (d, ff), d**-0.5, ("embed", "mlp")) if ff else None
        self.w_down = _param(rngs, (ff, d), ff**-0.5 * out_std, ("mlp", "embed")) if ff else None
        if cfg.mlp == "gelu":
            self.b_up, self.b_down = _zeros((ff,), ("mlp",)), _zeros((d,), ("embed",))
        else:
            self.b_up = self.b_down = None
        if cfg.block == "dit":  # shift, scale, gate of the attention, then of the MLP (adaLN-zero init)
            self.ada = _zeros((cfg.cond_dim, 6, d), ("cond", None, "embed"))
            self.ada_bias = _zeros((6, d), (None, "embed"))
        elif cfg.noise_conditioning:
            self.ada = nnx.Param(jnp.zeros((COND_DIM, 4, d), jnp.float32), out_sharding=("cond", None, "embed"))
            self.ada_bias = None
        else:
            self.ada = self.ada_bias = None
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype.value)
        self.attention_impl = cfg.attention
        self.attention_chunk = cfg.attention_chunk

    def __call__(self, x, cos, sin, spec, cond, kv=None):
        """-> (x, (k, v), routing) with this call's keys/values (`kv` = cached (k, v) [B, Lc, KV, D]
        prepended) and, in a mixture-of-experts block, its routing sums (dlm.models.moe; else None)."""
        cfg, dt = self.cfg, self.dtype
        gate1 = gate2 = None
        if self.ada_bias is not None:  # DiT: cond [cond_dim] -> [6, d]
            mods = _dense(cond, self.ada[...], jnp.float32) + self.ada_bias[...]
            shift1, scale1, gate1, shift2, scale2, gate2 = (m.astype(dt) for m in mods)
        elif self.ada is not None:
            shift1, scale1, shift2, scale2 = jnp.moveaxis(_dense(cond, self.ada[...], dt), -2, 0)
        h = norm(cfg, x, self.attn_scale[...]).astype(dt)
        if self.ada is not None:
            h = h * (1 + scale1) + shift1
        q, k, v = (constrain(_dense(h, w[...], dt), "act_batch", None, "act_heads", None) for w in (self.wq, self.wk, self.wv))
        if self.bq is not None:
            q, k, v = (a + b[...].astype(dt) for a, b in ((q, self.bq), (k, self.bk), (v, self.bv)))
        if self.q_norm is not None:  # QK-norm: RMSNorm over each head's dimensions, before RoPE
            q, k = (rms_norm(a, s[...], cfg.norm_eps).astype(dt) for a, s in ((q, self.q_norm), (k, self.k_norm)))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = (k, v)
        if kv is not None:
            k, v = (jnp.concatenate([c.astype(dt), n], axis=1) for c, n in zip(kv, new_kv))
        groups = q.shape[2] // k.shape[2]
        if groups > 1:  # grouped-query attention: head h reads key/value head h // groups
            k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        a = attend(q, k, v, spec, self.attention_impl, self.attention_chunk)
        a = _dense(a.reshape(*a.shape[:2], -1), self.wo[...].reshape(-1, x.shape[-1]), dt, x.dtype)
        x = x + (a if gate1 is None else gate1.astype(x.dtype) * a)
        h = norm(cfg, x, self.mlp_scale[...]).astype(dt)
        if self.ada is not None:
            h = h * (1 + scale2) + shift2
        routing = None
        if self.router is not None:
            mc = cfg.moe
            bias = None if self.expert_bias is None else jax.lax.stop_gradient(self.expert_bias[...])
            m, routing = moe_feedforward(h, self.router[...], self.experts_gate[...], self.experts_up[...], self.experts_down[...],
                                         Routing.of(mc), dt, mc.impl, mc.capacity_factor, bias)
            m = m.astype(x.dtype)
            if self.w_gate is not None:  # shared experts
                s = constrain(jax.nn.silu(_dense(h, self.w_gate[...], dt)) * _dense(h, self.w_up[...], dt), "act_batch", None, "act_mlp")
                m = m + _dense(s, self.w_down[...], dt, x.dtype)
        elif self.w_gate is not None:
            h = constrain(jax.nn.silu(_dense(h, self.w_gate[...], dt)) * _dense(h, self.w_up[...], dt), "act_batch", None, "act_mlp")
            m = _dense(h, self.w_down[...], dt, x.dtype)
        else:
            h = jax.nn.gelu(_dense(h, self.w_up[...], dt) + self.b_up[...].astype(dt), approximate=True)
            h = constrain(h, "act_batch", None, "act_mlp")
            m = (_dense(h, self.w_down[...], dt, jnp.float32) + self.b_down[...]).astype(x.dtype)
        x = x + (m if gate2 is None else gate2.astype(x.dtype) * m)
        return constrain(x, "act_batch", None, None), new_kv, routing


class Transformer(nnx.Module):
    """`subtokens` = l > 1 makes it an MDM-Prime denoiser: the input is [B, L, l] sub-tokens in
    {0..b-1} plus the mask b, embedded by one shared (b+1) x (d/l) table and concatenated; the
    output is still the joint over the V tokens."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs, subtokens: int = 1):
        self.cfg = cfg
        vocab_size = cfg.vocab_size or vocab_size
        self.vocab_size = vocab_size
        self.mask_id = mask_id_of(cfg, vocab_size)
        self.subtokens = subtokens
        d = cfg.d_model
        if subtokens > 1:
            from dlm.diffusion.prime import base_for

            rows = base_for(vocab_size, subtokens) + 1
            self.embed = _param(rngs, (_pad(rows), d // subtokens), cfg.embed_init_std, ("vocab", None))
        else:
            self.embed = _param(rngs, (_pad(max(vocab_size, self.mask_id + 1)), d), cfg.embed_init_std, ("vocab", "embed"))

        moe = cfg.moe.experts > 0
        dense = cfg.moe.dense_layers if moe else 0

        def stack(n: int, moe: bool):
            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs):
                return Block(cfg, rngs=rngs, moe=moe)

            return make_blocks(rngs)

        # a mixture-of-experts model's first model.moe.dense_layers blocks keep the dense
        # feed-forward: a stack of their own, run before the routed blocks
        self.dense_blocks = stack(dense, False) if dense else None
        self.blocks = stack(cfg.num_layers - dense, moe)
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
        if cfg.block == "dit":  # sigma_map (256 -> cond -> cond), the final norm's shift / scale, the head's bias
            c = cfg.cond_dim
            self.sigma_in, self.sigma_in_bias = _param(rngs, (256, c), 256**-0.5, (None, "cond")), _zeros((c,), ("cond",))
            self.sigma_out, self.sigma_out_bias = _param(rngs, (c, c), c**-0.5, ("cond", None)), _zeros((c,), (None,))
            self.final_ada, self.final_ada_bias = _zeros((c, 2, d), ("cond", None, "embed")), _zeros((2, d), (None, "embed"))
            self.head_bias = _zeros((_pad(vocab_size),), ("vocab",))
        else:
            self.sigma_in = self.sigma_in_bias = self.sigma_out = self.sigma_out_bias = None
            self.final_ada = self.final_ada_bias = self.head_bias = None
        if cfg.noise_conditioning:
            self.t_in = _param(rngs, (COND_DIM, COND_DIM), COND_DIM**-0.5, ("cond", None))
            self.t_out = _param(rngs, (COND_DIM, COND_DIM), COND_DIM**-0.5, (None, "cond"))
        else:
            self.t_in = self.t_out = None

    def __call__(self, tokens, *, positions=None, attention: AttentionSpec = FULL, noise=None, kv_cache=None,
                 return_kv: bool = False, head: bool = True, aux: bool = False):
        """head=False returns LazyLogits (the normed hidden states and the head, for the chunked
        losses) instead of the logits; aux=True returns (output, losses) with the mixture-of-experts
        training losses {'load_balance', 'router_z'} (averaged over the routed layers; {} for a
        dense model)."""
        cfg = self.cfg
        B, L = tokens.shape[:2]
        dt = jnp.dtype(cfg.dtype.value)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(L), (B, L))
        x = jnp.take(self.embed[...], tokens, axis=0)  # [B, L, d] (Prime: [B, L, l, d/l]) float32 residual stream
        x = x.reshape(B, L, cfg.d_model)
        x = constrain(x + self._position_embedding(positions), "act_batch", None, None)
        cos, sin = rope_tables(positions, rotary_dim(cfg), cfg.rope_theta)
        cond = None
        if self.sigma_in is not None:
            cond = self._dit_condition()
        if self.t_in is not None:
            if noise is None:
                raise ValueError("This model is noise-conditioned: pass noise=t (per-token times [B, L]).")
            e = timestep_embedding(jnp.broadcast_to(noise, (B, L)))
            cond = _dense(jax.nn.silu(_dense(e, self.t_in[...], jnp.float32)), self.t_out[...], jnp.float32).astype(dt)

        def body(block, x, kv):
            x, new_kv, routing = block(x, cos, sin, attention, cond, kv)
            return x, ((new_kv if return_kv else None), routing)

        if kv_cache is None and not return_kv and cfg.remat != Remat.NONE:
            body = nnx.remat(body, policy=jax.checkpoint_policies.nothing_saveable if cfg.remat == Remat.FULL
                             else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        scan = nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                        transform_metadata={nnx.PARTITION_NAME: "layers"})
        new_kv, losses = [], {}
        first = 0
        for blocks in (self.dense_blocks, self.blocks):  # the cache's layers are the stacks' layers in order
            if blocks is None:
                continue
            n = cfg.moe.dense_layers if blocks is self.dense_blocks else cfg.num_layers - first
            kv = None if kv_cache is None else jax.tree.map(lambda a: a[first:first + n], kv_cache)
            x, (kv_out, routing) = scan(blocks, x, kv)
            new_kv.append(kv_out)
            if routing is not None:  # the losses of each routed layer, averaged over the layers
                per_layer = jax.vmap(lambda r: losses_of(r, cfg.moe.top_k))(routing)
                losses = {name: jnp.mean(v) for name, v in per_layer.items()}
            first += n
        out = self._head(x, cond, lazy=not head)
        if return_kv:
            out = (out, new_kv[0] if len(new_kv) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *new_kv))
        return (out, losses) if aux else out

    def _dit_condition(self):
        """c = silu(sigma_map(sigma = 0)) [cond_dim]: MDLM-OWT is not time-conditioned, but its
        blocks still read this constant."""
        e = timestep_embedding(jnp.zeros(()), 256, scale=1.0)
        h = jax.nn.silu(_dense(e, self.sigma_in[...], jnp.float32) + self.sigma_in_bias[...])
        return jax.nn.silu(_dense(h, self.sigma_out[...], jnp.float32) + self.sigma_out_bias[...])

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

    def _head(self, x, cond=None, lazy: bool = False):
        """Float32 logits [B, L, V] of the final hidden states, or (lazy) the LazyLogits that the
        losses compute chunk by chunk. With shift_logits, position i reads the hidden state of
        i - 1 (position 0 its own)."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype.value)
        h = norm(cfg, x, self.final_scale[...])
        if self.final_ada is not None:
            shift, scale = _dense(cond, self.final_ada[...], jnp.float32) + self.final_ada_bias[...]
            h = h * (1 + scale) + shift
        h = h.astype(dt)
        if cfg.shift_logits:
            h = jnp.concatenate([h[:, :1], h[:, :-1]], axis=1)
        bias = None if self.head_bias is None else self.head_bias[...]
        never = self.mask_id if self.mask_id < self.vocab_size else -1
        logits = LazyLogits(h, self.head[...], self.vocab_size, rows_for(self.vocab_size, cfg.logits_chunk), bias, never)
        return logits if lazy else logits.materialize()
