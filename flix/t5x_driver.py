"""What the run files bind for T5X's drivers (`python -m t5x.train|eval|infer`).

The thin driver layer between T5X's entry points and flix (the model itself
is `flix.t5x_model`); only T5X's sections of `configs/runs/*.gin` use it:

  summarize_run               T5X's `summarize_config_fn`: writes
                              MODEL_DIR/config.gin, as T5X does, and the flix
                              run info (feature vocabulary, token vocabulary,
                              network config, base reference) that
                              flix.eval, flix.infer, flix.export and T5X's
                              eval/infer read.
  task_vocabulary             the model's vocabulary: the task's (T5X checks
                              they are equal), and the run's recorded one
                              when evaluating (`flix.vocabularies`).
  base_checkpoint             INITIAL_CHECKPOINT_PATH as T5X restores it; a
                              grow run's (GROW_FROM, `flix.grow`) defaults to
                              its original's base and is checked here,
                              before T5X restores or writes anything.
  fresh_params_assignment_map the `assignment_map` restoring the base from
                              INITIAL_CHECKPOINT_PATH (a public T5X mT5
                              checkpoint): adapters, optimizer state and the
                              step start fresh (a grow run's adapters start
                              as the model initializes them: its original's
                              in the old values' rows).
  checkpoint_to_restore       CHECKPOINT_PATH (a MODEL_DIR or one
                              `checkpoint_<step>` directory) -> the step
                              directory T5X restores.
  FeaturizedResultsLogger     a seqio logger that writes flix's results rows:
                              per (task, language) metrics with the zero-shot
                              flag, table and heatmap.

Importing this module imports t5x.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio
from t5x import gin_utils as t5x_gin_utils

from flix import checkpoints
from flix import evaluation
from flix import features as features_lib
from flix import featurized
from flix import grow
from flix import layers
from flix import models
from flix import train_step
from flix import vocabularies


def summarize_run(
    model_dir: str,
    summary_writer: Any,
    step: int,
    *,
    model: models.FlixModel,
    mixture_or_task_name: str,
    trainable_patterns: train_step.TrainablePatterns = "adapters",
    initial_checkpoint_path: Optional[str] = None,
    random_seed: Optional[int] = None,
    grow_from: Optional[str] = None,
) -> None:
  """T5X's config summary plus the flix run info in MODEL_DIR (with where a
  grow run grew from).

  A restart with another feature vocabulary than the one saved is an error
  (the adapters would map to the wrong features).
  """
  t5x_gin_utils.summarize_gin_config(model_dir, summary_writer, step)
  if jax.process_index() != 0:
    return
  meta = vocabularies.run_meta(
      model,
      mixture_or_task_name,
      trainable_patterns,
      initial_checkpoint_path,
      random_seed,
      model_dir,
  )
  if grow_from:
    meta[grow.META_KEY] = grow.Growth.load(grow_from).record()
  checkpoints.write_run_info(model_dir, meta)


def base_checkpoint(
    initial_checkpoint_path: Optional[str],
    grow_from: Optional[str] = None,
    *,
    model_dir: Optional[str] = None,
    model: Optional[models.FlixModel] = None,
    mixture_or_task_name: Optional[str] = None,
    trainable_patterns: train_step.TrainablePatterns = "adapters",
    random_seed: Optional[int] = None,
) -> Optional[str]:
  """The base checkpoint T5X restores (`RestoreCheckpointConfig.path`).

  `initial_checkpoint_path` itself, except for a grow run (`grow_from`,
  GROW_FROM): its base defaults to the original run's, and the grow is
  checked against the original (`grow.Growth.check`; the model, mixture,
  trainable patterns and seed are the run's) when gin builds T5X's
  checkpoint config, before T5X restores or writes anything.

  Raises:
    grow.GrowMismatchError: the grow run would change what its original
      trained (another base, model, vocabulary, an old value's id), or
      brings no new value.
    ValueError: MODEL_DIR is inside GROW_FROM, or the original's base is
      not a T5X checkpoint (T5X restores a grow run's base from one).
  """
  if not grow_from:
    return initial_checkpoint_path
  growth = grow.Growth.load(grow_from)
  if model_dir:
    growth.check_model_dir(model_dir)
  base = growth.base_checkpoint(initial_checkpoint_path)
  if not base or not checkpoints.is_t5x_checkpoint(base):
    what = (
        f"the base {base} is not a T5X checkpoint (a checkpoint_<step> "
        "directory)"
        if base
        else "the original's base was randomly initialized (no "
        "INITIAL_CHECKPOINT_PATH), which T5X's initialization would not "
        "reproduce"
    )
    raise ValueError(
        f"GROW_FROM {growth.path}: {what}; t5x.train restores a grow run's "
        "base from a T5X checkpoint. Grow it with python -m flix.train, "
        "which reads bases of every format."
    )
  if model is not None and mixture_or_task_name:
    growth.check(
        vocabularies.run_meta(
            model,
            mixture_or_task_name,
            trainable_patterns,
            base,
            random_seed,
        )
    )
  return base


def task_vocabulary(
    mixture_or_task_name: str,
    checkpoint_path: Optional[str] = None,
    configured: vocabularies.VocabularySpec = None,
) -> seqio.Vocabulary:
  """The vocabulary T5X's model holds: the task's own object (T5X requires
  the model's to equal it), which must tokenize as the run's recorded (or
  named, `VOCABULARY`) vocabulary when a checkpoint is given."""
  vocabulary = vocabularies.mixture_vocabulary(mixture_or_task_name)
  if checkpoint_path:
    recorded = vocabularies.vocabulary_for_checkpoint(
        checkpoint_path, configured, required=False
    )
    if recorded is not None:
      vocabularies.check_task(mixture_or_task_name, recorded)
  return vocabulary


def fresh_params_assignment_map(
    feature_space: Optional[features_lib.FeatureSpace],
) -> tuple[tuple[str, Optional[str]], ...]:
  """`RestoreCheckpointConfig.assignment_map` of INITIAL_CHECKPOINT_PATH.

  Base parameters load from the checkpoint (T5X's names are flix's); the
  adapters (if the model has any), the optimizer state and the step are not
  in it and start as the model initializes them (`fallback_to_scratch`;
  a grow run's model places its original's adapters in the old rows), so
  TRAIN_STEPS counts fine-tuning steps under both drivers.
  """
  fresh = [(r"state/.*", None)]
  if feature_space is not None:
    fresh.insert(0, (r"target/" + layers.ADAPTER_PATH_PATTERN, None))
  return tuple(fresh)


def checkpoint_to_restore(path: str) -> str:
  """The T5X step directory of CHECKPOINT_PATH (a MODEL_DIR: its latest)."""
  return checkpoints.t5x_step_dir(path)


class FeaturizedResultsLogger(seqio.Logger):
  """Writes flix's results rows for T5X's evaluations.

  One row per (task, metric) with the task's features and whether its
  (task, language) pair was seen in training, in `results-<split>-<step>`
  .json / .txt / .png under the evaluator's output directory, exactly as
  `python -m flix.eval` writes them. Each call (one task) rewrites the files
  with all rows so far. A task whose examples carry several feature
  combinations gets empty features (its metrics are not per combination).
  """

  def __init__(
      self,
      output_dir: str,
      training_mixture: Optional[str] = None,
      checkpoint_path: Optional[str] = None,
      split: str = "validation",
      grow_from: Optional[str] = None,
  ):
    """Constructor.

    Args:
      output_dir: where the evaluator writes (T5X passes it).
      training_mixture: the training task or mixture whose (task, language)
        pairs count as seen; default the run's (from `checkpoint_path`).
      checkpoint_path: the evaluated run, for its training mixture.
      split: the evaluated split (for file names).
      grow_from: a grow run's original (GROW_FROM): the pairs its adapters
        trained on count as seen too.
    """
    super().__init__(output_dir)
    mixtures = [training_mixture] if training_mixture else []
    if not mixtures and checkpoint_path:
      mixtures = grow.training_mixtures(checkpoints.read_meta(checkpoint_path))
    if grow_from:
      mixtures += grow.training_mixtures(grow.Growth.load(grow_from).meta)
    self._seen = (
        set().union(
            *(featurized.seen_pairs(m) for m in dict.fromkeys(mixtures))
        )
        if mixtures
        else None
    )
    self._split = split
    self._rows: dict[Optional[int], list[dict[str, Any]]] = (
        collections.defaultdict(list)
    )

  def __call__(
      self,
      task_name: str,
      step: Optional[int],
      metrics: Mapping[str, Any],
      dataset: Any,
      inferences: Any,
      targets: Optional[Sequence[Any]],
  ) -> None:
    del dataset, inferences
    combinations = featurized.feature_combinations(task_name)
    features = dict(next(iter(combinations))) if len(combinations) == 1 else {}
    values = {
        name: float(np.asarray(value.value))
        for name, value in metrics.items()
        if isinstance(value, seqio.metrics.Scalar)
    }
    rows = self._rows[step]
    rows.extend(
        evaluation.result_rows(
            task_name, features, values, len(targets or ()), self._seen
        )
    )
    name = f"results-{self._split}" + (f"-{step}" if step is not None else "")
    evaluation.write_results(rows, self.output_dir, name, "exact_match")
    logging.info(
        "Wrote %d result rows to %s/%s.*", len(rows), self.output_dir, name
    )
