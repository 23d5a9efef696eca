"""Which adapters each token uses: runs of feature ids, and value-sorted chunks.

A packed row holds several examples back to back and every token carries its
example's feature ids, so a row is a sequence of *runs* of equal ids (id 0 is
"no feature": padding, or an absent group). No token ever needs another run's
adapters. The adapter formulations of `flix.layers` group tokens either by run
(per row, in order, no sort) or by value (sorted across the batch, so tokens of
different rows that share a value share one matmul); this module computes both
groupings.

Dimension key: B batch, L length, G groups, S run slots per row, T = B * L
tokens, V values of a group, N chunks, C tokens per chunk.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flix import features as features_lib

Array = jax.Array


@flax.struct.dataclass
class Routing:
  """Per-token feature ids and each row's runs; computed once per stack.

  Attributes:
    ids: int [B, L, G] per-token feature ids.
    slot_ids: int [B, S, G] the ids of each row's runs in order (0 for slots
      past the row's last run).
    token_slot: int [B, L] the run (slot) of each token. Padding before the
      first run belongs to slot 0 and padding after a run to that run, so
      each slot is one contiguous span of the row and the spans tile it.
    max_runs: int scalar, the most runs in any row. More than S makes the
      run-based formulations poison their output with NaN.
  """

  ids: Array
  slot_ids: Array
  token_slot: Array
  max_runs: Array

  @property
  def num_slots(self) -> int:
    return self.slot_ids.shape[1]

  @property
  def active(self) -> Array:
    """bool [B, L]: tokens with at least one feature."""
    return jnp.any(self.ids != features_lib.NO_FEATURE, axis=-1)

  def slot_sizes(self) -> Array:
    """int32 [B, S]: tokens in each slot's span (they sum to L per row)."""
    slots = jnp.arange(self.num_slots, dtype=self.token_slot.dtype)
    return jnp.sum(self.token_slot[..., None] == slots, axis=1, dtype=jnp.int32)


def _run_starts(ids):
  """bool [B, L]: tokens that start a run (active, ids differ from previous)."""
  active = jnp.any(ids != features_lib.NO_FEATURE, axis=-1)
  previous = jnp.concatenate([jnp.zeros_like(ids[:, :1]), ids[:, :-1]], axis=1)
  return active & jnp.any(ids != previous, axis=-1)


def route(feature_ids: Array, max_segments: int = 1) -> Routing:
  """Finds each row's runs of equal ids, with min(max_segments, L) slots.

  Args:
    feature_ids: int [B, L, G] per-token ids (0 = no feature).
    max_segments: S, the most runs (packed examples) a row may hold.

  Returns:
    The `Routing` of the batch.
  """
  ids = jnp.asarray(feature_ids).astype(jnp.int32)
  batch, length, _ = ids.shape
  num_slots = max(1, min(int(max_segments), length))
  starts = _run_starts(ids)
  run = jnp.cumsum(starts, axis=1) - 1  # [B, L]; -1 before the first run
  token_slot = jnp.clip(run, 0, num_slots - 1)
  first = jnp.where(starts & (run < num_slots), run, num_slots)  # S: dropped
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, length))
  slot_ids = jnp.zeros((batch, num_slots, ids.shape[-1]), ids.dtype)
  slot_ids = slot_ids.at[rows, first].set(ids, mode="drop")
  max_runs = jnp.max(jnp.sum(starts, axis=1))
  return Routing(ids, slot_ids, token_slot, max_runs)


def count_runs(feature_ids: np.ndarray) -> np.ndarray:
  """int [B]: runs of equal, non-zero ids in each row (host side, numpy)."""
  ids = np.asarray(feature_ids)
  active = np.any(ids != features_lib.NO_FEATURE, axis=-1)
  previous = np.concatenate([np.zeros_like(ids[:, :1]), ids[:, :-1]], axis=1)
  return np.sum(active & np.any(ids != previous, axis=-1), axis=1)


class ValueChunks(NamedTuple):
  """One group's tokens sorted by value and cut into chunks of one value.

  Every value's tokens fill ceil(count / C) chunks of C token positions; the
  rest of a value's last chunk, and unused chunks, are padding. The last
  position (N * C - 1) is always padding: absent tokens point there.

  Attributes:
    token: int [N * C] the token at each chunk position (any token where
      `valid` is False).
    position: int [T] each token's chunk position (N * C - 1 if absent).
    value: int [N] each chunk's id (0 for unused chunks).
    valid: bool [N, C] positions holding a token.
  """

  token: Array
  position: Array
  value: Array
  valid: Array


def chunk_count(num_tokens: int, max_values: int, chunk: int) -> int:
  """N: chunks that always suffice, with one left over as padding.

  Sum over values of ceil(count_v / C) < T / C + U for U present values.
  """
  return math.ceil(num_tokens / chunk) + max_values


def value_chunks(
    ids: Array, num_values: int, max_values: int, chunk: int
) -> ValueChunks:
  """Sorts tokens by value into chunks (see `ValueChunks`).

  Args:
    ids: int [T] one group's id per token (0 = absent).
    num_values: V, ids are in [0, V].
    max_values: U, at most this many distinct non-zero ids occur.
    chunk: C, tokens per chunk.
  """
  num_tokens = ids.shape[0]
  num_chunks = chunk_count(num_tokens, max_values, chunk)
  order = jnp.argsort(ids, stable=True)
  counts = jnp.bincount(ids, length=num_values + 1)  # [V + 1]
  sorted_start = jnp.cumsum(counts) - counts  # of each id's tokens in `order`
  chunks = (counts.at[0].set(0) + chunk - 1) // chunk  # absent: no chunks
  chunk_end = jnp.cumsum(chunks)
  chunk_start = chunk_end - chunks
  n = jnp.arange(num_chunks)
  value = jnp.sum(chunk_end[None, :] <= n[:, None], axis=1)  # V + 1: unused
  used = value <= num_values
  value = jnp.where(used, value, 0)
  within = (n - chunk_start[value])[:, None] * chunk + jnp.arange(chunk)
  valid = used[:, None] & (within < counts[value][:, None])  # [N, C]
  sorted_index = jnp.clip(sorted_start[value][:, None] + within, 0, None)
  token = order[jnp.minimum(sorted_index, num_tokens - 1)].reshape(-1)
  rank = (
      jnp.zeros(num_tokens, order.dtype)
      .at[order]
      .set(jnp.arange(num_tokens, dtype=order.dtype))
  )
  position = jnp.where(
      ids > 0,
      chunk_start[ids] * chunk + rank - sorted_start[ids],
      num_chunks * chunk - 1,
  )
  return ValueChunks(token, position, value, valid)


def check_max_segments(feature_ids: np.ndarray, max_segments: int) -> None:
  """Raises if a row holds more runs of feature ids than `max_segments`.

  Args:
    feature_ids: int [B, L, G] numpy ids of a batch (host side).
    max_segments: the layers' `max_segments`.
  """
  runs = count_runs(feature_ids)
  if runs.size and runs.max() > max_segments:
    raise ValueError(
        f"A batch row packs {int(runs.max())} examples with different "
        f"features, but the FLix layers have max_segments={max_segments} "
        "slots per row. Set MAX_SEGMENTS (gin) to at least the number of "
        "examples packed per row."
    )
