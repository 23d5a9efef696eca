"""flix as a T5X plug-in: a `t5x.models.EncoderDecoderModel` around FlixModel.

`FlixEncoderDecoderModel` is what T5X's `MODEL` macro holds when a flix config
runs under `python -m t5x.train | t5x.eval | t5x.infer`. It adds no second
copy of anything: the network, the loss, feature dropout, the decoding step
and the feature converter are flix's own (`flix.models.FlixModel`,
`flix.feature_converter.FlixFeatureConverter`); T5X supplies the train loop,
partitioner, checkpoints, evaluator and decoding loops.

  - Batches carry per-token feature ids (`encoder_feature_ids`,
    `decoder_feature_ids` [B, L, G]) because `FEATURE_CONVERTER_CLS` is
    flix's converter over the model's feature space.
  - Training draws feature dropout from the dropout rng T5X passes in.
  - Decoding (T5X's `beam_search` or `temperature_sample`, with the KV cache)
    goes through `FlixModel.decoder_step`, so every decoded token uses its
    example's features.
  - Parameters carry `params_axes` from flix's logical axes, so T5X's
    `PjitPartitioner` shards base kernels and adapters alike (with
    `flix.partitioning.adapter_axis_rules()` as `additional_rules`).
  - Parameters are per layer (`encoder/layers_0/...`, the public T5X
    layout) in T5X's train state and checkpoints, whether or not the network
    scans its layers (`T5Config.scan_layers`): a scanned network gets them
    stacked inside each step (`FlixModel.network_layout`), so T5X restores
    public checkpoints, and flix reads T5X runs, unchanged.
  - The frozen base is neither differentiated (its leaves pass through
    `stop_gradient` in the loss) nor held in optimizer state
    (`TrainableSubsetOptimizer` keeps optax state for the trainable subset
    only).
  - A grow run (`grow_from`, `flix.grow`) initializes its adapters with the
    original run's in the old values' rows, and its optimizer never changes
    those rows: only the new values' adapters train, as under flix.train.

Importing this module imports t5x; nothing else in flix does.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping, MutableMapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import seqio
from flax import serialization
from flax import traverse_util
from flax.linen import partitioning as flax_partitioning
from t5x import decoding as t5x_decoding
from t5x import models as t5x_models
from t5x import optimizers as t5x_optimizers

from flix import feature_converter
from flix import features as features_lib
from flix import grow
from flix import layer_layout
from flix import models
from flix import train_step

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Array]


class TrainableSubsetOptimizer(t5x_optimizers.OptaxWrapper):
  """A T5X optimizer def that applies an optax optimizer to trainable params.

  The optax state covers the trainable subset only (`trainable_patterns`, as
  in flix's own step: 'adapters', 'all' or regexes), so frozen base weights
  hold no optimizer slots and are never updated. T5X checkpoints, restores
  and partitions this state like any optax state; each slot shaped like its
  parameter is partitioned like it (`train_step.optimizer_state_like_params`).
  """

  def __init__(
      self,
      optax_optimizer: optax.GradientTransformation,
      trainable_patterns: train_step.TrainablePatterns = "adapters",
  ):
    super().__init__(optax_optimizer)
    self.trainable_patterns = train_step.trainable_regexes(trainable_patterns)

  def _split(self, tree: PyTree) -> tuple[PyTree, PyTree]:
    return train_step.split_params(tree, self.trainable_patterns)

  def init_state(self, params):
    trainable, _ = self._split(params)
    return t5x_optimizers.OptimizerState(
        step=0, param_states=self.optax_optimizer.init(trainable)
    )

  def apply_gradient(self, hyper_params, params, state, grads):
    del hyper_params  # The schedule lives in the optax optimizer.
    trainable, frozen = self._split(params)
    trainable_grads, _ = self._split(grads)
    updates, param_states = self.optax_optimizer.update(
        trainable_grads, state.param_states, trainable
    )
    new_params = train_step.merge_params(
        optax.apply_updates(trainable, updates), frozen
    )
    if isinstance(params, flax.core.FrozenDict):
      new_params = flax.core.freeze(new_params)
    return new_params, t5x_optimizers.OptimizerState(
        step=state.step + 1, param_states=param_states
    )

  def derive_logical_axes(self, optimizer, param_logical_axes):
    trainable_axes, _ = self._split(param_logical_axes)
    trainable, _ = self._split(optimizer.target)
    state_axes = train_step.optimizer_state_like_params(
        self.optax_optimizer,
        optimizer.state.param_states,
        trainable,
        trainable_axes,
        None,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    axes = jax.tree.map(lambda _: None, optimizer.state_dict())
    axes["target"] = flax.core.unfreeze(param_logical_axes)
    axes["state"]["param_states"] = serialization.to_state_dict(state_axes)
    return optimizer.restore_state(flax.core.unfreeze(axes))


def params_axes(boxed_params: PyTree) -> dict[str, Any]:
  """T5X's `params_axes` collection (`<leaf>_axes` AxisMetadata) of boxed
  (logically partitioned) params."""
  specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed_params))
  return traverse_util.unflatten_dict(
      {
          path[:-1]
          + (path[-1] + "_axes",): flax_partitioning.AxisMetadata(
              names=tuple(spec)
          )
          for path, spec in specs.items()
      }
  )


def decode_fn_of(
    decode_kwargs: Optional[Mapping[str, Any]],
) -> tuple[t5x_models.DecodeFnCallable, t5x_models.DecoderParams]:
  """T5X's decode function and decoder params for flix's `DECODE_KWARGS`.

  `{'method': 'greedy'}` (the default) -> `temperature_sample` at
  temperature 0; `'sample'` with `temperature`, `topk`, `num_decodes`;
  `'beam'` with `beam_size`, `alpha` -> `beam_search`.
  """
  kwargs = dict(decode_kwargs or {"method": "greedy"})
  method = kwargs.pop("method", "greedy")
  if method == "beam":
    fn = functools.partial(
        t5x_decoding.beam_search, alpha=kwargs.pop("alpha", 0.6)
    )
    decodes = kwargs.pop("beam_size", 4)
  elif method in ("greedy", "sample"):
    temperature = kwargs.pop("temperature", 1.0)
    fn = functools.partial(
        t5x_decoding.temperature_sample,
        temperature=0.0 if method == "greedy" else temperature,
        topk=kwargs.pop("topk", 0),
    )
    decodes = kwargs.pop("num_decodes", 1)
  else:
    raise ValueError(
        f"Unknown decoding method {method!r}; use greedy, sample or beam."
    )
  if kwargs:
    raise ValueError(
        f"Decoding options {sorted(kwargs)} do not apply to method "
        f"{method!r}."
    )
  return fn, t5x_models.DecoderParams(num_decodes=decodes)


class FlixEncoderDecoderModel(t5x_models.EncoderDecoderModel):
  """A T5X `EncoderDecoderModel` whose computation is a `FlixModel`'s.

  Attributes:
    flix_model: the wrapped flix model (network config, feature space, loss).
  """

  def __init__(
      self,
      flix_model: models.FlixModel,
      vocabulary: seqio.Vocabulary,
      optimizer: Optional[optax.GradientTransformation] = None,
      trainable_patterns: train_step.TrainablePatterns = "adapters",
      decode_kwargs: Optional[Mapping[str, Any]] = None,
      output_vocabulary: Optional[seqio.Vocabulary] = None,
      grow_from: Optional[str] = None,
  ):
    """Constructor.

    Args:
      flix_model: the flix model (from the model gins' `FLIX_MODEL`).
      vocabulary: the inputs vocabulary (and the targets', unless
        `output_vocabulary` is given); must equal the tasks' (T5X checks).
      optimizer: optax optimizer of the trainable params (training only).
      trainable_patterns: what is trained: 'adapters', 'all' or regexes over
        '/'-joined param paths; everything else is frozen.
      decode_kwargs: flix's `DECODE_KWARGS` (see `decode_fn_of`).
      output_vocabulary: the targets vocabulary, default `vocabulary`.
      grow_from: a trained FLix run this one grows (GROW_FROM, `flix.grow`):
        initialization places its adapters in the old values' rows and the
        optimizer never changes those rows (`grow.freeze_rows`).
    """
    space = flix_model.feature_space or features_lib.FeatureSpace(groups=())
    self._growth = grow.Growth.load(grow_from) if grow_from else None
    if self._growth is not None and optimizer is not None:
      optimizer = self._growth.optimizer(optimizer)
    decode_fn, decoder_params = decode_fn_of(decode_kwargs)
    super().__init__(
        module=flix_model.module,
        input_vocabulary=vocabulary,
        output_vocabulary=output_vocabulary or vocabulary,
        optimizer_def=(
            TrainableSubsetOptimizer(optimizer, trainable_patterns)
            if optimizer is not None
            else None
        ),
        decode_fn=decode_fn,
        feature_converter_cls=functools.partial(
            feature_converter.FlixFeatureConverter, space
        ),
        # The loss is FlixModel's (`loss_fn` below); these are for show.
        label_smoothing=flix_model.label_smoothing,
        z_loss=flix_model.z_loss,
        default_decoder_params=decoder_params,
    )
    self.flix_model = flix_model
    self._trainable = [
        re.compile(p) for p in train_step.trainable_regexes(trainable_patterns)
    ]

  # ---- Parameters ----

  def get_initial_variables(
      self,
      rng: Array,
      input_shapes: Mapping[str, Any],
      input_types: Optional[Mapping[str, Any]] = None,
  ) -> dict[str, PyTree]:
    """`params` and their logical `params_axes` (shapes do not depend on the
    batch, so `input_shapes` is not needed)."""
    del input_shapes, input_types
    # Per layer even when the network scans its layers (the model stacks
    # them in each step): T5X's checkpoints, restore from public
    # checkpoints and assignment maps then see the public layout.
    boxed = layer_layout.unstack_layers(self.flix_model.init_boxed(rng))
    params = nn.unbox(boxed)
    if self._growth is not None:
      params = self._growth.start(params)
    return {"params": params, "params_axes": params_axes(boxed)}

  def _stop_frozen_gradients(self, params: PyTree) -> PyTree:
    """`params` with `stop_gradient` on every non-trainable leaf."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict(
        {
            path: (
                value
                if any(r.fullmatch(path) for r in self._trainable)
                else jax.lax.stop_gradient(value)
            )
            for path, value in flat.items()
        },
        sep="/",
    )

  # ---- Forward and loss ----

  def _compute_logits(
      self,
      params: PyTree,
      batch: Batch,
      dropout_rng: Optional[Array] = None,
      mutable: Any = False,
      other_variables: Optional[PyTree] = None,
  ) -> Array:
    """Teacher-forced logits [B, Ld, V] (no feature dropout)."""
    if mutable or other_variables:
      raise NotImplementedError(
          "FlixEncoderDecoderModel does not return intermediates or other "
          "variable collections (score_batch(return_intermediates=True))."
      )
    return self.flix_model.compute_logits(params, batch, dropout_rng)

  def loss_fn(
      self,
      params: PyTree,
      batch: Batch,
      dropout_rng: Optional[Array],
  ) -> tuple[Array, Mapping[str, Any]]:
    """FlixModel's loss; training (a dropout rng) adds feature dropout."""
    params = self._stop_frozen_gradients(params)
    feature_rng = None
    if dropout_rng is not None:
      dropout_rng, feature_rng = jax.random.split(dropout_rng)
    logits = self.flix_model.compute_logits(
        params, batch, dropout_rng, feature_rng
    )
    loss, flix_metrics = self.flix_model.loss_from_logits(logits, batch)
    segment_ids = {
        key[: -len("_segment_ids")]: value
        for key, value in batch.items()
        if key.endswith("_segment_ids")
    } or {
        key: value != 0
        for key, value in batch.items()
        if key in ("encoder_input_tokens", "decoder_target_tokens")
    }
    metrics = self._compute_metrics(
        logits=logits,
        targets=batch["decoder_target_tokens"],
        mask=models.FlixModel.loss_weights(batch),
        loss=loss,
        z_loss=flix_metrics["z_loss"],
        segment_ids=segment_ids,
    )
    return loss, metrics

  # ---- Decoding ----

  def predict_batch_with_aux(
      self,
      params: PyTree,
      batch: Batch,
      rng: Optional[Array] = None,
      decoder_params: Optional[MutableMapping[str, Any]] = None,
      return_all_decodes: Optional[bool] = None,
      num_decodes: Optional[int] = None,
      prompt_with_targets: bool = False,
  ) -> tuple[Array, Mapping[str, Array]]:
    """Decodes with T5X's decode function; each example uses its features.

    Returns:
      (decodes [B, max_len] (or [B, num_decodes, max_len] with
      `return_all_decodes`, best last, as T5X sorts them), {'scores': ...}).
    """
    if prompt_with_targets:
      raise NotImplementedError(
          "FlixEncoderDecoderModel does not decode from target prompts."
      )
    if return_all_decodes is None:
      return_all_decodes = self._default_decoder_params.return_all_decodes
    if num_decodes is None:
      num_decodes = self._default_decoder_params.num_decodes
    targets = batch["decoder_input_tokens"]
    step_fn, cache = self.flix_model.decoder_step(
        params, batch, targets.shape[1], num_decodes
    )
    decoder_params = dict(decoder_params or {})
    if rng is not None:
      decoder_params["decode_rng"] = rng
    decoder_params.setdefault("eos_id", self.output_vocabulary.eos_id or 1)
    decodes, scores = self._decode_fn(
        inputs=jnp.zeros_like(targets),
        cache=cache,
        tokens_to_logits=step_fn,
        num_decodes=num_decodes,
        cache_offset=self.flix_model.cache_offset,
        **decoder_params,
    )
    if return_all_decodes:
      return decodes, {"scores": scores}
    return decodes[:, -1, :], {"scores": scores[:, -1]}
