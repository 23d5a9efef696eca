"""SeqIO datasets -> numpy batches for the trainer, evaluator and inference.

Part of flix's data layer (with `featurized` and `feature_converter`), the
only modules that touch seqio / tf.data; the model and the train step see
numpy batches (see `flix.models` for keys).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Mapping, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import seqio
import tensorflow as tf

from flix import feature_converter
from flix import features as features_lib

tf.config.set_visible_devices([], "GPU")  # keep TF off accelerators


class _DropUncachedSourceWarning(logging.Filter):
  """Drops seqio's per-task "uncached FunctionDataset" training warning.

  It warns that file-level shuffling is lost on restarts. flix's in-memory
  sources are deterministic and a resumed run skips the batches it already
  consumed (`train_batches`), so the warning (once per task, 34 lines for
  the numbers mixture) says nothing here.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(
        "Using an uncached FunctionDataset for training"
    )


logging.getLogger("absl").addFilter(_DropUncachedSourceWarning())


def train_batches(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    feature_space: Optional[features_lib.FeatureSpace],
    split: str = "train",
    seed: int = 0,
    pack: bool = False,
    skip_batches: int = 0,
    shuffle: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless, deterministic, host-sharded numpy batches of a mixture.

  Deterministic given `seed`, so a resumed run skips `skip_batches` batches
  and continues at exactly the same data position.
  """

  space = feature_space or features_lib.FeatureSpace(groups=())
  shard = seqio.ShardInfo(
      index=jax.process_index(), num_shards=jax.process_count()
  )
  if batch_size % jax.process_count():
    raise ValueError(
        f"Batch size {batch_size} is not divisible by the "
        f"{jax.process_count()} hosts."
    )
  dataset = seqio.get_dataset(
      mixture_or_task_name,
      task_feature_lengths=dict(task_feature_lengths),
      dataset_split=split,
      shuffle=shuffle,
      num_epochs=None,
      feature_converter=feature_converter.FlixFeatureConverter(
          space, pack=pack
      ),
      shard_info=shard,
      use_cached=False,
      seed=seed,
      batch_size=batch_size // jax.process_count(),
  )
  if skip_batches:
    dataset = dataset.skip(skip_batches)
  # Built now (not on the first next()), so a caller's
  # `featurized.count_truncation()` block sees the tasks' pipelines.
  return iter(dataset.as_numpy_iterator())


def task_examples(
    task_name: str,
    split: str,
    task_feature_lengths: Optional[Mapping[str, int]] = None,
    max_examples: Optional[int] = None,
) -> list[dict[str, Any]]:
  """The tokenized examples of one task split, in order, as numpy dicts."""
  task = seqio.get_mixture_or_task(task_name)
  dataset = task.get_dataset(
      sequence_length=dict(task_feature_lengths)
      if task_feature_lengths
      else None,
      split=split,
      shuffle=False,
      num_epochs=1,
      use_cached=False,
  )
  if max_examples:
    dataset = dataset.take(max_examples)
  return list(dataset.as_numpy_iterator())
