"""The train state, the optimizer over the trainable subset, the train step.

Freezing is a mask built once from the parameter paths (`trainable_patterns`:
'adapters', 'all', or regexes over '/'-joined paths): FLix and LoRA train
the adapters, full fine-tuning trains everything. The frozen part is neither differentiated nor copied
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
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from flix import layer_layout
from flix import layers
from flix import models
from flix import partitioning

PyTree = Any
ADAPTER_PATTERNS = (layers.ADAPTER_PATH_PATTERN,)
ALL_PATTERNS = (r".*",)
# Names a gin file may give instead of regexes.
TRAINABLE_PRESETS = {"adapters": ADAPTER_PATTERNS, "all": ALL_PATTERNS}
TrainablePatterns = Union[str, Sequence[str]]


def trainable_regexes(trainable_patterns: TrainablePatterns) -> tuple[str, ...]:
  """'adapters', 'all', or regexes over '/'-joined param paths -> regexes."""
  if isinstance(trainable_patterns, str):
    if trainable_patterns not in TRAINABLE_PRESETS:
      raise ValueError(
          f"Unknown trainable set {trainable_patterns!r}: use "
          f"{' or '.join(map(repr, TRAINABLE_PRESETS))}, or a list of regexes."
      )
    return TRAINABLE_PRESETS[trainable_patterns]
  return tuple(trainable_patterns)


# ---- Trainable / frozen split ----


def split_params(params: PyTree, trainable_patterns: TrainablePatterns):
  """Splits a nested param dict into (trainable, frozen) nested dicts.

  Patterns match '/'-joined paths of `params` as given (a scanned stack's
  paths read `encoder/layers/...`; the default patterns match either). The
  trainable part comes back per layer, the frozen part as given.
  """
  trainable_patterns = trainable_regexes(trainable_patterns)
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
    trainable_patterns: TrainablePatterns,
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
  """Builds `train_step(state, batch, rng) -> (state, metrics)` (not jitted).

  The rng of a step is `fold_in(rng, state.step)`: a function of the seed
  and the step only, so a resumed run draws what an uninterrupted one does.
  `metrics['nonfinite']` is 1.0 when the step was not applied (non-finite
  loss, gradient norm or update norm).
  """

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
    # A non-finite loss, gradient or update is not applied: the state stays
    # the last good one, and the trainer stops or skips the step.
    finite = (
        jnp.isfinite(metrics["loss"])
        & jnp.isfinite(metrics["grad_norm"])
        & jnp.isfinite(optax.global_norm(updates))
    )
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    keep_if_finite = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old
    )
    return (
        state.replace(
            step=state.step + 1,
            trainable=keep_if_finite(trainable, state.trainable),
            opt_state=keep_if_finite(opt_state, state.opt_state),
        ),
        metrics,
    )

  return train_step


# ---- Sharded, jitted step ----


def optimizer_state_like_params(
    optimizer: optax.GradientTransformation,
    opt_state: PyTree,
    params: PyTree,
    param_values: PyTree,
    fallback: Any,
    is_leaf: Optional[Callable[[Any], bool]] = None,
) -> PyTree:
  """A tree like `opt_state`: each leaf shaped like its param gets that
  param's entry of `param_values` (a sharding, logical axes), every other
  leaf (factored Adafactor rows/columns, counts) gets `fallback`.

  The one rule for placing optimizer state, used by flix's step and by the
  T5X plug-in's optimizer (`flix.t5x_model`).
  """
  return optax.tree_map_params(
      optimizer,
      lambda leaf, value, param: (
          value if leaf.shape == param.shape else fallback
      ),
      opt_state,
      param_values,
      params,
      transform_non_params=lambda _: fallback,
      is_leaf=is_leaf,
  )


def state_shardings(
    model: models.FlixModel,
    optimizer: optax.GradientTransformation,
    trainable_patterns: TrainablePatterns,
    mesh,
    rules,
):
  """The abstract train state and its shardings, without allocating.

  Params follow their logical axes; each optimizer-state leaf shaped like its
  param is sharded like that param (Adam moments, unfactored Adafactor
  slots), other leaves (factored rows/columns, counts) are replicated.

  Returns:
    (abstract TrainState of ShapeDtypeStructs, TrainState of NamedShardings)
  """
  replicated = partitioning.replicated(mesh)
  boxed = model.abstract_params()  # shapes and logical axes
  abstract = jax.eval_shape(
      lambda p: create_train_state(p, optimizer, trainable_patterns),
      nn.unbox(boxed),
  )
  # Split the boxes, not shardings: the trainable part is unstacked per
  # layer, which needs the shapes.
  with mesh, nn.logical_axis_rules(rules):
    trainable, frozen = (
        partitioning.logical_to_sharding(
            nn.get_partition_spec(part), mesh, rules
        )
        for part in split_params(boxed, trainable_patterns)
    )
  opt_state = optimizer_state_like_params(
      optimizer, abstract.opt_state, abstract.trainable, trainable, replicated
  )
  return abstract, TrainState(
      step=replicated, trainable=trainable, frozen=frozen, opt_state=opt_state
  )


def jit_train_step(
    model: models.FlixModel,
    optimizer: optax.GradientTransformation,
    state_sharding,
    mesh,
    num_microbatches: int = 1,
) -> Callable:
  """The jitted, state-donating `train_step(state, batch, rng)` on `mesh`."""
  replicated = partitioning.replicated(mesh)
  return jax.jit(
      make_train_step(model, optimizer, num_microbatches),
      in_shardings=(
          state_sharding,
          partitioning.data_sharding(mesh),
          replicated,
      ),
      out_shardings=(state_sharding, replicated),
      donate_argnums=(0,),
  )
