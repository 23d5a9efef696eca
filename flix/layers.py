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
group, R rank (padded to the group's max rank), K sum of ranks, S run slots per
row (`max_segments`, at most L), T = B * L tokens, N chunks of C tokens.

Every formulation works on "rows": each value's A as R rows of length D and
its B as R rows of length O, all groups' rows stacked (`_RowTables`). They
differ in which rows a token is multiplied with:

  "dense"   every value's rows, masked per token: plain matmuls, no gathers,
            cost grows with V * R. Chosen for tiny groups (LoRA: V = 1).
  "slots"   each row's runs (`flix.routing`): the rows of its S runs are
            gathered once per row and applied to the whole row, masked.
            S times the adapter FLOPs, so for rows of one or a few examples
            (and for decoding, L = 1).
  "sorted"  one group's tokens sorted by value across the batch into chunks
            of C tokens of one value (`routing.value_chunks`): batched
            matmuls on the chunks, no wasted FLOPs but padding and two
            permutations per matmul pair. For many examples per row on CPU.
  "ragged"  `jax.lax.ragged_dot` over each row's runs in order (group sizes =
            run lengths, no sort): the grouped matmul of accelerators. On
            XLA:CPU it lowers to a dense masked matmul per group: very slow.
  "segment" the default: "ragged" on GPU/TPU; on CPU the cheapest of dense,
            slots and sorted per group (`plan`), chosen when traced.

All are exact (tests check each against a naive per-token sum). A row may
hold at most `max_segments` runs; in a batch with a longer row every token
with a feature gets NaN (never a silently wrong value), and
`routing.check_max_segments` tells the user on the host before a step.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flix import features as features_lib
from flix import routing as routing_lib

Array = jax.Array
DType = jnp.dtype
Initializer = Callable[..., Array]
Routing = routing_lib.Routing

STRATEGIES = ("segment", "dense", "slots", "sorted", "ragged")

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


# The CPU planner's prices, per token, in adapter columns (one rank column
# of one value's A and B), fitted to scripts/bench_layer.py runs on XLA:CPU
# (d_in 512, d_out 512 and 1024, ranks 4 and 8, 1 to 16 examples per row):
# a slot column costs more than a dense one (batched per-row matmuls, weight
# gathers); sorting a group costs about this many columns whatever its rank
# (permuting inputs, outputs and their gradients into chunk order).
SLOTS_COST = 1.25
SORTED_COST = 48.0
_MIN_CHUNK, _MAX_CHUNK = 16, 128

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


class _RowTables:
  """Some groups' adapters as stacked rows: value v of group g is R_g rows.

  Attributes:
    groups: indices (into `space.groups`) of the tables' groups, in order.
    a: [rows, D] the A matrices, transposed (a row is one rank column of A).
    b: [rows, O] the B matrices.
    coef: [rows] s_g * rank mask of every row (times `poison`).
    row_group, row_id: static int [rows]: each row's group index and id.
  """

  def __init__(self, space, adapters, groups, dtype, poison):
    self.groups = tuple(groups)
    self._groups = [space.groups[g] for g in self.groups]
    a_rows, b_rows, coefs, row_group, row_id = [], [], [], [], []
    for g, group in zip(self.groups, self._groups):
      a, b = adapters[g]
      num_values, d_in, rank = a.shape
      a_rows.append(a.transpose(0, 2, 1).reshape(num_values * rank, d_in))
      b_rows.append(b.reshape(num_values * rank, b.shape[-1]))
      coefs.append(_coefficients(space, group)[1:].reshape(-1))
      row_group.append(np.full(num_values * rank, g))
      row_id.append(np.repeat(np.arange(1, num_values + 1), rank))
    self.a = jnp.concatenate(a_rows).astype(dtype)
    self.b = jnp.concatenate(b_rows).astype(dtype)
    # `poison` (1 or NaN) rides on the small coefficient table, not on the
    # [B, L, O] output: NaN coefficients make every token's delta NaN
    # (tokens without features may stay 0).
    self.coef = jnp.asarray(np.concatenate(coefs), dtype) * poison
    self.row_group = np.concatenate(row_group)
    self.row_id = np.concatenate(row_id)

  def rows_of(self, ids: Array) -> tuple[Array, Array]:
    """Rows and their coefficients for ids [..., len(groups)] (in `groups`
    order): int [..., K] and [..., K] (zero coefficients for id 0)."""
    rows, on = [], []
    offset = 0
    for j, group in enumerate(self._groups):
      value = jnp.clip(ids[..., j] - 1, 0, group.num_values - 1)
      rank = jnp.arange(group.max_rank)
      rows.append(offset + value[..., None] * group.max_rank + rank)
      present = ids[..., j] != features_lib.NO_FEATURE
      on.append(
          jnp.broadcast_to(present[..., None], present.shape + rank.shape)
      )
      offset += group.num_values * group.max_rank
    rows, on = jnp.concatenate(rows, -1), jnp.concatenate(on, -1)
    return rows, jnp.take(self.coef, rows) * on.astype(self.coef.dtype)

  def rows_of_slots(self, routing: Routing) -> tuple[Array, Array]:
    """`rows_of` each row's runs: [B, S, K] each."""
    return self.rows_of(jnp.take(routing.slot_ids, np.array(self.groups), -1))


@jax.custom_vjp
def _permute_rows(values: Array, index: Array, inverse: Array) -> Array:
  """values[index] along axis 0, whose transpose is a gather by `inverse`.

  `index` and `inverse` are inverse partial permutations: every row i of
  `values` that matters sits at output position inverse[i] (index[inverse[i]]
  == i), and the cotangent of every other output position is zero (masked
  downstream). The VJP is then values' cotangent = cotangent[inverse], a
  gather instead of XLA's serial scatter-add.
  """
  return jnp.take(values, index, axis=0, mode="clip")


def _permute_rows_fwd(values, index, inverse):
  return _permute_rows(values, index, inverse), (index, inverse)


def _permute_rows_bwd(residuals, cotangent):
  index, inverse = residuals
  return jnp.take(cotangent, inverse, axis=0, mode="clip"), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def _delta_dense(tables, x, ids):
  """Every value's rows, masked per token: x [B, L, D] -> [B, L, O]."""
  batch, length, d_in = x.shape
  # 2-D matmuls: XLA:CPU ran the 3-D einsum of the same product slower.
  h = x.reshape(-1, d_in) @ tables.a.T  # [T, rows]
  ids = ids.reshape(batch * length, -1)
  mask = jnp.take(ids, tables.row_group, axis=-1) == tables.row_id
  delta = (h * (mask * tables.coef)) @ tables.b
  return delta.reshape(batch, length, -1)


def _delta_slots(tables, x, routing):
  """Each row's runs' rows on the whole row, masked: [B, L, D] -> [B, L, O]."""
  batch, num_slots = routing.slot_ids.shape[:2]
  rows, coef = tables.rows_of_slots(routing)  # [B, S, K]
  k = rows.shape[-1]
  a = jnp.take(tables.a, rows.reshape(batch, -1), axis=0, mode="clip")
  b = jnp.take(tables.b, rows.reshape(batch, -1), axis=0, mode="clip")
  h = jnp.einsum("bld,bnd->bln", x, a)  # [B, L, S * K]
  on = (routing.token_slot[..., None] == jnp.arange(num_slots)) & (
      routing.active[..., None]
  )  # [B, L, S]
  h = h.reshape(h.shape[:2] + (num_slots, k))
  h = h * (on[..., None].astype(h.dtype) * coef[:, None])
  return jnp.einsum("bln,bno->blo", h.reshape(h.shape[:2] + (-1,)), b)


def _chunking(num_tokens: int, max_values: int) -> int:
  """C: a power of two near T / (2 U) in [16, 128]: padding (under U * C
  positions) stays near half the tokens and chunks stay matmul-sized."""
  target = max(1, num_tokens // (2 * max(1, max_values)))
  return int(np.clip(2 ** int(math.log2(target)), _MIN_CHUNK, _MAX_CHUNK))


def _max_values(group, routing) -> int:
  """U: at most min(V, B * S, T) distinct values (one per run)."""
  batch, length = routing.token_slot.shape
  return min(group.num_values, batch * routing.num_slots, batch * length)


def _delta_sorted(tables, x, routing, group, max_values):
  """One group on value-sorted chunks of tokens: [B, L, D] -> [B, L, O]."""
  (g,) = tables.groups
  batch, length, d_in = x.shape
  num_tokens = batch * length
  chunk = _chunking(num_tokens, max_values)
  group_ids = routing.ids[..., g].reshape(-1)
  plan = routing_lib.value_chunks(
      group_ids, group.num_values, max_values, chunk
  )
  num_chunks = plan.value.shape[0]
  rows, coef = tables.rows_of(plan.value[:, None])  # [N, R]
  a = jnp.take(tables.a, rows, axis=0, mode="clip")  # [N, R, D]
  b = jnp.take(tables.b, rows, axis=0, mode="clip")  # [N, R, O]
  xs = _permute_rows(x.reshape(num_tokens, d_in), plan.token, plan.position)
  h = jnp.einsum("ncd,nrd->ncr", xs.reshape(num_chunks, chunk, d_in), a)
  h = h * (coef[:, None] * plan.valid[..., None].astype(h.dtype))
  out = jnp.einsum("ncr,nro->nco", h, b).reshape(num_chunks * chunk, -1)
  delta = _permute_rows(out, plan.position, plan.token)
  return delta.reshape(batch, length, -1)


def _delta_ragged(tables, x, routing):
  """ragged_dot over each row's runs in order: [B, L, D] -> [B, L, O]."""
  batch, length, d_in = x.shape
  num_slots = routing.num_slots
  rows, coef = tables.rows_of_slots(routing)  # [B, S, K]
  rows = rows.reshape(batch * num_slots, -1)
  a = jnp.take(tables.a, rows, axis=0, mode="clip")  # [B * S, K, D]
  b = jnp.take(tables.b, rows, axis=0, mode="clip")  # [B * S, K, O]
  sizes = routing.slot_sizes().reshape(-1)  # runs in order tile every row
  token_run = jnp.arange(batch)[:, None] * num_slots + routing.token_slot
  token_coef = jnp.take(coef.reshape(batch * num_slots, -1), token_run, axis=0)
  token_coef = token_coef * routing.active[..., None].astype(coef.dtype)
  h = jax.lax.ragged_dot_general(
      x.reshape(batch * length, d_in),
      a,
      sizes,
      jax.lax.RaggedDotDimensionNumbers(
          dot_dimension_numbers=(([1], [2]), ([], [])),
          lhs_ragged_dimensions=[0],
          rhs_group_dimensions=[0],
      ),
  )
  h = h * token_coef.reshape(batch * length, -1)
  return jax.lax.ragged_dot(h, b, sizes).reshape(batch, length, -1)


def plan(
    space: features_lib.FeatureSpace,
    routing: Routing,
    strategy: str = "segment",
    backend: Optional[str] = None,
) -> tuple[str, ...]:
  """The formulation of each group (see the module docstring).

  Args:
    space: the feature space.
    routing: the batch's routing (only its shapes are used).
    strategy: one of STRATEGIES; anything but "segment" applies to all groups.
    backend: `jax.default_backend()` when None.

  Returns:
    One of "dense", "slots", "sorted", "ragged" per group.
  """
  if strategy != "segment":
    return (strategy,) * space.num_groups
  backend = backend or jax.default_backend()
  batch, length = routing.token_slot.shape
  num_tokens = batch * length
  chosen = []
  for group in space.groups:
    if group.num_values == 1:
      chosen.append("dense")
    elif backend != "cpu":
      chosen.append("ragged")
    else:  # adapter columns per token
      max_values = _max_values(group, routing)
      padded = num_tokens + max_values * _chunking(num_tokens, max_values)
      rank = group.max_rank
      costs = {
          "dense": group.num_values * rank,
          "slots": SLOTS_COST * routing.num_slots * rank,
          "sorted": rank * padded / num_tokens + SORTED_COST,
      }
      chosen.append(min(costs, key=costs.get))  # ties: first listed
  return tuple(chosen)


def route(
    feature_ids: Array, strategy: str = "segment", max_segments: int = 1
) -> Routing:
  """Prepares per-token ids [B, L, G] for `flix_delta` (once per stack)."""
  if strategy not in STRATEGIES:
    raise ValueError(
        f"Unknown FLix strategy {strategy!r}; use one of {STRATEGIES}."
    )
  return routing_lib.route(feature_ids, max_segments)


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
      `Routing` (from `route`, with the same max_segments).
    adapters: per group `(A [V, D, R], B [V, R, O])`, in `space.groups` order.
    strategy: one of STRATEGIES.
    max_segments: the most runs (packed examples) per row.

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
  chosen = plan(space, routing, strategy)
  # A row with more runs than max_segments cannot be computed by the run-
  # and value-based formulations. Poisoning the result (instead of a slower
  # exact fallback under lax.cond, whose backward materialises both
  # branches) is never silently wrong; `routing.check_max_segments` raises
  # the readable error on the host. Every strategy does it, so the limit
  # does not depend on which formulation the planner picked.
  poison = jnp.where(routing.max_runs > routing.num_slots, jnp.nan, 1.0)
  delta = 0.0
  for name in sorted(set(chosen)):
    groups = [g for g, c in enumerate(chosen) if c == name]
    if name == "sorted":  # one value sort per group
      for g in groups:
        tables = _RowTables(space, adapters, [g], x.dtype, poison)
        max_values = _max_values(space.groups[g], routing)
        delta = delta + _delta_sorted(
            tables, x, routing, space.groups[g], max_values
        )
      continue
    tables = _RowTables(space, adapters, groups, x.dtype, poison)
    if name == "dense":
      delta = delta + _delta_dense(tables, x, routing.ids)
    elif name == "slots":
      delta = delta + _delta_slots(tables, x, routing)
    else:
      delta = delta + _delta_ragged(tables, x, routing)
  return delta


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
