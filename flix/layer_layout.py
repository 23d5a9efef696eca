"""Per-layer and stacked (scanned) parameter layouts, and the one conversion.

The public layout names every layer, as T5X and Hugging Face checkpoints do:

    encoder/layers_0/attention/query/kernel   [D, H * K]
    ...
    encoder/layers_23/attention/query/kernel  [D, H * K]

With `T5Config.scan_layers` the network runs each stack as one `nn.scan` and
stores its layers stacked on a leading axis (logical axis 'layers'):

    encoder/layers/attention/query/kernel     [24, D, H * K]

Everything outside the network speaks the per-layer layout: legacy T5X and HF
checkpoints, flix's own Orbax checkpoints (the trained params and their
optimizer state), export. `to_layout` converts between the two and is the only
conversion: the model applies it to the params it is given, checkpoint loading
to what it read. A tree may be mixed (a stacked frozen base plus per-layer
trained adapters, as the train state holds them): both directions merge the
converted leaves with those already in the target layout.

Leaves may be arrays (NumPy or JAX, also traced), `jax.ShapeDtypeStruct`s or
Flax partitioning boxes (`nn.LogicalPartitioned`, whose axis names gain or
lose 'layers'); a stacked leaf's layer count is its leading dimension.
"""

from __future__ import annotations

import collections
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

PyTree = Any
STACKS = ("encoder", "decoder")
STACKED = "layers"  # module name of a scanned stack's layers
LAYERS_AXIS = "layers"  # logical axis name of the stacked dimension
_LAYER_RE = re.compile(r"layers_(\d+)")


def _shape(leaf) -> tuple[int, ...]:
  if isinstance(leaf, nn.Partitioned):
    leaf = leaf.value
  return tuple(leaf.shape)


def _take(leaf, index: int):
  """Layer `index` of a stacked leaf."""
  if isinstance(leaf, nn.Partitioned):
    return leaf.replace(value=_take(leaf.value, index), names=leaf.names[1:])
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return leaf[index]


def _stack(leaves: list):
  """Stacks per-layer leaves on a new leading axis."""
  first = leaves[0]
  if isinstance(first, nn.Partitioned):
    return first.replace(
        value=_stack([leaf.value for leaf in leaves]),
        names=(LAYERS_AXIS,) + tuple(first.names),
    )
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + first.shape, first.dtype)
  if all(isinstance(leaf, np.ndarray) for leaf in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _stacked_key(key: tuple[str, ...]) -> bool:
  return len(key) > 2 and key[0] in STACKS and key[1] == STACKED


def is_stacked(params: PyTree) -> bool:
  """Whether any stack's layers are stored stacked."""
  return any(_stacked_key(k) for k in traverse_util.flatten_dict(params))


def _put(out: dict, key: tuple[str, ...], value) -> None:
  if key in out:
    raise ValueError(
        f"Parameter {'/'.join(key)} is given both per layer and stacked."
    )
  out[key] = value


def unstack_layers(params: PyTree) -> PyTree:
  """Stacked `<stack>/layers/...` [L, ...] -> `<stack>/layers_<i>/...`."""
  out = {}
  for key, leaf in traverse_util.flatten_dict(params).items():
    if not _stacked_key(key):
      _put(out, key, leaf)
      continue
    for i in range(_shape(leaf)[0]):
      _put(out, (key[0], f"layers_{i}") + key[2:], _take(leaf, i))
  return traverse_util.unflatten_dict(out)


def stack_layers(params: PyTree) -> PyTree:
  """`<stack>/layers_<i>/...` -> stacked `<stack>/layers/...` [L, ...]."""
  out, per_layer = {}, collections.defaultdict(dict)
  for key, leaf in traverse_util.flatten_dict(params).items():
    match = len(key) > 2 and key[0] in STACKS and _LAYER_RE.fullmatch(key[1])
    if match:
      per_layer[(key[0],) + key[2:]][int(match.group(1))] = leaf
    else:
      _put(out, key, leaf)
  for (stack, *rest), layers in per_layer.items():
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(
          f"{stack}/layers_<i>/{'/'.join(rest)} is given for layers "
          f"{sorted(layers)}; stacking needs every layer from 0."
      )
    _put(
        out,
        (stack, STACKED, *rest),
        _stack([layers[i] for i in range(len(layers))]),
    )
  return traverse_util.unflatten_dict(out)


def to_layout(params: PyTree, stacked: bool) -> PyTree:
  """`params` (per-layer, stacked or mixed) in the stacked or per-layer layout.

  Leaves already in the requested layout are passed through untouched.
  """
  return stack_layers(params) if stacked else unstack_layers(params)
