"""Per-device memory of the sharded train state on the CPU mesh, and dlm.plan compiling the real
train step and decoder for a TPU topology (libtpu describes the chips; nothing runs on them)."""

import json
import math

import jax
import numpy as np
import pytest

from dlm import plan as P
from dlm.config import MeshConfig, load_config
from dlm.mesh import make_mesh
from dlm.train.state import create_train_state

V = 32000


def _cfg(root, *over):
    return load_config(root / "configs/test.yaml", ["model.d_model=128", "model.num_heads=4", "model.num_layers=2", *over])


def _device_bytes(tree, device):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


@pytest.mark.parametrize("fsdp,tensor", [(8, 1), (4, 2)])
def test_every_state_leaf_holds_its_parameter_shard(root, fsdp, tensor):
    cfg = _cfg(root)
    mesh = make_mesh(MeshConfig(data=1, fsdp=fsdp, tensor=tensor))
    _, state, _ = create_train_state(cfg, V, mesh)
    dev = jax.devices()[0]
    params = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    moments = [state.opt_state[1][0].mu, state.opt_state[1][0].nu, state.ema]
    for tree in moments:
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            p = params[jax.tree_util.keystr(path)]
            assert leaf.sharding.is_equivalent_to(p.sharding, p.ndim), jax.tree_util.keystr(path)
            shard = math.prod(p.sharding.shard_shape(p.shape)) * leaf.dtype.itemsize
            assert _device_bytes([leaf], dev) == shard, jax.tree_util.keystr(path)
    scalars = [x for x in jax.tree.leaves(state) if x.ndim == 0]
    assert scalars and all(x.sharding.is_fully_replicated for x in scalars)
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    scalar_bytes = sum(x.nbytes for x in jax.tree.leaves(state) if x.size <= 2)
    per_device = _device_bytes(state, dev)
    assert per_device <= (total / 8) * 1.02 + scalar_bytes, (per_device, total / 8)


def test_unshardable_optimizer_leaf_is_refused():
    from jax.sharding import NamedSharding, PartitionSpec

    from dlm.train.state import shard_like_params

    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    params = {"w": NamedSharding(mesh, PartitionSpec("fsdp"))}
    rep = NamedSharding(mesh, PartitionSpec())
    out = shard_like_params((jax.ShapeDtypeStruct((), np.int32), {"w": jax.ShapeDtypeStruct((8,), np.float32)}), params, rep)
    assert out[0] == rep and out[1] == params
    with pytest.raises(ValueError, match="neither a scalar nor inside a copy of the parameter tree"):
        shard_like_params({"extra": jax.ShapeDtypeStruct((3, 4), np.float32)}, params, rep)


KEYS = {"topology", "chips", "what", "hbm_bytes_per_chip", "state_total_bytes", "per_chip", "fits", "flops_per_chip",
        "collectives", "roofline", "verdict"}
PER_CHIP = {"params_bytes", "optimizer_bytes", "ema_bytes", "other_args_bytes", "temp_bytes", "output_bytes", "code_bytes",
            "total_bytes"}


def _plan(root, tmp_path, *args):
    """python -m dlm.plan on the test config with `args`: exits 0, and its JSON report."""
    out = tmp_path / "plan.json"
    assert P.main(["--config", str(root / "configs/test.yaml"), *args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_train_step_plan_for_v5e_2x2(root, tmp_path):
    r = _plan(root, tmp_path, "mesh.data=1", "mesh.fsdp=4", "train.batch_size=8",
              "--topology", "v5e:2x2", "--what", "train")
    assert KEYS <= set(r) and PER_CHIP <= set(r["per_chip"])
    assert r["chips"] == 4 and r["fits"] and r["verdict"].startswith("fits with")
    cfg = load_config(root / "configs/test.yaml")
    # the state's shards: parameters, Adam's two moments and the EMA, a quarter each on 4 chips (the
    # stacked layers' small vectors may not divide)
    pc = r["per_chip"]
    state = pc["params_bytes"] + pc["optimizer_bytes"] + pc["ema_bytes"]
    assert r["state_total_bytes"] / 4 <= state <= r["state_total_bytes"] / 4 * 1.05
    assert pc["optimizer_bytes"] >= 2 * pc["params_bytes"] * 0.99
    # the model's FLOPs: 6 N per token (+ attention) on 8 x 32 tokens, over 4 chips
    n = P.matmul_params(cfg.model, 257)
    tokens = 8 * 32
    expect = 3 * (2 * (n["layers"] + n["head"]) + 4 * cfg.model.num_layers * 32 * cfg.model.d_model) * tokens / 4
    assert r["flops_per_chip"] == pytest.approx(expect)
    # fsdp over 4 chips: each chip receives at least the 3/4 of every weight it does not hold (and
    # sends its gradients), so the collectives move at least that much per step
    moved = sum(c["bytes"] for c in r["collectives"] if not c["dcn"])
    assert moved >= 0.75 * pc["params_bytes"] * 4, (moved, pc["params_bytes"])
    assert {"compute_seconds", "hbm_seconds", "ici_seconds", "dcn_seconds", "step_seconds", "mfu"} <= set(r["roofline"])


def test_parallel_decoder_plan_for_v5e_2x2(root, tmp_path):
    r = _plan(root, tmp_path, "mesh.data=4", "sampling.sampler=parallel",
              "sampling.decode.cache=dual", "sampling.num_samples=4", "sampling.length=32",
              "sampling.decode.block_length=8", "--prompt-len", "8", "--param-dtype", "bfloat16",
              "--topology", "v5e:2x2", "--what", "sample")
    assert KEYS <= set(r) and PER_CHIP <= set(r["per_chip"]) and r["fits"]
    assert r["per_chip"]["optimizer_bytes"] == 0
    # bfloat16 parameters, replicated over data: each chip holds all of them in 2 bytes each
    assert r["per_chip"]["params_bytes"] == r["state_total_bytes"]


def test_plan_that_cannot_fit_gets_the_sentence(root, tmp_path, capsys):
    r = _plan(root, tmp_path, "model.d_model=4096",
              "model.num_layers=16", "model.num_heads=32", "model.vocab_size=32000", "mesh.data=1", "mesh.fsdp=4", "train.batch_size=4",
              "--topology", "v5e:2x2", "--what", "train")
    assert not r["fits"]
    assert r["verdict"].startswith("does not fit") and ("largest consumers" in r["verdict"] or "refused" in r["verdict"])
    assert "does not fit" in capsys.readouterr().out


def test_collective_parser_counts_loop_bodies_by_their_trip_counts():
    hlo = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %constant.1 = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %constant.1), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8] get-tuple-element(%p), index=1
  %ag = f32[32]{0} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %k = f32[8] custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"cfg":
"{\\"block_q\\": 128}"
}}, metadata={op_name="a kernel whose config spans lines"}
  %ag2 = f32[32]{0} all-gather(%k), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %t = (s32[], f32[8]) tuple(%i, %x)
}

%cond2 (q: (u32[], f32[8])) -> pred[] {
  %q = (u32[], f32[8]) parameter(0)
  %j = u32[] get-tuple-element(%q), index=0
  %constant.8 = u32[] constant(8)
  ROOT %lt2 = pred[] compare(%j, %constant.8), direction=LT
}

%unrolled (q: (u32[], f32[8])) -> (u32[], f32[8]) {
  %q = (u32[], f32[8]) parameter(0)
  %j = u32[] get-tuple-element(%q), index=0
  %y = f32[8] get-tuple-element(%q), index=1
  %constant.2 = u32[] constant(2)
  %cp = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%y), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %next = u32[] add(%j, %constant.2)
  ROOT %t2 = (u32[], f32[8]) tuple(%next, %y)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8] parameter(0)
  %w = (s32[], f32[8]) while(%t0), condition=%cond, body=%body
  %w2 = (u32[], f32[8]) while(%t1), condition=%cond2, body=%unrolled
  %ar = bf16[16]{0} all-reduce(%a), channel_id=2, replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""
    rows = {r["kind"]: r for r in P.parse_collectives(hlo, 8)}
    assert rows["all-gather"]["count"] == 10 and rows["all-gather"]["bytes"] == 10 * 128
    assert rows["all-gather"]["traffic_bytes"] == int(10 * 128 * 3 / 4)
    assert rows["all-reduce"]["count"] == 1 and rows["all-reduce"]["bytes"] == 32
    assert rows["all-reduce"]["traffic_bytes"] == int(32 * 2 * 3 / 4)
    # a loop that steps its counter by 2 up to 8 runs 4 times
    assert rows["collective-permute"]["count"] == 4 and rows["collective-permute"]["bytes"] == 4 * 32


def test_unknown_topology_is_one_sentence(root, capsys):
    assert P.main(["--config", str(root / "configs/test.yaml"), "--topology", "v5q:2x2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a TPU topology" in err


def test_two_slices_reduce_only_gradients_across_slices(root, tmp_path):
    """With two slices the data axis spans them (DCN) and fsdp stays inside each: the only
    cross-slice transfers are the gradients' reduction, about one float32 copy of the chip's
    parameter shard per step."""
    r = _plan(root, tmp_path, "mesh.data=1", "mesh.fsdp=4", "train.batch_size=8",
              "--topology", "v5e:2x2", "--num-slices", "2", "--what", "train")
    assert r["chips"] == 8 and r["mesh"] == {"data": 2, "expert": 1, "fsdp": 4, "tensor": 1}
    dcn = [c for c in r["collectives"] if c["dcn"]]
    assert dcn, "no cross-slice transfer: the slices would not agree on the gradients"
    sent = sum(c["bytes"] for c in dcn if c["kind"] == "send")
    grads = r["per_chip"]["params_bytes"]  # float32 gradients sharded like the parameters
    assert 0.9 * grads <= sent <= 1.5 * grads + 64 * 1024, (sent, grads)


def test_restore_target_and_start_from_shard_the_optimizer_like_the_parameters(root):
    """The abstract state a resume restores into, and the state `start_from` builds from imported
    parameters, give Adam's moments and the EMA the parameters' shardings."""
    from dlm.train.state import start_from

    cfg = _cfg(root)
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    _, abstract, shardings = create_train_state(cfg, V, mesh, abstract=True)
    params = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), abstract.params)
    state = start_from(cfg, params, shardings)
    p_leaves = jax.tree.leaves(abstract.params)
    for tree in (abstract.opt_state[1][0].mu, abstract.opt_state[1][0].nu, abstract.ema,
                 state.opt_state[1][0].mu, state.opt_state[1][0].nu, state.ema):
        for leaf, p in zip(jax.tree.leaves(tree), p_leaves):
            assert leaf.sharding.is_equivalent_to(p.sharding, p.ndim)
    assert any(not p.sharding.is_fully_replicated for p in p_leaves)


def test_expert_parallel_plan_splits_the_experts_and_dispatches_by_all_to_all(root, tmp_path):
    """A mixture-of-experts train step on v5e:2x2 with mesh.expert=4: the experts' parameters are
    a quarter per chip, and the step's collectives include the dispatch all-to-alls."""
    moe = ["model.moe.experts=8", "model.moe.expert_dim=64", "mesh.data=1", "mesh.expert=4", "mesh.fsdp=1", "train.batch_size=8"]
    r = _plan(root, tmp_path, *moe, "--topology", "v5e:2x2", "--what", "train")
    d = _plan(root, tmp_path, *moe[:2], "mesh.expert=1", "mesh.data=4", "mesh.fsdp=1", "train.batch_size=8",
              "--topology", "v5e:2x2", "--what", "train")
    assert r["fits"] and any(c["kind"] == "all-to-all" for c in r["collectives"])
    assert not any(c["kind"] == "all-to-all" for c in d["collectives"])
    cfg = load_config(root / "configs/test.yaml", moe)
    experts = 3 * cfg.model.num_layers * 8 * cfg.model.d_model * 64 * 4  # float32 bytes of every expert matrix
    assert d["per_chip"]["params_bytes"] - r["per_chip"]["params_bytes"] >= 0.99 * experts * 3 / 4
