"""One train step under T5X vs under flix, and the two drivers' checkpoints.

The same tiny FLix model, optimizer and batch, in one process:
  flix   `train_step.jit_train_step` (what `python -m flix.train` runs),
  T5X    `t5x.trainer.Trainer`'s compiled train step (what `python -m
         t5x.train` runs) over `flix.t5x_model.FlixEncoderDecoderModel`.
Steps are timed in interleaved repetitions; only the ratio means anything on
a shared machine. Then each driver's own checkpointer saves the state once:
flix's Orbax checkpoint holds the trainable params and their optimizer state,
T5X's every param (the frozen base included) and the same optimizer state.

  python scripts/bench_t5x.py [--reps 5 --steps 20 --batch 16 ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import seqio

from flix import checkpoints
from flix import feature_converter
from flix import features
from flix import models
from flix import network
from flix import partitioning
from flix import train_step
from flix import trainer


def _args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="demo_small")
  p.add_argument("--tasks", type=int, default=8)
  p.add_argument("--languages", type=int, default=20)
  p.add_argument("--rank", type=int, default=4)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--inputs", type=int, default=64)
  p.add_argument("--targets", type=int, default=64)
  p.add_argument("--steps", type=int, default=20, help="Steps per rep.")
  p.add_argument("--reps", type=int, default=5)
  return p.parse_args()


def _setup(args):
  space = features.FeatureSpace.from_values(
      {
          "task": [f"t{i}" for i in range(args.tasks)],
          "language": [f"l{i}" for i in range(args.languages)],
      },
      ranks={"task": args.rank, "language": args.rank},
      dropout={"task": 0.1, "language": 0.1},
  )
  model = models.FlixModel(network.preset(args.preset, feature_space=space))
  rng = np.random.default_rng(0)
  examples = [
      {
          "inputs": rng.integers(2, 200, args.inputs - 1).tolist() + [1],
          "targets": rng.integers(2, 200, args.targets - 1).tolist() + [1],
          "features": {
              "task": f"t{rng.integers(args.tasks)}",
              "language": f"l{rng.integers(args.languages)}",
          },
      }
      for _ in range(args.batch)
  ]
  batch = feature_converter.encode_examples(
      examples, space, {"inputs": args.inputs, "targets": args.targets}
  )
  return model, batch


def _flix_step(model, optimizer, batch):
  run = trainer.build_run(model, optimizer, "adapters")
  device_batch = trainer.to_device_batch(batch, run.mesh)
  rng = jax.random.PRNGKey(1)

  def step():
    with run.mesh:
      run.state, metrics = run.step_fn(run.state, device_batch, rng)
    jax.block_until_ready(metrics)

  return run, step


def _t5x_step(model, optimizer, batch):
  from t5x import partitioning as t5x_partitioning  # pylint: disable=g-import-not-at-top
  from t5x import trainer as t5x_trainer  # pylint: disable=g-import-not-at-top
  from t5x import utils as t5x_utils  # pylint: disable=g-import-not-at-top

  from flix import t5x_model  # pylint: disable=g-import-not-at-top

  wrapped = t5x_model.FlixEncoderDecoderModel(
      model, seqio.ByteVocabulary(), optimizer=optimizer
  )
  partitioner = t5x_partitioning.PjitPartitioner(
      num_partitions=1,
      logical_axis_rules=t5x_partitioning.standard_logical_axis_rules(
          additional_rules=partitioning.adapter_axis_rules()
      ),
  )
  initializer = t5x_utils.TrainStateInitializer(
      wrapped.optimizer_def,
      wrapped.get_initial_variables,
      {k: v.shape for k, v in batch.items()},
      partitioner,
  )
  t5x_run = t5x_trainer.Trainer(
      wrapped,
      initializer.from_scratch(jax.random.PRNGKey(0)),
      partitioner,
      eval_names=[],
      summary_dir=None,
      train_state_axes=initializer.train_state_axes,
      rng=jax.random.PRNGKey(1),
      learning_rate_fn=lambda step: 1e-3,
      num_microbatches=None,
  )
  t5x_run.compile_train(batch)

  def step():
    t5x_run.train_state, metrics = t5x_run._compiled_train_step(  # pylint: disable=protected-access
        t5x_run.train_state, batch
    )
    jax.block_until_ready(metrics)

  return t5x_run, initializer, partitioner, step


def _dir_bytes(path: str) -> int:
  return sum(
      os.path.getsize(os.path.join(d, f))
      for d, _, files in os.walk(path)
      for f in files
  )


def main() -> None:
  args = _args()
  model, batch = _setup(args)
  optimizer = train_step.make_optimizer(1e-3, "adafactor")
  flix_run, flix_step = _flix_step(model, optimizer, batch)
  t5x_run, initializer, partitioner, t5x_step = _t5x_step(
      model, optimizer, batch
  )
  for step in (flix_step, t5x_step):  # Compile and warm up.
    step()
    step()
  times = {"flix": [], "t5x": []}
  for _ in range(args.reps):
    for name, step in (("flix", flix_step), ("t5x", t5x_step)):
      start = time.perf_counter()
      for _ in range(args.steps):
        step()
      times[name].append((time.perf_counter() - start) / args.steps * 1e3)
  flix_ms, t5x_ms = (statistics.median(times[k]) for k in ("flix", "t5x"))
  trainable = train_step.count_params(flix_run.state.trainable)
  total = trainable + train_step.count_params(flix_run.state.frozen)
  print(
      f"{args.preset} FLix {args.tasks} tasks x {args.languages} languages, "
      f"rank {args.rank}+{args.rank}, batch {args.batch} x "
      f"({args.inputs} + {args.targets}), Adafactor; {trainable:,} of "
      f"{total:,} params trained; median of {args.reps} interleaved reps of "
      f"{args.steps} steps"
  )
  print("| driver | ms/step | per-rep ms | x flix |")
  print("|---|---:|---|---:|")
  for name, ms in (("flix (flix.train)", flix_ms), ("T5X (t5x.train)", t5x_ms)):
    reps = times["flix" if name.startswith("flix") else "t5x"]
    print(
        f"| {name} | {ms:.2f} | {', '.join(f'{t:.1f}' for t in reps)} | "
        f"{ms / flix_ms:.3f} |"
    )

  # ---- Checkpoints, written by each driver's own checkpointer ----
  from t5x import utils as t5x_utils  # pylint: disable=g-import-not-at-top

  tmp = tempfile.mkdtemp(prefix="bench_t5x_")
  try:
    flix_dir = os.path.join(tmp, "flix")
    saver = checkpoints.Checkpointer(flix_dir)
    saver.save(
        1,
        flix_run.state.trainable,
        flix_run.state.opt_state,
        flix_run.meta,
        force=True,
    )
    saver.close()
    t5x_dir = os.path.join(tmp, "t5x")
    # (T5X's manager writes checkpoint_<step> beside the path it is given.)
    _, manager = t5x_utils.create_checkpoint_manager_and_restore(
        initializer,
        partitioner,
        None,
        None,
        jax.random.PRNGKey(0),
        save_checkpoint_cfg=t5x_utils.SaveCheckpointConfig(period=1),
        model_dir=os.path.join(t5x_dir, "run"),
        ds_iter=None,
        use_orbax=True,
    )
    manager.save(t5x_run.train_state)
    manager.wait_until_finished()
    manager.close()
    flix_bytes = _dir_bytes(os.path.join(flix_dir, "checkpoints"))
    t5x_bytes = sum(
        _dir_bytes(os.path.join(t5x_dir, d))
        for d in os.listdir(t5x_dir)
        if d.startswith("checkpoint_")
    )
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print()
  print("| checkpoint | bytes | x flix |")
  print("|---|---:|---:|")
  print(
      f"| flix (trainable params + their optimizer state) | {flix_bytes:,} | 1.0 |"
  )
  print(
      f"| T5X (all params + the same optimizer state) | {t5x_bytes:,} | "
      f"{t5x_bytes / flix_bytes:.1f} |"
  )


if __name__ == "__main__":
  main()
