"""Inference evaluation: decode, score with SeqIO metrics, write results.

Results: one row per (feature values, metric)

  {"features": {"task": ..., "language": ...}, "metric": ..., "value": ...,
   "examples": N, "seen_in_training": true|false}

written as `results-<split>-<step>.json`, a readable table in the log and
`results-<split>-<step>.txt`, and a task x language heatmap PNG in which
zero-shot cells are marked.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np
import seqio

from flix import checkpoints
from flix import feature_converter
from flix import featurized
from flix import grow
from flix import input_pipeline
from flix import models
from flix import vocabularies

PyTree = Any


def _decode_text(vocabulary, tokens: np.ndarray) -> str:
  tokens = [int(t) for t in tokens]
  if 1 in tokens:  # EOS
    tokens = tokens[: tokens.index(1)]
  return vocabulary.decode([t for t in tokens if t > 1])


@functools.lru_cache(maxsize=16)
def _jitted_predict(
    model: models.FlixModel,
    target_length: int,
    decode_items: tuple[tuple[str, Any], ...],
):
  """One compiled predict function per (model, length, decoding settings)."""
  return jax.jit(
      functools.partial(
          model.predict_batch,
          max_decode_length=target_length,
          **dict(decode_items),
      )
  )


def predict_examples(
    model: models.FlixModel,
    params: PyTree,
    examples: Sequence[Mapping[str, Any]],
    vocabulary,
    input_length: int,
    target_length: int,
    batch_size: int = 32,
    decode_kwargs: Optional[Mapping[str, Any]] = None,
) -> list[str]:
  """Decodes a prediction string for each example (in order).

  Args:
    model: the model.
    params: its params.
    examples: `inputs` as text or token ids (a SeqIO task's), and features
      (see `feature_converter.encode_examples`).
    vocabulary: tokenizes text inputs and detokenizes the predictions.
    input_length: encoder length (longer inputs are trimmed).
    target_length: the most tokens decoded.
    batch_size: examples per compiled batch (the last one is padded).
    decode_kwargs: `models.FlixModel.predict_batch` options.

  Returns:
    One prediction string per example.
  """
  predict = _jitted_predict(
      model, target_length, tuple(sorted((decode_kwargs or {}).items()))
  )
  lengths = {"inputs": input_length, "targets": target_length}
  predictions = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start : start + batch_size]
    batch = feature_converter.encode_examples(
        [{**ex, "targets": None} for ex in chunk],
        model.feature_space,
        lengths,
        vocabulary=vocabulary,
        batch_size=batch_size,
    )
    tokens, _ = predict(params, batch)
    tokens = np.asarray(tokens)[:, 0]
    predictions.extend(
        _decode_text(vocabulary, row) for row in tokens[: len(chunk)]
    )
  return predictions


def text_of(value) -> str:
  """A TF string feature (bytes) as str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def evaluate_tasks(
    model: models.FlixModel,
    params: PyTree,
    task_names: Sequence[str],
    split: str,
    task_feature_lengths: Mapping[str, int],
    seen: Optional[set[tuple[str, ...]]] = None,
    batch_size: int = 32,
    max_examples_per_task: Optional[int] = None,
    decode_kwargs: Optional[Mapping[str, Any]] = None,
    vocabulary: Optional[seqio.Vocabulary] = None,
    examples_cache: Optional[dict[Any, list[dict[str, Any]]]] = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Decodes every task's split and computes its metrics per feature set.

  `vocabulary` is the model's (`vocabularies.vocabulary_for_checkpoint`):
  every task must tokenize with it; None uses each task's own.
  `examples_cache`: a dict kept by a caller that evaluates many models on the
  same tasks; the tokenized examples are built once (building the tf.data
  pipeline of a task takes longer than decoding a few dozen examples).

  Returns:
    (result rows, prediction records with inputs/target/prediction/features).
  """
  rows, records, truncations = [], [], []
  for task_name in task_names:
    task = seqio.get_mixture_or_task(task_name)
    key = (
        task,  # Not its name: a re-registered task is another one.
        split,
        tuple(sorted(task_feature_lengths.items())),
        max_examples_per_task,
    )
    if examples_cache is not None and key in examples_cache:
      examples = examples_cache[key]  # Its truncations were reported then.
    else:
      with featurized.count_truncation() as truncation:
        examples = input_pipeline.task_examples(
            task_name, split, task_feature_lengths, max_examples_per_task
        )
      truncations.append((task_name, truncation))
      if examples_cache is not None:
        examples_cache[key] = examples
    if not examples:
      logging.warning("Task %s has no %s examples; skipped.", task_name, split)
      continue
    if vocabulary is not None:
      vocabularies.check_task(task_name, vocabulary)
    predictions = predict_examples(
        model,
        params,
        examples,
        vocabulary or task.output_features["targets"].vocabulary,
        task_feature_lengths["inputs"],
        task_feature_lengths["targets"],
        batch_size,
        decode_kwargs,
    )
    by_features = collections.defaultdict(lambda: ([], []))
    for example, prediction in zip(examples, predictions):
      features = feature_converter.example_features(example)
      target = text_of(example["targets_pretokenized"])
      if task.postprocess_fn is not None:
        target = task.postprocess_fn(target, example=example, is_target=True)
        prediction = task.postprocess_fn(
            prediction, example=example, is_target=False
        )
      key = tuple(sorted(features.items()))
      by_features[key][0].append(target)
      by_features[key][1].append(prediction)
      records.append(
          {
              "task": task_name,
              "inputs": text_of(example["inputs_pretokenized"]),
              "target": target,
              "prediction": prediction,
              "features": features,
          }
      )
    for key, (targets, preds) in by_features.items():
      values = {}
      for metric_fn in task.predict_metric_fns:
        values.update(metric_fn(targets, preds))
      rows.extend(result_rows(task_name, dict(key), values, len(targets), seen))
  message = featurized.describe_truncations(
      truncations, task_feature_lengths, f"{split} examples read"
  )
  if message:
    logging.warning("%s", message)
  return rows, records


def result_rows(
    task_name: str,
    features: Mapping[str, str],
    metrics: Mapping[str, float],
    examples: int,
    seen: Optional[set[tuple[str, ...]]] = None,
) -> list[dict[str, Any]]:
  """Result rows of one feature set of a task: one per metric.

  `seen_in_training` is None without `seen` (the training mixture's
  `featurized.seen_pairs`), else whether the set's (task, language) pair was
  seen (False: zero-shot).
  """
  seen_flag = featurized.is_seen(features, seen) if seen is not None else None
  return [
      {
          "features": dict(features),
          "metric": metric,
          "value": float(value),
          "examples": examples,
          "seen_in_training": seen_flag,
          "task_name": task_name,
      }
      for metric, value in metrics.items()
  ]


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A readable results table (one line per feature set and metric)."""
  lines = [f"{'features':<34} {'metric':<18} {'value':>8} {'n':>5}  seen"]
  for row in sorted(rows, key=lambda r: (str(r["features"]), r["metric"])):
    features = ",".join(f"{k}={v}" for k, v in sorted(row["features"].items()))
    seen = {True: "yes", False: "ZERO-SHOT", None: "-"}[row["seen_in_training"]]
    lines.append(
        f"{features:<34} {row['metric']:<18} {row['value']:8.2f} "
        f"{row['examples']:5d}  {seen}"
    )
  return "\n".join(lines)


def plot_heatmap(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    path: str,
    title: str = "",
    axes: Sequence[str] = ("task", "language"),
    higher_is_better: bool = True,
) -> Optional[str]:
  """Heatmap of `metric`, feature `axes[0]` x `axes[1]`; zero-shot cells are
  hatched. Brighter is better (`higher_is_better=False`: lower, e.g. CER)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  row_axis, column_axis = axes
  cells = {
      (r["features"].get(row_axis), r["features"].get(column_axis)): r
      for r in rows
      if r["metric"] == metric
      and row_axis in r["features"]
      and column_axis in r["features"]
  }
  if not cells:
    return None
  tasks = sorted({t for t, _ in cells})
  languages = sorted({l for _, l in cells})
  grid = np.full((len(tasks), len(languages)), np.nan)
  for (t, l), row in cells.items():
    grid[tasks.index(t), languages.index(l)] = row["value"]
  fig, ax = plt.subplots(
      figsize=(max(4.5, 1.0 + 0.7 * len(languages)), 1.6 + 0.5 * len(tasks))
  )
  cmap = plt.get_cmap("viridis" if higher_is_better else "viridis_r")
  image = ax.imshow(
      grid, cmap=cmap, vmin=0, vmax=max(100.0, float(np.nanmax(grid)))
  )
  for (t, l), row in cells.items():
    i, j = tasks.index(t), languages.index(l)
    zero_shot = row["seen_in_training"] is False
    red, green, blue, _ = cmap(image.norm(row["value"]))
    ax.text(
        j,
        i,
        f"{row['value']:.0f}" + ("*" if zero_shot else ""),
        ha="center",
        va="center",
        fontsize=8,
        color="black"
        if 0.3 * red + 0.6 * green + 0.1 * blue > 0.5
        else "white",
    )
    if zero_shot:
      ax.add_patch(
          matplotlib.patches.Rectangle(
              (j - 0.5, i - 0.5),
              1,
              1,
              fill=False,
              hatch="//",
              edgecolor="red",
              linewidth=1.5,
          )
      )
  ax.set_xticks(range(len(languages)), languages)
  ax.set_yticks(range(len(tasks)), tasks)
  ax.set_title(title or f"{metric} (* and hatched: zero-shot)", fontsize=9)
  fig.colorbar(image, ax=ax, shrink=0.8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_results(
    rows: Sequence[Mapping[str, Any]],
    output_dir: str,
    name: str,
    heatmap_metric: Optional[str] = None,
) -> dict:
  """Writes the JSON rows, the readable table and the heatmap."""
  os.makedirs(output_dir, exist_ok=True)
  paths = {
      "json": os.path.join(output_dir, f"{name}.json"),
      "table": os.path.join(output_dir, f"{name}.txt"),
  }
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(list(rows), f, indent=1, ensure_ascii=False)
  table = format_table(rows)
  with open(paths["table"], "w", encoding="utf-8") as f:
    f.write(table + "\n")
  logging.info("Results %s:\n%s", name, table)
  metrics = sorted({r["metric"] for r in rows})
  metric = heatmap_metric or (metrics[0] if metrics else None)
  if metric:
    png = plot_heatmap(rows, metric, os.path.join(output_dir, f"{name}.png"))
    if png:
      paths["heatmap"] = png
  return paths


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Mean of each metric over supervised and over zero-shot feature sets."""
  groups = collections.defaultdict(list)
  for row in rows:
    split = {True: "supervised", False: "zero_shot", None: "all"}[
        row["seen_in_training"]
    ]
    groups[f"{row['metric']}/{split}"].append(row["value"])
  return {name: float(np.mean(values)) for name, values in groups.items()}


def write_summaries(
    summary: Mapping[str, float], output_dir: str, step: int
) -> None:
  """Writes the summary scalars for TensorBoard (CLU metric writers)."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  writer = metric_writers.create_default_writer(
      output_dir, just_logging=jax.process_index() > 0
  )
  writer.write_scalars(step, dict(summary))
  writer.flush()
  writer.close()


def evaluate(
    *,
    run=None,
    step: Optional[int] = None,
    model_dir: Optional[str] = None,
    model: Optional[models.FlixModel] = None,
    params: Optional[PyTree] = None,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    split: str = "validation",
    training_mixture: Union[None, str, Sequence[str]] = None,
    output_dir: Optional[str] = None,
    batch_size: int = 32,
    max_examples_per_task: Optional[int] = None,
    decode_kwargs: Optional[Mapping[str, Any]] = None,
    heatmap_metric: Optional[str] = "exact_match",
    vocabulary: Optional[seqio.Vocabulary] = None,
) -> dict:
  """Evaluates a model (or a training run) on a mixture's tasks.

  Called by the trainer with `run`, `step`, `model_dir`, or with `model`,
  `params` and `vocabulary` (see `evaluate_checkpoint`).
  """
  if run is not None:
    model, params = run.model, run.params
    vocabulary = vocabularies.vocabulary_for_checkpoint(
        run.meta, required=False
    )
  output_dir = output_dir or os.path.join(model_dir, "eval")
  mixture = seqio.get_mixture_or_task(mixture_or_task_name)
  task_names = (
      [t.name for t in mixture.tasks]
      if isinstance(mixture, seqio.Mixture)
      else [mixture.name]
  )
  mixtures = (
      [training_mixture]
      if isinstance(training_mixture, str)
      else list(training_mixture or [])
  )
  if run is not None and mixtures:
    # A grown run's old adapters were trained on its original's mixtures.
    mixtures += run.meta.get(grow.META_KEY, {}).get("training_mixtures", [])
  seen = None
  if mixtures:
    seen = set()
    for name in dict.fromkeys(mixtures):
      if name in seqio.MixtureRegistry.names() or (
          name in seqio.TaskRegistry.names()
      ):
        seen |= featurized.seen_pairs(name)
      else:
        logging.warning(
            "Training mixture %r is not registered here: the zero-shot flags "
            "ignore the pairs it trained.",
            name,
        )
  rows, records = evaluate_tasks(
      model,
      params,
      task_names,
      split,
      task_feature_lengths,
      seen,
      batch_size,
      max_examples_per_task,
      decode_kwargs,
      vocabulary,
  )
  name = f"results-{split}" + (f"-{step}" if step is not None else "")
  paths = write_results(rows, output_dir, name, heatmap_metric)
  summary = summarize(rows)
  logging.info(
      "Eval summary (%s): %s",
      name,
      ", ".join(f"{k} {v:.2f}" for k, v in sorted(summary.items())),
  )
  if step is not None:
    write_summaries(summary, output_dir, step)
  with open(
      os.path.join(
          output_dir,
          f"predictions-{split}"
          + (f"-{step}" if step is not None else "")
          + ".jsonl",
      ),
      "w",
      encoding="utf-8",
  ) as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  return {"rows": rows, "paths": paths, "summary": summary}


def evaluate_checkpoint(
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
    decode_kwargs: Optional[Mapping[str, Any]] = None,
    vocabulary: vocabularies.VocabularySpec = None,
) -> dict:
  """Loads a flix checkpoint and `evaluate`s it (`python -m flix.eval`).

  The checkpoint's saved feature vocabulary replaces the model's; the
  training mixture (for the zero-shot flags) defaults to the run's. The
  tasks must tokenize with the checkpoint's vocabulary (recorded, or named
  by `vocabulary`; see `flix.vocabularies`).
  """
  vocabulary = vocabularies.vocabulary_for_checkpoint(
      checkpoint_path,
      vocabulary,
      embedding_rows=model.config.vocab_size,
      required=False,
  )
  model, params, meta = checkpoints.load_for_inference(model, checkpoint_path)
  training_mixture = training_mixture or grow.training_mixtures(meta)
  return evaluate(
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
      vocabulary=vocabulary,
  )
