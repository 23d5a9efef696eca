"""Growing a trained FLix run: new feature values, everything old frozen.

`GROW_FROM` (gin; `trainer.train(grow_from=...)`) names a trained FLix run
(a MODEL_DIR or one of its checkpoints, of either driver). The grow run
trains the adapters of the feature values its mixture brings that the run
lacks (a new language in `language`, a new group) and changes nothing else:

  vocabulary  the saved feature space extended by the mixture's
              (`FeatureSpace.extend`, called by `featurized.feature_space`
              with `grow_from`): old values keep their ids.
  base        the saved run's base reference (INITIAL_CHECKPOINT_PATH may
              be left unset); the base stays frozen.
  adapters    the same leaves as any run, `lora_a_<group>` [V, D, R] and
              `lora_b_<group>` [V, R, O] with V (and R) grown: the rows of
              old values hold the saved adapters (rank columns past the
              saved R are zero), new values' rows start fresh (B = 0, the
              zero state).
  optimizer   `freeze_rows`: the rows of old values get zero gradients and
              zero updates (so no weight decay, no momentum), built once
              from the saved vocabulary; only new values' rows train.
  checks      `Growth.check`: anything `run_meta.differences` finds besides
              appended values and groups (another base, model size, token
              vocabulary, trainable set, an old value's id or rank) is an
              error naming it.

Checkpoints hold the grown arrays and the base reference like any run's, so
flix.eval, flix.infer and flix.export read a grown run unchanged; its meta
records where it grew from (`grown_from`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from flix import checkpoints
from flix import features as features_lib
from flix import layers
from flix import run_meta

PyTree = Any
META_KEY = "grown_from"


class GrowMismatchError(ValueError):
  """A grow run would change what the run it grows from trained."""


def _as_dtype(array: np.ndarray, dtype: Any) -> np.ndarray:
  return np.asarray(array, dtype)


def _absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def saved_space(path: str) -> features_lib.FeatureSpace:
  """The feature space of the FLix run at `path` (GROW_FROM)."""
  return Growth.load(path).space


def training_mixtures(meta: Mapping[str, Any]) -> list[str]:
  """Every mixture a run's adapters were trained on: its own and, for a
  grown run, those of the runs it grew from."""
  own = meta.get("data", {}).get("mixture_or_task_name")
  return ([own] if own else []) + list(
      meta.get(META_KEY, {}).get("training_mixtures", [])
  )


def freeze_rows(
    optimizer: optax.GradientTransformation, frozen_values: Mapping[str, int]
) -> optax.GradientTransformation:
  """`optimizer` over adapter leaves whose first `frozen_values[group]` value
  rows never change.

  The rows' gradients are zeroed before `optimizer` (its state, clipping
  and statistics see only trained rows) and their updates replaced by -0.0
  after it: `x + -0.0 == x` bit for bit for every x (also -0.0, which
  `+ 0.0` would turn into +0.0), so weight decay or momentum never touch
  them. Leaves that are not adapters, and groups not in `frozen_values`,
  train as usual.
  """
  frozen_values = dict(frozen_values)

  def row_masks(tree):
    def mask(path, leaf):
      key = getattr(path[-1], "key", None) if path else None
      match = layers.ADAPTER_LEAF_RE.match(str(key)) if key else None
      frozen = frozen_values.get(match.group(2), 0) if match else 0
      if not frozen:
        return jnp.ones((), bool)
      rows = jnp.arange(leaf.shape[0]) >= frozen  # [V]
      return rows.reshape((-1,) + (1,) * (leaf.ndim - 1))

    return jax.tree_util.tree_map_with_path(mask, tree)

  def init(params):
    return optimizer.init(params)

  def update(grads, state, params=None):
    masks = row_masks(grads)
    grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), grads, masks)
    updates, state = optimizer.update(grads, state, params)
    updates = jax.tree.map(
        lambda u, m: jnp.where(m, u, jnp.asarray(-0.0, u.dtype)), updates, masks
    )
    return updates, state

  return optax.GradientTransformation(init, update)


def trained_param_count(
    trainable: PyTree, frozen_values: Mapping[str, int]
) -> int:
  """Parameters `freeze_rows` lets train: adapter rows of new values."""
  total = 0
  for name, leaf in traverse_util.flatten_dict(trainable, sep="/").items():
    match = layers.ADAPTER_LEAF_RE.match(name.rsplit("/", 1)[-1])
    frozen = frozen_values.get(match.group(2), 0) if match else 0
    total += (leaf.shape[0] - frozen) * int(np.prod(leaf.shape[1:]))
  return total


def _is_growth(
    difference: run_meta.Difference,
    saved: features_lib.FeatureSpace,
    now: features_lib.FeatureSpace,
) -> bool:
  """Whether a feature-space difference only appends values or groups."""
  path = difference.path
  if path == "feature_space.groups":
    return list(now.group_names[: saved.num_groups]) == list(saved.group_names)
  parts = path.split(".")
  if len(parts) != 3 or parts[0] != "feature_space":
    return False
  group, field = saved.group(parts[1]), parts[2]
  grown = now.group(parts[1])
  if field == "values":
    return grown.values[: group.num_values] == group.values
  if field == "value_ranks":
    return all(group.rank_of(v) == grown.rank_of(v) for v in group.values)
  return False


def _describe(
    difference: run_meta.Difference,
    saved: features_lib.FeatureSpace,
    now: features_lib.FeatureSpace,
) -> str:
  """`difference`, or for an old value that moved, its ids."""
  parts = difference.path.split(".")
  if difference.path.startswith("feature_space.") and parts[-1] == "values":
    old, new = saved.group(parts[1]), now.group(parts[1])
    moved = [
        f"{v!r} had id {i + 1}, now "
        + (f"{new.index(v) + 1}" if v in new.values else "absent")
        for i, v in enumerate(old.values)
        if v not in new.values or new.index(v) != i
    ]
    return f"{difference.path}: old values' ids change ({'; '.join(moved)})"
  return str(difference)


@dataclasses.dataclass(frozen=True)
class Growth:
  """The run a grow run grows: its location, meta and feature space."""

  path: str
  meta: Mapping[str, Any]

  @classmethod
  def load(cls, path: str) -> Growth:
    path = _absolute(path)
    if "://" not in path and not os.path.exists(path):
      raise FileNotFoundError(
          f"GROW_FROM {path} does not exist: give the MODEL_DIR (or one "
          "checkpoint) of a trained FLix run."
      )
    meta = checkpoints.read_meta(path)
    if not meta.get("feature_space"):
      raise ValueError(
          f"GROW_FROM {path} has no feature adapters (full fine-tuning): "
          "only a FLix or LoRA run can grow."
      )
    return cls(path, meta)

  @property
  def space(self) -> features_lib.FeatureSpace:
    return features_lib.FeatureSpace.from_dict(self.meta["feature_space"])

  @property
  def frozen_values(self) -> dict[str, int]:
    """`{group: V_old}`: the value rows `freeze_rows` keeps."""
    return {g.name: g.num_values for g in self.space.groups}

  def base_checkpoint(self, given: Optional[str]) -> Optional[str]:
    """INITIAL_CHECKPOINT_PATH of the grow run: the saved run's when not
    given (or given as another spelling of the same path)."""
    saved = self.meta.get("base", {}).get("initial_checkpoint")
    if given is None or (saved and _absolute(given) == _absolute(saved)):
      return saved
    return given

  def added_values(
      self, space: features_lib.FeatureSpace
  ) -> dict[str, tuple[str, ...]]:
    """`{group: new values}` of `space` beyond the saved one."""
    old = {g.name: g.values for g in self.space.groups}
    added = {
        g.name: tuple(v for v in g.values if v not in old.get(g.name, ()))
        for g in space.groups
    }
    return {k: v for k, v in added.items() if v}

  def check(self, current: Mapping[str, Any]) -> None:
    """Raises unless `current` (the grow run's meta) only appends values.

    Raises:
      GrowMismatchError: naming every other difference (another base, model
        config, token vocabulary, trainable set; an old value's id or rank),
        or none to train (no new value).
    """
    saved = self.space
    now = features_lib.FeatureSpace.from_dict(current["feature_space"])
    problems = [
        _describe(d, saved, now)
        for d in run_meta.differences(self.meta, current)
        if not _is_growth(d, saved, now)
    ]
    if problems:
      raise GrowMismatchError(
          f"GROW_FROM {self.path}: this run would change what it trained, "
          "and a grow run keeps its base and every old adapter as they are: "
          + "; ".join(problems)
          + ". Use the original run's base (leave INITIAL_CHECKPOINT_PATH "
          "unset), model and vocabulary gins, and the feature space from "
          "featurized.feature_space with grow_from = %GROW_FROM."
      )
    if not self.added_values(now):
      raise GrowMismatchError(
          f"GROW_FROM {self.path}: the mixture brings no feature value the "
          f"run lacks (its groups: {', '.join(saved.group_names)}); there is "
          "nothing to grow."
      )

  def optimizer(
      self, optimizer: optax.GradientTransformation
  ) -> optax.GradientTransformation:
    return freeze_rows(optimizer, self.frozen_values)

  @functools.cached_property
  def saved_adapters(self) -> dict[str, np.ndarray]:
    """The saved run's adapter leaves by '/'-joined path (per layer)."""
    saved, _ = checkpoints.read_flix_checkpoint(self.path)
    return {
        name: np.asarray(value)
        for name, value in traverse_util.flatten_dict(saved, sep="/").items()
        if layers.ADAPTER_LEAF_RE.match(name.rsplit("/", 1)[-1])
    }

  def start(self, params: PyTree) -> PyTree:
    """`params` (fresh grown adapters, and any other leaves) with the saved
    run's adapters in the old values' rows; rank columns past the saved R
    zero. Traceable (T5X's initialization jits it); concrete arrays keep
    their sharding.

    Raises:
      GrowMismatchError: the saved run has adapters `params` lacks, or one
        that does not fit in its grown leaf.
    """
    saved = self.saved_adapters
    flat = traverse_util.flatten_dict(params, sep="/")
    missing = sorted(set(saved) - set(flat))
    if missing:
      raise GrowMismatchError(
          f"GROW_FROM {self.path} has adapters this model lacks "
          f"({', '.join(missing[:3])}); check the model gin (adapter "
          "targets) against the original run's config.gin."
      )
    out = dict(flat)
    for name, old in saved.items():
      leaf = flat[name]
      if old.ndim != leaf.ndim or any(
          o > g for o, g in zip(old.shape, leaf.shape)
      ):
        raise GrowMismatchError(
            f"GROW_FROM {self.path}: {name} {old.shape} does not fit in the "
            f"grown {leaf.shape}."
        )
      traced = isinstance(leaf, jax.core.Tracer)
      if traced:
        # A host callback, not a constant: the original's adapters (GBs at
        # mT5-XL) stay out of the compiled program.
        saved_leaf = jax.pure_callback(
            functools.partial(_as_dtype, old, leaf.dtype),
            jax.ShapeDtypeStruct(old.shape, leaf.dtype),
        )
      else:
        saved_leaf = _as_dtype(old, leaf.dtype)
      grown = (
          jnp.asarray(leaf)
          .at[: old.shape[0]]
          .set(0)
          .at[tuple(slice(0, s) for s in old.shape)]
          .set(saved_leaf)
      )
      if isinstance(leaf, jax.Array) and not traced:
        grown = jax.device_put(grown, leaf.sharding)
      out[name] = grown
    return traverse_util.unflatten_dict(out, sep="/")

  def check_model_dir(self, model_dir: str) -> None:
    """Raises unless `model_dir` (the grow run's) is outside the saved run."""
    if os.path.commonpath([self.path, _absolute(model_dir)]) == _absolute(
        model_dir
    ):
      raise ValueError(
          f"GROW_FROM {self.path} is in MODEL_DIR {model_dir}: a grow run "
          "writes a new run; give it another MODEL_DIR."
      )

  def record(self) -> dict[str, Any]:
    """The grow run's meta entry `grown_from`."""
    return {
        "checkpoint": self.path,
        "step": self.meta.get("step"),
        "feature_space": dict(self.meta["feature_space"]),
        "training_mixtures": training_mixtures(self.meta),
    }

  def log(self, space: features_lib.FeatureSpace, trainable: PyTree) -> None:
    logging.info(
        "Growing %s (step %s): new values %s; training %d of %d adapter "
        "parameters, the rest (and the base) frozen.",
        self.path,
        self.meta.get("step"),
        self.added_values(space),
        trained_param_count(trainable, self.frozen_values),
        trained_param_count(trainable, {}),
    )
