"""Predictions for featurized inputs, as T5X's infer writes them.

Input is a featurized JSONL file (`{"inputs": ..., "features": {...}}` per
line) or a SeqIO task split; the output is JSONL with each input, its
features and the prediction. Any feature combination may be given: an
unseen (task, language) pair composes its adapters; an unknown value warns
and only the known features apply. `python -m flix.infer` runs `write_predictions`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import tensorflow as tf

from flix import checkpoints
from flix import evaluation
from flix import feature_converter
from flix import input_pipeline
from flix import jsonl_records
from flix import models
from flix import vocabularies


def read_featurized_inputs(path: str) -> list[dict[str, Any]]:
  """Reads `{"inputs", "features"}` lines (`flix.jsonl_records`; `targets`
  optional); errors name file and line."""
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"INPUT_FILE {path} does not exist.")
  return [
      {"inputs": record.inputs, "features": record.features}
      for record in jsonl_records.read_records(path, targets_required=False)
  ]


def write_predictions(
    *,
    model: models.FlixModel,
    checkpoint_path: str,
    output_dir: str,
    task_feature_lengths: Mapping[str, int],
    input_file: Optional[str] = None,
    mixture_or_task_name: Optional[str] = None,
    split: str = "test",
    batch_size: int = 32,
    decode_kwargs: Optional[Mapping[str, Any]] = None,
    vocabulary: vocabularies.VocabularySpec = None,
) -> str:
  """Predicts for every input; returns the path of the predictions JSONL.

  Text is tokenized and predictions detokenized with the checkpoint's
  vocabulary (recorded at training, or named by `vocabulary`: 'bytes' or a
  SentencePiece .model path; see `flix.vocabularies`); a task split must
  tokenize with it too.
  """
  vocabulary = vocabularies.vocabulary_for_checkpoint(
      checkpoint_path,
      vocabulary,
      embedding_rows=model.config.vocab_size,
      required=bool(input_file),
  )
  model, params, _ = checkpoints.load_for_inference(model, checkpoint_path)
  if input_file:
    records = read_featurized_inputs(input_file)
    examples = records
    name = os.path.splitext(os.path.basename(input_file))[0]
  elif mixture_or_task_name:
    if vocabulary is None:
      vocabulary = vocabularies.mixture_vocabulary(mixture_or_task_name)
    else:
      vocabularies.check_task(mixture_or_task_name, vocabulary)
    examples = input_pipeline.task_examples(
        mixture_or_task_name, split, task_feature_lengths
    )
    records = [
        {
            "inputs": evaluation.text_of(ex["inputs_pretokenized"]),
            "features": feature_converter.example_features(ex),
        }
        for ex in examples
    ]
    name = f"{mixture_or_task_name}-{split}"
  else:
    raise ValueError(
        "Give INPUT_FILE or MIXTURE_OR_TASK_NAME (inference.write_predictions)."
    )
  predictions = evaluation.predict_examples(
      model,
      params,
      examples,
      vocabulary,
      task_feature_lengths["inputs"],
      task_feature_lengths["targets"],
      batch_size,
      decode_kwargs,
  )
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, f"{name}-predictions.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for record, prediction in zip(records, predictions):
      f.write(
          json.dumps({**record, "prediction": prediction}, ensure_ascii=False)
          + "\n"
      )
  return path
