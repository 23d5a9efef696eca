"""Entry point: `python -m flix.eval --gin_file=configs/runs/eval.gin ...`.

Evaluates a flix checkpoint on a mixture's tasks: per (feature set, metric)
results JSON, a readable table, and a task x language heatmap.
"""

from typing import Any, Mapping, Optional

from flix import checkpoints
from flix import evaluation
from flix import gin_utils
from flix import models


def evaluate(
    *,
    model: models.FlixModel,
    checkpoint_path: str,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    output_dir: str,
    split: str = "test",
    training_mixture: Optional[str] = None,
    batch_size: int = 32,
    max_examples_per_task: Optional[int] = None,
    decode_kwargs: Optional[Mapping[str, Any]] = None
) -> dict:
  """Loads `checkpoint_path` and runs `evaluation.evaluate` on it."""
  model, params, meta = checkpoints.load_for_inference(model, checkpoint_path)
  training_mixture = training_mixture or meta.get("data", {}).get(
      "mixture_or_task_name"
  )
  return evaluation.evaluate(
      model=model,
      params=params,
      step=meta.get("step"),
      mixture_or_task_name=mixture_or_task_name,
      task_feature_lengths=task_feature_lengths,
      split=split,
      training_mixture=training_mixture,
      output_dir=output_dir,
      batch_size=batch_size,
      max_examples_per_task=max_examples_per_task,
      decode_kwargs=decode_kwargs,
  )


def main(argv):
  gin_utils.setup(argv)
  from flix import eval as eval_lib  # the module gin configured, not __main__

  gin_utils.call_configured(eval_lib.evaluate)


if __name__ == "__main__":
  gin_utils.define_flags()
  gin_utils.run(main)
