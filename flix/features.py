"""The feature space: feature groups, their value vocabularies, ids, dropout.

Every example carries features, grouped (by default `task` and `language`).
An example has at most one value per group; a group may be absent. Each value
of each group owns one low-rank adapter in every adapted layer (see
`flix.layers`). This module turns `{group: value}` dicts into integer ids and
implements feature dropout.

Id convention (per group): 0 means "no feature" (absent, unknown, or dropped);
value `i` of the group's ordered `values` has id `i + 1`.

Shapes: B batch, L length, G number of groups, S segment slots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NO_FEATURE = 0


@dataclasses.dataclass(frozen=True)
class FeatureGroup:
  """One feature group, e.g. `language`, with its ordered values.

  Attributes:
    name: group name, e.g. "task".
    values: ordered value names; the order fixes adapter indices.
    rank: LoRA rank r_g of this group's adapters.
    alpha: LoRA alpha; scale s = alpha / r_v (or alpha / sqrt(r_v) with
      rsLoRA), r_v the value's rank. Defaults to the group's `rank` (scale 1
      for values without a rank override).
    dropout: probability p_g of dropping this group's feature of an example
      during training.
    value_ranks: optional per-value rank overrides `((value, rank), ...)`.
      Adapters are stored padded to `max_rank`; columns past a value's rank
      are masked to zero.
    default: a value applied when an example lacks the group (or carries an
      unknown value). `None` (the FLix default) means "no feature". Plain
      LoRA is a group with one value that is its own default.
  """

  name: str
  values: tuple[str, ...]
  rank: int = 8
  alpha: Optional[float] = None
  dropout: float = 0.0
  value_ranks: tuple[tuple[str, int], ...] = ()
  default: Optional[str] = None

  def __post_init__(self):
    object.__setattr__(self, "values", tuple(self.values))
    object.__setattr__(
        self,
        "value_ranks",
        tuple((str(v), int(r)) for v, r in self.value_ranks),
    )
    if not self.name or not self.name.replace("_", "").isalnum():
      raise ValueError(
          f"Feature group name {self.name!r} must be alphanumeric."
      )
    if not self.values:
      raise ValueError(f"Feature group {self.name!r} has no values.")
    if len(set(self.values)) != len(self.values):
      raise ValueError(f"Feature group {self.name!r} has duplicate values.")
    if self.rank < 1:
      raise ValueError(f"Feature group {self.name!r}: rank must be >= 1.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(
          f"Feature group {self.name!r}: dropout must be in [0, 1), "
          f"got {self.dropout}."
      )
    for value, value_rank in self.value_ranks:
      if value not in self.values:
        raise ValueError(
            f"Feature group {self.name!r}: rank override for unknown value "
            f"{value!r}."
        )
      if value_rank < 1:
        raise ValueError(f"Feature group {self.name!r}: rank of {value!r} < 1.")
    if self.default is not None and self.default not in self.values:
      raise ValueError(
          f"Feature group {self.name!r}: default {self.default!r} is not one "
          f"of its values."
      )

  @property
  def num_values(self) -> int:
    return len(self.values)

  @property
  def max_rank(self) -> int:
    """R, the stored (padded) adapter rank: the largest rank in use."""
    return max(self.rank_of(v) for v in self.values)

  def rank_of(self, value: str) -> int:
    return dict(self.value_ranks).get(value, self.rank)

  def index(self, value: str) -> int:
    """0-based adapter index of `value` (raises ValueError if unknown)."""
    return self.values.index(value)

  @property
  def default_id(self) -> int:
    """The id an example lacking this group gets (`NO_FEATURE` unless the
    group has a default value)."""
    return NO_FEATURE if self.default is None else self.index(self.default) + 1


_warned_unknown: set[tuple[str, str]] = set()


@dataclasses.dataclass(frozen=True)
class FeatureSpace:
  """Ordered feature groups; the vocabulary saved with every checkpoint."""

  groups: tuple[FeatureGroup, ...]
  rslora: bool = False

  def __post_init__(self):
    object.__setattr__(self, "groups", tuple(self.groups))
    names = [g.name for g in self.groups]
    if len(set(names)) != len(names):
      raise ValueError(f"Duplicate feature group names: {names}.")

  # ---- Construction ----

  @classmethod
  def lora(
      cls, rank: int = 8, alpha: Optional[float] = None, rslora: bool = False
  ) -> FeatureSpace:
    """Plain LoRA: one group with one always-on value."""
    return cls(
        groups=(
            FeatureGroup(
                name="lora",
                values=("all",),
                rank=rank,
                alpha=alpha,
                default="all",
            ),
        ),
        rslora=rslora,
    )

  @classmethod
  def from_values(
      cls,
      values: Mapping[str, Sequence[str]],
      ranks: Optional[Mapping[str, int]] = None,
      alphas: Optional[Mapping[str, float]] = None,
      dropout: Optional[Mapping[str, float]] = None,
      value_ranks: Optional[Mapping[str, Mapping[str, int]]] = None,
      rslora: bool = False,
  ) -> FeatureSpace:
    """Builds a space from `{group: values}` plus per-group knobs."""
    ranks, alphas = ranks or {}, alphas or {}
    dropout, value_ranks = dropout or {}, value_ranks or {}
    groups = []
    for name, group_values in values.items():
      groups.append(
          FeatureGroup(
              name=name,
              values=tuple(group_values),
              rank=int(ranks.get(name, 8)),
              alpha=alphas.get(name),
              dropout=float(dropout.get(name, 0.0)),
              value_ranks=tuple(sorted(value_ranks.get(name, {}).items())),
          )
      )
    return cls(groups=tuple(groups), rslora=rslora)

  def extend(self, other: FeatureSpace) -> FeatureSpace:
    """This space grown by `other`'s new values and groups; old ids kept.

    Every group and value of this space keeps its position (so its id and
    its adapter rows); values of `other` that a group lacks are appended to
    it, and groups this space lacks are appended after its groups, in
    `other`'s order. Old values keep their ranks; a new value takes its rank
    in `other` (a per-value override when it is not the group's rank). The
    group's alpha and default and `rslora` are this space's (they define the
    old adapters' scales); feature dropout rates are `other`'s (a training
    setting).

    Raises:
      ValueError: `other` gives a group another default or scales by rank
        differently (`rslora`): the old adapters would change meaning.
    """
    if other.rslora != self.rslora:
      raise ValueError(
          f"Cannot extend a feature space with rslora={self.rslora} by one "
          f"with rslora={other.rslora}: the old adapters' scales would change."
      )
    other_groups = {g.name: g for g in other.groups}
    groups = []
    for group in self.groups:
      new = other_groups.get(group.name)
      if new is None:
        groups.append(group)
        continue
      if new.default != group.default:
        raise ValueError(
            f"Cannot extend feature group {group.name!r}: its default value "
            f"is {group.default!r}, the new space's is {new.default!r}."
        )
      added = tuple(v for v in new.values if v not in group.values)
      value_ranks = dict(group.value_ranks)
      value_ranks.update(
          (v, new.rank_of(v)) for v in added if new.rank_of(v) != group.rank
      )
      groups.append(
          dataclasses.replace(
              group,
              values=group.values + added,
              dropout=new.dropout,
              value_ranks=tuple(sorted(value_ranks.items())),
          )
      )
    groups += [g for g in other.groups if g.name not in self.group_names]
    return FeatureSpace(groups=tuple(groups), rslora=self.rslora)

  # ---- Queries ----

  @property
  def group_names(self) -> tuple[str, ...]:
    return tuple(g.name for g in self.groups)

  @property
  def num_groups(self) -> int:
    return len(self.groups)

  def group(self, name: str) -> FeatureGroup:
    for g in self.groups:
      if g.name == name:
        return g
    raise KeyError(f"No feature group {name!r}; groups are {self.group_names}.")

  def dropout_rates(self) -> np.ndarray:
    """Per-group dropout probabilities, float32 [G]."""
    return np.array([g.dropout for g in self.groups], np.float32)

  def scale(self, group: FeatureGroup, rank: int) -> float:
    alpha = float(group.rank if group.alpha is None else group.alpha)
    return alpha / (math.sqrt(rank) if self.rslora else rank)

  def scale_table(self, group: FeatureGroup) -> np.ndarray:
    """Per-id scale s_g (id 0 = no feature -> 0), float32 [V + 1]."""
    scales = [0.0] + [self.scale(group, group.rank_of(v)) for v in group.values]
    return np.array(scales, np.float32)

  def rank_mask(self, group: FeatureGroup) -> np.ndarray:
    """Per-id mask of the padded rank columns in use, float32 [V + 1, R]."""
    mask = np.zeros((group.num_values + 1, group.max_rank), np.float32)
    for i, value in enumerate(group.values):
      mask[i + 1, : group.rank_of(value)] = 1.0
    return mask

  def num_adapter_params(self, d_in: int, d_out: int) -> int:
    """Trainable parameters this space adds to one d_in x d_out layer."""
    return sum(g.num_values * g.max_rank * (d_in + d_out) for g in self.groups)

  # ---- Encoding ----

  def resolve(
      self, features: Mapping[str, Any], strict: bool = False
  ) -> list[tuple[FeatureGroup, str]]:
    """The (group, value) pairs whose adapters an example's features apply.

    The one rule for a feature set: a group that is absent (missing key,
    `None` or `""`) gets its default (none, except plain LoRA's always-on
    value); keys that are not groups of this space are ignored.

    Args:
      features: `{group: value}` (bytes values are decoded).
      strict: raise on an unknown value or group (export, where the user
        names the set); otherwise an unknown value warns once per
        (group, value) and counts as absent: only the known features apply.

    Returns:
      (group, value) pairs in the space's group order.

    Raises:
      ValueError: with `strict`, for a group or value the space lacks; the
        message lists the known ones.
    """
    if strict:
      unknown = [g for g in features if g not in self.group_names]
      if unknown:
        raise ValueError(
            f"Unknown feature group {unknown[0]!r}; the model's groups are: "
            f"{', '.join(self.group_names)}."
        )
    pairs = []
    for group in self.groups:
      value = features.get(group.name)
      if isinstance(value, bytes):
        value = value.decode("utf-8")
      if value is not None and value != "" and value not in group.values:
        if strict:
          raise ValueError(
              f"Unknown {group.name} value {value!r}: the model has no "
              f"adapter for it. Known {group.name} values: "
              f"{', '.join(group.values)}."
          )
        if (group.name, value) not in _warned_unknown:
          _warned_unknown.add((group.name, value))
          logging.warning(
              "Unknown %s value %r: its adapter does not exist, so only the "
              "known features apply (known values: %s).",
              group.name,
              value,
              ", ".join(group.values),
          )
        value = None
      if value is None or value == "":
        value = group.default
      if value is not None:
        pairs.append((group, value))
    return pairs

  def encode(self, features: Mapping[str, Any]) -> np.ndarray:
    """Maps an example's `{group: value}` to ids, int32 [G] (see `resolve`)."""
    ids = np.zeros((self.num_groups,), np.int32)
    index = {name: i for i, name in enumerate(self.group_names)}
    for group, value in self.resolve(features):
      ids[index[group.name]] = group.index(value) + 1
    return ids

  def decode(self, ids: Sequence[int]) -> dict[str, str]:
    """Inverse of `encode` for one example: `{group: value}` of active ids."""
    out = {}
    for group, feature_id in zip(self.groups, ids):
      if int(feature_id) != NO_FEATURE:
        out[group.name] = group.values[int(feature_id) - 1]
    return out

  # ---- Serialisation ----

  def to_dict(self) -> dict[str, Any]:
    return {
        "rslora": self.rslora,
        "groups": [
            {
                "name": g.name,
                "values": list(g.values),
                "rank": g.rank,
                "alpha": g.alpha,
                "dropout": g.dropout,
                "value_ranks": {v: r for v, r in g.value_ranks},
                "default": g.default,
            }
            for g in self.groups
        ],
    }

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpace:
    groups = tuple(
        FeatureGroup(
            name=g["name"],
            values=tuple(g["values"]),
            rank=int(g["rank"]),
            alpha=g.get("alpha"),
            dropout=float(g.get("dropout", 0.0)),
            value_ranks=tuple(sorted(g.get("value_ranks", {}).items())),
            default=g.get("default"),
        )
        for g in data["groups"]
    )
    return cls(groups=groups, rslora=bool(data.get("rslora", False)))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

  @classmethod
  def from_json(cls, text: str) -> FeatureSpace:
    return cls.from_dict(json.loads(text))

  def save(self, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
      f.write(self.to_json())

  @classmethod
  def load(cls, path: str) -> FeatureSpace:
    with open(path, encoding="utf-8") as f:
      return cls.from_json(f.read())


def lora_space(
    rank: int = 8, alpha: Optional[float] = None, rslora: bool = False
) -> FeatureSpace:
  """Plain LoRA as a feature space (a function, so gin can bind it)."""
  return FeatureSpace.lora(rank=rank, alpha=alpha, rslora=rslora)


# ---- Feature dropout (pure JAX) ----


def sample_feature_keep(
    rng: jax.Array, batch_size: int, num_segments: int, rates: jax.Array
) -> jax.Array:
  """Draws which (example, group) features survive dropout.

  Args:
    rng: PRNG key.
    batch_size: B.
    num_segments: S, segment slots per row (> max segment id); 1 if unpacked.
    rates: per-group drop probabilities [G].

  Returns:
    keep mask, bool [B, S, G]; slot s holds packed segment s of the row.
  """
  rates = jnp.asarray(rates, jnp.float32)
  u = jax.random.uniform(rng, (batch_size, num_segments, rates.shape[0]))
  return u >= rates


def apply_feature_keep(
    feature_ids: jax.Array,
    keep: jax.Array,
    segment_ids: Optional[jax.Array] = None,
) -> jax.Array:
  """Zeroes the dropped features of every token.

  Args:
    feature_ids: int [B, L, G] per-token ids.
    keep: bool [B, S, G] from `sample_feature_keep`.
    segment_ids: int [B, L] packed segment of each token, or None (unpacked:
      every token uses slot 0).

  Returns:
    int [B, L, G] ids, 0 where the token's example dropped the feature.
  """
  if segment_ids is None:
    token_keep = keep[:, :1, :]  # [B, 1, G] broadcast over L
  else:
    slot = jnp.clip(segment_ids, 0, keep.shape[1] - 1)
    token_keep = jnp.take_along_axis(keep, slot[..., None], axis=1)
  return jnp.where(token_keep, feature_ids, NO_FEATURE)


def feature_dropout(
    feature_ids: jax.Array,
    rng: jax.Array,
    rates: jax.Array,
    segment_ids: Optional[jax.Array] = None,
) -> jax.Array:
  """Drops each example's feature of group g with probability rates[g].

  One draw per (example, group): all tokens of an example (and, with the same
  rng and segment ids, its encoder and decoder tokens alike) lose the same
  features. See `sample_feature_keep` / `apply_feature_keep` to share one draw
  between encoder and decoder ids of different lengths.
  """
  batch, length = feature_ids.shape[0], feature_ids.shape[1]
  keep = sample_feature_keep(rng, batch, length + 1, rates)
  return apply_feature_keep(feature_ids, keep, segment_ids)
