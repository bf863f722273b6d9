"""Hugging Face checkpoint folders <-> dlm models.

`load_pretrained(path, family=None, mesh=None, dtype="float32")` reads a local folder
(config.json, model.safetensors or shards with their index, tokenizer files), names its family
(dlm.models.families), and places every parameter onto the mesh with its logical sharding, one
checkpoint tensor at a time: a tensor is read into a fresh host buffer, converted, and copied
into the parameter's device buffer (a stacked block parameter is allocated on the devices once
and each layer written into it in place, with buffer donation), so the host holds one tensor
(and its converted copy) besides the model. Every checkpoint key must be used exactly once:
known buffers (`rotary_emb.inv_freq`) are listed and skipped, and an unknown or missing key, a
shape that differs from the family's layout for that config.json, or a family that cannot be
named is one sentence naming it. Nothing in the folder is executed: no remote code, no pickle.

`export(model, out, family, ...)` writes the reverse: safetensors (sharded with an index above
`max_shard_bytes`), config.json and the tokenizer files, such that importing the folder gives
back the same parameters bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dlm.config import Config, ConfigError, ModelConfig, MoEConfig, check_moe
from dlm.interop import layouts
from dlm.interop.safetensors import Folder, write
from dlm.mesh import make_mesh, mesh_context
from dlm.models import families
from dlm.models.transformer import Transformer
from dlm.train.state import abstract_model_state

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def read_config(path) -> dict:
    f = pathlib.Path(path) / "config.json"
    if not f.exists():
        what = "does not exist" if not pathlib.Path(path).exists() else "holds no config.json"
        raise ConfigError(f"{str(path)!r} {what}; point at a Hugging Face checkpoint folder (config.json and safetensors).")
    try:
        config = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{str(f)!r} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    except (UnicodeDecodeError, RecursionError):
        raise ConfigError(f"{str(f)!r} is not a JSON text file.") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{str(f)!r} holds a JSON {type(config).__name__}, not an object of settings.")
    return config


@dataclasses.dataclass
class Checkpoint:
    """A checked checkpoint folder: its family, config.json, the ModelConfig and context length
    it maps to, and its tensors' layout."""

    path: pathlib.Path
    family: str
    config: dict
    model_cfg: ModelConfig
    context: int
    folder: Folder
    entries: list

    @property
    def param_bytes(self) -> int:
        return sum(self.folder.nbytes(e.key) for e in self.entries)

    @property
    def largest_tensor_bytes(self) -> int:
        return max(self.folder.nbytes(e.key) for e in self.entries)


def open_checkpoint(path, family: str | None = None, dtype: str = "float32") -> Checkpoint:
    """Read and check a folder's config and keys (no tensor is read)."""
    path = pathlib.Path(path)
    config = read_config(path)
    family = families.detect(config, family)
    options, context = families.model_options(family, config)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    moe = options.pop("moe", None)
    m = ModelConfig(**options)
    if moe:
        m.moe = MoEConfig(**moe)
        check_moe(m)
    m.dtype = type(m.dtype)(dtype)
    folder = Folder(path)
    entries = layouts.layout(family, m, layouts.checkpoint_vocab(family, config),
                             biases=family == "llada" and bool(config.get("include_bias")))
    wanted = {e.key: e for e in entries}
    for key in folder.keys():
        if key not in wanted and not key.endswith(layouts.IGNORED_SUFFIXES):
            raise ConfigError(f"The checkpoint key {key!r} is not part of the {family} layout of this config.json "
                              f"({m.num_layers} layers, width {m.d_model}); the weights and config.json disagree, or the folder "
                              "holds another architecture.")
    for e in entries:
        if e.key not in folder:
            raise ConfigError(f"The checkpoint has no {e.key!r}, which the {family} layout of this config.json needs "
                              f"({m.num_layers} layers); a shard is missing or the config does not match the weights.")
        if tuple(folder.shape(e.key)) != e.shape:
            raise ConfigError(f"{e.key!r} has shape {list(folder.shape(e.key))} but this config.json's {family} layout needs "
                              f"{list(e.shape)}; the weights and config.json disagree.")
        if not np.issubdtype(folder.dtype(e.key), np.floating) and folder.dtype(e.key).name != "bfloat16":
            raise ConfigError(f"{e.key!r} is stored as {folder.dtype(e.key)}, not a float; dlm reads float weights only.")
    for key in folder.keys():
        if key.endswith("rotary_emb.inv_freq"):
            _check_rotary(folder, key, m)
    return Checkpoint(path, family, config, m, context, folder, entries)


def _check_rotary(folder, key, m: ModelConfig) -> None:
    """A stored RoPE buffer is skipped, but it must be the one dlm computes from the config."""
    hd = m.d_model // m.num_heads
    inv = folder.read(key).astype(np.float64)
    ours = 1.0 / m.rope_theta ** (np.arange(0, hd, 2) / hd)
    if inv.shape != ours.shape or not np.allclose(inv, ours, rtol=1e-5):
        raise ConfigError(f"{key!r} holds RoPE frequencies that differ from base {m.rope_theta} over {hd} dimensions; "
                          "dlm cannot run this rotary embedding.")


class _Placer:
    """Device buffers of the parameters, filled one checkpoint tensor at a time."""

    def __init__(self, abstract: dict, dtype):
        self.abstract, self.dtype = abstract, dtype
        self.values: dict = {}
        self.layers: dict = {}
        # x: one slice, with leading axes of 1 for all but the first index; idx: (layer,) or (layer, expert)
        self._set = jax.jit(lambda a, x, idx: jax.lax.dynamic_update_slice(
            a, x[None].astype(a.dtype), tuple(idx) + (0,) * (a.ndim - idx.shape[0])), donate_argnums=0)

    def put(self, path: tuple, layer, array: np.ndarray) -> None:
        spec = self.abstract[path]
        host = np.asarray(array, dtype=self.dtype)
        if layer is None:
            if host.shape != spec.shape:
                raise ConfigError(f"{'.'.join(path)} would get shape {host.shape}, not {spec.shape}.")
            self.values[path] = jax.make_array_from_callback(spec.shape, spec.sharding, lambda idx: host[idx])
            return
        index = layer if isinstance(layer, tuple) else (layer,)  # (layer,) or (layer, expert)
        if path not in self.values:
            zeros = jax.jit(lambda: jnp.zeros(spec.shape, self.dtype), out_shardings=spec.sharding)
            self.values[path] = zeros()
            self.layers[path] = set()
        sharding = NamedSharding(spec.sharding.mesh, P(*tuple(spec.sharding.spec)[len(index):]))
        x = jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
        self.values[path] = self._set(self.values[path], x.reshape((1,) * (len(index) - 1) + x.shape),
                                      jnp.asarray(index, jnp.int32))
        self.layers[path].add(index)

    def finish(self) -> dict:
        for path, spec in self.abstract.items():
            if path not in self.values:
                raise ConfigError(f"No checkpoint key fills dlm's parameter {'.'.join(path)}.")
            if path in self.layers:
                depth = len(next(iter(self.layers[path])))
                want = int(np.prod(spec.shape[:depth]))
                if len(self.layers[path]) != want:
                    raise ConfigError(f"dlm's parameter {'.'.join(path)} got {len(self.layers[path])} of its {want} stacked slices.")
        return self.values


def load_pretrained(path, family: str | None = None, mesh=None, dtype: str = "float32", *, progress=None) -> Transformer:
    """A published checkpoint folder as a dlm Transformer with parameters in `dtype` (float32,
    bfloat16, float16) sharded over `mesh` (default: every device on data). `family` (llada,
    dream, mdlm) overrides the detection from config.json. `progress(key)` is called after
    each tensor."""
    ckpt = open_checkpoint(path, family, dtype)
    model, _ = _load(ckpt, mesh, progress)
    return model


def _load(ckpt: Checkpoint, mesh=None, progress=None):
    mesh = mesh or make_mesh()
    m = ckpt.model_cfg
    graphdef, abstract = abstract_model_state(Config(model=m), m.vocab_size, mesh)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(abstract)}
    placer = _Placer(flat, DTYPES[m.dtype.value])
    start = time.time()
    for e in ckpt.entries:
        arrays = e.load(ckpt.folder.read(e.key))
        for (path, layer), a in zip(e.targets, arrays):
            placer.put(path, layer, a)
        del arrays
        if progress is not None:
            progress(e.key)
    values = placer.finish()
    state = abstract
    nnx.replace_by_pure_dict(state, _nest(values))
    with mesh_context(mesh):
        model = nnx.merge(graphdef, state)
    return model, time.time() - start


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


# ------------------------------------------------------------------------------------------
# export


def exportable(model: Transformer, family: str) -> tuple[ModelConfig, dict]:
    """(the ModelConfig the family layout describes, the parameters as a flat dict) of a model,
    or one sentence saying why the layout cannot hold it. A model trained here (mask appended as
    id V) is written with the mask's row and logit column inside the vocabulary (V + 1
    columns; the mask's logit is never predicted either way)."""
    m = dataclasses.replace(model.cfg)
    flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    bad = [why for cond, why in (
        (m.noise_conditioning, "it is noise-conditioned"), (m.learned_positions > 0, "it has learned absolute positions"),
        (bool(m.grid), "it has grid embeddings"), (model.subtokens > 1, "it is an MDM-Prime model"),
        (family in ("llada", "dream") and m.block != "prenorm", f"its {m.block} block is not the {family} block"),
        (family in ("llada", "dream") and (m.norm, m.mlp) != ("rms", "swiglu"), "it does not use RMSNorm and SwiGLU"),
        (family == "llada" and m.shift_logits, "its shifted prediction (Dream) has no place in the LLaDA layout; export it --to hf"),
        (family == "dream" and not m.shift_logits, "the Dream layout implies a shifted prediction this model does not make"),
        (family == "dream" and not m.qkv_bias, "the Dream layout has q/k/v biases and this model has none"),
        (family in ("llada", "dream", "mdlm") and m.qk_norm, f"its QK-norm has no place in the {family} layout"),
        (family == "mdlm" and m.block != "dit", "the MDLM layout is the DiT block"),
        (family in families.QWEN3_LIKE and not m.qk_norm, f"the {family} layout has QK-norm and this model has none"),
        (family in families.QWEN3_LIKE and (m.qkv_bias or m.shift_logits), f"the {family} layout has no q/k/v biases and no shift"),
        (family == "fast_dllm_v2" and not (m.qkv_bias and m.shift_logits), "the Fast-dLLM v2 layout has q/k/v biases and a shift"),
        (family in families.QWEN3_LIKE + ("fast_dllm_v2",) and (m.block, m.norm, m.mlp) != ("prenorm", "rms", "swiglu"),
         "it is not a pre-norm RMSNorm / SwiGLU transformer"),
        (family == "llada2" and not (m.moe.experts and m.moe.router == "sigmoid"), "the LLaDA2 layout routes by sigmoid scores"),
        (family != "llada2" and (m.rope_fraction != 1.0 or m.moe.router != "softmax"),
         f"its partial RoPE or sigmoid router has no place in the {family} layout"),
        (family in ("sdar", "fast_dllm_v2", "llada", "dream", "mdlm") and m.moe.experts > 0, f"its experts have no place in the {family} layout"),
        (family in ("sdar_moe", "llada_moe") and not m.moe.experts, f"the {family} layout is a mixture of experts"),
        (family == "llada_moe" and (m.moe.renormalize or m.moe.shared_experts), "LLaDA-MoE routes without renormalised gates or shared experts"),
        (family == "mdlm" and model.mask_id != model.vocab_size, "the MDLM layout appends the mask after the vocabulary")) if cond]
    if bad:
        raise ConfigError(f"This model cannot be written in the {family} layout: {bad[0]}.")
    if family != "mdlm" and model.mask_id == model.vocab_size:  # dlm's appended mask -> inside a vocabulary of V + 1
        V = model.vocab_size
        cols = layouts._pad(V + 1)
        head = flat[("head",)]
        if head.shape[1] < cols:
            flat[("head",)] = jnp.pad(head, ((0, 0), (0, cols - head.shape[1])))
        m = dataclasses.replace(m, vocab_size=V + 1, mask_id=V)
    m.mlp_dim = layouts.mlp_width(m)
    m.num_kv_heads = layouts.kv_heads(m)
    return m, flat


MODELING_FILE_BYTES = 16 << 20


def read_modeling_dir(family: str, directory) -> dict:
    """The Python files of a family's own modeling code (the user's copy: they are not ours to
    ship), checked to define the classes config.json's auto_map will name: file name -> bytes."""
    d = pathlib.Path(directory)
    if not d.is_dir():
        raise ConfigError(f"--modeling-dir {str(d)!r} is not a folder; point it at the folder holding the {family} release's "
                          "configuration and modeling .py files.")
    files = {}
    for f in sorted(d.glob("*.py")):
        if not f.is_file() or f.is_symlink():
            raise ConfigError(f"{str(f)!r} in --modeling-dir is not a regular file; copy the file itself there.")
        if f.stat().st_size > MODELING_FILE_BYTES:
            raise ConfigError(f"{str(f)!r} in --modeling-dir is over {MODELING_FILE_BYTES >> 20} MB, which no modeling file is; "
                              "point --modeling-dir at the release's code.")
        files[f.name] = f.read_bytes()
    for module, classes in families.MODELING[family].items():
        name = module + ".py"
        if name not in files:
            raise ConfigError(f"--modeling-dir {str(d)!r} has no {name}, which the {family} layout's auto_map names; copy it "
                              "from the release.")
        for cls in set(classes.values()):
            if f"class {cls}".encode() not in files[name]:
                raise ConfigError(f"{name} in --modeling-dir {str(d)!r} defines no class {cls}; is it the {family} release's "
                                  "code?")
    return files


def export(model: Transformer, out, family: str, *, context: int = 4096, base_config: dict | None = None,
           special: dict | None = None, dtype: str | None = None, max_shard_bytes: int = 5 << 30,
           tokenizer_files: dict | None = None, buffers: dict | None = None, overwrite: bool = False,
           inputs=(), modeling_files: dict | None = None) -> dict:
    """Write `model` as a Hugging Face folder of `family`'s layout as `out`. Returns {'files',
    'keys', 'bytes'}. dtype None keeps the parameters' dtype. tokenizer_files maps file names to
    bytes written beside the weights; `buffers` are the family's known non-parameter tensors as
    an imported folder held them (default: computed as the family's reference code does).
    `modeling_files` (read_modeling_dir) are written beside them and named in config.json's
    auto_map, so that AutoModel.from_pretrained(out, trust_remote_code=True) loads the folder.

    The folder is written by `dlm.folders.writing`: a non-empty `out` is replaced only with
    overwrite and only when dlm wrote every file in it, and an `out` that is, holds or lies
    inside one of `inputs` is refused."""
    from dlm.folders import writing

    m, flat = exportable(model, family)
    with writing(out, inputs=inputs, overwrite=overwrite) as tmp:
        return _write_folder(m, flat, tmp, family, context, base_config, special, dtype, max_shard_bytes,
                             tokenizer_files, buffers, modeling_files)


def _write_folder(m: ModelConfig, flat: dict, out: pathlib.Path, family: str, context: int, base_config, special,
                  dtype, max_shard_bytes: int, tokenizer_files, buffers, modeling_files) -> dict:
    vocab_rows = (m.vocab_size + 1) if family == "mdlm" else m.vocab_size
    entries = layouts.layout(family, m, vocab_rows, biases=family == "llada" and families.llada_biases(base_config))

    def produce(e):
        def get():
            parts = []
            for path, layer in e.targets:
                a = flat[path]
                parts.append(np.asarray(jax.device_get(a if layer is None else a[layer])))
            return np.asarray(e.save(*parts), dtype=out_dtype(e))
        return get

    def out_dtype(e):
        if dtype is not None:
            return np.dtype(DTYPES[dtype])
        return np.dtype(flat[e.targets[0][0] if e.targets else ("head",)].dtype)  # a bias of no parameter: the head's

    items = [(e.key, e.shape, out_dtype(e), produce(e)) for e in entries]
    extra = layouts.buffers(family, m) if buffers is None else buffers
    items += [(k, a.shape, a.dtype, (lambda a=a: a)) for k, a in extra.items()]
    sizes = [int(np.prod(s, dtype=np.int64)) * d.itemsize for _, s, d, _ in items]
    groups, cur, cur_bytes = [], [], 0
    for item, n in zip(items, sizes):
        if cur and cur_bytes + n > max_shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(item)
        cur_bytes += n
    groups.append(cur)
    files = []
    if len(groups) == 1:
        write(out / "model.safetensors", groups[0], {"format": "pt"})
        files.append("model.safetensors")
    else:
        weight_map = {}
        for i, g in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            write(out / name, g, {"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k, *_ in g})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": sum(sizes)},
                                                                     "weight_map": weight_map}, indent=2) + "\n")
    config = families.hf_config(family, m, context, base_config, special)
    if dtype is not None or "torch_dtype" in config:
        config["torch_dtype"] = dtype or str(np.dtype(out_dtype(entries[0])))
    if modeling_files:
        config["auto_map"] = families.auto_map(family)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, data in {**(tokenizer_files or {}), **(modeling_files or {})}.items():
        (out / name).write_bytes(data)
    return {"files": files, "keys": len(items), "bytes": sum(sizes)}
