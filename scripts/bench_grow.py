"""Grow a trained FLix run with a new language vs retrain from scratch.

Starts from the demo's runs (`bash scripts/demo.sh`: a base and a FLix run
on `numbers_multitask`, 12 languages) and, in one process:

  grow     the FLix run grown with Dutch (`flix.grow`) on
           `numbers_multitask_nl`: base and old adapters frozen, only the
           Dutch adapters' rows train
  retrain  FLix from the same base, from scratch, on
           `numbers_multitask_with_nl` (every old pair and the Dutch ones):
           what a team without growth must do

The two runs' steps are interleaved (one grow step, one retrain step, each
timed to completion) until each has done its steps (`--grow_steps`, default
150; `--retrain_steps`, default the original run's budget, 300). Printed:
trained parameters, median step times and the ratio, total training time
and the ratio, then CER / exact match of old and new (Dutch) pairs,
supervised and zero-shot, for the original run (before), the grown run and
the retrained one (validation split, `--eval_examples` per pair; supervised =
trained by the original or the grow run, for all three); the old
pairs' metrics of the original and the grown run must be identical.

    python scripts/bench_grow.py [--original /tmp/flix_demo/flix]
        [--grow_steps 150] [--retrain_steps 300] [--eval_examples 24]
        [--batch_size 32]
        [--output /tmp/flix_demo/bench_grow.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", message=".*mesh.*context manager.*")

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from flix import checkpoints
from flix import evaluation
from flix import featurized
from flix import grow
from flix import input_pipeline
from flix import models
from flix import network
from flix import train_step as train_step_lib
from flix import trainer
from flix import vocabularies
from flix_tasks import numbers

GROW_MIXTURE = numbers.GROWN.train_mixture
RETRAIN_MIXTURE = f"numbers_multitask_with_{numbers.GROW_LANGUAGE}"
EVAL_MIXTURE = f"numbers_multitask_eval_with_{numbers.GROW_LANGUAGE}"
# The demo's settings (configs/demo.gin).
LENGTHS = {"inputs": 32, "targets": 64}
RANK, DROPOUT, LEARNING_RATE = 4, 0.2, 3e-3


def _model(space) -> models.FlixModel:
  return models.FlixModel(
      network.preset("demo_small", feature_space=space, dropout_rate=0.0)
  )


def _timed_run(name, model, optimizer, base, seed, mixture, batch_size):
  run = trainer.build_run(model, optimizer, "adapters", base, seed)
  batches = input_pipeline.train_batches(
      mixture, LENGTHS, batch_size, model.feature_space, seed=seed
  )
  return {"name": name, "run": run, "batches": batches, "times": []}


def _step(entry, rng) -> None:
  run, batch = entry["run"], next(entry["batches"])
  start = time.perf_counter()
  with run.mesh, nn.logical_axis_rules(run.rules):
    run.state, metrics = run.step_fn(
        run.state, trainer.to_device_batch(batch, run.mesh), rng
    )
    # The whole update, not only the loss: the optimizer runs after it.
    jax.block_until_ready((run.state, metrics))
  entry["times"].append(time.perf_counter() - start)
  entry["loss"] = float(metrics["loss"])


def _metrics(model, params, seen_mixtures, examples, vocabulary, trained):
  """{(old|new, supervised|zero_shot, metric): mean}; a pair is supervised
  if `trained` (the grown run's training pairs) holds it, for every model,
  so each row compares the same pairs."""
  rows = evaluation.evaluate(
      model=model,
      params=params,
      mixture_or_task_name=EVAL_MIXTURE,
      task_feature_lengths=LENGTHS,
      split="validation",
      training_mixture=seen_mixtures,
      output_dir=tempfile.mkdtemp(prefix="bench_grow_"),
      batch_size=64,
      max_examples_per_task=examples,
      vocabulary=vocabulary,
  )["rows"]
  groups = collections.defaultdict(list)
  for row in rows:
    new = row["features"].get("language") == numbers.GROW_LANGUAGE
    pair = (row["features"].get("task"), row["features"].get("language"))
    seen = "supervised" if pair in trained else "zero_shot"
    groups[("new" if new else "old", seen, row["metric"])].append(row["value"])
  return {key: float(np.mean(values)) for key, values in groups.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--original", default="/tmp/flix_demo/flix")
  parser.add_argument("--grow_steps", type=int, default=150)
  parser.add_argument("--retrain_steps", type=int, default=None)
  parser.add_argument("--eval_examples", type=int, default=24)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default=None)
  args = parser.parse_args()

  growth = grow.Growth.load(args.original)
  base = growth.base_checkpoint(None)
  retrain_steps = args.retrain_steps or int(growth.meta["step"])
  optimizer = train_step_lib.make_optimizer(LEARNING_RATE, "adamw")
  grown_space = featurized.feature_space(
      GROW_MIXTURE, ranks=RANK, dropout=DROPOUT, grow_from=args.original
  )
  retrain_space = featurized.feature_space(
      RETRAIN_MIXTURE, ranks=RANK, dropout=DROPOUT
  )
  load = os.getloadavg()[0]
  grown = _timed_run(
      "grow",
      _model(grown_space),
      growth.optimizer(optimizer),
      base,
      args.seed,
      GROW_MIXTURE,
      args.batch_size,
  )
  growth.check(grown["run"].meta)
  grown["run"].state = grown["run"].state.replace(
      trainable=growth.start(grown["run"].state.trainable)
  )
  retrained = _timed_run(
      "retrain",
      _model(retrain_space),
      optimizer,
      base,
      args.seed,
      RETRAIN_MIXTURE,
      args.batch_size,
  )
  rng = jax.random.PRNGKey(args.seed + 1)
  for entry in (grown, retrained):  # Compiles; not timed.
    _step(entry, rng)
    entry["times"].clear()
  steps = {"grow": args.grow_steps - 1, "retrain": retrain_steps - 1}
  while any(len(e["times"]) < steps[e["name"]] for e in (grown, retrained)):
    for entry in (grown, retrained):
      if len(entry["times"]) < steps[entry["name"]]:
        _step(entry, rng)

  params = {
      "grow": grow.trained_param_count(
          grown["run"].state.trainable, growth.frozen_values
      ),
      "retrain": train_step_lib.count_params(retrained["run"].state.trainable),
  }
  step_time = {
      e["name"]: statistics.median(e["times"]) for e in (grown, retrained)
  }
  total = {e["name"]: sum(e["times"]) for e in (grown, retrained)}
  print(f"1-min load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
  print(
      f"{'':10s}{'trained params':>16s}{'steps':>7s}{'median step':>13s}"
      f"{'train time':>12s}{'final loss':>12s}"
  )
  for entry in (grown, retrained):
    name = entry["name"]
    print(
        f"{name:10s}{params[name]:16,d}{len(entry['times']) + 1:7d}"
        f"{step_time[name] * 1e3:11.0f}ms{total[name]:11.1f}s"
        f"{entry['loss']:12.3f}"
    )
  print(
      f"grow / retrain: trained params {params['grow'] / params['retrain']:.3f}"
      f", step time {step_time['grow'] / step_time['retrain']:.2f}, "
      f"training time {total['grow'] / total['retrain']:.2f}"
  )

  vocabulary = vocabularies.vocabulary_for_checkpoint(args.original)
  original_model, original_params, original_meta = (
      checkpoints.load_for_inference(_model(None), args.original)
  )
  original_mixtures = grow.training_mixtures(original_meta)
  trained = set().union(
      *(featurized.seen_pairs(m) for m in [GROW_MIXTURE] + original_mixtures)
  )
  results = {
      "before (original)": _metrics(
          original_model,
          original_params,
          original_mixtures,
          args.eval_examples,
          vocabulary,
          trained,
      ),
      "grown": _metrics(
          grown["run"].model,
          grown["run"].params,
          [GROW_MIXTURE] + original_mixtures,
          args.eval_examples,
          vocabulary,
          trained,
      ),
      "retrained": _metrics(
          retrained["run"].model,
          retrained["run"].params,
          [RETRAIN_MIXTURE],
          args.eval_examples,
          vocabulary,
          trained,
      ),
  }
  keys = sorted({k for r in results.values() for k in r})
  print(f"\n{'pairs':28s}" + "".join(f"{name:>20s}" for name in results))
  for key in keys:
    print(
        f"{' '.join(key):28s}"
        + "".join(f"{r.get(key, float('nan')):20.2f}" for r in results.values())
    )
  old = [k for k in keys if k[0] == "old"]
  unchanged = all(
      results["grown"][k] == results["before (original)"][k] for k in old
  )
  print(f"old pairs' metrics identical before and after growing: {unchanged}")
  if args.output:
    with open(args.output, "w") as f:
      json.dump(
          {
              "trained_params": params,
              "median_step_s": step_time,
              "train_time_s": total,
              "steps": {
                  e["name"]: len(e["times"]) + 1 for e in (grown, retrained)
              },
              "metrics": {
                  name: {"/".join(k): v for k, v in r.items()}
                  for name, r in results.items()
              },
          },
          f,
          indent=1,
      )


if __name__ == "__main__":
  main()
