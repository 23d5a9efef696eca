"""The encoder-decoder model: loss, scoring and prediction around the network.

A `FlixModel` binds a `network.Transformer` to the batch layout produced by
`flix.feature_converter.FlixFeatureConverter` (numpy arrays):

  encoder_input_tokens  [B, Le]      decoder_input_tokens   [B, Ld]
  decoder_target_tokens [B, Ld]      decoder_loss_weights   [B, Ld]
  encoder_feature_ids   [B, Le, G]   decoder_feature_ids    [B, Ld, G]
  (packed: encoder_/decoder_segment_ids, encoder_/decoder_positions [B, L])

Feature dropout happens here, in training only: one draw per (example, group),
shared by the example's encoder and decoder tokens.

Params may be given per layer (the public layout), stacked, or mixed; every
method puts them in the network's layout (`layer_layout.to_layout`), which is a
no-op for leaves already in it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flix import decoding
from flix import features as features_lib
from flix import layer_layout
from flix import network
from flix import routing

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Array]

# T5X's special loss normalisation: divide by the number of real target tokens.
NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"


def cross_entropy_with_z_loss(
    logits: Array,
    targets: Array,
    weights: Array,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
):
  """T5X's weighted cross entropy with label smoothing and z-loss.

  Args:
    logits: [B, L, V] float32.
    targets: int [B, L].
    weights: [B, L] loss weights (0 on padding).
    label_smoothing: mass spread uniformly over the vocabulary.
    z_loss: coefficient of log(Z)^2, which keeps the softmax normaliser near 1.

  Returns:
    (sum of weighted token losses, sum of weighted z-losses), scalars.
  """
  vocab = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  # Entropy of the smoothed target distribution, so a perfect model has 0 loss.
  normalizing_constant = (
      -(
          confidence * np.log(confidence)
          + (vocab - 1) * low * np.log(low + 1e-20)
      )
      if label_smoothing
      else 0.0
  )
  soft_targets = jax.nn.one_hot(targets, vocab) * (confidence - low) + low
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  token_loss = (
      -jnp.sum(soft_targets * log_probs, axis=-1) - normalizing_constant
  )
  token_z_loss = z_loss * jnp.square(log_z)
  return (
      jnp.sum((token_loss + token_z_loss) * weights),
      jnp.sum(token_z_loss * weights),
  )


@dataclasses.dataclass(frozen=True)
class FlixModel:
  """Loss, scoring and decoding for an mT5 network with FLix adapters.

  Attributes:
    config: the network config (its `feature_space` says which adapters exist).
    z_loss: T5X z-loss coefficient (1e-4 in T5X configs).
    label_smoothing: label smoothing mass.
    loss_normalizing_factor: None (sum over tokens, T5X's default), a number,
      or "NUM_REAL_TARGET_TOKENS" (mean over real target tokens).
  """

  config: network.T5Config
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  loss_normalizing_factor: Union[None, float, str] = NUM_REAL_TARGET_TOKENS

  @property
  def module(self) -> network.Transformer:
    return network.Transformer(self.config)

  @property
  def feature_space(self) -> Optional[features_lib.FeatureSpace]:
    return self.config.feature_space

  @property
  def num_groups(self) -> int:
    space = self.feature_space
    return space.num_groups if space is not None else 0

  # ---- Parameters ----

  def dummy_batch(
      self, batch_size: int, input_length: int, target_length: int
  ) -> dict[str, np.ndarray]:
    groups = max(self.num_groups, 1)
    return {
        "encoder_input_tokens": np.ones((batch_size, input_length), np.int32),
        "decoder_input_tokens": np.ones((batch_size, target_length), np.int32),
        "decoder_target_tokens": np.ones((batch_size, target_length), np.int32),
        "encoder_feature_ids": np.zeros(
            (batch_size, input_length, groups), np.int32
        ),
        "decoder_feature_ids": np.zeros(
            (batch_size, target_length, groups), np.int32
        ),
    }

  def init_boxed(
      self, rng: Array, input_length: int = 8, target_length: int = 8
  ) -> PyTree:
    """Initial params with their logical-partitioning boxes, in the network's
    layout. Their values do not depend on the layout: a scanning network's
    are the unrolled network's, stacked (`nn.scan` would draw other random
    numbers), so a random base is rebuilt alike with or without scan."""
    if self.config.scan_layers:
      unrolled = dataclasses.replace(
          self,
          config=dataclasses.replace(
              self.config, scan_layers=False, remat_policy="none"
          ),
      )
      return layer_layout.stack_layers(
          unrolled.init_boxed(rng, input_length, target_length)
      )
    return self.module_init(rng, input_length, target_length)

  def module_init(
      self, rng: Array, input_length: int = 8, target_length: int = 8
  ) -> PyTree:
    """The network module's own boxed params (`nn.scan`'s stacked tree when
    it scans its layers; `init_boxed` initializes scanned networks
    unrolled instead)."""
    batch = self.dummy_batch(1, input_length, target_length)
    return self.module.init(
        rng,
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
        self.feature_ids(batch, "encoder"),
        self.feature_ids(batch, "decoder"),
        enable_dropout=False,
    )["params"]

  def network_layout(self, params: PyTree) -> PyTree:
    """`params` in the network's layout (stacked layers if it scans them)."""
    return layer_layout.to_layout(params, self.config.scan_layers)

  def init_params(self, rng: Array) -> PyTree:
    """Initial params as plain arrays (unboxed), in the network's layout."""
    return nn.unbox(self.init_boxed(rng))

  def abstract_params(self) -> PyTree:
    """Boxed ShapeDtypeStructs of the params: no allocation."""
    return jax.eval_shape(self.init_boxed, jax.random.PRNGKey(0))

  def param_logical_axes(self) -> PyTree:
    """Tree of logical PartitionSpecs, same structure as the params."""
    return nn.get_partition_spec(self.abstract_params())

  def check_batch(self, batch: Batch) -> None:
    """Raises a readable error for a host batch the network cannot compute
    exactly (a packed row with more runs of feature ids than `max_segments`).

    Feature dropout draws per packed example, so with dropout every example
    of a row may become a run of its own: runs are then counted per segment.
    """
    space = self.feature_space
    if space is None:
      return
    dropout = bool(np.any(space.dropout_rates() > 0))
    for side in ("encoder", "decoder"):
      ids = np.asarray(batch[f"{side}_feature_ids"])
      segments = batch.get(f"{side}_segment_ids")
      if dropout and segments is not None:
        ids = np.concatenate([ids, np.asarray(segments)[..., None]], axis=-1)
      routing.check_max_segments(ids, self.config.max_segments)

  # ---- Forward ----

  def feature_ids(self, batch: Batch, side: str) -> Optional[Array]:
    """The batch's `{side}_feature_ids` [B, L, G], or None without adapters."""
    if self.feature_space is None:
      return None
    return batch[f"{side}_feature_ids"]

  def _dropped_feature_ids(self, batch: Batch, rng: Array):
    """Applies feature dropout to encoder and decoder ids alike."""
    enc_ids, dec_ids = self.feature_ids(batch, "encoder"), self.feature_ids(
        batch, "decoder"
    )
    space = self.feature_space
    if space is None or rng is None or not np.any(space.dropout_rates() > 0):
      return enc_ids, dec_ids
    num_slots = max(enc_ids.shape[1], dec_ids.shape[1]) + 1
    keep = features_lib.sample_feature_keep(
        rng, enc_ids.shape[0], num_slots, space.dropout_rates()
    )
    return (
        features_lib.apply_feature_keep(
            enc_ids, keep, batch.get("encoder_segment_ids")
        ),
        features_lib.apply_feature_keep(
            dec_ids, keep, batch.get("decoder_segment_ids")
        ),
    )

  def compute_logits(
      self,
      params: PyTree,
      batch: Batch,
      dropout_rng: Optional[Array] = None,
      feature_rng: Optional[Array] = None,
  ) -> Array:
    """Teacher-forced logits, float32 [B, Ld, V]."""
    enc_ids, dec_ids = self._dropped_feature_ids(batch, feature_rng)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {"params": self.network_layout(params)},
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
        enc_ids,
        dec_ids,
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        encoder_positions=batch.get("encoder_positions"),
        decoder_positions=batch.get("decoder_positions"),
        enable_dropout=dropout_rng is not None,
        rngs=rngs,
    )

  def loss_fn(
      self,
      params: PyTree,
      batch: Batch,
      dropout_rng: Optional[Array] = None,
      feature_rng: Optional[Array] = None,
  ):
    """Training loss (dropout and feature dropout when rngs are given).

    Returns:
      (loss scalar, metrics dict of scalars: loss, z_loss, weight_sum,
      accuracy, token_loss).
    """
    logits = self.compute_logits(params, batch, dropout_rng, feature_rng)
    return self.loss_from_logits(logits, batch)

  def loss_from_logits(self, logits: Array, batch: Batch):
    """The loss of teacher-forced logits [B, Ld, V] (see `loss_fn`)."""
    targets = batch["decoder_target_tokens"]
    weights = self.loss_weights(batch)
    total, z_total = cross_entropy_with_z_loss(
        logits, targets, weights, self.label_smoothing, self.z_loss
    )
    weight_sum = jnp.sum(weights)
    if self.loss_normalizing_factor == NUM_REAL_TARGET_TOKENS:
      denominator = jnp.maximum(weight_sum, 1.0)
    elif self.loss_normalizing_factor is None:
      denominator = 1.0
    else:
      denominator = float(self.loss_normalizing_factor)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
    metrics = {
        "loss": total / denominator,
        "z_loss": z_total / denominator,
        "weight_sum": weight_sum,
        "accuracy": correct / jnp.maximum(weight_sum, 1.0),
        "token_loss": (total - z_total) / jnp.maximum(weight_sum, 1.0),
    }
    return total / denominator, metrics

  @staticmethod
  def loss_weights(batch: Batch) -> Array:
    """Per-token loss weights, float32 [B, Ld] (1 on real targets)."""
    weights = batch.get("decoder_loss_weights")
    if weights is None:
      weights = batch["decoder_target_tokens"] > 0
    return jnp.asarray(weights, jnp.float32)

  def score_batch(self, params: PyTree, batch: Batch) -> Array:
    """Log-likelihood of each target sequence, [B]."""
    logits = self.compute_logits(params, batch)
    targets = batch["decoder_target_tokens"]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    return jnp.sum(token * (targets > 0), axis=-1)

  # ---- Decoding ----

  def decoder_step(
      self, params: PyTree, batch: Batch, max_decode_length: int, fan_out: int
  ) -> tuple[decoding.TokensToLogits, PyTree]:
    """Encodes the batch once; returns the decoding step and an empty cache.

    The step callback (`decoding.model_tokens_to_logits`) sees the flat batch
    of B * fan_out rows (each example repeated `fan_out` times, as the
    decoding functions of flix and T5X expand it); every step of an example
    uses that example's features (`encoder_feature_ids[:, 0]`).

    Returns:
      (tokens_to_logits(state) -> (logits [B * fan_out, V], cache), the cache
      for B examples, which the decoding function expands on its batch axis
      `cache_offset`).
    """
    params = self.network_layout(params)
    tokens = batch["encoder_input_tokens"]
    enc_ids = self.feature_ids(batch, "encoder")
    example_ids = None if enc_ids is None else enc_ids[:, 0, :]  # [B, G]
    encoded = self.module.apply(
        {"params": params},
        tokens,
        enc_ids,
        enable_dropout=False,
        method=network.Transformer.encode,
    )
    expand = lambda x: (
        None if x is None else decoding.flat_batch_beam_expand(x, fan_out)
    )
    step_fn = decoding.model_tokens_to_logits(
        self.module,
        params,
        expand(encoded),
        expand(tokens),
        max_decode_length,
        encoder_feature_ids=expand(enc_ids),
        decoder_feature_ids=expand(example_ids),
    )
    cache = decoding.init_cache(
        self.module, self.config, tokens.shape[0], max_decode_length
    )
    return step_fn, cache

  @property
  def cache_offset(self) -> int:
    """The batch axis of the decoding cache's arrays: a scanned network's
    cache is stacked over layers in front of the batch (T5X's name)."""
    return 1 if self.config.scan_layers else 0

  def predict_batch(
      self,
      params: PyTree,
      batch: Batch,
      max_decode_length: int,
      method: str = "greedy",
      beam_size: int = 4,
      temperature: float = 1.0,
      topk: int = 0,
      alpha: float = 0.6,
      rng: Optional[Array] = None,
      num_decodes: int = 1,
  ):
    """Decodes targets for the batch's inputs with the KV cache.

    Returns:
      (tokens int [B, num_decodes, max_decode_length], scores [B, num_decodes])
      best first.
    """
    fan_out = beam_size if method == "beam" else num_decodes
    step_fn, cache = self.decoder_step(
        params, batch, max_decode_length, fan_out
    )
    batch_size = batch["encoder_input_tokens"].shape[0]
    if method == "beam":
      return decoding.beam_search(
          step_fn,
          cache,
          batch_size=batch_size,
          max_decode_len=max_decode_length,
          beam_size=beam_size,
          alpha=alpha,
          cache_offset=self.cache_offset,
      )
    if method == "greedy":
      temperature = 0.0
    elif method != "sample":
      raise ValueError(
          f"Unknown decoding method {method!r}; use greedy, " "sample or beam."
      )
    return decoding.temperature_sample(
        step_fn,
        cache,
        batch_size=batch_size,
        max_decode_len=max_decode_length,
        rng=rng,
        temperature=temperature,
        topk=topk,
        num_decodes=num_decodes,
        cache_offset=self.cache_offset,
    )
