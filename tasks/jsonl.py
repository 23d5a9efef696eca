"""Bring-your-own featurized JSONL tasks.

One JSON object per line:

  {"inputs": "...", "targets": "...", "features": {"task": "qa", "language": "sw"}}

`features` may name any groups; a line without a group (or with `null` or "")
lacks that feature. Blank lines are skipped. A malformed line raises a
`ValueError` naming `file:line` and the problem (the format and its checks:
`flix.jsonl_records`).

`register_jsonl_task` scans the files once when it is called: it validates
every line and records the feature values (all splits: they enter the feature
vocabulary) and the feature combinations of the training split (for
`flix.featurized.seen_pairs`). Nothing is registered at import; entry
points and gin configs call `register_jsonl_task`.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import seqio
import tensorflow as tf

from flix import featurized
from flix import jsonl_records
from flix_tasks import metrics

Patterns = Union[str, Sequence[str]]


def resolve_files(patterns: Patterns, what: str = "") -> list[str]:
  """Sorted files matching a glob pattern (or several; comma-separated OK).

  Raises:
    ValueError: a pattern matches no file (`what` names the pattern's use,
      e.g. "the train split of JSONL task 'byo_jsonl'").
  """
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p.strip()]
  files = []
  for pattern in patterns:
    matches = sorted(tf.io.gfile.glob(pattern.strip()))
    if not matches:
      raise ValueError(
          f"No file matches {pattern.strip()!r}"
          + (f" ({what})" if what else "")
          + "."
      )
    files.extend(matches)
  return files


def read_examples(files: Sequence[str]) -> Iterator[jsonl_records.Record]:
  """Parses every non-blank line of `files`, in order."""
  for path in files:
    yield from jsonl_records.read_records(path)


@dataclasses.dataclass
class _Scan:
  num_examples: int = 0
  values: dict[str, set[str]] = dataclasses.field(default_factory=dict)
  combinations: set[frozenset] = dataclasses.field(default_factory=set)


def _scan(files: Sequence[str]) -> _Scan:
  scan = _Scan()
  for path in files:
    before = scan.num_examples
    for example in jsonl_records.read_records(path):
      scan.num_examples += 1
      for group, value in example.features.items():
        scan.values.setdefault(group, set()).add(value)
      scan.combinations.add(frozenset(example.features.items()))
    if scan.num_examples == before:
      raise ValueError(f"{path}: no examples (the file is empty or blank).")
  return scan


def _dataset_fn(
    split: str,
    shuffle_files: bool = False,
    seed: Optional[int] = None,
    *,
    files: dict[str, list[str]],
    groups: tuple[str, ...],
) -> tf.data.Dataset:
  """Streams a split's examples with one `feature_<group>` per group."""
  split_files = list(files[split])
  if shuffle_files and len(split_files) > 1:
    random.Random(seed).shuffle(split_files)

  def _generate():
    for example in read_examples(split_files):
      row = {"inputs": example.inputs, "targets": example.targets}
      for group in groups:
        row[featurized.feature_key(group)] = example.features.get(group, "")
      yield row

  signature = {
      key: tf.TensorSpec([], tf.string)
      for key in ["inputs", "targets"]
      + [featurized.feature_key(g) for g in groups]
  }
  return tf.data.Dataset.from_generator(_generate, output_signature=signature)


def register_jsonl_task(
    name: str,
    train_pattern: Optional[Patterns] = None,
    validation_pattern: Optional[Patterns] = None,
    test_pattern: Optional[Patterns] = None,
    vocabulary: Optional[seqio.Vocabulary] = None,
    metric_fns: Optional[Sequence[Callable[..., Any]]] = None,
    add_eos: bool = True,
    postprocess_fn: Optional[Callable[..., Any]] = None,
) -> seqio.Task:
  """Registers (or replaces) a featurized SeqIO task read from JSONL files.

  Args:
    name: task name.
    train_pattern: glob(s) of the training files.
    validation_pattern: glob(s) of the validation files (optional).
    test_pattern: glob(s) of the test files (optional).
    vocabulary: inputs and targets vocabulary; default `seqio.ByteVocabulary`.
    metric_fns: SeqIO metric functions; default exact match and CER.
    add_eos: append EOS to inputs and targets.
    postprocess_fn: SeqIO postprocessing function.

  Returns:
    The registered `seqio.Task`.

  Raises:
    ValueError: no split given, a pattern matches no file, or a malformed line
      (the message names `file:line`).
  """
  patterns = {
      "train": train_pattern,
      "validation": validation_pattern,
      "test": test_pattern,
  }
  files = {
      split: resolve_files(p, f"the {split} files of JSONL task {name!r}")
      for split, p in patterns.items()
      if p is not None
  }
  if not files:
    raise ValueError(f"JSONL task {name!r}: give at least one file pattern.")
  scans = {split: _scan(split_files) for split, split_files in files.items()}

  values: dict[str, set[str]] = {}
  for scan in scans.values():
    for group, group_values in scan.values.items():
      values.setdefault(group, set()).update(group_values)
  groups = featurized.order_groups(values)
  # Combinations seen in training: those of the train split, if any.
  combos_split = "train" if "train" in scans else next(iter(scans))
  combinations = [dict(c) for c in scans[combos_split].combinations]

  vocabulary = vocabulary or seqio.ByteVocabulary()
  output_features = {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=add_eos),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=add_eos),
  }
  preprocessors = featurized.text_preprocessors(add_eos)
  source = seqio.FunctionDataSource(
      dataset_fn=functools.partial(_dataset_fn, files=files, groups=groups),
      splits=tuple(files),
      num_input_examples={s: scan.num_examples for s, scan in scans.items()},
  )
  return featurized.add_task(
      name,
      source=source,
      preprocessors=preprocessors,
      output_features=output_features,
      metric_fns=(
          metrics.DEFAULT_METRIC_FNS if metric_fns is None else metric_fns
      ),
      feature_values={g: sorted(values[g]) for g in groups},
      feature_combinations=combinations,
      postprocess_fn=postprocess_fn,
  )


def jsonl_task(name: str, **kwargs: Any) -> str:
  """Registers a JSONL task (see `register_jsonl_task`) and returns its name.

  For gin: `MIXTURE_OR_TASK_NAME = @jsonl.jsonl_task()` registers the files
  given by macros before anything looks the task up.
  """
  register_jsonl_task(name, **kwargs)
  return name
