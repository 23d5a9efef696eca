"""Featurized SeqIO tasks: every example names its FLix features.

Besides `inputs` / `targets` (and their `*_pretokenized` copies), every example
of a featurized task carries one string scalar per feature group, named
`feature_<group>` (e.g. `feature_task`, `feature_language`); the empty string
means the example lacks that group. `flix.feature_converter.FlixFeatureConverter`
turns these strings into per-token adapter ids.

This module keeps a small registry next to SeqIO's: for every featurized task,
the feature values it can emit and the feature combinations it contains. From
it come a task's or mixture's feature vocabulary (`feature_values`,
`feature_space`) and the combinations seen in training (`seen_pairs`), which
mark zero-shot results.

Register tasks with `add_task` and mixtures with `add_mixture`: SeqIO's plain
`Mixture` keeps only `output_features` keys, which would drop the feature
strings; `FeaturizedMixture` keeps them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import (
    Any,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Optional,
    Sequence,
    Union,
)

import seqio
import tensorflow as tf

from flix import features as features_lib

FEATURE_PREFIX = "feature_"
# Groups listed first, in this order; any other group follows alphabetically.
LEADING_GROUPS = ("task", "language")

FeatureCombination = frozenset  # frozenset of (group, value) pairs.
_NumberOrMapping = Union[None, float, Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class TaskFeatures:
  """What a featurized task can emit.

  Attributes:
    values: `{group: sorted values}`.
    combinations: the feature combinations its examples carry, each a
      frozenset of `(group, value)` pairs (absent groups left out).
  """

  values: Mapping[str, tuple[str, ...]]
  combinations: frozenset[FeatureCombination]


_TASK_FEATURES: dict[str, TaskFeatures] = {}


# ---- Names and ordering ----


def feature_key(group: str) -> str:
  """The example key that holds `group`'s value, e.g. `feature_language`."""
  return FEATURE_PREFIX + group


def order_groups(groups: Iterable[str]) -> tuple[str, ...]:
  """Deterministic group order: `task`, `language`, then alphabetical."""
  groups = set(groups)
  leading = [g for g in LEADING_GROUPS if g in groups]
  return tuple(leading + sorted(groups - set(leading)))


def _check_group_name(group: str) -> None:
  if not isinstance(group, str) or not group.replace("_", "").isalnum():
    raise ValueError(
        f"Feature group name {group!r} must be a non-empty alphanumeric "
        "string (underscores allowed)."
    )


def _check_value(group: str, value: Any) -> None:
  if not isinstance(value, str) or not value:
    raise ValueError(
        f"Feature {group!r} must have a non-empty string value, got "
        f"{value!r}."
    )


# ---- Preprocessors ----


def add_constant_features(
    dataset: tf.data.Dataset, features: Mapping[str, str]
) -> tf.data.Dataset:
  """Adds `feature_<group>` = value to every example (a SeqIO preprocessor)."""
  constants = {feature_key(g): str(v) for g, v in features.items()}

  def _add(example):
    example = dict(example)
    for key, value in constants.items():
      example[key] = tf.constant(value, tf.string)
    return example

  return dataset.map(_add, num_parallel_calls=tf.data.AUTOTUNE)


def fill_missing_features(
    dataset: tf.data.Dataset, groups: Sequence[str]
) -> tf.data.Dataset:
  """Adds `feature_<group>` = "" (absent) for every missing group."""
  missing = [
      feature_key(g)
      for g in groups
      if feature_key(g) not in dataset.element_spec
  ]
  if not missing:
    return dataset

  def _fill(example):
    example = dict(example)
    for key in missing:
      example[key] = tf.constant("", tf.string)
    return example

  return dataset.map(_fill, num_parallel_calls=tf.data.AUTOTUNE)


# ---- Registration ----


def text_preprocessors(add_eos: bool = True) -> list[Any]:
  """The baseline's text pipeline: tokenize, cache placeholder, (count the
  examples longer than the feature lengths), EOS."""
  preprocessors = [
      seqio.preprocessors.tokenize,
      seqio.CacheDatasetPlaceholder(),
      functools.partial(count_truncated, add_eos=add_eos),
  ]
  if add_eos:
    preprocessors.append(seqio.preprocessors.append_eos_after_trim)
  return preprocessors


# ---- Truncation counts ----

_KEYS = ("inputs", "targets")
# The counters of the datasets built inside `count_truncation()` blocks.
_ACTIVE_COUNTERS: list["TruncationCounter"] = []


class TruncationCounter:
  """How many examples of the datasets built while it was active were read,
  and how many had inputs / targets longer than their feature length.

  The counts are tf.Variables, so the tf.data pipeline counts as it reads.
  """

  def __init__(self):
    self.variables = {
        name: tf.Variable(0, dtype=tf.int64, trainable=False)
        for name in ("examples",) + _KEYS
    }

  def counts(self) -> dict[str, int]:
    """`{'examples': n, 'inputs': i, 'targets': t}` read so far."""
    return {k: int(v.numpy()) for k, v in self.variables.items()}


@contextlib.contextmanager
def count_truncation() -> Iterator[TruncationCounter]:
  """`with count_truncation() as counter:` datasets of featurized text tasks
  built in the block count into `counter` (see `count_truncated`)."""
  counter = TruncationCounter()
  _ACTIVE_COUNTERS.append(counter)
  try:
    yield counter
  finally:
    _ACTIVE_COUNTERS.remove(counter)


def describe_truncations(
    counters: Sequence[tuple[str, TruncationCounter]],
    lengths: Mapping[str, int],
    what: str,
) -> Optional[str]:
  """One line saying how many of `what` (the examples the `(task name,
  counter)` pairs counted) were truncated, naming the tasks; None if none."""
  counts = [(name, counter.counts()) for name, counter in counters]
  total = {k: sum(c[k] for _, c in counts) for k in ("examples",) + _KEYS}
  parts = []
  for key in _KEYS:
    if total[key]:
      tasks = sorted(
          ((c[key], name) for name, c in counts if c[key]), reverse=True
      )
      named = ", ".join(f"{name} {n}" for n, name in tasks[:3])
      more = f", ... ({len(tasks)} tasks)" if len(tasks) > 3 else ""
      parts.append(
          f"{total[key]} had {key} longer than TASK_FEATURE_LENGTHS['{key}']"
          f" = {lengths[key]} tokens ({named}{more})"
      )
  if not parts:
    return None
  return (
      f"Of {total['examples']} {what}, "
      + " and ".join(parts)
      + "; they are truncated (raise TASK_FEATURE_LENGTHS to keep them)."
  )


def count_truncated(
    dataset: tf.data.Dataset,
    sequence_length: Optional[Mapping[str, int]] = None,
    add_eos: bool = True,
) -> tf.data.Dataset:
  """Counts, into the active `count_truncation()` counter, the examples whose
  tokens the next step (`append_eos_after_trim`, or the feature converter)
  will truncate to `sequence_length` (a SeqIO preprocessor; the data is
  unchanged)."""
  if not sequence_length or not _ACTIVE_COUNTERS:
    return dataset
  variables = _ACTIVE_COUNTERS[-1].variables
  limits = {
      key: int(sequence_length[key]) - (1 if add_eos else 0)
      for key in _KEYS
      if sequence_length.get(key)
  }

  def _count(example):
    updates = [variables["examples"].assign_add(1)]
    for key, limit in limits.items():
      if key in example:
        longer = tf.size(example[key]) > limit
        updates.append(variables[key].assign_add(tf.cast(longer, tf.int64)))
    with tf.control_dependencies(updates):
      return {k: tf.identity(v) for k, v in example.items()}

  return dataset.map(_count)


def add_task(
    name: str,
    source: seqio.DataSource,
    preprocessors: Sequence[Callable[..., tf.data.Dataset]],
    output_features: Mapping[str, seqio.Feature],
    metric_fns: Sequence[Callable[..., Any]] = (),
    features: Optional[Mapping[str, str]] = None,
    feature_values: Optional[Mapping[str, Sequence[str]]] = None,
    postprocess_fn: Optional[Callable[..., Any]] = None,
    feature_combinations: Optional[Iterable[Mapping[str, str]]] = None,
    **task_kwargs,
) -> seqio.Task:
  """Registers (or replaces) a featurized `seqio.Task`.

  Args:
    name: task name.
    source: its data source.
    preprocessors: SeqIO preprocessors (tokenization, EOS, ...).
    output_features: `{"inputs": Feature, "targets": Feature}`.
    metric_fns: SeqIO metric functions `fn(targets, predictions)`.
    features: constant features of every example, `{group: value}`; a
      preprocessor that adds them is appended to `preprocessors`.
    feature_values: for tasks whose examples carry their own
      `feature_<group>` strings (e.g. JSONL): `{group: values}` they can emit.
    postprocess_fn: SeqIO postprocessing function.
    feature_combinations: the `{group: value}` combinations the examples
      carry; defaults to `features` for constant-feature tasks.
    **task_kwargs: passed on to `seqio.Task` (e.g. `shuffle_buffer_size`).

  Returns:
    The registered task.
  """
  features = dict(features or {})
  values: dict[str, set[str]] = {}
  for group, value in features.items():
    _check_group_name(group)
    _check_value(group, value)
    values.setdefault(group, set()).add(value)
  for group, group_values in (feature_values or {}).items():
    _check_group_name(group)
    if isinstance(group_values, str):
      raise ValueError(
          f"feature_values[{group!r}] must be a sequence of strings, not a "
          "string."
      )
    for value in group_values:
      _check_value(group, value)
    values.setdefault(group, set()).update(group_values)

  combinations = set()
  if feature_combinations is not None:
    for combo in feature_combinations:
      combinations.add(frozenset((g, v) for g, v in combo.items() if v))
  elif features:
    combinations.add(frozenset(features.items()))

  preprocessors = list(preprocessors)
  if features:
    preprocessors.append(
        functools.partial(add_constant_features, features=features)
    )
  if set(values) - set(features):
    # Every example carries every group of the task, "" where absent.
    preprocessors.append(
        functools.partial(fill_missing_features, groups=tuple(values))
    )

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  task = seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=preprocessors,
      output_features=output_features,
      metric_fns=list(metric_fns),
      postprocess_fn=postprocess_fn,
      **task_kwargs,
  )
  _TASK_FEATURES[name] = TaskFeatures(
      values={g: tuple(sorted(values[g])) for g in order_groups(values)},
      combinations=frozenset(combinations),
  )
  return task


class FeaturizedMixture(seqio.Mixture):
  """A `seqio.Mixture` that keeps its tasks' `feature_<group>` strings.

  Every sub-task dataset gets every feature group of the mixture (empty
  string where a task lacks a group), so they share one structure and can be
  sampled together.
  """

  def get_task_dataset(
      self, task: seqio.Task, output_feature_keys, *args, **kwargs
  ) -> tf.data.Dataset:
    groups = tuple(_union_values(t.name for t in self.tasks))
    keys = set(output_feature_keys) | {feature_key(g) for g in groups}
    dataset = super().get_task_dataset(task, keys, *args, **kwargs)
    return fill_missing_features(dataset, groups)


def add_mixture(
    name: str,
    tasks: Sequence[Union[str, tuple[str, float]]],
    default_rate: Optional[Union[float, Callable[[seqio.Task], float]]] = 1.0,
    **mixture_kwargs,
) -> seqio.Mixture:
  """Registers (or replaces) a `FeaturizedMixture` of featurized tasks.

  Args:
    name: mixture name.
    tasks: task or mixture names, or `(name, rate)` pairs.
    default_rate: rate of tasks given without one (a number or a function of
      the task, e.g. `seqio.mixing_rate_num_examples`).
    **mixture_kwargs: passed on to `seqio.Mixture`.

  Returns:
    The registered mixture.
  """
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(
      name,
      tasks,
      default_rate=default_rate,
      mixture_cls=FeaturizedMixture,
      **mixture_kwargs,
  )


# ---- Queries ----


def _leaf_task_names(mixture_or_task_name: str) -> list[str]:
  """The task itself, or all (recursive) sub-tasks of a mixture."""
  if mixture_or_task_name in seqio.TaskRegistry.names():
    return [mixture_or_task_name]
  if mixture_or_task_name in seqio.MixtureRegistry.names():
    mixture = seqio.MixtureRegistry.get(mixture_or_task_name)
    return [t.name for t in mixture.tasks]
  raise ValueError(
      f"No task or mixture named {mixture_or_task_name!r} is registered."
  )


def task_features(task_name: str) -> TaskFeatures:
  """The recorded features of one task (empty if it is not featurized)."""
  record = _TASK_FEATURES.get(task_name)
  if record is None:
    logging.warning(
        "Task %r was not registered with flix.featurized.add_task; it "
        "carries no features.",
        task_name,
    )
    return TaskFeatures(values={}, combinations=frozenset())
  return record


def feature_values(mixture_or_task_name: str) -> dict[str, tuple[str, ...]]:
  """`{group: sorted values}` over a task or all sub-tasks of a mixture.

  Groups come in a deterministic order: `task`, `language`, then the others
  alphabetically.
  """
  return _union_values(_leaf_task_names(mixture_or_task_name))


def _union_values(task_names: Iterable[str]) -> dict[str, tuple[str, ...]]:
  values: dict[str, set[str]] = {}
  for name in task_names:
    for group, group_values in task_features(name).values.items():
      values.setdefault(group, set()).update(group_values)
  return {g: tuple(sorted(values[g])) for g in order_groups(values)}


def _per_group(
    setting: _NumberOrMapping,
    groups: Sequence[str],
    known: Sequence[str],
) -> dict[str, float]:
  """A per-group setting (one value, or `{group: value}`) for `groups`.

  Entries for `known` groups left out of `groups` (e.g. `language` under a
  task-only ablation) are ignored; a group the data does not have is an error.
  """
  if setting is None:
    return {}
  if isinstance(setting, Mapping):
    unknown = set(setting) - set(known)
    if unknown:
      raise ValueError(
          f"Settings for unknown feature groups {sorted(unknown)}; groups "
          f"are {list(known)}."
      )
    return {g: v for g, v in setting.items() if g in groups}
  return {g: setting for g in groups}


def feature_space(
    mixture_or_task_name: str,
    groups: Optional[Sequence[str]] = None,
    ranks: Union[None, int, Mapping[str, int]] = None,
    alphas: _NumberOrMapping = None,
    dropout: _NumberOrMapping = None,
    rslora: bool = False,
    value_ranks: Optional[Mapping[str, Mapping[str, int]]] = None,
    grow_from: Optional[str] = None,
) -> features_lib.FeatureSpace:
  """The FLix feature space of a task or mixture.

  Args:
    mixture_or_task_name: a registered task or mixture.
    groups: groups to use, in this order (e.g. `("task",)` for task-only
      FLix); default all groups, in `feature_values` order.
    ranks: rank per group (`{group: rank}`) or one rank for all groups.
    alphas: LoRA alpha per group or for all groups (default: the rank).
    dropout: feature dropout probability per group or for all groups.
    rslora: scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
    value_ranks: per-value rank overrides, `{group: {value: rank}}`.
    grow_from: a trained run (GROW_FROM, see `flix.grow`): its saved space
      extended by this one (`FeatureSpace.extend`: its values keep their
      ids, the mixture's new values and groups are appended).

  Returns:
    A `flix.features.FeatureSpace` with sorted values per group (the saved
    run's order first, with `grow_from`).
  """
  values = feature_values(mixture_or_task_name)
  if groups is None:
    groups = tuple(values)
  else:
    if isinstance(groups, str):
      groups = (groups,)
    missing = [g for g in groups if g not in values]
    if missing:
      raise ValueError(
          f"{mixture_or_task_name!r} has no feature group(s) {missing}; its "
          f"groups are {list(values)}."
      )
    groups = tuple(groups)
  if not groups:
    raise ValueError(f"{mixture_or_task_name!r} has no feature groups.")
  space = features_lib.FeatureSpace.from_values(
      {g: values[g] for g in groups},
      ranks=_per_group(ranks, groups, values),
      alphas=_per_group(alphas, groups, values),
      dropout=_per_group(dropout, groups, values),
      value_ranks=value_ranks,
      rslora=rslora,
  )
  if grow_from:
    from flix import grow  # pylint: disable=g-import-not-at-top

    space = grow.saved_space(grow_from).extend(space)
  return space


def feature_combinations(
    mixture_or_task_name: str,
) -> frozenset[FeatureCombination]:
  """All feature combinations (frozensets of `(group, value)`) it contains."""
  combos = set()
  for name in _leaf_task_names(mixture_or_task_name):
    combos.update(task_features(name).combinations)
  return frozenset(combos)


def seen_pairs(
    mixture_name: str,
    groups: Sequence[str] = LEADING_GROUPS,
) -> set[tuple[str, ...]]:
  """The combinations of `groups` values present in a (training) mixture.

  Args:
    mixture_name: the training task or mixture.
    groups: which groups form a pair, default `("task", "language")`.

  Returns:
    `{(task, language), ...}`: value tuples in `groups` order, from every
    example combination that has all of `groups`. An evaluation example whose
    tuple is not in the set is zero-shot (see `is_seen`).
  """
  pairs = set()
  for combo in feature_combinations(mixture_name):
    combo = dict(combo)
    if all(g in combo for g in groups):
      pairs.add(tuple(combo[g] for g in groups))
  return pairs


def is_seen(
    features: Mapping[str, str],
    seen: set[tuple[str, ...]],
    groups: Sequence[str] = LEADING_GROUPS,
) -> bool:
  """Whether an example's `groups` combination was seen in training."""
  return tuple(features.get(g) for g in groups) in seen


def check_feature_values(
    mixture_or_task_name: str, space: features_lib.FeatureSpace
) -> dict[str, tuple[str, ...]]:
  """Warns about values a task or mixture emits that `space` lacks.

  Unknown values are treated as absent by the feature converter; this logs
  the same warning as `FeatureSpace.encode`, once per (group, value).

  Returns:
    `{group: unknown values}` for groups of `space` with unknown values.
  """
  unknown = {}
  values = feature_values(mixture_or_task_name)
  for group in space.groups:
    missing = tuple(
        v for v in values.get(group.name, ()) if v not in group.values
    )
    for value in missing:
      space.encode({group.name: value})  # Warns once.
    if missing:
      unknown[group.name] = missing
  return unknown
