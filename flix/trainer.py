"""The train loop: mesh, state, data, checkpoints, logging, periodic eval.

`python -m flix.train` -> `trainer.train(...)` (gin-configured) -> the jitted
`train_step(state, batch, rng) -> (state, metrics)` of `flix.train_step`.

A run can be killed at any moment and restarted with the same command: it
takes MODEL_DIR's lock (`flix.run_lock`), resumes from the newest intact
checkpoint and refuses a configuration that trains something else
(`flix.resume`), and continues bit-identically: the step's rng depends on
(seed, step) only and the data resumes at the saved batch count. A
non-finite loss stops the run (or, with `nonfinite_loss='skip'`, skips the
step) without saving it.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from flix import grow
from flix import models
from flix import partitioning
from flix import resume
from flix import run_lock
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
  meta = checkpoints.run_meta(
      model, trainable_patterns, initial_checkpoint_path, random_seed
  )
  return Run(model, mesh, rules, state, step_fn, meta)


def to_device_batch(batch: Mapping[str, np.ndarray], mesh) -> dict[str, Any]:
  sharding = partitioning.data_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in batch.items()
  }


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


NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteLossError(FloatingPointError):
  """A step's loss, gradient or update was NaN or Inf."""


def _check_int(name: str, value: Any, minimum: int) -> None:
  if (
      isinstance(value, bool)
      or not isinstance(value, (int, np.integer))
      or value < minimum
  ):
    raise ValueError(
        f"trainer.train: {name} must be an integer >= {minimum}, got "
        f"{value!r} ({type(value).__name__})."
    )


def _check_arguments(
    task_feature_lengths: Any, nonfinite_loss: str, **integers: tuple[Any, int]
) -> None:
  """Readable errors for mistyped gin values, before anything is built."""
  for name, (value, minimum) in integers.items():
    if value is not None:
      _check_int(name, value, minimum)
  if not isinstance(task_feature_lengths, Mapping) or not {
      "inputs",
      "targets",
  } <= set(task_feature_lengths):
    raise ValueError(
        "trainer.train: task_feature_lengths must be a dict with 'inputs' "
        f"and 'targets' lengths, got {task_feature_lengths!r}."
    )
  for key, length in task_feature_lengths.items():
    _check_int(f"task_feature_lengths[{key!r}]", length, 1)
  if nonfinite_loss not in NONFINITE_POLICIES:
    raise ValueError(
        f"trainer.train: nonfinite_loss must be one of {NONFINITE_POLICIES}, "
        f"got {nonfinite_loss!r}."
    )


class _NonFiniteGuard:
  """Stops at (or skips) a step whose `metrics['nonfinite']` is set.

  The step already left the state unchanged (`train_step`); checking one
  step late lets the host queue the next step before it waits.
  """

  def __init__(self, policy: str, checkpointer: checkpoints.Checkpointer):
    self.policy, self.checkpointer = policy, checkpointer
    self.skipped = 0

  def check(self, pending: Optional[tuple[int, Mapping[str, Any]]]) -> None:
    if pending is None:
      return
    step, metrics = pending
    if not float(metrics["nonfinite"]):
      return
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if self.policy == "skip":
      self.skipped += 1
      logging.warning(
          "Step %d skipped: non-finite loss %s or gradient norm %s; its "
          "update was not applied (%d steps skipped so far).",
          step,
          loss,
          grad_norm,
          self.skipped,
      )
      return
    self.checkpointer.wait()
    last = self.checkpointer.latest_step()
    kept = (
        f"the last checkpoint, step {last} in {self.checkpointer.directory},"
        " is kept"
        if last is not None
        else "no checkpoint was saved yet"
    )
    raise NonFiniteLossError(
        f"Non-finite loss at step {step} (loss {loss}, gradient norm "
        f"{grad_norm}): training stopped without applying or saving that "
        f"step; {kept}. Lower the learning rate or check the data; "
        "trainer.train.nonfinite_loss = 'skip' skips such steps instead."
    )


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
    nonfinite_loss: str = "stop",
    operative_config: Optional[str] = None,
    grow_from: Optional[str] = None,
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
    nonfinite_loss: 'stop' (default) ends the run at a NaN/Inf loss,
      gradient or update, keeping the last checkpoint; 'skip' skips such
      steps (not applied, counted in the log).
    operative_config: text written to MODEL_DIR/config.gin once the run has
      the lock and its configuration matches the saved run's.
    grow_from: a trained FLix run to grow (`flix.grow`): the model's feature
      space must extend its saved one; its base (the default
      `initial_checkpoint_path`) and adapters stay frozen and only the new
      values' adapters train.

  Returns:
    the Run (state after training).

  Raises:
    ValueError: bad arguments, a MODEL_DIR run that trained something else
      (`run_meta.ResumeMismatchError`), no intact checkpoint left
      (`resume.prepare`), or a grow run that would change its original
      (`grow.GrowMismatchError`).
    run_lock.RunLockedError: another live run holds MODEL_DIR.
    NonFiniteLossError: a non-finite step with `nonfinite_loss='stop'`.
  """
  _check_arguments(
      task_feature_lengths,
      nonfinite_loss,
      train_steps=(train_steps, 1),
      batch_size=(batch_size, 1),
      random_seed=(random_seed, 0),
      num_partitions=(num_partitions, 1),
      num_microbatches=(num_microbatches, 1),
      checkpoint_period=(checkpoint_period, 1),
      keep_checkpoints=(keep_checkpoints, 1),
      log_period=(log_period, 1),
      eval_period=(eval_period, 0),
  )
  from flix import vocabularies  # pylint: disable=g-import-not-at-top

  growth = grow.Growth.load(grow_from) if grow_from else None
  if growth is not None:
    growth.check_model_dir(model_dir)
    initial_checkpoint_path = growth.base_checkpoint(initial_checkpoint_path)
    optimizer = growth.optimizer(optimizer)
  described = vocabularies.run_meta(
      model,
      mixture_or_task_name,
      trainable_patterns,
      initial_checkpoint_path,
      random_seed,
  )
  if growth is not None:
    growth.check(described)
  resume.create_model_dir(model_dir)
  # One writer per MODEL_DIR (process 0 holds it for the run's hosts).
  lock = (
      run_lock.RunLock(model_dir)
      if jax.process_index() == 0
      else contextlib.nullcontext()
  )
  with lock:
    resume_step = resume.prepare(model_dir, described)
    if operative_config is not None:
      with open(os.path.join(model_dir, "config.gin"), "w") as f:
        f.write(operative_config)
    run = build_run(
        model,
        optimizer,
        trainable_patterns,
        initial_checkpoint_path,
        random_seed,
        num_partitions,
        num_microbatches,
    )
    run.meta[vocabularies.META_KEY] = vocabularies.record(
        vocabularies.mixture_vocabulary(mixture_or_task_name), model_dir
    )
    if growth is not None:
      run.meta[grow.META_KEY] = growth.record()
      if resume_step is None:
        run.state = run.state.replace(
            trainable=growth.start(run.state.trainable)
        )
      growth.log(model.feature_space, run.state.trainable)
    partitioning.check_batch_size(batch_size, run.mesh)
    logging.info(
        "Trainable params: %d of %d (%s).",
        train_step_lib.count_params(run.state.trainable),
        train_step_lib.count_params(run.state.trainable)
        + train_step_lib.count_params(run.state.frozen),
        ", ".join(run.meta["trainable_patterns"]),
    )
    checkpointer = checkpoints.Checkpointer(model_dir, keep=keep_checkpoints)
    try:
      _loop(
          run,
          checkpointer,
          model_dir=model_dir,
          resume_step=resume_step,
          mixture_or_task_name=mixture_or_task_name,
          task_feature_lengths=task_feature_lengths,
          train_steps=train_steps,
          batch_size=batch_size,
          random_seed=random_seed,
          pack=pack,
          checkpoint_period=checkpoint_period,
          log_period=log_period,
          eval_period=eval_period,
          evaluate_fn=evaluate_fn,
          nonfinite_loss=nonfinite_loss,
      )
    finally:
      # Also on errors: a save in flight is committed before the end.
      checkpointer.close()
  return run


def _loop(
    run: Run,
    checkpointer: checkpoints.Checkpointer,
    *,
    model_dir: str,
    resume_step: Optional[int],
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    train_steps: int,
    batch_size: int,
    random_seed: int,
    pack: bool,
    checkpoint_period: int,
    log_period: int,
    eval_period: int,
    evaluate_fn: Optional[Callable[..., Any]],
    nonfinite_loss: str,
) -> None:
  """Restores `resume_step` and runs the steps, saves and evaluations."""
  start_step, batches_consumed = 0, 0
  data = {"mixture_or_task_name": mixture_or_task_name, "seed": random_seed}
  if resume_step is not None:
    trainable, opt_state, saved = checkpointer.restore(
        resume_step, run.state.trainable, run.state.opt_state
    )
    run.state = run.state.replace(
        step=jnp.asarray(resume_step, jnp.int32),
        trainable=trainable,
        opt_state=opt_state,
    )
    start_step = resume_step
    batches_consumed = saved["data"]["batches_consumed"]
    if {k: saved["data"].get(k) for k in data} != data:
      logging.warning(
          "The training data or seed differs from the saved run's (%s); "
          "the data position is not continued exactly.",
          saved["data"],
      )
    logging.info(
        "Resumed from step %d of %s.", resume_step, checkpointer.directory
    )
  run.meta["data"] = {**data, "batches_consumed": batches_consumed}

  from flix import featurized  # pylint: disable=g-import-not-at-top
  from flix import input_pipeline  # pylint: disable=g-import-not-at-top

  def is_eval_step(step: int) -> bool:
    return evaluate_fn is not None and (
        (eval_period and step % eval_period == 0) or step == train_steps
    )

  def evaluate(step: int) -> None:
    checkpointer.wait()  # The step's checkpoint is committed first.
    logging.info("Evaluating step %d.", step)
    evaluate_fn(run=run, step=step, model_dir=model_dir)
    resume.record_evaluated_step(model_dir, step)

  progress = ProgressLogger(model_dir, train_steps, start_step)
  guard = _NonFiniteGuard(nonfinite_loss, checkpointer)
  rng = jax.random.PRNGKey(random_seed + 1)
  step, pending, truncation_reported = start_step, None, False
  try:
    with run.mesh, nn.logical_axis_rules(run.rules):
      if (
          start_step
          and is_eval_step(start_step)
          and resume.last_evaluated_step(model_dir) != start_step
      ):
        # The run stopped after saving this step, before its evaluation
        # finished.
        evaluate(start_step)
      if start_step >= train_steps:
        logging.info("The run is complete: step %d.", start_step)
      with featurized.count_truncation() as truncation:
        batches = input_pipeline.train_batches(
            mixture_or_task_name,
            task_feature_lengths,
            batch_size,
            run.model.feature_space,
            seed=random_seed,
            pack=pack,
            skip_batches=batches_consumed,
        )
      while step < train_steps:
        batch = next(batches)
        run.model.check_batch(batch)
        run.state, metrics = run.step_fn(
            run.state, to_device_batch(batch, run.mesh), rng
        )
        step += 1
        guard.check(pending)  # The previous step's, now this one is queued.
        pending = (step, metrics)
        run.meta["data"]["batches_consumed"] = batches_consumed + (
            step - start_step
        )
        if step % log_period == 0 or step == train_steps:
          guard.check(pending)
          pending = None
          progress.log(step, jax.device_get(metrics))
          if not truncation_reported:
            # Once, over the examples read by the first log step.
            truncation_reported = True
            message = featurized.describe_truncations(
                [(mixture_or_task_name, truncation)],
                task_feature_lengths,
                "training examples read so far",
            )
            if message:
              logging.warning("%s", message)
        if step % checkpoint_period == 0 or step == train_steps:
          guard.check(pending)
          pending = None
          logging.info("Saving checkpoint step %d.", step)
          checkpointer.save(
              step,
              run.state.trainable,
              run.state.opt_state,
              {**run.meta, "step": step},
              force=True,
          )
        if is_eval_step(step):
          guard.check(pending)
          pending = None
          evaluate(step)
      guard.check(pending)
  finally:
    progress.close()
