"""The train state, the optimizer over the trainable subset, the train step.

Freezing is a mask built once from the parameter paths (`trainable_patterns`,
regexes over '/'-joined paths): FLix and LoRA train `.*/lora_[ab]_.*`, full
fine-tuning trains `.*`. The frozen part is neither differentiated nor copied
into optimizer state: the step takes `value_and_grad` w.r.t. the trainable
subtree only.

Layouts (`flix.layer_layout`): the trainable params and their optimizer state
are kept per layer whatever the network's layout, so checkpoints, resumption
and the optimizer's math (Adafactor's per-parameter factoring and clipping)
are the same with and without scanned layers; the frozen base keeps the
network's layout (stacked when scanned) and the model stacks the trainable
leaves into it inside the step.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from flix import layer_layout
from flix import models

PyTree = Any
ADAPTER_PATTERNS = (r".*/lora_[ab]_[^/]*",)
ALL_PATTERNS = (r".*",)


# ---- Trainable / frozen split ----


def split_params(params: PyTree, trainable_patterns: Sequence[str]):
  """Splits a nested param dict into (trainable, frozen) nested dicts.

  Patterns match '/'-joined paths of `params` as given (a scanned stack's
  paths read `encoder/layers/...`; the default patterns match either). The
  trainable part comes back per layer, the frozen part as given.
  """
  regexes = [re.compile(p) for p in trainable_patterns]
  flat = traverse_util.flatten_dict(params, sep="/")
  trainable = {
      k: v for k, v in flat.items() if any(r.fullmatch(k) for r in regexes)
  }
  if not trainable:
    raise ValueError(
        f"No parameter matches the trainable patterns {list(trainable_patterns)}"
        f"; e.g. paths are {list(flat)[:3]}."
    )
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  return (
      layer_layout.unstack_layers(
          traverse_util.unflatten_dict(trainable, sep="/")
      ),
      traverse_util.unflatten_dict(frozen, sep="/"),
  )


def merge_params(trainable: PyTree, frozen: PyTree) -> PyTree:
  """One param tree (mixed layouts if the frozen part is stacked)."""
  flat = traverse_util.flatten_dict(frozen, sep="/")
  flat.update(traverse_util.flatten_dict(trainable, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


def count_params(tree: PyTree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


# ---- Optimizer ----


def learning_rate_schedule(
    base_learning_rate: float = 1e-3,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int = 0,
) -> optax.Schedule:
  """T5X-style schedules: constant, rsqrt (T5 pre-training), linear, cosine.

  All start with a linear warmup of `warmup_steps` (none if 0).
  """
  if schedule == "constant":
    main = optax.constant_schedule(base_learning_rate)
  elif schedule == "rsqrt":
    offset = max(warmup_steps, 1)
    main = lambda step: base_learning_rate * jnp.sqrt(
        offset / jnp.maximum(step + offset, 1.0)
    )
  elif schedule == "linear":
    main = optax.linear_schedule(
        base_learning_rate, 0.0, max(total_steps - warmup_steps, 1)
    )
  elif schedule == "cosine":
    main = optax.cosine_decay_schedule(
        base_learning_rate, max(total_steps - warmup_steps, 1)
    )
  else:
    raise ValueError(
        f"Unknown learning rate schedule {schedule!r}; use "
        "constant, rsqrt, linear or cosine."
    )
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, base_learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def make_optimizer(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    name: str = "adafactor",
    weight_decay: float = 0.0,
    clip_norm: Optional[float] = None,
    decay_rate: float = 0.8,
    multiply_by_parameter_scale: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
) -> optax.GradientTransformation:
  """Adafactor (T5X's default; decay 0.8) or AdamW.

  `multiply_by_parameter_scale` defaults to False: with LoRA's zero-initialised
  B, T5X's default (True) scales early updates by the tiny parameter RMS.
  """
  if name == "adafactor":
    tx = optax.adafactor(
        learning_rate,
        decay_rate=decay_rate,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        weight_decay_rate=weight_decay or None,
    )
  elif name == "adamw":
    tx = optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)
  elif name == "sgd":
    tx = optax.sgd(learning_rate)
  else:
    raise ValueError(f"Unknown optimizer {name!r}; use adafactor, adamw, sgd.")
  if clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return tx


# ---- Train state and step ----


@flax.struct.dataclass
class TrainState:
  """What a train step reads and writes.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    trainable: the trained params (adapters, or all for full fine-tuning).
    frozen: the frozen params (the base model); never updated.
    opt_state: optimizer state of `trainable` only.
  """

  step: jax.Array
  trainable: PyTree
  frozen: PyTree
  opt_state: PyTree

  @property
  def params(self) -> PyTree:
    return merge_params(self.trainable, self.frozen)


def create_train_state(
    params: PyTree,
    tx: optax.GradientTransformation,
    trainable_patterns: Sequence[str],
) -> TrainState:
  trainable, frozen = split_params(params, trainable_patterns)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      trainable=trainable,
      frozen=frozen,
      opt_state=tx.init(trainable),
  )


def _split_microbatches(batch: Mapping[str, jax.Array], num: int):
  return {
      k: v.reshape((num, v.shape[0] // num) + v.shape[1:])
      for k, v in batch.items()
  }


def make_train_step(
    model: models.FlixModel,
    tx: optax.GradientTransformation,
    num_microbatches: int = 1,
) -> Callable:
  """Builds `train_step(state, batch, rng) -> (state, metrics)` (not jitted)."""

  def train_step(state: TrainState, batch, rng):
    dropout_rng, feature_rng = jax.random.split(
        jax.random.fold_in(rng, state.step)
    )

    def loss_of(trainable, microbatch, dropout_rng, feature_rng):
      params = merge_params(trainable, state.frozen)
      return model.loss_fn(params, microbatch, dropout_rng, feature_rng)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if num_microbatches <= 1:
      (_, metrics), grads = grad_fn(
          state.trainable, batch, dropout_rng, feature_rng
      )
    else:
      # Accumulates the trainable subset's gradients only: with FLix that is
      # the adapters, not a full-size copy of the model.
      def accumulate(carry, inputs):
        grads, metrics = carry
        microbatch, index = inputs
        (_, mb_metrics), mb_grads = grad_fn(
            state.trainable,
            microbatch,
            jax.random.fold_in(dropout_rng, index),
            jax.random.fold_in(feature_rng, index),
        )
        return (
            jax.tree.map(jnp.add, grads, mb_grads),
            jax.tree.map(jnp.add, metrics, mb_metrics),
        ), None

      zeros = jax.tree.map(jnp.zeros_like, state.trainable)
      metric_shapes = jax.eval_shape(
          lambda: grad_fn(
              state.trainable,
              jax.tree.map(
                  lambda v: v[0], _split_microbatches(batch, num_microbatches)
              ),
              dropout_rng,
              feature_rng,
          )[0][1]
      )
      zero_metrics = jax.tree.map(
          lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes
      )
      (grads, metrics), _ = jax.lax.scan(
          accumulate,
          (zeros, zero_metrics),
          (
              _split_microbatches(batch, num_microbatches),
              jnp.arange(num_microbatches),
          ),
      )
      metrics = {
          k: (v if k == "weight_sum" else v / num_microbatches)
          for k, v in metrics.items()
      }
      if model.loss_normalizing_factor == models.NUM_REAL_TARGET_TOKENS:
        # Each microbatch loss is already a mean: average, don't sum.
        grads = jax.tree.map(lambda g: g / num_microbatches, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return (
        state.replace(
            step=state.step + 1, trainable=trainable, opt_state=opt_state
        ),
        metrics,
    )

  return train_step


def make_eval_step(model: models.FlixModel) -> Callable:
  """`eval_step(params, batch) -> metrics` (teacher-forced loss, no dropout)."""

  def eval_step(params, batch):
    return model.loss_fn(params, batch)[1]

  return eval_step
