"""Device mesh from the config, logical -> mesh axis rules, batch sharding, multi-host init.

Model code names logical axes only; this table is the one place that maps them to the mesh
axes (data, expert, fsdp, tensor). The expert axis splits a mixture-of-experts layer's experts
(expert parallelism: tokens go to their experts' devices by all-to-all, dlm.models.moe) and,
everywhere else, the batch, like data.
"""

from __future__ import annotations

import contextlib
import math

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dlm.config import ConfigError, MeshConfig

AXES = ("data", "expert", "fsdp", "tensor")
BATCH = ("data", "expert", "fsdp")  # the mesh axes that split rows

LOGICAL_RULES = (
    ("batch", BATCH),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("layers", None),
    ("cond", None),
    ("expert", "expert"),
    # activations: rows over (data, expert, fsdp), so that fsdp gathers weights rather than all-reducing
    # activations; heads and the MLP's hidden units over tensor; the residual stream replicated
    ("act_batch", BATCH),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
_RULES = dict(LOGICAL_RULES)


def mesh_shape(cfg: MeshConfig, num_devices: int | None = None) -> tuple[int, int, int, int]:
    """Resolve -1 entries so that data * expert * fsdp * tensor equals the device count."""
    n = jax.device_count() if num_devices is None else num_devices
    what = f"{n} available devices"
    sizes = [cfg.data, cfg.expert, cfg.fsdp, cfg.tensor]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ConfigError("At most one of mesh.data, mesh.expert, mesh.fsdp, mesh.tensor may be -1 (fill with the remaining devices).")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"Mesh sizes must be positive or -1, got data={cfg.data} expert={cfg.expert} fsdp={cfg.fsdp} "
                          f"tensor={cfg.tensor}.")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if n % fixed:
            raise ConfigError(f"Mesh sizes with product {fixed} do not divide the {what}; choose sizes whose product divides {n}.")
        sizes[free[0]] = n // fixed
    if math.prod(sizes) != n:
        raise ConfigError(
            f"Mesh data={sizes[0]} x expert={sizes[1]} x fsdp={sizes[2]} x tensor={sizes[3]} = {math.prod(sizes)} devices does not fit the "
            f"{what}; make the product equal {n} (or set one axis to -1).")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig | None = None, devices=None) -> jax.sharding.Mesh:
    """A (data, expert, fsdp, tensor) mesh over `devices` (default: all devices)."""
    devices = jax.devices() if devices is None else list(devices)
    slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices if d.platform == "tpu"})
    if len(slices) > 1:  # TPU slices joined over the data-center network
        return _multislice_mesh(cfg or MeshConfig(), devices, len(slices))
    shape = mesh_shape(cfg or MeshConfig(), len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _multislice_mesh(cfg: MeshConfig, devices, num_slices: int) -> jax.sharding.Mesh:
    """TPU devices of several slices (a multi-slice job: `slice_index` differs): the mesh config
    is resolved within one slice (ICI: mesh.data, mesh.fsdp, mesh.tensor and the -1 count the
    devices of one slice), and the data axis is tiled over the slices (DCN), so the mesh's data
    axis is mesh.data x slices; expert, fsdp and tensor stay inside a slice and the only cross-slice
    traffic is the data-parallel gradient reduction."""
    from jax.experimental import mesh_utils

    per = len(devices) // num_slices
    if per * num_slices != len(devices):
        raise ConfigError(f"{len(devices)} devices do not split evenly into {num_slices} slices.")
    ici = mesh_shape(cfg, per)
    arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1, 1), devices)
    return jax.sharding.Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh):
    """Enter the mesh and the logical rules (needed to create or shard parameters)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
        yield mesh


def on_mesh(fn, mesh):
    """`fn` traced with `mesh` as the abstract mesh in scope, so that `constrain` sees it however
    the jitted function is called (a jit made under mesh_context is traced at its first call,
    usually outside that context)."""
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def batch_axes(rows: int) -> tuple[str, ...]:
    """The mesh axes (of data, expert, fsdp) that split the batch under the mesh in scope, when
    `rows` divides by their sizes; () without a mesh or a split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(a for a in BATCH if a in mesh.shape and mesh.shape[a] > 1)
    ways = math.prod(mesh.shape[a] for a in axes)
    return axes if axes and rows % ways == 0 else ()


def constrain(x, *names):
    """Pin an activation's sharding by logical axis names (one per dimension; None: replicated)
    under the mesh in scope. A named dimension that its mesh axes do not divide (or whose axes
    have size 1) is left to XLA (unconstrained); without a mesh nothing is pinned. Without it
    XLA's propagation may keep the whole batch on every device and all-reduce partial
    activations over fsdp (the weights' sharded axis) instead of gathering the weights:
    activation memory then does not shrink with fsdp."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec, pinned = [], False
    for n, size in zip(names, x.shape):
        if n is None:
            spec.append(None)
            continue
        axes = _RULES.get(n)
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a in mesh.shape)
        ways = math.prod(mesh.shape[a] for a in axes)
        if axes and ways > 1 and size % ways == 0:
            spec.append(axes)
            pinned = True
        else:
            spec.append(P.UNCONSTRAINED)
    if not pinned:
        return x
    return jax.lax.with_sharding_constraint(x, P(*spec))


def batch_shards(mesh) -> int:
    """How many ways the mesh splits a batch's rows: data x expert x fsdp."""
    return math.prod(mesh.shape[a] for a in BATCH)


def batch_sharding(mesh) -> NamedSharding:
    """Rows over (data, expert, fsdp), sequence replicated."""
    return NamedSharding(mesh, P(BATCH, None))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local, mesh):
    """This process's rows (an array, or a dict of arrays) -> global arrays sharded over (data, expert, fsdp)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh), x), local)


def check_batch(batch_size: int, mesh, grad_accum: int = 1) -> None:
    shards = batch_shards(mesh)
    if grad_accum < 1 or batch_size % grad_accum:
        raise ConfigError(f"train.grad_accum={grad_accum} must be at least 1 and divide train.batch_size={batch_size}.")
    if (batch_size // grad_accum) % shards:
        raise ConfigError(f"train.batch_size={batch_size} / train.grad_accum={grad_accum} (the micro-batch) must be "
                          f"divisible by mesh data*expert*fsdp={shards}.")
    if batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={batch_size} must be divisible by the {jax.process_count()} processes.")
