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
  fresh_params_assignment_map the `assignment_map` restoring the base from
                              INITIAL_CHECKPOINT_PATH (a public T5X mT5
                              checkpoint): adapters, optimizer state and the
                              step start fresh.
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
) -> None:
  """T5X's config summary plus the flix run info in MODEL_DIR.

  A restart with another feature vocabulary than the one saved is an error
  (the adapters would map to the wrong features).
  """
  t5x_gin_utils.summarize_gin_config(model_dir, summary_writer, step)
  if jax.process_index() != 0:
    return
  meta = checkpoints.run_meta(
      model,
      trainable_patterns,
      initial_checkpoint_path,
      random_seed,
      mixture_or_task_name,
  )
  vocabulary = vocabularies.mixture_vocabulary(mixture_or_task_name)
  vocabularies.check_fits(vocabulary, model.config.vocab_size)
  meta[vocabularies.META_KEY] = vocabularies.record(vocabulary, model_dir)
  checkpoints.write_run_info(model_dir, meta)


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
    grow_from: Optional[str] = None,
) -> tuple[tuple[str, Optional[str]], ...]:
  """`RestoreCheckpointConfig.assignment_map` of INITIAL_CHECKPOINT_PATH.

  Base parameters load from the checkpoint (T5X's names are flix's); the
  adapters (if the model has any), the optimizer state and the step are not
  in it and start fresh (`fallback_to_scratch`), so TRAIN_STEPS counts
  fine-tuning steps under both drivers.

  Raises:
    ValueError: with `grow_from` (GROW_FROM): T5X's restore cannot place the
      saved adapters into rows of the grown ones; `python -m flix.train`
      grows runs of either driver.
  """
  if grow_from:
    raise ValueError(
        f"GROW_FROM={grow_from!r} is supported by python -m flix.train only "
        "(it grows runs trained by either driver); t5x.train would start "
        "every adapter fresh."
    )
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
  ):
    """Constructor.

    Args:
      output_dir: where the evaluator writes (T5X passes it).
      training_mixture: the training task or mixture whose (task, language)
        pairs count as seen; default the run's (from `checkpoint_path`).
      checkpoint_path: the evaluated run, for its training mixture.
      split: the evaluated split (for file names).
    """
    super().__init__(output_dir)
    if training_mixture is None and checkpoint_path:
      training_mixture = (
          checkpoints.read_meta(checkpoint_path)
          .get("data", {})
          .get("mixture_or_task_name")
      )
    self._seen = (
        featurized.seen_pairs(training_mixture) if training_mixture else None
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
