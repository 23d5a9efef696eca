"""The train loop: mesh, state, data, checkpoints, logging, periodic eval.

`python -m flix.train` -> `trainer.train(...)` (gin-configured) -> the jitted
`train_step(state, batch, rng) -> (state, metrics)` of `flix.train_step`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flix import checkpoints
from flix import features as features_lib
from flix import models
from flix import partitioning
from flix import train_step as train_step_lib

PyTree = Any


@dataclasses.dataclass
class Run:
  """Everything a run builds once: mesh, model, jitted step, state."""

  model: models.FlixModel
  mesh: Any
  rules: Sequence[tuple[str, Optional[str]]]
  state: train_step_lib.TrainState
  step_fn: Callable
  meta: dict[str, Any]

  @property
  def params(self) -> PyTree:
    return self.state.params


def build_run(
    model: models.FlixModel,
    optimizer: optax.GradientTransformation,
    trainable_patterns: train_step_lib.TrainablePatterns = "adapters",
    initial_checkpoint_path: Optional[str] = None,
    random_seed: int = 0,
    num_partitions: int = 1,
    num_microbatches: int = 1,
    logical_axis_rules: Optional[Sequence[Any]] = None,
    devices: Optional[Sequence[Any]] = None,
) -> Run:
  """Initialises (or loads) the params on a mesh and jits the train step."""
  mesh = partitioning.make_mesh(num_partitions, devices)
  rules = tuple(
      logical_axis_rules or partitioning.standard_logical_axis_rules()
  )
  _, state_sharding = train_step_lib.state_shardings(
      model, optimizer, trainable_patterns, mesh, rules
  )
  with mesh, nn.logical_axis_rules(rules):
    param_sharding = partitioning.logical_to_sharding(
        model.param_logical_axes(), mesh, rules
    )
    params = jax.jit(model.init_params, out_shardings=param_sharding)(
        jax.random.PRNGKey(random_seed)
    )
    if initial_checkpoint_path:
      loaded = checkpoints.restore_base_params(
          jax.tree.map(np.asarray, params),
          initial_checkpoint_path,
          fresh_patterns=train_step_lib.ADAPTER_PATTERNS,
          config=model.config,
      )
      params = jax.device_put(loaded, param_sharding)
    state = jax.jit(
        lambda p: train_step_lib.create_train_state(
            p, optimizer, trainable_patterns
        ),
        out_shardings=state_sharding,
    )(params)
    step_fn = train_step_lib.jit_train_step(
        model, optimizer, state_sharding, mesh, num_microbatches
    )
  space = model.feature_space
  meta = {
      "feature_space": space.to_dict() if space is not None else None,
      "model_config": model.config.to_dict(),
      "base": {
          "initial_checkpoint": initial_checkpoint_path,
          "init_seed": random_seed,
      },
      "trainable_patterns": list(
          train_step_lib.trainable_regexes(trainable_patterns)
      ),
  }
  return Run(model, mesh, rules, state, step_fn, meta)


def to_device_batch(batch: Mapping[str, np.ndarray], mesh) -> dict[str, Any]:
  sharding = partitioning.data_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in batch.items()
  }


def _check_feature_space(
    saved: Optional[Mapping[str, Any]],
    space: Optional[features_lib.FeatureSpace],
    where: str,
) -> None:
  current = space.to_dict() if space is not None else None
  if saved != current:
    raise ValueError(
        f"The feature vocabulary saved in {where} differs from this run's; "
        "adapters would map to the wrong features. Resume with the same "
        f"mixture and FLix config. Saved: {json.dumps(saved)[:300]}; now: "
        f"{json.dumps(current)[:300]}"
    )


class ProgressLogger:
  """Logs `step, loss, steps/s, ETA` lines and writes CLU summaries."""

  def __init__(self, model_dir: str, total_steps: int, start_step: int):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top

    self.writer = metric_writers.create_default_writer(
        os.path.join(model_dir, "train"), just_logging=jax.process_index() > 0
    )
    self.total_steps, self.last_step = total_steps, start_step
    self.last_time = time.time()

  def log(self, step: int, metrics: Mapping[str, Any]) -> None:
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    scalars = {k: float(v) for k, v in metrics.items()}
    scalars["steps_per_second"] = rate
    self.writer.write_scalars(step, scalars)
    eta = (self.total_steps - step) / max(rate, 1e-9)
    logging.info(
        "step %d/%d  loss %.4f  acc %.3f  %.2f steps/s  ETA %s",
        step,
        self.total_steps,
        scalars["loss"],
        scalars.get("accuracy", float("nan")),
        rate,
        time.strftime("%H:%M:%S", time.gmtime(eta)),
    )

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()


def train(
    *,
    model: models.FlixModel,
    model_dir: str,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    train_steps: int,
    batch_size: int,
    optimizer: optax.GradientTransformation,
    trainable_patterns: train_step_lib.TrainablePatterns = "adapters",
    initial_checkpoint_path: Optional[str] = None,
    random_seed: int = 0,
    pack: bool = False,
    num_partitions: int = 1,
    num_microbatches: int = 1,
    checkpoint_period: int = 1000,
    keep_checkpoints: Optional[int] = 3,
    log_period: int = 10,
    eval_period: int = 0,
    evaluate_fn: Optional[Callable[..., Any]] = None,
) -> Run:
  """Trains `model` on a SeqIO mixture; resumes from MODEL_DIR if possible.

  Args:
    model: the model (its network config carries the feature space).
    model_dir: where checkpoints, summaries and eval results go.
    mixture_or_task_name: SeqIO training mixture.
    task_feature_lengths: e.g. {'inputs': 64, 'targets': 32}.
    train_steps: total optimizer steps (absolute, like T5X's TRAIN_STEPS).
    batch_size: global batch size.
    optimizer: optax transformation (see `train_step.make_optimizer`).
    trainable_patterns: 'adapters', 'all', or regexes of trained param paths.
    initial_checkpoint_path: base weights (T5X, HF or flix checkpoint).
    random_seed: seeds init, dropout and the data order.
    pack: pack several examples per row (needs network max_segments).
    num_partitions: model-parallel size of the mesh.
    num_microbatches: gradient accumulation steps per batch.
    checkpoint_period: save every this many steps (and at the end).
    keep_checkpoints: how many to keep (None: all).
    log_period: progress line every this many steps.
    eval_period: call `evaluate_fn(run, step)` every this many steps (0: only
      at the end).
    evaluate_fn: evaluation callback, e.g. a configured `evaluation.evaluate`.

  Returns:
    the Run (state after training).
  """
  os.makedirs(model_dir, exist_ok=True)
  run = build_run(
      model,
      optimizer,
      trainable_patterns,
      initial_checkpoint_path,
      random_seed,
      num_partitions,
      num_microbatches,
  )
  partitioning.check_batch_size(batch_size, run.mesh)
  logging.info(
      "Trainable params: %d of %d (%s).",
      train_step_lib.count_params(run.state.trainable),
      train_step_lib.count_params(run.state.trainable)
      + train_step_lib.count_params(run.state.frozen),
      ", ".join(run.meta["trainable_patterns"]),
  )
  checkpointer = checkpoints.Checkpointer(model_dir, keep=keep_checkpoints)
  start_step, batches_consumed = 0, 0
  latest = checkpointer.latest_step()
  if latest is not None:
    trainable, opt_state, meta = checkpointer.restore(
        latest, run.state.trainable, run.state.opt_state
    )
    _check_feature_space(
        meta.get("feature_space"), model.feature_space, checkpointer.directory
    )
    run.state = run.state.replace(
        step=jnp.asarray(latest, jnp.int32),
        trainable=trainable,
        opt_state=opt_state,
    )
    start_step, batches_consumed = latest, meta["data"]["batches_consumed"]
    logging.info("Resumed from step %d of %s.", latest, checkpointer.directory)
  run.meta["data"] = {
      "mixture_or_task_name": mixture_or_task_name,
      "seed": random_seed,
      "batches_consumed": batches_consumed,
  }

  from flix import input_pipeline  # pylint: disable=g-import-not-at-top
  from flix import vocabularies  # pylint: disable=g-import-not-at-top

  vocabulary = vocabularies.mixture_vocabulary(mixture_or_task_name)
  vocabularies.check_fits(vocabulary, model.config.vocab_size)
  run.meta[vocabularies.META_KEY] = vocabularies.record(vocabulary, model_dir)
  batches = input_pipeline.train_batches(
      mixture_or_task_name,
      task_feature_lengths,
      batch_size,
      model.feature_space,
      seed=random_seed,
      pack=pack,
      skip_batches=batches_consumed,
  )
  progress = ProgressLogger(model_dir, train_steps, start_step)
  rng = jax.random.PRNGKey(random_seed + 1)
  step = start_step
  with run.mesh, nn.logical_axis_rules(run.rules):
    while step < train_steps:
      batch = next(batches)
      model.check_batch(batch)
      run.state, metrics = run.step_fn(
          run.state, to_device_batch(batch, run.mesh), rng
      )
      step += 1
      run.meta["data"]["batches_consumed"] = batches_consumed + (
          step - start_step
      )
      if step % log_period == 0 or step == train_steps:
        progress.log(step, jax.device_get(metrics))
      if step % checkpoint_period == 0 or step == train_steps:
        checkpointer.save(
            step,
            run.state.trainable,
            run.state.opt_state,
            {**run.meta, "step": step},
            force=True,
        )
      if evaluate_fn is not None and (
          (eval_period and step % eval_period == 0) or step == train_steps
      ):
        checkpointer.wait()
        evaluate_fn(run=run, step=step, model_dir=model_dir)
  checkpointer.close()
  progress.close()
  return run
