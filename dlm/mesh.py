"""Device mesh from the config, logical -> mesh axis rules, batch sharding, multi-host init.

Model code names logical axes only; this table is the one place that maps them to the mesh
axes (data, fsdp, tensor).
"""

from __future__ import annotations

import contextlib
import math

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dlm.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("layers", None),
    ("cond", None),
)


def mesh_shape(cfg: MeshConfig, num_devices: int | None = None) -> tuple[int, int, int]:
    """Resolve -1 entries so that data * fsdp * tensor equals the device count."""
    n = jax.device_count() if num_devices is None else num_devices
    what = f"{n} available devices"
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ConfigError("At most one of mesh.data, mesh.fsdp, mesh.tensor may be -1 (fill with the remaining devices).")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"Mesh sizes must be positive or -1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}.")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if n % fixed:
            raise ConfigError(f"Mesh sizes with product {fixed} do not divide the {what}; choose sizes whose product divides {n}.")
        sizes[free[0]] = n // fixed
    if math.prod(sizes) != n:
        raise ConfigError(
            f"Mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices does not fit the "
            f"{what}; make the product equal {n} (or set one axis to -1).")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig | None = None, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(cfg or MeshConfig(), len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh):
    """Enter the mesh and the logical rules (needed to create or shard parameters)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
        yield mesh


def batch_sharding(mesh) -> NamedSharding:
    """Rows over (data, fsdp), sequence replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), None))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local, mesh):
    """This process's rows (an array, or a dict of arrays) -> global arrays sharded over (data, fsdp)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh), x), local)


def check_batch(batch_size: int, mesh, grad_accum: int = 1) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if grad_accum < 1 or batch_size % grad_accum:
        raise ConfigError(f"train.grad_accum={grad_accum} must be at least 1 and divide train.batch_size={batch_size}.")
    if (batch_size // grad_accum) % shards:
        raise ConfigError(f"train.batch_size={batch_size} / train.grad_accum={grad_accum} (the micro-batch) must be "
                          f"divisible by mesh data*fsdp={shards}.")
    if batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={batch_size} must be divisible by the {jax.process_count()} processes.")
