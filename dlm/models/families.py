"""Named presets of published diffusion-LM architectures: a Hugging Face config.json -> the
ModelConfig options of dlm's one transformer, and back.

- `llada` (LLaDA-8B Base / Instruct, LLaDA-1.5): the llama block, bidirectional; RMSNorm,
  SwiGLU, RoPE theta 5e5, untied head, mask 126336 inside the 126464-column vocabulary.
- `dream` (Dream-v0 7B): Qwen2.5 run without a causal mask; q/k/v biases, grouped-query
  attention, RoPE theta 1e6, mask 151666, and the prediction shifted by one position.
- `mdlm` (kuleshov-group/mdlm-owt): the DiT with adaLN (conditioning vector from sigma = 0),
  fused QKV, LayerNorm without bias, GELU-tanh MLP; GPT-2's 50257 tokens with the mask appended
  as id 50257 (dlm's own convention: vocab_size real tokens, mask = vocab_size).

- `sdar` (JetAstra SDAR-1.7B/4B/8B): Qwen3 exactly (per-head QK-norm, grouped-query attention,
  no biases), trained and decoded as block diffusion: the block hyperschedule with the
  config's block_size (4 by default), mask 151669, no shift.
- `sdar_moe` (SDAR-30B-A3B): Qwen3-MoE, the same blocks; softmax top-k routing with the gates
  renormalised iff norm_topk_prob; mlp_only_layers, when given, must be the first layers (they
  keep the dense feed-forward).
- `fast_dllm_v2` (NVlabs Fast-dLLM v2 1.5B/7B): Qwen2.5 (q/k/v biases, grouped-query attention)
  with Dream's shifted prediction, trained and decoded as block diffusion (bd_size, 32), mask
  151665; decoded with sub-blocks of 8 and each block's first token autoregressive.
- `llada2` (inclusionAI LLaDA2.0 / 2.1 mini and flash): Ling 2.0 (BailingMoeV2) as block
  diffusion (blocks of 32): fused QKV, per-head QK-norm, partial RoPE (half of each head), a
  dense first layer, then a shared expert plus routed experts chosen DeepSeek-V3's way (sigmoid
  scores plus an expert bias, group-limited top-k, renormalised gates times 2.5); mask 156895.
- `llada_moe` (LLaDA-MoE-7B-A1B): Qwen3-MoE's names and per-head QK-norm, bidirectional (flat),
  softmax top-k without renormalised gates, mask 156895. Its model_type is "llada", as
  LLaDA-8B's: it is told apart by architectures (LLaDAMoEModelLM).

`detect(config)` names the family of a config.json; `model_options(family, config)` gives the
ModelConfig fields and the context length; `hf_config(family, model_cfg, base)` writes the
family's config.json fields for a model (export).
"""

from __future__ import annotations

from dlm.config import ConfigError

FAMILIES = ("llada", "dream", "mdlm", "sdar", "sdar_moe", "llada_moe", "fast_dllm_v2", "llada2")
DEFAULT_MASK = {"llada": 126336, "dream": 151666, "sdar": 151669, "sdar_moe": 151669, "llada_moe": 156895, "fast_dllm_v2": 151665, "llada2": 156895}
QWEN3_LIKE = ("sdar", "sdar_moe", "llada_moe")  # Qwen3 / Qwen3-MoE key names with per-head QK-norm


def detect(config: dict, family: str | None = None) -> str:
    """The family of a config.json (or `family`, checked)."""
    if family is not None:
        if family not in FAMILIES:
            raise ConfigError(f"family={family!r} is not one dlm imports; use one of {', '.join(FAMILIES)}.")
        return family
    kind = str(config.get("model_type", "")).lower()
    archs = config.get("architectures") or []
    archs = " ".join(a for a in archs if isinstance(a, str)).lower() if isinstance(archs, list) else str(archs).lower()
    # the MoE families first: "lladamoemodellm" contains "llada", "sdarmoe" contains "sdar"
    for fam, names in (("llada2", ("llada2",)), ("llada_moe", ("lladamoe", "llada_moe")), ("sdar_moe", ("sdarmoe", "sdar_moe")), ("sdar", ("sdar",)),
                       ("fast_dllm_v2", ("fast_dllm_qwen",)), ("llada", ("llada",)), ("dream", ("dream",)), ("mdlm", ("mdlm",))):
        if fam == "llada" and "lladamoe" in archs.replace("_", ""):
            continue
        if kind in names or any(n in archs for n in names):
            return fam
    raise ConfigError(f"config.json has model_type {config.get('model_type')!r} and architectures {config.get('architectures')}, "
                      f"which is none of the families dlm imports ({', '.join(FAMILIES)}); pass family (--family) "
                      "when the folder holds one of them under another name.")


# the largest value dlm accepts for each size a config.json gives: far beyond any published
# model, and small enough that a hostile value is refused before anything is built
LIMITS = {"width": 1 << 16, "layers": 1024, "heads": 1024, "mlp": 1 << 20, "vocab": 1 << 24, "context": 1 << 24,
          "experts": 1 << 12, "block": 1 << 16}


def _need(config: dict, key: str, family: str):
    if key not in config:
        raise ConfigError(f"config.json has no {key!r}, which a {family} checkpoint's config must give.")
    return config[key]


def _int(config: dict, key: str, family: str, kind: str, default=None, low: int = 1) -> int:
    """config[key] (or `default` when absent or null and a default exists) as an integer in [low, LIMITS[kind]]."""
    v = config.get(key)
    if v is None:
        if default is None:
            _need(config, key, family)  # absent: the "has no" sentence
            raise ConfigError(f"config.json's {key!r} is null; a {family} checkpoint's config must give an integer.")
        v = default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"config.json's {key!r} is {str(v)[:40]!r} ({type(v).__name__}); it must be an integer.")
    if not low <= v <= LIMITS[kind]:
        raise ConfigError(f"config.json's {key!r} is {v}; dlm accepts {low} to {LIMITS[kind]} for it.")
    return v


def _float(config: dict, key: str, default: float, low: float = 0.0) -> float:
    v = config.get(key, default)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > low) or v != v or v == float("inf"):
        raise ConfigError(f"config.json's {key!r} is {str(v)[:40]!r}; it must be a finite number above {low:g}.")
    return float(v)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def model_options(family: str, config: dict) -> tuple[dict, int]:
    """(ModelConfig fields, context length) of a family's config.json."""
    if family == "llada":
        _check(config.get("block_type", "llama") == "llama",
               f"This LLaDA config has block_type {config.get('block_type')!r}; dlm imports the llama block (LLaDA-8B) only.")
        _check(config.get("activation_type", "silu") in ("silu", "swiglu"),
               f"This LLaDA config has activation_type {config.get('activation_type')!r}; dlm imports silu (SwiGLU) only.")
        _check(config.get("layer_norm_type", "rms") == "rms",
               f"This LLaDA config has layer_norm_type {config.get('layer_norm_type')!r}; dlm imports rms only.")
        _check(not config.get("weight_tying", False), "This LLaDA config ties the head to the embedding (weight_tying); dlm imports untied heads.")
        _check(not config.get("include_bias", False) or config.get("bias_for_layer_norm") is False,
               "This LLaDA config has include_bias=true with layer-norm biases; dlm imports bias-free LLaDA blocks (and its "
               "own exports, whose biases are zero).")
        _check(not config.get("alibi", False), "This LLaDA config uses ALiBi; dlm imports RoPE models.")
        vocab = _int(config, "embedding_size", family, "vocab") if config.get("embedding_size") else _int(config, "vocab_size", family, "vocab")
        heads = _int(config, "n_heads", family, "heads")
        options = dict(family="llada", d_model=_int(config, "d_model", family, "width"), num_layers=_int(config, "n_layers", family, "layers"),
                       num_heads=heads, num_kv_heads=_int(config, "n_kv_heads", family, "heads", default=heads),
                       mlp_dim=_int(config, "mlp_hidden_size", family, "mlp"),
                       rope_theta=_float(config, "rope_theta", 10000.0), norm="rms", norm_eps=_float(config, "rms_norm_eps", 1e-5),
                       mlp="swiglu", qkv_bias=bool(config.get("include_qkv_bias", False)), vocab_size=vocab,
                       mask_id=_int(config, "mask_token_id", family, "vocab", default=DEFAULT_MASK["llada"], low=0), embed_init_std=0.02)
        context = _int(config, "max_sequence_length", family, "context", default=4096)
    elif family in ("dream", "fast_dllm_v2"):
        name = "Dream" if family == "dream" else "Fast-dLLM v2"
        _hf_basics(config, name)
        _check(not config.get("use_sliding_window", False), f"This {name} config uses sliding-window attention; dlm imports full attention.")
        heads = _int(config, "num_attention_heads", family, "heads")
        options = dict(family=family, d_model=_int(config, "hidden_size", family, "width"),
                       num_layers=_int(config, "num_hidden_layers", family, "layers"), num_heads=heads,
                       num_kv_heads=_int(config, "num_key_value_heads", family, "heads", default=heads),
                       mlp_dim=_int(config, "intermediate_size", family, "mlp"), rope_theta=_float(config, "rope_theta", 10000.0),
                       norm="rms", norm_eps=_float(config, "rms_norm_eps", 1e-6), mlp="swiglu", qkv_bias=True,
                       vocab_size=_int(config, "vocab_size", family, "vocab"),
                       mask_id=_int(config, "mask_token_id", family, "vocab", default=DEFAULT_MASK[family], low=0),
                       shift_logits=True, embed_init_std=0.02)
        context = _int(config, "max_position_embeddings", family, "context", default=4096)
    elif family in QWEN3_LIKE:
        options, context = _qwen3_like(family, config)
    elif family == "llada2":
        options, context = _llada2(config)
    elif family == "mdlm":
        _check(not config.get("time_conditioning", False),
               "This MDLM config is time-conditioned; dlm's DiT conditions on sigma = 0 (mdlm-owt), so it cannot run it.")
        d = _int(config, "hidden_dim", family, "width")
        options = dict(family="mdlm", d_model=d, num_layers=_int(config, "n_blocks", family, "layers"),
                       num_heads=_int(config, "n_heads", family, "heads"), mlp_dim=4 * d,
                       rope_theta=10000.0, norm="layer", norm_eps=1e-5, mlp="gelu", block="dit",
                       cond_dim=_int(config, "cond_dim", family, "width"),
                       vocab_size=_int(config, "vocab_size", family, "vocab", low=2) - 1, mask_id=-1, embed_init_std=0.02)
        context = _int(config, "model_length", family, "context", default=1024)
    else:
        raise ConfigError(f"Unknown family {family!r}; use one of {', '.join(FAMILIES)}.")
    if options["d_model"] % options["num_heads"]:
        raise ConfigError(f"config.json's width {options['d_model']} is not divisible by its {options['num_heads']} heads.")
    if options.get("num_kv_heads") and options["num_heads"] % options["num_kv_heads"]:
        raise ConfigError(f"config.json's {options['num_heads']} heads are not a multiple of its {options['num_kv_heads']} "
                          "key/value heads.")
    if options.get("mask_id", -1) >= options["vocab_size"]:
        raise ConfigError(f"config.json's mask_token_id {options['mask_id']} is not below its vocabulary size {options['vocab_size']}.")
    return options, context


def _hf_basics(config: dict, name: str) -> None:
    """What dlm's transformer needs of every transformers-style family: SwiGLU (silu), an untied
    head, plain RoPE."""
    _check(config.get("hidden_act", "silu") == "silu", f"This {name} config has hidden_act {config.get('hidden_act')!r}; dlm imports silu only.")
    _check(not config.get("tie_word_embeddings", False), f"This {name} config ties the head to the embedding; dlm imports untied heads.")
    _check(not config.get("rope_scaling"), f"This {name} config scales RoPE (rope_scaling); dlm imports plain RoPE.")


def _width_heads(config: dict, family: str, name: str) -> tuple[int, int]:
    """(hidden_size, heads), a given head_dim checked to be hidden_size / heads (dlm's attention)."""
    d, heads = _int(config, "hidden_size", family, "width"), _int(config, "num_attention_heads", family, "heads")
    if config.get("head_dim") is not None:
        hd = _int(config, "head_dim", family, "width")
        _check(hd * heads == d, f"This {name} config has head_dim {hd} with {heads} heads of a width {d}; dlm's attention has "
                                "head_dim = hidden_size / heads, so it cannot run this model.")
    return d, heads


def _qwen3_like(family: str, config: dict) -> tuple[dict, int]:
    """SDAR, SDAR-MoE and LLaDA-MoE: Qwen3's attention (per-head QK-norm) and, for the MoE
    families, Qwen3-MoE's routed feed-forward."""
    name = {"sdar": "SDAR", "sdar_moe": "SDAR-MoE", "llada_moe": "LLaDA-MoE"}[family]
    _hf_basics(config, name)
    _check(not config.get("attention_bias", False), f"This {name} config has attention biases; dlm imports the bias-free Qwen3 attention.")
    d, heads = _width_heads(config, family, name)
    layers = _int(config, "num_hidden_layers", family, "layers")
    options = dict(family=family, d_model=d, num_layers=layers, num_heads=heads,
                   num_kv_heads=_int(config, "num_key_value_heads", family, "heads", default=heads),
                   rope_theta=_float(config, "rope_theta", 10000.0), norm="rms", mlp="swiglu", qk_norm=True,
                   norm_eps=_float(config, "rms_norm_eps", 1e-6), vocab_size=_int(config, "vocab_size", family, "vocab"),
                   mask_id=_int(config, "mask_token_id", family, "vocab", default=DEFAULT_MASK[family], low=0), embed_init_std=0.02)
    if family == "sdar":
        options["mlp_dim"] = _int(config, "intermediate_size", family, "mlp")
    elif family == "sdar_moe":
        _check(config.get("decoder_sparse_step", 1) == 1, f"This {name} config routes every {config.get('decoder_sparse_step')}th "
                                                          "layer (decoder_sparse_step); dlm imports models whose routed layers follow the dense ones.")
        dense = config.get("mlp_only_layers") or []
        _check(isinstance(dense, list) and dense == list(range(len(dense))) and len(dense) < layers,
               f"This {name} config's dense layers (mlp_only_layers {str(dense)[:40]}) are not the first layers; dlm's dense layers come first.")
        options["mlp_dim"] = _int(config, "intermediate_size", family, "mlp")
        options["moe"] = dict(experts=_int(config, "num_experts", family, "experts"), top_k=_int(config, "num_experts_per_tok", family, "experts"),
                              expert_dim=_int(config, "moe_intermediate_size", family, "mlp"),
                              renormalize=bool(config.get("norm_topk_prob", False)), dense_layers=len(dense))
    else:
        for key, ok, want in (("moe_router_score_function", ("softmax", None), "softmax"),
                              ("moe_router_enable_expert_bias", (False, None), "false"), ("router_num_group", (None, 1), "null"),
                              ("shared_expert_intermediate_size", (None, 0), "null"), ("partial_rotary_factor", (1, 1.0, None), "1"),
                              ("routed_scaling_factor", (1, 1.0, None), "1"), ("clip_qkv", (None,), "null"),
                              ("norm_topk_prob", (None, False), "false"), ("qk_layernorm", (True, None), "true")):
            _check(config.get(key) in ok, f"This {name} config has {key} {str(config.get(key))[:40]!r}; dlm imports LLaDA-MoE-7B's "
                                          f"{want} only.")
        freq = config.get("moe_layer_freq") or [1] * layers
        _check(isinstance(freq, list) and len(freq) == layers and all(v in (0, 1) for v in freq) and freq == sorted(freq) and freq[-1] == 1,
               f"This {name} config's moe_layer_freq {str(freq)[:60]} is not dense layers followed by routed ones.")
        dense = freq.count(0)
        options["mlp_dim"] = _int(config, "dense_intermediate_size", family, "mlp")
        options["moe"] = dict(experts=_int(config, "num_experts", family, "experts"), top_k=_int(config, "num_experts_per_tok", family, "experts"),
                              expert_dim=_int(config, "expert_intermediate_size", family, "mlp"), renormalize=False, dense_layers=dense)
    if "moe" in options:
        _check(options["moe"]["top_k"] <= options["moe"]["experts"],
               f"This {name} config routes to {options['moe']['top_k']} of {options['moe']['experts']} experts.")
    return options, _int(config, "max_position_embeddings", family, "context", default=4096)


def _llada2(config: dict) -> tuple[dict, int]:
    family, name = "llada2", "LLaDA2"
    _hf_basics(config, name)
    for key, want in (("use_qkv_bias", False), ("use_bias", False), ("use_rmsnorm", True), ("norm_head", False),
                      ("use_sliding_window", False), ("use_linear_attention", False)):
        _check(bool(config.get(key, want)) == want, f"This {name} config has {key} {config.get(key)!r}; dlm imports {want} only.")
    _check(config.get("score_function", "sigmoid") in ("sigmoid", "softmax"),
           f"This {name} config has score_function {config.get('score_function')!r}; dlm routes by sigmoid or softmax.")
    d, heads = _width_heads(config, family, name)
    hd = d // heads
    layers = _int(config, "num_hidden_layers", family, "layers")
    dense = _int(config, "first_k_dense_replace", family, "layers", default=0, low=0)
    _check(dense < layers, f"This {name} config's first_k_dense_replace {dense} leaves no routed layer of its {layers}.")
    experts = _int(config, "num_experts", family, "experts")
    groups = _int(config, "n_group", family, "experts", default=1)
    sigmoid = config.get("score_function", "sigmoid") == "sigmoid"
    fraction = _float(config, "partial_rotary_factor", 1.0)
    _check(fraction <= 1 and (fraction * hd) % 2 == 0, f"This {name} config's partial_rotary_factor {fraction} does not rotate an "
                                                        f"even number of the {hd} dimensions of a head.")
    options = dict(family=family, d_model=d, num_layers=layers, num_heads=heads,
                   num_kv_heads=_int(config, "num_key_value_heads", family, "heads", default=heads),
                   mlp_dim=_int(config, "intermediate_size", family, "mlp"), rope_theta=_float(config, "rope_theta", 10000.0),
                   rope_fraction=fraction, norm="rms", mlp="swiglu", qk_norm=bool(config.get("use_qk_norm", True)),
                   norm_eps=_float(config, "rms_norm_eps", 1e-6), vocab_size=_int(config, "vocab_size", family, "vocab"),
                   mask_id=_int(config, "mask_token_id", family, "vocab", default=DEFAULT_MASK[family], low=0), embed_init_std=0.02,
                   moe=dict(experts=experts, top_k=_int(config, "num_experts_per_tok", family, "experts"),
                            expert_dim=_int(config, "moe_intermediate_size", family, "mlp"), dense_layers=dense,
                            shared_experts=_int(config, "num_shared_experts", family, "experts", default=0, low=0),
                            router="sigmoid" if sigmoid else "softmax", renormalize=True if sigmoid else bool(config.get("norm_topk_prob", True)),
                            groups=groups, group_top_k=_int(config, "topk_group", family, "experts", default=1),
                            route_scale=_float(config, "routed_scaling_factor", 1.0),
                            expert_bias=bool(config.get("moe_router_enable_expert_bias", False)) and sigmoid))
    _check(experts % groups == 0 and options["moe"]["top_k"] <= experts,
           f"This {name} config's {experts} experts do not split into its n_group {groups} groups, or it routes to more of them than it has.")
    return options, _int(config, "max_position_embeddings", family, "context", default=4096)


def diffusion_options(family: str, config: dict) -> dict:
    """The DiffusionConfig fields a family was trained with: the block hyperschedule and its
    width for the block-diffusion families; {} for the flat ones."""
    if family in ("sdar", "sdar_moe"):
        return {"hyperschedule": "block", "block_width": _int(config, "block_size", family, "block", default=4)}
    if family == "llada2":  # its configs give no block: the release decodes (and trained) with blocks of 32
        return {"hyperschedule": "block", "block_width": _int(config, "block_size", family, "block", default=32)}
    if family == "fast_dllm_v2":  # sub-blocks of 8, the release's default small_block_size
        bw = _int(config, "bd_size", family, "block", default=32)
        return {"hyperschedule": "block", "block_width": bw, "sub_block": min(8, bw) if bw % 8 == 0 else bw}
    return {}


def sampling_overrides(family: str, config: dict) -> list[str]:
    """Dotted overrides that run a family as it was trained and decoded (before the user's own,
    which win): a block-diffusion family's blocks, decoded block by block with the parallel
    decoder's threshold rule; [] for the flat families."""
    d = diffusion_options(family, config)
    if not d:
        return []
    return [f"diffusion.hyperschedule={d['hyperschedule']}", f"diffusion.block_width={d['block_width']}",
            "sampling.sampler=parallel", f"sampling.decode.block_length={d.get('sub_block', d['block_width'])}"]


# The classes each family's own modeling code defines, for config.json's auto_map (what
# AutoModel.from_pretrained(..., trust_remote_code=True) loads): module file -> classes.
MODELING = {
    "llada": {"configuration_llada": {"AutoConfig": "LLaDAConfig"},
              "modeling_llada": {"AutoModel": "LLaDAModelLM", "AutoModelForCausalLM": "LLaDAModelLM"}},
    "dream": {"configuration_dream": {"AutoConfig": "DreamConfig"}, "modeling_dream": {"AutoModel": "DreamModel"}},
    "mdlm": {"configuration_mdlm": {"AutoConfig": "MDLMConfig"}, "modeling_mdlm": {"AutoModelForMaskedLM": "MDLM"}},
}


def auto_map(family: str) -> dict:
    return {auto: f"{module}.{cls}" for module, classes in MODELING[family].items() for auto, cls in classes.items()}


def llada_biases(base: dict | None) -> bool:
    """Whether a LLaDA-layout export carries dlm's biases (zero, but -1e4 on the mask's logit):
    a model trained here (no base config), or one imported from such an export."""
    return base is None or (base.get("include_bias") is True and base.get("bias_for_layer_norm") is False)


def hf_config(family: str, m, context: int, base: dict | None = None, special: dict | None = None) -> dict:
    """The family's config.json for a model of ModelConfig `m` (`base`: the imported folder's own
    config, whose other fields are kept)."""
    out = dict(base or {})
    special = special or {}
    if family == "llada":
        out.setdefault("architectures", ["LLaDAModelLM"])
        out.update(model_type="llada", block_type="llama", d_model=m.d_model, n_layers=m.num_layers, n_heads=m.num_heads,
                   n_kv_heads=m.num_kv_heads or m.num_heads, mlp_hidden_size=m.mlp_dim, activation_type="silu",
                   layer_norm_type="rms", rms_norm_eps=m.norm_eps, rope=True, rope_theta=m.rope_theta,
                   include_bias=llada_biases(base), include_qkv_bias=m.qkv_bias, weight_tying=False,
                   max_sequence_length=context)
        out.setdefault("vocab_size", m.vocab_size)
        out["embedding_size"] = m.vocab_size
        out["mask_token_id"] = m.mask_id
        for k in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if special.get(k) is not None:
                out.setdefault(k, special[k])
        if base is None:  # a model trained here has no dropout: LLaDA's code would default to 0.1
            out.update(attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0)
        if llada_biases(base):  # its mask logit was never trained: the output bias hides it from
            # code that does not (dlm.interop.layouts.mask_logit_bias); every other bias is zero
            out["bias_for_layer_norm"] = False
        return out
    if family == "dream":
        out.setdefault("architectures", ["DreamModel"])
        out.update(model_type="Dream", hidden_size=m.d_model, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                   num_key_value_heads=m.num_kv_heads or m.num_heads, intermediate_size=m.mlp_dim, hidden_act="silu",
                   rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=False, vocab_size=m.vocab_size,
                   mask_token_id=m.mask_id)
        out.setdefault("max_position_embeddings", context)
        for k in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if special.get(k) is not None:
                out.setdefault(k, special[k])
        if base is None:
            out["attention_dropout"] = 0.0
        return out
    if family in QWEN3_LIKE + ("fast_dllm_v2", "llada2"):
        if base is None:
            raise ConfigError(f"dlm exports the {family} layout for models imported from a {family} folder (their config.json "
                              "is the base); export a model trained here --to hf.")
        out.update(hidden_size=m.d_model, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                   num_key_value_heads=m.num_kv_heads or m.num_heads, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                   vocab_size=m.vocab_size, mask_token_id=m.mask_id)
        return out
    if family == "mdlm":
        out.setdefault("architectures", ["MDLM"])
        out.update(model_type="mdlm", hidden_dim=m.d_model, cond_dim=m.cond_dim, n_blocks=m.num_layers, n_heads=m.num_heads,
                   vocab_size=m.vocab_size + 1, time_conditioning=False)
        out.setdefault("model_length", context)
        return out
    raise ConfigError(f"Unknown family {family!r}; use one of {', '.join(FAMILIES)}.")
