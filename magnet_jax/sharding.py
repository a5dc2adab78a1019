"""Mesh construction and the logical-axis rules that map parameter annotations to it.

Layers name their axes logically (`embed`, `mlp`, `heads`, `vocab`, ...); this table is the
only place that decides which mesh axis shards what (jax_stack.md §2.3, §3.1).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")

# FSDP: parameter rows over `fsdp`, the batch over both axes; everything else replicated.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", None),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("length", None),
)


def make_mesh(num_data: int = -1, num_fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh with Auto axes; -1 fills the remaining devices."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if num_data == -1:
        if n % num_fsdp:
            raise ValueError(f"mesh.fsdp={num_fsdp} does not divide the {n} devices")
        num_data = n // num_fsdp
    if num_data * num_fsdp != n:
        raise ValueError(f"mesh data×fsdp = {num_data}×{num_fsdp} != {n} devices")
    return jax.make_mesh((num_data, num_fsdp), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a tree still wrapped in nn.LogicallyPartitioned boxes."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
