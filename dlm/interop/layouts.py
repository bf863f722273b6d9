"""Checkpoint key layouts: which published key fills which dlm parameter, and how.

An `Entry` is one checkpoint key: its shape in the checkpoint, the dlm parameters it fills
(a path in the model's state and, for the stacked blocks, a layer), `load` (checkpoint array ->
one array per target) and `save` (the targets' arrays -> the checkpoint array), exact inverses
of each other. Torch Linear weights are [out, in]; dlm kernels are [in, ...out]. Vocabulary
tables are padded to a multiple of 128 rows / columns in dlm; the checkpoint keeps its own
count (export cuts the padding off again).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from dlm.config import ConfigError, ModelConfig
from dlm.models.transformer import PAD_MULTIPLE, kv_heads, mlp_width

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # known buffers: recomputed from the config, not parameters


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple
    targets: tuple  # ((path tuple, layer or None), ...); layer: an index of the stacked layers, or (layer, expert)
    load: Callable  # checkpoint array -> tuple of target arrays
    save: Callable  # target arrays -> checkpoint array


def _pad(n: int) -> int:
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def _one(key, shape, path, layer, load, save):
    return Entry(key, tuple(shape), ((path, layer),), lambda a: (load(a),), save)


def linear(key, n_out, n_in, path, layer=None):
    """[out, in] -> [in, out]."""
    return _one(key, (n_out, n_in), path, layer, lambda a: a.T, lambda w: w.T)


def heads_in(key, n, hd, d, path, layer):
    """q/k/v [n * hd, d] -> [d, n, hd]."""
    return _one(key, (n * hd, d), path, layer, lambda a: a.T.reshape(d, n, hd), lambda w: w.reshape(d, n * hd).T)


def heads_bias(key, n, hd, path, layer):
    return _one(key, (n * hd,), path, layer, lambda a: a.reshape(n, hd), lambda b: b.reshape(n * hd))


def heads_out(key, d, H, hd, path, layer):
    """o_proj [d, H * hd] -> [H, hd, d]."""
    return _one(key, (d, H * hd), path, layer, lambda a: a.T.reshape(H, hd, d), lambda w: w.reshape(H * hd, d).T)


def vector(key, n, path, layer=None):
    return _one(key, (n,), path, layer, lambda a: a, lambda v: v)


def rows(key, n, d, path):
    """An embedding table [n, d] -> [pad(n), d]."""
    def load(a):
        return a if _pad(n) == n else np.concatenate([a, np.zeros((_pad(n) - n, d), a.dtype)])
    return _one(key, (n, d), path, None, load, lambda e: e[:n])


def head(key, n, d, path, columns):
    """An output layer [n, d] -> [d, columns]."""
    def load(a):
        t = a.T
        return t if columns == n else np.concatenate([t, np.zeros((d, columns - n), a.dtype)], axis=1)
    return _one(key, (n, d), path, None, load, lambda w: w[:, :n].T)


def head_bias(key, n, path, columns):
    return _one(key, (n,), path, None, lambda a: a if columns == n else np.concatenate([a, np.zeros(columns - n, a.dtype)]),
                lambda b: b[:n])


MASK_LOGIT_BIAS = -1e4  # exp(-1e4) is 0 in every float format: the mask is never predicted


def zero_bias(key, n):
    """A bias the checkpoint format has and dlm's block does not: written as zeros, and on
    import checked to be zeros (anything else would change the model)."""
    def load(a):
        if np.any(a != 0):
            raise ConfigError(f"{key} holds nonzero biases, which dlm's llama block has no place for; this folder was not "
                              "written by dlm, import a bias-free LLaDA folder instead.")
        return ()
    return Entry(key, (n,), (), load, lambda: np.zeros(n, np.float32))


def mask_logit_bias(key, n, mask_id):
    """LLaDA's output bias as dlm writes it: 0, except MASK_LOGIT_BIAS on the mask's logit, so
    that code which does not hide the mask's logit (LLaDA's and Fast-dLLM's do not) never
    gives the mask any probability. On import any value at the mask is accepted (dlm hides that
    logit itself) and every other entry must be 0."""
    def load(a):
        others = np.delete(a, mask_id) if 0 <= mask_id < n else a
        if np.any(others != 0):
            raise ConfigError(f"{key} holds nonzero biases outside the mask's logit, which dlm's head has no place for; import a "
                              "bias-free LLaDA folder instead.")
        return ()

    def save():
        b = np.zeros(n, np.float32)
        b[mask_id] = MASK_LOGIT_BIAS
        return b
    return Entry(key, (n,), (), load, save)


def modulation(key, k, d, cond, path, layer=None):
    """adaLN [k * d, cond] -> [cond, k, d] (chunks shift, scale, gate, ... in order)."""
    return _one(key, (k * d, cond), path, layer, lambda a: a.T.reshape(cond, k, d), lambda w: w.reshape(cond, k * d).T)


def modulation_bias(key, k, d, path, layer=None):
    return _one(key, (k * d,), path, layer, lambda a: a.reshape(k, d), lambda b: b.reshape(k * d))


def fused_qkv(key, H, hd, d, layer):
    """MDLM's attn_qkv [3 * H * hd, d], rows laid out (three h d) -> wq, wk, wv [d, H, hd]."""
    def load(a):
        w = a.reshape(3, H, hd, d)
        return tuple(w[i].transpose(2, 0, 1) for i in range(3))

    def save(q, k, v):
        return np.concatenate([w.reshape(d, H * hd).T for w in (q, k, v)])

    targets = tuple(((("blocks", n), layer)) for n in ("wq", "wk", "wv"))
    return Entry(key, (3 * H * hd, d), targets, load, save)


def fused_gqa(key, H, KV, hd, d, stack, layer):
    """LLaDA2's query_key_value [(H + 2 KV) * hd, d], rows all query heads, then key heads, then
    value heads -> wq [d, H, hd], wk and wv [d, KV, hd]."""
    def load(a):
        w = a.reshape(H + 2 * KV, hd, d)
        return tuple(part.transpose(2, 0, 1) for part in (w[:H], w[H:H + KV], w[H + KV:]))

    def save(q, k, v):
        return np.concatenate([w.reshape(d, -1).T for w in (q, k, v)])

    targets = tuple(((stack, n), layer) for n in ("wq", "wk", "wv"))
    return Entry(key, ((H + 2 * KV) * hd, d), targets, load, save)


def experts(prefix: str, E: int, fe: int, d: int, path, layer: int) -> list[Entry]:
    """The routed experts of one layer as the hub stores them, {prefix}{e}.{gate,up,down}_proj.weight,
    into the stacked [layers, E, ...] expert matrices (path(name): the stack's parameter path)."""
    out = []
    for e in range(E):
        x = f"{prefix}{e}."
        out += [linear(x + "gate_proj.weight", fe, d, path("experts_gate"), (layer, e)),
                linear(x + "up_proj.weight", fe, d, path("experts_up"), (layer, e)),
                linear(x + "down_proj.weight", d, fe, path("experts_down"), (layer, e))]
    return out


def layout(family: str, m: ModelConfig, checkpoint_vocab: int, biases: bool = False) -> list[Entry]:
    """Every key of a `family` checkpoint of model `m` (checkpoint_vocab: the rows of its
    embedding and output tables). biases (LLaDA's include_bias): every linear layer has a bias,
    zero but for the output layer's mask logit (see mask_logit_bias)."""
    d, H, KV = m.d_model, m.num_heads, kv_heads(m)
    hd, ff, V = d // H, mlp_width(m), m.vocab_size
    n = checkpoint_vocab
    b = lambda name: ("blocks", name)
    out = []
    if family == "llada":
        p = "model.transformer."
        out += [rows(p + "wte.weight", n, d, ("embed",)), vector(p + "ln_f.weight", d, ("final_scale",)),
                head(p + "ff_out.weight", n, d, ("head",), _pad(V))]
        for i in range(m.num_layers):
            q = f"{p}blocks.{i}."
            out += [vector(q + "attn_norm.weight", d, b("attn_scale"), i), vector(q + "ff_norm.weight", d, b("mlp_scale"), i),
                    heads_in(q + "q_proj.weight", H, hd, d, b("wq"), i), heads_in(q + "k_proj.weight", KV, hd, d, b("wk"), i),
                    heads_in(q + "v_proj.weight", KV, hd, d, b("wv"), i), heads_out(q + "attn_out.weight", d, H, hd, b("wo"), i),
                    linear(q + "ff_proj.weight", ff, d, b("w_gate"), i), linear(q + "up_proj.weight", ff, d, b("w_up"), i),
                    linear(q + "ff_out.weight", d, ff, b("w_down"), i)]
            if m.qkv_bias:
                out += [heads_bias(q + f"{x}_proj.bias", c, hd, b(f"b{x}"), i) for x, c in (("q", H), ("k", KV), ("v", KV))]
            elif biases:
                out += [zero_bias(q + f"{x}_proj.bias", c * hd) for x, c in (("q", H), ("k", KV), ("v", KV))]
            if biases:
                out += [zero_bias(q + "attn_out.bias", d), zero_bias(q + "ff_proj.bias", ff), zero_bias(q + "up_proj.bias", ff),
                        zero_bias(q + "ff_out.bias", d)]
        if biases:
            out.append(mask_logit_bias(p + "ff_out.bias", n, m.mask_id))
    elif family in ("dream", "fast_dllm_v2", "sdar", "sdar_moe", "llada_moe"):  # Qwen2 / Qwen3 / Qwen3-MoE key names
        out += [rows("model.embed_tokens.weight", n, d, ("embed",)), vector("model.norm.weight", d, ("final_scale",)),
                head("lm_head.weight", n, d, ("head",), _pad(V))]
        E, dense = m.moe.experts, (m.moe.dense_layers if m.moe.experts else m.num_layers)
        fe = m.moe.expert_dim or ff
        for i in range(m.num_layers):
            # a MoE model's first layers are its dense stack; the routed ones are the "blocks" stack
            stack, j = ("dense_blocks", i) if E and i < dense else ("blocks", i - dense if E else i)
            s = lambda name: (stack, name)  # noqa: E731
            q = f"model.layers.{i}."
            out += [vector(q + "input_layernorm.weight", d, s("attn_scale"), j),
                    vector(q + "post_attention_layernorm.weight", d, s("mlp_scale"), j),
                    heads_in(q + "self_attn.q_proj.weight", H, hd, d, s("wq"), j),
                    heads_in(q + "self_attn.k_proj.weight", KV, hd, d, s("wk"), j),
                    heads_in(q + "self_attn.v_proj.weight", KV, hd, d, s("wv"), j)]
            if m.qkv_bias:  # Qwen2 (Dream, Fast-dLLM v2)
                out += [heads_bias(q + f"self_attn.{x}_proj.bias", c, hd, s(f"b{x}"), j) for x, c in (("q", H), ("k", KV), ("v", KV))]
            out.append(heads_out(q + "self_attn.o_proj.weight", d, H, hd, s("wo"), j))
            if m.qk_norm:  # Qwen3's per-head QK-norm
                out += [vector(q + "self_attn.q_norm.weight", hd, s("q_norm"), j), vector(q + "self_attn.k_norm.weight", hd, s("k_norm"), j)]
            if E and i >= dense:
                out.append(linear(q + "mlp.gate.weight", E, d, s("router"), j))
                out += experts(q + "mlp.experts.", E, fe, d, s, j)
            else:
                out += [linear(q + "mlp.gate_proj.weight", ff, d, s("w_gate"), j), linear(q + "mlp.up_proj.weight", ff, d, s("w_up"), j),
                        linear(q + "mlp.down_proj.weight", d, ff, s("w_down"), j)]
    elif family == "llada2":
        out += [rows("model.word_embeddings.weight", n, d, ("embed",)), vector("model.norm.weight", d, ("final_scale",)),
                head("lm_head.weight", n, d, ("head",), _pad(V))]
        E, dense = m.moe.experts, m.moe.dense_layers
        fe = m.moe.expert_dim or ff
        for i in range(m.num_layers):
            stack, j = ("dense_blocks", i) if i < dense else ("blocks", i - dense)
            s = lambda name: (stack, name)  # noqa: E731
            q = f"model.layers.{i}."
            out += [vector(q + "input_layernorm.weight", d, s("attn_scale"), j),
                    vector(q + "post_attention_layernorm.weight", d, s("mlp_scale"), j),
                    fused_gqa(q + "attention.query_key_value.weight", H, KV, hd, d, stack, j),
                    heads_out(q + "attention.dense.weight", d, H, hd, s("wo"), j)]
            if m.qk_norm:
                out += [vector(q + "attention.query_layernorm.weight", hd, s("q_norm"), j),
                        vector(q + "attention.key_layernorm.weight", hd, s("k_norm"), j)]
            if i >= dense:
                out.append(linear(q + "mlp.gate.weight", E, d, s("router"), j))
                if m.moe.expert_bias:
                    out.append(vector(q + "mlp.gate.expert_bias", E, s("expert_bias"), j))
                out += experts(q + "mlp.experts.", E, fe, d, s, j)
                if m.moe.shared_experts:
                    fs, x = m.moe.shared_experts * fe, q + "mlp.shared_experts."
                    out += [linear(x + "gate_proj.weight", fs, d, s("w_gate"), j), linear(x + "up_proj.weight", fs, d, s("w_up"), j),
                            linear(x + "down_proj.weight", d, fs, s("w_down"), j)]
            else:
                out += [linear(q + "mlp.gate_proj.weight", ff, d, s("w_gate"), j), linear(q + "mlp.up_proj.weight", ff, d, s("w_up"), j),
                        linear(q + "mlp.down_proj.weight", d, ff, s("w_down"), j)]
    elif family == "mdlm":
        p, c = "backbone.", m.cond_dim
        out += [rows(p + "vocab_embed.embedding", n, d, ("embed",)),
                linear(p + "sigma_map.mlp.0.weight", c, 256, ("sigma_in",)), vector(p + "sigma_map.mlp.0.bias", c, ("sigma_in_bias",)),
                linear(p + "sigma_map.mlp.2.weight", c, c, ("sigma_out",)), vector(p + "sigma_map.mlp.2.bias", c, ("sigma_out_bias",)),
                vector(p + "output_layer.norm_final.weight", d, ("final_scale",)),
                modulation(p + "output_layer.adaLN_modulation.weight", 2, d, c, ("final_ada",)),
                modulation_bias(p + "output_layer.adaLN_modulation.bias", 2, d, ("final_ada_bias",)),
                head(p + "output_layer.linear.weight", n, d, ("head",), _pad(V)),
                head_bias(p + "output_layer.linear.bias", n, ("head_bias",), _pad(V))]
        for i in range(m.num_layers):
            q = f"{p}blocks.{i}."
            out += [vector(q + "norm1.weight", d, b("attn_scale"), i), vector(q + "norm2.weight", d, b("mlp_scale"), i),
                    fused_qkv(q + "attn_qkv.weight", H, hd, d, i), heads_out(q + "attn_out.weight", d, H, hd, b("wo"), i),
                    linear(q + "mlp.0.weight", ff, d, b("w_up"), i), vector(q + "mlp.0.bias", ff, b("b_up"), i),
                    linear(q + "mlp.2.weight", d, ff, b("w_down"), i), vector(q + "mlp.2.bias", d, b("b_down"), i),
                    modulation(q + "adaLN_modulation.weight", 6, d, c, b("ada"), i),
                    modulation_bias(q + "adaLN_modulation.bias", 6, d, b("ada_bias"), i)]
    else:
        raise ValueError(family)
    return out


def buffers(family: str, m: ModelConfig) -> dict:
    """The known non-parameter tensors a family's checkpoints carry, as its reference code
    computes them in float32 (MDLM's persistent rotary buffer)."""
    if family != "mdlm":
        return {}
    hd = m.d_model // m.num_heads
    f32 = np.float32
    inv = f32(1.0) / (f32(m.rope_theta) ** (np.arange(0, hd, 2).astype(f32) / f32(hd)))
    return {"backbone.rotary_emb.inv_freq": inv.astype(f32)}


def checkpoint_vocab(family: str, config: dict) -> int:
    """Rows of a checkpoint's embedding / output tables, from its config.json."""
    if family == "llada":
        return int(config.get("embedding_size") or config["vocab_size"])
    return int(config["vocab_size"])
