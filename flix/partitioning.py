"""Device mesh and logical axis rules (T5X's PjitPartitioner, on jax.sharding).

Params and activations carry logical axis names (`embed`, `mlp`, `joined_kv`,
...); the rules map them onto a `('data', 'model')` mesh. FLix adapters
inherit the base kernel's sharding on d_in / d_out, except that where the
kernel's dimension is `embed` (replicated by T5X's 1-D rules) the adapter's is
`adapter_embed`, sharded over 'model': every adapter is then split over the
model axis once. Value and rank dimensions (`flix_values`, `lora_rank`) are
replicated. Scanned stacks add a leading, replicated `layers` axis.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flix import layers

PyTree = Any
LogicalRules = Sequence[tuple[str, Optional[str]]]


def adapter_axis_rules() -> tuple[tuple[str, Optional[str]], ...]:
  """The FLix adapter axes: inventory and rank dimensions are replicated,
  an adapter's `adapter_embed` side is sharded over 'model' (its other side
  uses the base kernel's axis). T5X's partitioner takes them as
  `additional_rules` (its own rules already replicate scanned stacks'
  `layers` axis, as flix's do)."""
  return (
      (layers.VALUES_AXIS, None),
      (layers.RANK_AXIS, None),
      (layers.EMBED_AXIS, "model"),
  )


def standard_logical_axis_rules(
    additional_rules: LogicalRules = (),
) -> tuple[tuple[str, Optional[str]], ...]:
  """T5X's 1-D activation / 1-D parameter partitioning rules plus FLix axes."""
  return (
      tuple(additional_rules)
      + (
          ("batch", "data"),
          ("vocab", "model"),
          ("embed", None),
          ("mlp", "model"),
          ("heads", "model"),
          ("kv", None),
          ("joined_kv", "model"),
          ("relpos_buckets", None),
          ("abspos_buckets", None),
          ("length", None),
          ("layers", None),
          ("stack", None),
          ("mlp_activations", None),
      )
      + adapter_axis_rules()
  )


def make_mesh(
    num_partitions: int = 1, devices: Optional[Sequence[jax.Device]] = None
) -> Mesh:
  """A ('data', 'model') mesh with `num_partitions` devices on 'model'."""
  devices = list(devices if devices is not None else jax.devices())
  if len(devices) % num_partitions:
    raise ValueError(
        f"num_partitions={num_partitions} does not divide the "
        f"{len(devices)} devices."
    )
  grid = np.array(devices).reshape(
      len(devices) // num_partitions, num_partitions
  )
  return Mesh(grid, ("data", "model"))


def logical_to_sharding(
    logical_specs: PyTree, mesh: Mesh, rules: LogicalRules
) -> PyTree:
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays: leading (batch) dim over 'data', the rest replicated."""
  return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  data = mesh.shape["data"]
  if batch_size % data:
    raise ValueError(
        f"Batch size {batch_size} is not divisible by the "
        f"{data} data-parallel devices of the mesh."
    )
