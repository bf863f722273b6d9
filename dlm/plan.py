"""Plan a pod run on this host: compile the real train step or sampler for a TPU topology and
report what one chip holds, what it computes and what it sends, before anyone pays for the pod.

    python -m dlm.plan --config C [key=value ...] --topology v5p:4x4x4 [--num-slices N]
                       --what train|sample [--param-dtype bfloat16] --out plan.json

libtpu (the `tpu` extra, installed with the tests) describes the topology's chips to JAX on a
CPU-only host (`jax.experimental.topologies`); the state, the batch and the parameters are
ShapeDtypeStructs with their shardings on a mesh of those chips, so nothing is allocated, and
`jit(...).lower(...).compile()` runs XLA's TPU compiler on the same program the trainer or
`dlm.generate` runs. What comes back is a compiler's view, not a measured step:

- per-chip bytes: the state's shards (parameters, optimizer, EMA: from the shardings), other
  arguments, temporaries, outputs and code (`memory_analysis()`, per device), and their total
  code + arguments + outputs - aliased + temporaries (what XLA calls the minimum to run), against
  the chip's HBM;
- FLOPs per chip from the model (dlm.plan.model_flops): XLA's `cost_analysis()` counts a scanned
  layer once and a Pallas kernel as almost nothing, so its figure is printed beside, labelled;
- every collective of the optimized HLO (kind, count, bytes per step per chip, with while-loop
  bodies multiplied by their trip counts), and which cross slices (DCN); for a sampler these are
  the whole decode's, its data-dependent loops counted at their bound;
- a roofline: step time >= max(FLOPs / peak, HBM bytes / bandwidth, ICI bytes / bandwidth,
  DCN bytes / bandwidth) with published per-chip figures (CHIPS), and the MFU that bound allows
  (perfect overlap), beside the step and MFU if none of the four overlapped (their sum);
  for a sampler, of one denoising pass (its ICI: the weights it gathers over fsdp, and with
  tensor parallelism two all-reduces of the pass's activations per layer). HBM bytes are
  the larger of the weights and state each step must read and write, and XLA's bytes accessed
  scaled by the factor by which its FLOPs fall short of the model's (it counts a loop body once).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import sys
from collections import defaultdict

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (bf16 dense peak; ICI one-way bandwidth of one link)."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float  # bytes / s
    ici_link: float  # bytes / s, one way, one link; a ring collective on one torus axis uses two (both ways)
    dcn: float  # bytes / s per chip (the host's NICs shared by its 4 chips)


# Sources: cloud.google.com/tpu/docs/v4, /v5e, /v5p-training, /v6e (HBM, peak bf16, HBM bandwidth);
# ICI per link and DCN per host from the scaling book (jax-ml.github.io/scaling-book, "How to Think
# About TPUs": per link one way v4 4.5e10, v5e 4.5e10, v5p 9e10 and v6e 9e10 B/s; DCN about 2.5e10
# B/s per host of 4 chips). HBM as published: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB.
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12, 4.5e10, 2.5e10 / 4),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 8.19e11, 4.5e10, 2.5e10 / 4),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.765e12, 9e10, 2.5e10 / 4),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12, 9e10, 2.5e10 / 4),
}


class PlanError(ValueError):
    """The plan cannot be made as asked; the message says why and what to do."""


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", name)
    if not m:
        raise PlanError(f"--topology {name!r} is not a TPU topology this planner knows; use one of v4:AxBxC, v5p:AxBxC, "
                        "v5e:AxB, v6e:AxB (chips per axis, e.g. v5p:4x4x4).")
    dims = tuple(int(d) for d in m.group(2).split("x"))
    if (m.group(1) in ("v4", "v5p")) != (len(dims) == 3):
        raise PlanError(f"--topology {name!r}: {m.group(1)} slices are {'3' if m.group(1) in ('v4', 'v5p') else '2'}-D "
                        "(v4 / v5p: AxBxC, v5e / v6e: AxB).")
    return m.group(1), dims


def topology_devices(name: str, num_slices: int = 1):
    """The compile-only TPU devices of `num_slices` slices of topology `name` (libtpu describes
    them on a CPU host)."""
    gen, _ = parse_topology(name)
    # nothing touches a chip here, so several planning processes may load libtpu at once (it
    # otherwise takes a machine-wide lock file and refuses a second process)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover
        raise PlanError(f"jax.experimental.topologies is unavailable ({e}).") from None
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, chips_per_host_bounds=(2, 2, 1),
                                            num_slices=num_slices)
    except Exception as e:  # libtpu missing or the name unknown to it
        raise PlanError(f"libtpu could not describe {name!r} ({str(e).splitlines()[0][:160]}); install the tpu extra "
                        "(pip install -e '.[tpu]') and check the topology name.") from None
    return desc.devices


# ------------------------------------------------------------------------------------------
# the model's FLOPs


def matmul_params(mcfg, vocab_size: int) -> dict:
    """Weights that take part in a matmul per token: per layer (attention projections, MLP) and
    the output head (the embedding is a lookup). A mixture-of-experts layer counts its router,
    its top-k experts and its shared experts per token ("layers"); "layers_total" counts every
    expert (the weights a pass over many tokens reads)."""
    from dlm.models.transformer import kv_heads, mlp_width

    d, H, KV = mcfg.d_model, mcfg.num_heads, kv_heads(mcfg)
    hd, ff = d // H, mlp_width(mcfg)
    attn = d * H * hd * 2 + d * KV * hd * 2
    mlp = (3 if mcfg.mlp == "swiglu" else 2) * d * ff
    n = {"layer": attn + mlp, "layers": mcfg.num_layers * (attn + mlp), "head": d * vocab_size}
    n["layers_total"], n["experts"] = n["layers"], 0
    moe = mcfg.moe
    if moe.experts:
        fe, routed = moe.expert_dim or ff, mcfg.num_layers - moe.dense_layers
        active = attn + d * moe.experts + 3 * d * fe * (moe.top_k + moe.shared_experts)
        every = attn + d * moe.experts + 3 * d * fe * (moe.experts + moe.shared_experts)
        n.update(layer=active, layers=moe.dense_layers * (attn + mlp) + routed * active,
                 layers_total=moe.dense_layers * (attn + mlp) + routed * every, experts=routed * 3 * d * fe * moe.experts)
    return n


def model_flops(mcfg, vocab_size: int, tokens: int, keys: int, backward: bool) -> float:
    """2 N per token per matmul weight plus the attention scores and values (4 L_k d per token
    per layer, bidirectional: nothing halved); x 3 with the backward pass. Rematerialisation is
    not counted (these are model FLOPs, the numerator of MFU)."""
    n = matmul_params(mcfg, vocab_size)
    per_token = 2 * (n["layers"] + n["head"]) + 4 * mcfg.num_layers * keys * mcfg.d_model
    return (3 if backward else 1) * per_token * tokens


# ------------------------------------------------------------------------------------------
# collectives of the optimized HLO

_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "send", "recv")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+(" + "|".join(_KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8e4m3fn|f8e5m2|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
          "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "c64": 8, "c128": 16}
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|called_computations)=\{?([^}\s]+(?:,\s*%[\w.\-]+)*)\}?")


def _arrays(type_text: str) -> list[int]:
    out = []
    for dt, dims in _ARRAY.findall(type_text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(int(n * _BYTES[dt]))
    return out


def _top_level(type_text: str) -> list[str]:
    """The top-level elements of a tuple type '(a, (b, c), d)' (or [type_text] for an array)."""
    t = type_text.strip()
    if not t.startswith("("):
        return [t]
    parts, depth, cur = [], 0, ""
    for ch in t[1:-1]:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _result_bytes(type_text: str, kind: str, start: bool) -> int:
    """Bytes of a collective's result(s). A synchronous op's type is its result (a tuple when
    combined). An async start's is (operands, results, contexts...): for all-gather and
    collective-permute the results follow the operands (each possibly a tuple of combined
    arrays); an all-reduce-start's type is its result(s), the same shapes as its operands."""
    parts = _top_level(type_text)
    if not start or kind == "all-reduce" or len(parts) == 1:
        return sum(_arrays(type_text))
    arrays = [p for p in parts if _arrays(p) and not re.fullmatch(r"[su]32\[\]\S*", p)]  # contexts are u32[] scalars
    if len(arrays) >= 2:
        return sum(_arrays(arrays[1]))
    return sum(_arrays(arrays[0])) if arrays else 0


def _group_size(line: str, num_devices: int) -> int:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = dict((k.strip("' "), int(v)) for k, v in (kv.split("=") for kv in m.group(1).split(",")))
        return math.prod(sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip())
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if m:
        return int(m.group(2))
    m = re.search(r"source_target_pairs=\{([^}]*(?:\}[^}]*)*)\}", line)
    return 2 if m else num_devices


def parse_collectives(hlo: str, num_devices: int) -> list[dict]:
    """Collectives of an optimized HLO module: [{kind, count, bytes, traffic_bytes, dcn}] per
    step and chip. `bytes` are each op's result (the gathered array of an all-gather, the shard
    of a reduce-scatter); ops in a while body count once per iteration, the trip count read from
    the loop condition's `i < N`. `traffic_bytes` is what a ring sends per chip: (n - 1) / n of
    the gathered bytes for all-gather, n - 1 shards for reduce-scatter, twice (n - 1) / n for
    all-reduce, (n - 1) / n for all-to-all, all of it for a permute. `dcn`: a cross-slice
    transfer (XLA's megascale send / recv)."""
    comps: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo.splitlines():
        if name is None:
            m = _COMP.match(line)
            if m and not line.startswith(" "):
                name = m.group(1)
                comps[name] = []
                if line.startswith("ENTRY"):
                    entry = name
            continue
        if line.rstrip() == "}":  # a computation's end (a kernel's multi-line config may start a line with "}}")
            name = None
            continue
        comps[name].append(line)
    trips: dict[str, int] = {}
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for cname, lines in comps.items():
        for line in lines:
            w = re.search(r"\bwhile\(.*condition=%([\w.\-]+), body=%([\w.\-]+)", line)
            if w:
                cond, body = w.group(1), w.group(2)
                known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                n = int(known.group(1)) if known else _trip_count(comps.get(cond, []), comps.get(body, []))
                trips[body] = n
                edges[cname] += [(cond, n), (body, n)]
                continue
            for m in _CALLS.finditer(line):
                for callee in re.findall(r"%?([\w.\-]+)", m.group(1)):
                    if callee in comps:
                        edges[cname].append((callee, 1))
    mult: dict[str, int] = defaultdict(int)

    def visit(c, k, depth=0):
        mult[c] += k
        if depth < 64:
            for callee, n in edges.get(c, []):
                visit(callee, k * n, depth + 1)

    if entry is not None:
        visit(entry, 1)
    table: dict[tuple[str, bool], dict] = {}
    for cname, lines in comps.items():
        k = mult.get(cname, 0)
        if not k:
            continue
        for line in lines:
            m = _OP.match(line)
            if not m:
                continue
            type_text, kind, start = m.groups()
            size = _result_bytes(type_text, kind, bool(start))
            if not size:
                continue
            dcn = "megascale" in line
            n = max(_group_size(line, num_devices), 1)
            share = {"all-gather": (n - 1) / n, "all-reduce": 2 * (n - 1) / n, "reduce-scatter": n - 1,
                     "all-to-all": (n - 1) / n}.get(kind, 1.0)
            row = table.setdefault((kind, dcn), {"kind": kind, "count": 0, "bytes": 0, "traffic_bytes": 0, "dcn": dcn})
            row["count"] += k
            row["bytes"] += k * size
            row["traffic_bytes"] += int(k * size * share)
    return sorted(table.values(), key=lambda r: -r["traffic_bytes"])


def _constants(lines: list[str]) -> dict[str, int]:
    out = {}
    for line in lines:
        m = re.match(r"\s*%(\S+)\s*=\s*[su](?:8|16|32|64)\[\]\S*\s+constant\((-?\d+)\)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def _trip_count(cond_lines: list[str], body_lines: list[str] = ()) -> int:
    """Iterations of a loop whose condition is `i < N` on a tuple element i that the body steps
    by a constant c (1 for a scan; XLA's unrolled windowed einsums step by 2): ceil(N / c), a
    counter starting at 0. 1 when the loop is not of that shape."""
    consts = _constants(cond_lines)
    index = bound = None
    gtes = {}
    for line in cond_lines:
        m = re.match(r"\s*%(\S+)\s*=.*get-tuple-element\(%\S+\), index=(\d+)", line)
        if m:
            gtes[m.group(1)] = int(m.group(2))
    for line in cond_lines:
        m = re.search(r"compare\(%(\S+?), %(\S+?)\), direction=LT", line)
        if m and m.group(2) in consts:
            bound, index = consts[m.group(2)], gtes.get(m.group(1))
    if bound is None:
        return 1
    step = 1
    if index is not None and body_lines:
        bconsts = _constants(body_lines)
        root = next((l for l in body_lines if l.lstrip().startswith("ROOT") and " tuple(" in l), "")
        elems = re.findall(r"%([\w.\-]+)", root.split(" tuple(", 1)[1]) if root else []
        if index < len(elems):
            for line in body_lines:
                m = re.match(r"\s*%" + re.escape(elems[index]) + r"\s*=.*\badd\(%(\S+?), %(\S+?)\)", line)
                if m:
                    c = bconsts.get(m.group(2), bconsts.get(m.group(1)))
                    step = c if c and c > 0 else 1
    return max(-(-bound // step), 1)


# ------------------------------------------------------------------------------------------
# building and compiling the programs


def _abstract(tree, dtype=None):
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=a.sharding), tree)


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (its largest shard)."""
    import jax

    total = 0
    for a in jax.tree.leaves(tree):
        shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += math.prod(shape) * a.dtype.itemsize
    return int(total)


def vocab_of(cfg) -> int:
    from dlm.config import TokenizerKind

    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    if cfg.data.tokenizer == TokenizerKind.BYTE:
        return 257
    if cfg.data.tokenizer == TokenizerKind.BPE:
        return cfg.data.bpe_vocab_size
    raise PlanError("The plan needs the vocabulary size without loading a tokenizer: set model.vocab_size.")


def _train_program(cfg, mesh, V):
    import jax
    import jax.numpy as jnp

    from dlm.mesh import batch_sharding, check_batch
    from dlm.train.state import create_train_state, make_train_step

    check_batch(cfg.train.batch_size, mesh, cfg.train.grad_accum)
    graphdef, state, shardings = create_train_state(cfg, V, mesh, abstract=True)
    step = make_train_step(cfg, graphdef, V, mesh, shardings)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), jnp.int32, sharding=batch_sharding(mesh))
    parts = {"params_bytes": shard_bytes(state.params), "optimizer_bytes": shard_bytes(state.opt_state),
             "ema_bytes": shard_bytes(state.ema) if state.ema is not None else 0}
    total = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(state))
    tokens = cfg.train.batch_size * cfg.data.seq_len
    return step, (state, batch), parts, total, {
        "tokens": tokens, "flops": model_flops(cfg.model, V, tokens, cfg.data.seq_len, backward=True),
        "weight_passes": 4 if cfg.model.remat.value != "none" else 3, "description":
            f"train step: batch {cfg.train.batch_size} x seq {cfg.data.seq_len}, remat {cfg.model.remat.value}, "
            f"attention {cfg.model.attention}, compute {cfg.model.dtype.value}"}


def _sample_program(cfg, mesh, V, param_dtype: str, prompt_len: int):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from dlm.mesh import batch_shards, batch_sharding
    from dlm.objectives import objective_for
    from dlm.sampling.generate import blocks, grid_arguments, parallel, program, sampler_for, setup_for
    from dlm.models.transformer import mask_id_of
    from dlm.train.state import abstract_model_state

    sc = cfg.sampling
    L = sc.length or cfg.data.seq_len
    B = sc.num_samples
    shards = batch_shards(mesh)
    if B % shards:
        raise PlanError(f"sampling.num_samples={B} must be divisible by mesh data*expert*fsdp={shards} (generate pads it; a plan "
                        "should not count padding rows).")
    if not 0 <= prompt_len < L:
        raise PlanError(f"--prompt-len {prompt_len} must be below the generation length {L} (sampling.length).")
    graphdef, params = abstract_model_state(cfg, V, mesh)
    params = _abstract(params, jnp.dtype(param_dtype))
    leaves, treedef = jax.tree.flatten(params)
    mask_id = mask_id_of(cfg.model, cfg.model.vocab_size or V)
    objective = objective_for(cfg.diffusion, mask_id, cfg.model.noise_conditioning, V)
    sampler = sampler_for(objective, sc)
    setup = setup_for(sampler, objective, sc, cfg.model, V, L, prompt_len=prompt_len if sampler in (parallel, blocks) else 0)
    run = program(sampler, setup, graphdef, treedef)
    bs = batch_sharding(mesh)
    rep = NamedSharding(mesh, P())
    with jax.enable_x64(sc.x64):
        alphas, times, _ = grid_arguments(sc, objective)
        key = jax.eval_shape(lambda: jax.random.key(0))
    args = (leaves, jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=bs), jax.ShapeDtypeStruct((B, L), jnp.bool_, sharding=bs),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
            jax.ShapeDtypeStruct(alphas.shape, alphas.dtype, sharding=rep), jax.ShapeDtypeStruct(times.shape, times.dtype, sharding=rep),
            None, None if sc.temperature == 0 else jax.ShapeDtypeStruct((), jnp.float64 if sc.x64 else jnp.float32, sharding=rep))
    total = sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves)
    gen = L - prompt_len
    if sampler is parallel:
        dc = sc.decode
        block = min(dc.block_length, gen)
        pass_tokens = {"none": L, "prefix": L - prompt_len, "dual": block}[dc.cache.value]
        what = (f"parallel decoder: batch {B}, prompt {prompt_len} + generation {gen}, block {block}, {dc.rule.value} "
                f"{dc.score.value}, cache {dc.cache.value}")
    elif sampler is blocks:  # a cached step feeds the block (the first of a block also the finished one before)
        bw = cfg.diffusion.block_width
        pass_tokens = bw if sc.cache else L
        what = (f"block decoder: batch {B}, prompt {prompt_len} + generation {gen}, block {bw}, {sc.decode.rule.value} "
                f"{sc.decode.score.value}, cache of settled blocks {'on' if sc.cache else 'off'}")
    else:  # a cached hyperschedule step feeds the active block (its width); other passes the whole canvas
        pass_tokens = setup.plan.width if setup.plan is not None and sc.cache else L
        what = f"{sampler.__name__} loop: batch {B}, length {L}, {sc.steps} steps, hyperschedule {cfg.diffusion.hyperschedule.value}"
    extra = {"tokens": B * pass_tokens, "flops": model_flops(cfg.model, V, B * pass_tokens, L, backward=False),
             "weight_passes": 1, "description": what + f", {param_dtype} parameters; one denoising pass",
             "full_pass_flops": model_flops(cfg.model, V, B * L, L, backward=False)}
    return run, args, {"params_bytes": shard_bytes(params), "optimizer_bytes": 0, "ema_bytes": 0}, total, extra


def _targets_tpu(compiled) -> bool:
    import jax

    shardings = [s for s in jax.tree.leaves(compiled.input_shardings) + jax.tree.leaves(compiled.output_shardings)
                 if hasattr(s, "device_set")]
    return bool(shardings) and all(d.platform == "tpu" for s in shardings for d in s.device_set)


def plan(cfg, topology: str, what: str = "train", num_slices: int = 1, param_dtype: str | None = None,
         prompt_len: int = 0, hlo_path=None) -> dict:
    """Compile `what` (train: the train step; sample: the configured sampler) for `num_slices`
    slices of `topology` and return the report (see the module docstring)."""
    import jax

    from dlm.mesh import batch_shards, make_mesh, mesh_context

    gen, _ = parse_topology(topology)
    chip = CHIPS[gen]
    devices = topology_devices(topology, num_slices)
    mesh = make_mesh(cfg.mesh, devices=devices)
    V = vocab_of(cfg)
    if what == "train":
        fn, args, parts, total, extra = _train_program(cfg, mesh, V)
    elif what == "sample":
        fn, args, parts, total, extra = _sample_program(cfg, mesh, V, param_dtype or cfg.model.dtype.value, prompt_len)
        fn = jax.jit(fn)
    else:
        raise PlanError(f"--what {what!r}: use train or sample.")
    report = {"topology": topology, "num_slices": num_slices, "chips": len(devices), "chip": chip.name, "what": what,
              "description": extra["description"], "mesh": dict(mesh.shape), "hbm_bytes_per_chip": chip.hbm_bytes,
              "state_total_bytes": int(total)}
    # a compile-only TPU client can neither read nor usefully write JAX's persistent cache (JAX
    # decides once per process whether to use it: reset that decision on both sides)
    from jax.experimental.compilation_cache import compilation_cache

    cache_was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        with mesh_context(mesh), jax.enable_x64(cfg.sampling.x64 if what == "sample" else False):
            compiled = fn.lower(*args).compile()
    except Exception as e:  # XLA refuses programs that do not fit: turn that into the verdict
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "exceeds" not in text.lower():
            raise
        first = next((l for l in text.splitlines() if "RESOURCE_EXHAUSTED" in l or "exceeds" in l), text.splitlines()[0])
        per_chip = dict(parts, other_args_bytes=None, temp_bytes=None, output_bytes=None, code_bytes=None, total_bytes=None)
        return dict(report, compiled=False, fits=False, per_chip=per_chip, flops_per_chip=extra["flops"] / len(devices),
                    collectives=[], roofline=None,
                    verdict=_refused(first.strip(), sum(parts.values()), chip))
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was)
        compilation_cache.reset_cache()
    if not _targets_tpu(compiled):
        raise PlanError("The program compiled for the host, not the topology's chips (no input is sharded on them); "
                        "this is a bug in the planner.")
    mem = compiled.memory_analysis()
    args_b, out_b, alias_b = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes
    temp_b, code_b = mem.temp_size_in_bytes, mem.generated_code_size_in_bytes
    per_chip = dict(parts, other_args_bytes=int(args_b - sum(parts.values())), temp_bytes=int(temp_b),
                    output_bytes=int(out_b), alias_bytes=int(alias_b), code_bytes=int(code_b),
                    total_bytes=int(code_b + args_b + out_b - alias_b + temp_b))
    peak = getattr(mem, "peak_memory_in_bytes", None)
    if peak:
        per_chip["peak_memory_bytes"] = int(peak)
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    tensor = mesh.shape["tensor"]
    hlo = compiled.as_text()
    if hlo_path:
        pathlib.Path(hlo_path).write_text(hlo)
    collectives = parse_collectives(hlo, len(devices))
    chips = len(devices)
    flops = extra["flops"] / chips
    # HBM traffic: at least the weights each chip reads per matmul pass (gathered to its tensor
    # shard) and the optimizer's read and write of the state's shards
    n = matmul_params(cfg.model, V)
    # (a chip reads only its own experts: 1 / mesh.expert of them)
    shared = n["layers_total"] - n["experts"] + n["head"]
    wbytes = extra["weight_passes"] * (shared + n["experts"] / mesh.shape["expert"]) / tensor * jax.numpy.dtype(
        param_dtype or cfg.model.dtype.value).itemsize
    state_rw = 2 * (parts["params_bytes"] + parts["optimizer_bytes"] + parts["ema_bytes"]) + 2 * parts["params_bytes"] \
        if what == "train" else 0
    hbm_floor = wbytes + state_rw
    # XLA's own count of bytes accessed, scaled up by the factor its FLOPs fall short of the
    # model's (both count a loop body once): activations' traffic included, approximately
    xla_flops, xla_bytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    hbm_scaled = xla_bytes * max(flops / xla_flops, 1.0) if xla_flops > 0 else 0.0
    hbm = max(hbm_floor, hbm_scaled)
    ici = sum(c["traffic_bytes"] for c in collectives if not c["dcn"])
    # a cross-slice transfer is a send on one chip and a recv on another, over full-duplex links
    dcn = max(sum(c["traffic_bytes"] for c in collectives if c["dcn"] and c["kind"] != "recv"),
              sum(c["traffic_bytes"] for c in collectives if c["dcn"] and c["kind"] == "recv"))
    if what == "sample":
        # the HLO's collectives are the whole decode's (data-dependent loops at their bound);
        # the roofline is one pass's: the weights gathered over fsdp where the program gathers,
        # and, with tensor parallelism, two all-reduces per layer of the pass's activations, and
        # with expert parallelism each routed layer's two all-to-alls
        fsdp = mesh.shape["fsdp"]
        gathers = any(c["kind"] == "all-gather" for c in collectives)
        ici = parts["params_bytes"] * (fsdp - 1) if gathers else 0
        if tensor > 1:
            rows = extra["tokens"] / batch_shards(mesh)
            act = rows * cfg.model.d_model * jax.numpy.dtype(cfg.model.dtype.value).itemsize
            ici += 2 * cfg.model.num_layers * act * 2 * (tensor - 1) / tensor
        moe, shards = cfg.model.moe, mesh.shape["expert"]
        if moe.experts and shards > 1:  # each routed layer: two all-to-alls of the dispatch buffer
            rows = extra["tokens"] / batch_shards(mesh)
            a = rows * moe.top_k
            cap = min(a, math.ceil(moe.capacity_factor * a / shards)) if moe.capacity_factor > 0 else a
            buf = shards * cap * cfg.model.d_model * jax.numpy.dtype(cfg.model.dtype.value).itemsize
            ici += 2 * (cfg.model.num_layers - moe.dense_layers) * buf * (shards - 1) / shards
        dcn = 0
    times = {"compute_seconds": flops / chip.peak_flops, "hbm_seconds": hbm / chip.hbm_bandwidth,
             "ici_seconds": ici / (2 * chip.ici_link), "dcn_seconds": dcn / chip.dcn}
    step_s = max(times.values())
    serial = sum(times.values())
    roofline = dict(times, step_seconds=step_s, mfu=(flops / chip.peak_flops) / step_s if step_s else 0.0,
                    step_seconds_no_overlap=serial, mfu_no_overlap=(flops / chip.peak_flops) / serial if serial else 0.0,
                    bound=max(times, key=times.get).replace("_seconds", ""), hbm_bytes=int(hbm),
                    hbm_bytes_weights_and_state=int(hbm_floor), hbm_bytes_xla_scaled=int(hbm_scaled), ici_bytes=int(ici),
                    dcn_bytes=int(dcn))
    if what == "train":
        roofline["tokens_per_second_per_chip"] = extra["tokens"] / chips / step_s if step_s else 0.0
    # the sum of the parts decides (MaxText's figure): XLA's own out-of-memory check compares
    # the temporaries alone with the HBM, and its peak_memory_in_bytes (undocumented) comes out
    # below the temporaries on these programs, so neither bounds what is resident; the peak is
    # reported beside the sum
    fits = per_chip["total_bytes"] <= chip.hbm_bytes
    report.update(compiled=True, fits=fits, per_chip=per_chip, flops_per_chip=flops, model_flops_per_step=extra["flops"],
                  xla_cost_analysis_flops_per_chip=float(cost.get("flops", 0.0)),
                  xla_cost_analysis_note="XLA counts a scanned layer once and a Pallas kernel as almost nothing; "
                                         "flops_per_chip is computed from the model",
                  collectives=collectives, roofline=roofline, verdict=_verdict(fits, per_chip, chip))
    if "full_pass_flops" in extra:
        report["full_pass_flops_per_chip"] = extra["full_pass_flops"] / chips
    return report


def _gib(b) -> str:
    return f"{b / GiB:.2f}"


_LABELS = {"params_bytes": "parameters", "optimizer_bytes": "optimizer state", "ema_bytes": "EMA",
           "other_args_bytes": "other arguments", "temp_bytes": "temporaries (activations, gradients, buffers)",
           "output_bytes": "outputs (not donated)", "code_bytes": "code"}


def _refused(message: str, state_bytes: int, chip: Chip) -> str:
    """The verdict of a program XLA refused for memory: by at least its temporaries plus the
    state's shards beyond the HBM (XLA checks the temporaries alone against what is free)."""
    m = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM", message)
    if not m:
        return (f"does not fit: the compiler refused it ({message[:300]}); the state alone is {_gib(state_bytes)} GiB "
                f"per chip of {_gib(chip.hbm_bytes)}.")
    temp = float(m.group(1)) * GiB
    short = temp + state_bytes - chip.hbm_bytes
    return (f"does not fit by at least {_gib(short)} GiB: XLA refused it, its temporaries alone ({_gib(temp)} GiB) exceed "
            f"the free HBM, and the state's shards add {_gib(state_bytes)} GiB per chip of {_gib(chip.hbm_bytes)}.")


def _verdict(fits: bool, per_chip: dict, chip: Chip) -> str:
    total, peak, hbm = per_chip["total_bytes"], per_chip.get("peak_memory_bytes"), chip.hbm_bytes
    beside = ""
    if peak and (total > hbm) != (peak > hbm):
        beside = f"; XLA's peak estimate, {_gib(peak)} GiB, would {'' if peak <= hbm else 'not '}fit"
    if fits:
        return f"fits with {_gib(hbm - total)} GiB to spare ({_gib(total)} of {_gib(hbm)} GiB per chip{beside})."
    parts = dict(per_chip, output_bytes=per_chip["output_bytes"] - per_chip.get("alias_bytes", 0))  # donated outputs reuse inputs
    top = sorted(((parts[k], k) for k in _LABELS if parts.get(k, 0) > 0), reverse=True)[:3]
    consumers = ", ".join(f"{_LABELS[k]} {_gib(v)} GiB" for v, k in top)
    return (f"does not fit by {_gib(total - hbm)} GiB ({_gib(total)} of {_gib(hbm)} GiB per chip{beside}): the largest "
            f"consumers are {consumers}.")


def table(report: dict) -> str:
    """The report as a readable table."""
    lines = [f"{report['what']} on {report['topology']} x {report['num_slices']} slice(s): {report['chips']} chips "
             f"({report['chip']}, {_gib(report['hbm_bytes_per_chip'])} GiB HBM each), mesh {report['mesh']}",
             f"  {report['description']}",
             f"  state: {report['state_total_bytes'] / 1e9:.2f} GB in all", "  per chip:"]
    pc = report["per_chip"]
    for k in ("params_bytes", "optimizer_bytes", "ema_bytes", "other_args_bytes", "temp_bytes", "output_bytes",
              "alias_bytes", "code_bytes", "total_bytes", "peak_memory_bytes"):
        if pc.get(k) is not None:
            lines.append(f"    {k.replace('_bytes', ''):<18} {pc[k] / GiB:9.3f} GiB")
    if report.get("compiled"):
        r = report["roofline"]
        lines += [f"  FLOPs per chip: {report['flops_per_chip']:.3e} from the model "
                  f"(XLA cost_analysis: {report['xla_cost_analysis_flops_per_chip']:.3e}, undercounts scans and kernels)",
                  "  collectives per step per chip:"]
        for c in report["collectives"]:
            lines.append(f"    {c['kind'] + (' (DCN)' if c['dcn'] else ''):<24} x{c['count']:<6} {c['bytes'] / 1e9:10.3f} GB"
                         f"  ring traffic {c['traffic_bytes'] / 1e9:10.3f} GB")
        lines.append(f"  roofline: compute {r['compute_seconds'] * 1e3:.1f} ms, HBM {r['hbm_seconds'] * 1e3:.1f} ms, "
                     f"ICI {r['ici_seconds'] * 1e3:.1f} ms, DCN {r['dcn_seconds'] * 1e3:.1f} ms -> step >= "
                     f"{r['step_seconds'] * 1e3:.1f} ms ({r['bound']}-bound), MFU <= {r['mfu']:.1%}; with no overlap "
                     f"{r['step_seconds_no_overlap'] * 1e3:.1f} ms, MFU {r['mfu_no_overlap']:.1%}")
    lines.append(f"  verdict: {report['verdict']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import jax

    if not jax.config.jax_platforms:  # the host compiles; libtpu only describes the chips (jax is imported already)
        jax.config.update("jax_platforms", "cpu")
    p = argparse.ArgumentParser(prog="dlm-plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config")
    p.add_argument("--topology", required=True, help="v5p:4x4x4, v5e:4x4, v4:2x2x2, v6e:2x4, ...")
    p.add_argument("--num-slices", type=int, default=1)
    p.add_argument("--what", choices=("train", "sample"), default="train")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                   help="sample: the parameters' dtype (default: model.dtype; dlm.load_pretrained's dtype)")
    p.add_argument("--prompt-len", type=int, default=0, help="sample: prompt tokens before the generation")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--hlo", default=None, help="write the optimized HLO text here")
    args = p.parse_args(argv)
    from dlm.config import ConfigError, load_config

    try:
        if args.num_slices < 1:
            raise PlanError(f"--num-slices {args.num_slices} must be at least 1.")
        cfg = load_config(args.config, args.overrides)
        report = plan(cfg, args.topology, args.what, args.num_slices, args.param_dtype, args.prompt_len, hlo_path=args.hlo)
    except (ConfigError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(report))
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
