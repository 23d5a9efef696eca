"""One featurized SeqIO task per feature combination, from in-memory examples.

The studies of scripts/reproduce.py (the numbers mixture, any featurized
JSONL) evaluate per feature combination, e.g. per (task, language) pair, and
hold some combinations out of training. `register` turns examples grouped by
combination into:

  <prefix>_<combination>      one task per combination (all splits it has)
  <train_mixture>             the combinations with train examples that are
                              not held out (training)
  <eval_mixture>              every combination (evaluation)
  <single_mixtures>[value]    for each value of the first group (e.g. a task),
                              its training combinations (Figure 2's
                              "multilingual-only" runs)

Mixture rates are the combinations' train-example counts, so a mixture
samples every training example equally often.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from flix import featurized
from flix_tasks import metrics

Combination = tuple[str, ...]  # Values in `groups` order ("" = absent).
ExamplesFn = Callable[[Combination, str], Sequence[tuple[str, str]]]
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Registration:
  """What `register` registered.

  Attributes:
    groups: the feature groups, e.g. `("task", "language")`.
    pairs: every registered combination (values in `groups` order).
    held_out: the combinations left out of training (zero-shot).
    task_names: `{combination: seqio task name}`.
    train_mixture: name of the training mixture.
    eval_mixture: name of the mixture of every combination.
    multilingual_mixtures: `{value of groups[0]: mixture of its training
      combinations}`.
    num_examples: `{combination: {split: examples}}`.
    examples: `(combination, split) -> [(inputs, targets)]`, the texts.
  """

  groups: tuple[str, ...]
  pairs: tuple[Combination, ...]
  held_out: tuple[Combination, ...]
  task_names: dict[Combination, str]
  train_mixture: str
  eval_mixture: str
  multilingual_mixtures: dict[str, str]
  num_examples: dict[Combination, dict[str, int]]
  examples: ExamplesFn = dataclasses.field(compare=False, repr=False)

  @property
  def train_pairs(self) -> tuple[Combination, ...]:
    return tuple(p for p in self.pairs if p not in self.held_out)

  def features(self, combination: Combination) -> dict[str, str]:
    """`{group: value}` of a combination (absent groups left out)."""
    return {g: v for g, v in zip(self.groups, combination) if v}


def task_suffix(combination: Combination) -> str:
  """A SeqIO-safe name part for a combination: `cardinal_en`."""
  return "_".join(re.sub(r"[^\w.-]", "-", v or "none") for v in combination)


def _dataset_fn(
    split: str,
    shuffle_files: bool = False,
    seed: Optional[int] = None,
    *,
    examples_fn: ExamplesFn,
    combination: Combination,
) -> tf.data.Dataset:
  del shuffle_files, seed  # Deterministic; the Task shuffles examples.
  pairs = examples_fn(combination, split)
  return tf.data.Dataset.from_tensor_slices(
      {
          name: tf.constant([p[i] for p in pairs], tf.string, [len(pairs)])
          for i, name in enumerate(("inputs", "targets"))
      }
  )


def register(
    prefix: str,
    groups: Sequence[str],
    num_examples: Mapping[Combination, Mapping[str, int]],
    examples_fn: ExamplesFn,
    held_out: Sequence[Combination] = (),
    vocabulary: Optional[seqio.Vocabulary] = None,
    suffix: str = "",
    metric_fns: Optional[Sequence[Callable[..., dict]]] = None,
) -> Registration:
  """Registers a task per combination and the mixtures (replacing any).

  Args:
    prefix: task and mixture names start with it (`numbers`).
    groups: feature group of each position of a combination.
    num_examples: `{combination: {split: count}}`; a split with no examples
      is left out of that task.
    examples_fn: `(combination, split) -> [(inputs, targets)]`, called when
      a dataset is built (so registering stays cheap).
    held_out: combinations kept out of the training mixtures.
    vocabulary: of inputs and targets (bytes by default).
    suffix: appended to every name, for variants.
    metric_fns: default exact match and CER.

  Returns:
    A `Registration`.
  """
  groups = tuple(groups)
  vocabulary = vocabulary or seqio.ByteVocabulary()
  features = {
      name: seqio.Feature(vocabulary=vocabulary, add_eos=True)
      for name in ("inputs", "targets")
  }
  metric_fns = metrics.DEFAULT_METRIC_FNS if metric_fns is None else metric_fns
  pairs = tuple(num_examples)
  held = tuple(p for p in pairs if p in set(map(tuple, held_out)))
  names, counts = {}, {}
  for combination in pairs:
    sizes = {s: n for s, n in num_examples[combination].items() if n}
    name = f"{prefix}_{task_suffix(combination)}{suffix}"
    source = seqio.FunctionDataSource(
        dataset_fn=functools.partial(
            _dataset_fn, examples_fn=examples_fn, combination=combination
        ),
        splits=tuple(sizes),
        num_input_examples=sizes,
    )
    featurized.add_task(
        name,
        source=source,
        preprocessors=featurized.text_preprocessors(),
        output_features=features,
        metric_fns=metric_fns,
        features={g: v for g, v in zip(groups, combination) if v},
    )
    names[combination] = name
    counts[combination] = dict(num_examples[combination])

  train_pairs = [p for p in pairs if p not in held and counts[p].get("train")]
  if not train_pairs:
    raise ValueError(f"{prefix}: no combination is left for training.")

  def _rated(selected):
    return [(names[p], counts[p].get("train") or 1) for p in selected]

  train_mixture = f"{prefix}_multitask{suffix}"
  eval_mixture = f"{prefix}_multitask_eval{suffix}"
  featurized.add_mixture(train_mixture, _rated(train_pairs))
  featurized.add_mixture(eval_mixture, _rated(pairs))
  single = {}
  for value in dict.fromkeys(p[0] for p in train_pairs):
    single[value] = f"{prefix}_multilingual_{task_suffix((value,))}{suffix}"
    featurized.add_mixture(
        single[value], _rated([p for p in train_pairs if p[0] == value])
    )
  return Registration(
      groups=groups,
      pairs=pairs,
      held_out=held,
      task_names=names,
      train_mixture=train_mixture,
      eval_mixture=eval_mixture,
      multilingual_mixtures=single,
      num_examples=counts,
      examples=examples_fn,
  )
