"""The FLix dense layer: a frozen kernel plus featurized low-rank adapters.

FLix (Featurized Low-Rank Mixtures; Lin et al., arXiv 2402.17934). For a dense
layer with frozen kernel W0 [D, O], every value v of every feature group g owns
a low-rank pair A[g, v] [D, R_g] and B[g, v] [R_g, O]. A token x of an example
with active features F(x) gets

    y = x W0 + sum_{(g, v) in F(x)} s_g (x A[g, v]) B[g, v]

with s_g = alpha_g / r_g (alpha_g / sqrt(r_g) with rsLoRA). B starts at zero,
so training starts exactly at the base model. Plain LoRA is one group with one
always-on value (`FeatureSpace.lora`): the same code path.

Feature ids are given per token, so a packed row holding several examples gives
each its own adapters. Id 0 means "no feature" (see `flix.features`).

Dimension key: B batch, L length, D d_in, O d_out, G groups, V values of a
group, R rank (padded to the group's max rank), K sum of the groups' ranks,
S segment slots per row, T tokens.

Strategies (all exact; tests check each against a naive per-token sum):
  "segment"  per-row slots: each row's runs of equal feature ids are given one
             of `max_segments` slots; the slots' adapters are gathered once per
             row ([B, S, D, K], tiny) and applied with a batched matmul. Cost
             does not depend on the inventory size V. A row with more runs than
             slots gives NaN (never a silently wrong value);
             `check_max_segments` tells the user on the host. Default.
  "gather"   per-token gather of A and B ([B, L, D, K]): general, memory-heavy;
             right for decoding (L = 1).
  "dense"    all adapters concatenated along rank, masked per token: no gather,
             static shapes, cost grows with V * R.
  "ragged"   sort tokens by feature id, `jax.lax.ragged_dot`, unsort: the
             grouped-matmul path for accelerators with a native ragged dot
             (very slow on XLA:CPU).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional, Sequence, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flix import features as features_lib

Array = jax.Array
DType = jnp.dtype
Initializer = Callable[..., Array]

STRATEGIES = ("segment", "gather", "dense", "ragged")

# Adapters are the leaves `lora_a_<group>` [V, D, R] and `lora_b_<group>`
# [V, R, O] beside a layer's `kernel`; every module that finds, freezes, saves
# or exports adapters uses these three.
ADAPTER_LEAF_RE = re.compile(r"^lora_([ab])_(.+)$")
ADAPTER_PATH_PATTERN = r".*/lora_[ab]_[^/]*"  # '/'-joined param paths


def adapter_leaf_names(group: str) -> tuple[str, str]:
  """(A, B) leaf names of `group`'s adapters, e.g. `lora_a_task`."""
  return f"lora_a_{group}", f"lora_b_{group}"


# Logical axis names of adapter dimensions (replicated by default rules).
VALUES_AXIS = "flix_values"
RANK_AXIS = "lora_rank"
# An adapter's d_in / d_out where the kernel's is 'embed', which T5X's 1-D
# rules replicate; the default rules shard this one (`flix.partitioning`).
EMBED_AXIS = "adapter_embed"


def adapter_axis(kernel_axis: str) -> str:
  """Logical axis of the adapter dimension matching a kernel dimension."""
  return EMBED_AXIS if kernel_axis == "embed" else kernel_axis


default_kernel_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal"
)
# Kaiming-uniform with bound 1/sqrt(D), as PEFT initialises LoRA's A.
default_adapter_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1, batch_axis=(0,)
)


def _coefficients(
    space: features_lib.FeatureSpace, group: features_lib.FeatureGroup
) -> np.ndarray:
  """Per-id rank coefficients s_g * rank_mask, float32 [V + 1, R]; row 0 = 0."""
  return space.scale_table(group)[:, None] * space.rank_mask(group)


def _gather_adapters(space, adapters, ids):
  """Gathers and concatenates every group's adapters for the given ids.

  Args:
    space: the feature space.
    adapters: per group `(A [V, D, R], B [V, R, O])`, in group order.
    ids: int [..., G].

  Returns:
    A [..., D, K], coefficients [..., K], B [..., K, O].
  """
  a_parts, c_parts, b_parts = [], [], []
  for g, (group, (a, b)) in enumerate(zip(space.groups, adapters)):
    group_ids = ids[..., g]
    index = jnp.clip(group_ids - 1, 0, group.num_values - 1)
    a_parts.append(jnp.take(a, index, axis=0))
    b_parts.append(jnp.take(b, index, axis=0))
    coef = jnp.asarray(_coefficients(space, group), a.dtype)
    c_parts.append(jnp.take(coef, group_ids, axis=0))
  return (
      jnp.concatenate(a_parts, -1),
      jnp.concatenate(c_parts, -1),
      jnp.concatenate(b_parts, -2),
  )


def _delta_gather(space, x, ids, adapters):
  a, coef, b = _gather_adapters(space, adapters, ids)  # [B,L,D,K] [B,L,K] ...
  h = jnp.einsum("bld,bldk->blk", x, a) * coef
  return jnp.einsum("blk,blko->blo", h, b)


def segment_slots(ids: Array, num_slots: int):
  """Assigns each token's run of equal feature ids to a per-row slot.

  Args:
    ids: int [B, L, G] per-token feature ids.
    num_slots: S.

  Returns:
    slot_ids int [B, S, G] (the ids of each slot, 0 where unused),
    token_slot one-hot float [B, L, S] (zero rows for tokens with no feature),
    max_runs int scalar: the most runs in any row.
  """
  batch, length, _ = ids.shape
  active = jnp.any(ids != features_lib.NO_FEATURE, axis=-1)  # [B, L]
  previous = jnp.concatenate([jnp.zeros_like(ids[:, :1]), ids[:, :-1]], axis=1)
  starts = active & jnp.any(ids != previous, axis=-1)
  run = jnp.cumsum(starts, axis=1) - 1  # [B, L]
  max_runs = jnp.max(jnp.sum(starts, axis=1))
  slot = jnp.where(active & (run < num_slots), run, num_slots)  # S = dropped
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, length))
  slot_ids = jnp.zeros((batch, num_slots, ids.shape[-1]), ids.dtype)
  slot_ids = slot_ids.at[rows, slot].set(ids, mode="drop")
  token_slot = jax.nn.one_hot(slot, num_slots, dtype=jnp.float32)
  return slot_ids, token_slot, max_runs


def _delta_segment(space, x, routing, adapters):
  slot_ids, max_runs = routing.slot_ids, routing.max_runs
  num_slots = slot_ids.shape[1]
  a, coef, b = _gather_adapters(space, adapters, slot_ids)  # [B,S,D,K] ...
  token_slot = routing.token_slot.astype(x.dtype)
  if num_slots == 1:  # one example per row: plain batched matmuls
    h = jnp.einsum("bld,bdk->blk", x, a[:, 0]) * (coef[:, :1] * token_slot)
    delta = jnp.einsum("blk,bko->blo", h, b[:, 0])
  else:
    h = jnp.einsum("bld,bsdk->blsk", x, a)
    h = h * (coef[:, None] * token_slot[..., None])
    delta = jnp.einsum("blsk,bsko->blo", h, b)
  # A row with more runs than slots cannot be computed exactly here. A
  # lax.cond fallback to "gather" made the backward pass 5x slower (its
  # residuals are materialised for both branches), so instead the result is
  # poisoned with NaN: never silently wrong. `check_max_segments` raises the
  # readable error on the host before a step.
  return jnp.where(max_runs > num_slots, jnp.nan, delta)


def check_max_segments(
    feature_ids: np.ndarray, max_segments: int, strategy: str = "segment"
) -> None:
  """Raises if a row holds more runs of feature ids than the layer has slots.

  Args:
    feature_ids: int [B, L, G] numpy ids of a batch (host side).
    max_segments: the layers' `max_segments`.
    strategy: the layers' strategy; only "segment" has the limit.
  """
  if strategy != "segment":
    return
  ids = np.asarray(feature_ids)
  active = np.any(ids != features_lib.NO_FEATURE, axis=-1)
  previous = np.concatenate([np.zeros_like(ids[:, :1]), ids[:, :-1]], axis=1)
  runs = np.sum(active & np.any(ids != previous, axis=-1), axis=1)
  if runs.size and runs.max() > max_segments:
    raise ValueError(
        f"A batch row packs {int(runs.max())} examples with different "
        f"features, but the FLix layers have max_segments={max_segments} "
        "slots per row. Set MAX_SEGMENTS (gin) to at least the number of "
        "examples packed per row, or FLIX_STRATEGY = 'gather'."
    )


def _delta_dense(space, x, ids, adapters):
  delta = 0.0
  for g, (group, (a, b)) in enumerate(zip(space.groups, adapters)):
    coef = jnp.asarray(_coefficients(space, group)[1:], a.dtype)  # [V, R]
    mask = jax.nn.one_hot(ids[..., g] - 1, group.num_values, dtype=a.dtype)
    h = jnp.einsum("bld,vdr->blvr", x, a) * (mask[..., None] * coef)
    delta = delta + jnp.einsum("blvr,vro->blo", h, b)
  return delta


def _delta_ragged(space, x, ids, adapters):
  batch, length, d_in = x.shape
  tokens = x.reshape(batch * length, d_in)
  delta = 0.0
  for g, (group, (a, b)) in enumerate(zip(space.groups, adapters)):
    group_ids = ids[..., g].reshape(-1)
    order = jnp.argsort(group_ids)
    sizes = jnp.bincount(group_ids, length=group.num_values + 1)
    zero_a = jnp.zeros((1,) + a.shape[1:], a.dtype)
    zero_b = jnp.zeros((1,) + b.shape[1:], b.dtype)
    coef = jnp.asarray(_coefficients(space, group), a.dtype)
    h = jax.lax.ragged_dot(
        tokens[order], jnp.concatenate([zero_a, a]), sizes.astype(jnp.int32)
    )
    h = h * jnp.take(coef, group_ids[order], axis=0)
    out = jax.lax.ragged_dot(
        h, jnp.concatenate([zero_b, b]), sizes.astype(jnp.int32)
    )
    delta = delta + out[jnp.argsort(order)]
  return delta.reshape(batch, length, -1)


@flax.struct.dataclass
class Routing:
  """Per-token feature ids, plus each row's slots for the "segment" strategy.

  Computed once per stack (`route`) and shared by all its adapted layers.

  Attributes:
    ids: int [B, L, G] per-token feature ids.
    slot_ids: int [B, S, G] ids of each row's slots ("segment" only).
    token_slot: float [B, L, S] one-hot slot of each token ("segment" only).
    max_runs: int scalar, the most runs of ids in any row ("segment" only).
  """

  ids: Array
  slot_ids: Optional[Array] = None
  token_slot: Optional[Array] = None
  max_runs: Optional[Array] = None


def route(
    feature_ids: Array, strategy: str = "segment", max_segments: int = 1
) -> Routing:
  """Prepares per-token ids [B, L, G] for `flix_delta`."""
  if strategy not in STRATEGIES:
    raise ValueError(
        f"Unknown FLix strategy {strategy!r}; use one of " f"{STRATEGIES}."
    )
  ids = jnp.asarray(feature_ids).astype(jnp.int32)
  if strategy != "segment":
    return Routing(ids)
  return Routing(ids, *segment_slots(ids, max_segments))


def flix_delta(
    space: features_lib.FeatureSpace,
    x: Array,
    feature_ids: Union[Array, Routing],
    adapters: Sequence[tuple[Array, Array]],
    strategy: str = "segment",
    max_segments: int = 1,
) -> Array:
  """Sum of the active features' adapter outputs, per token.

  Args:
    space: the feature space (groups, ranks, scales).
    x: [B, L, D] inputs.
    feature_ids: int [B, L, G] per-token ids (0 = no feature), or their
      `Routing` (from `route`, with the same strategy and max_segments).
    adapters: per group `(A [V, D, R], B [V, R, O])`, in `space.groups` order.
    strategy: one of STRATEGIES.
    max_segments: slots per row for the "segment" strategy.

  Returns:
    [B, L, O]: sum_{(g,v) active} s_g (x A[g,v]) B[g,v].
  """
  routing = (
      feature_ids
      if isinstance(feature_ids, Routing)
      else route(feature_ids, strategy, max_segments)
  )
  if routing.ids.shape != x.shape[:2] + (space.num_groups,):
    raise ValueError(
        f"feature_ids shape {routing.ids.shape} does not match inputs "
        f"{x.shape[:2]} x {space.num_groups} groups {space.group_names}."
    )
  if strategy == "segment":
    return _delta_segment(space, x, routing, adapters)
  if strategy == "gather":
    return _delta_gather(space, x, routing.ids, adapters)
  if strategy == "dense":
    return _delta_dense(space, x, routing.ids, adapters)
  return _delta_ragged(space, x, routing.ids, adapters)


def _canonical_tuple(x: Union[int, Sequence[int]]) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class FlixDense(nn.Module):
  """T5X `DenseGeneral` (no bias, 2-D stored kernel) with FLix adapters.

  The kernel is stored flattened to [prod(input axes), prod(features)], as in
  T5X, so public checkpoints map 1:1. Contracted axes must be the trailing
  `len(axis)` input axes. With `feature_space=None` this is a plain frozen
  DenseGeneral.

  Attributes:
    features: output feature shape, e.g. `(heads, head_dim)`.
    axis: contracted trailing input axes, -1 or (-2, -1).
    kernel_axes: logical axis names of the 2-D kernel (in, out).
    feature_space: adapters to create, or None for none.
    strategy: see module docstring.
    max_segments: slots per row of the "segment" strategy.
    dtype: compute dtype.
    kernel_init: initializer of the base kernel.
    adapter_init: initializer of A (B is zero).
  """

  features: Union[int, Sequence[int]]
  axis: Union[int, Sequence[int]] = -1
  kernel_axes: tuple[str, str] = ("embed", "mlp")
  feature_space: Optional[features_lib.FeatureSpace] = None
  strategy: str = "segment"
  max_segments: int = 1
  dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init
  adapter_init: Initializer = default_adapter_init

  @nn.compact
  def __call__(
      self, inputs: Array, feature_ids: Union[None, Array, Routing] = None
  ) -> Array:
    """Applies the layer.

    Args:
      inputs: [B, L, *in_dims].
      feature_ids: int [B, L, G] per-token feature ids, or their `Routing`
        (required when the layer has adapters).

    Returns:
      [B, L, *features].
    """
    features = _canonical_tuple(self.features)
    num_in = len(_canonical_tuple(self.axis))
    in_shape = inputs.shape[-num_in:]
    d_in, d_out = math.prod(in_shape), math.prod(features)
    batch_shape = inputs.shape[:-num_in]

    # T5X initialises and stores the kernel flattened to 2-D, so fan-in is
    # prod(contracted axes).
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
        (d_in, d_out),
        jnp.float32,
    )
    x = inputs.reshape(batch_shape + (d_in,)).astype(self.dtype)
    y = jnp.dot(x, jnp.asarray(kernel, self.dtype))

    if self.feature_space is not None:
      if feature_ids is None:
        raise ValueError(
            f"{self.name}: this layer has FLix adapters and "
            "needs per-token feature_ids."
        )
      adapters = []
      for group in self.feature_space.groups:
        a_name, b_name = adapter_leaf_names(group.name)
        a = self.param(
            a_name,
            nn.with_logical_partitioning(
                self.adapter_init,
                (VALUES_AXIS, adapter_axis(self.kernel_axes[0]), RANK_AXIS),
            ),
            (group.num_values, d_in, group.max_rank),
            jnp.float32,
        )
        b = self.param(
            b_name,
            nn.with_logical_partitioning(
                nn.initializers.zeros,
                (VALUES_AXIS, RANK_AXIS, adapter_axis(self.kernel_axes[1])),
            ),
            (group.num_values, group.max_rank, d_out),
            jnp.float32,
        )
        adapters.append(
            (jnp.asarray(a, self.dtype), jnp.asarray(b, self.dtype))
        )
      y = y + flix_delta(
          self.feature_space,
          x,
          feature_ids,
          adapters,
          self.strategy,
          self.max_segments,
      ).astype(y.dtype)
    return y.reshape(batch_shape + features)
