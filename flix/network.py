"""mT5 / T5 v1.1 encoder-decoder with T5X semantics, and FLix adapters.

The network computes what T5X's `examples/t5/network.py` computes, with the
same parameter tree (`token_embedder/embedding`,
`encoder/layers_0/attention/query/kernel`, ..., `decoder/logits_dense/kernel`;
docs/mt5_reference.md §2), so public T5X mT5 checkpoints and HF
`google/mt5-*` weights map 1:1. T5X quirks kept for checkpoint compatibility
(docs/mt5_reference.md §1): RMSNorm in float32, no 1/sqrt(head_dim) at run
time (it is folded into the query initializer), 2-D joined attention kernels,
one relative-position table per stack, dropout masks shared over the length
axis, float32 untied logits.

FLix: the dense layers named in `T5Config.adapter_targets` (in every attention
kind and MLP of the stacks in `adapter_stacks`) carry per-feature low-rank
adapters (`layers.FlixDense`), stored as leaves `lora_a_<group>` /
`lora_b_<group>` next to `kernel`. Feature ids are per token, int [B, L, G],
aligned with the tokens they belong to (a [B, G] per-example array is
broadcast over L): encoder layers use the encoder ids; decoder self-attention
and MLP the decoder ids; cross-attention's query/out the decoder ids and its
key/value, which project encoder outputs, the encoder ids.

Layer stacks: a Python loop over `layers_<i>` modules (T5X's names), or with
`T5Config.scan_layers` one `nn.scan` over a module named `layers` whose params
are stacked on a leading 'layers' axis (`flix.layer_layout` converts to and
from the per-layer layout); each layer is rematerialised in the backward pass
per `T5Config.remat_policy`. Both share one feature routing per stack, passed
to every layer.

Dimension key: B batch, L length (Le encoder, Ld decoder), D emb_dim,
H heads, K head_dim, F mlp_dim, V vocab, G feature groups.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flix import layer_layout
from flix import layers
from flix import t5_config
from flix import t5_layers

# The config and presets live in t5_config; they are part of this module's API
# (`network.T5Config`, `network.preset` in gin files).
from flix.t5_config import PRESETS, T5Config, preset  # pylint: disable=unused-import

Array = jax.Array

# ---- Stacks ----


class EncoderLayer(nn.Module):
  """Pre-norm self-attention and MLP blocks with residuals (T5X names)."""

  config: T5Config
  adapted: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, inputs, ids, mask, bias, deterministic):
    cfg = self.config
    x = t5_layers.LayerNorm(cfg.dtype, name="pre_attention_layer_norm")(inputs)
    x = t5_layers.Attention(cfg, self.adapted, name="attention")(
        x, x, ids, ids, mask, bias, deterministic=deterministic
    )
    x = t5_layers.dropout(cfg, x, deterministic) + inputs
    y = t5_layers.LayerNorm(cfg.dtype, name="pre_mlp_layer_norm")(x)
    y = t5_layers.MlpBlock(cfg, self.adapted, name="mlp")(y, ids, deterministic)
    y = t5_layers.dropout(cfg, y, deterministic) + x
    y = t5_layers.constrain(y, "batch", "length", "embed")  # [B, L, D]
    return (y, None) if cfg.scan_layers else y


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention, cross-attention and MLP blocks."""

  config: T5Config
  adapted: tuple[str, ...] = ()

  @nn.compact
  def __call__(
      self,
      inputs,
      encoded,
      dec_ids,
      enc_ids,
      decoder_mask,
      cross_mask,
      bias,
      deterministic,
      decode,
  ):
    cfg = self.config
    x = t5_layers.LayerNorm(cfg.dtype, name="pre_self_attention_layer_norm")(
        inputs
    )
    x = t5_layers.Attention(cfg, self.adapted, name="self_attention")(
        x,
        x,
        dec_ids,
        dec_ids,
        decoder_mask,
        bias,
        deterministic=deterministic,
        decode=decode,
    )
    x = t5_layers.dropout(cfg, x, deterministic) + inputs
    y = t5_layers.LayerNorm(cfg.dtype, name="pre_cross_attention_layer_norm")(x)
    y = t5_layers.Attention(
        cfg, self.adapted, name="encoder_decoder_attention"
    )(
        y,
        encoded,
        dec_ids,
        enc_ids,
        cross_mask,
        None,
        deterministic=deterministic,
    )
    y = t5_layers.dropout(cfg, y, deterministic) + x
    z = t5_layers.LayerNorm(cfg.dtype, name="pre_mlp_layer_norm")(y)
    z = t5_layers.MlpBlock(cfg, self.adapted, name="mlp")(
        z, dec_ids, deterministic
    )
    z = t5_layers.dropout(cfg, z, deterministic) + y
    z = t5_layers.constrain(z, "batch", "length", "embed")  # [B, L, D]
    return (z, None) if cfg.scan_layers else z


def _run_layers(
    cfg: T5Config,
    layer: type[nn.Module],
    num_layers: int,
    adapted: tuple[str, ...],
    x: Array,
    *args,
    static: tuple[int, ...],
) -> Array:
  """Applies `num_layers` layers `layer(cfg, adapted)(x, *args)` to x [B, L, D].

  `static` indexes the Python-valued `args` (flags), which rematerialisation
  must not trace. Called inside a stack's compact method, so the layers are
  its submodules.
  """
  if cfg.remat_policy != "none":
    layer = nn.remat(
        layer,
        policy=t5_config.remat_policy(cfg.remat_policy),
        prevent_cse=not cfg.scan_layers,  # scan already prevents CSE
        static_argnums=tuple(i + 2 for i in static),  # after self and x
    )
  if not cfg.scan_layers:
    for i in range(num_layers):
      x = layer(cfg, adapted, name=f"layers_{i}")(x, *args)
    return x
  stack = nn.scan(
      layer,
      variable_axes={"params": 0, "cache": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * len(args),
      length=num_layers,
      metadata_params={nn.PARTITION_NAME: layer_layout.LAYERS_AXIS},
  )
  x, _ = stack(cfg, adapted, name=layer_layout.STACKED)(x, *args)
  return x


def _route(cfg: T5Config, ids: Optional[Array]):
  """Routes a stack's feature ids once for all its adapted layers."""
  if ids is None or cfg.feature_space is None:
    return ids
  return layers.route(ids, cfg.flix_strategy, cfg.max_segments)


def _relpos(cfg: T5Config) -> t5_layers.RelativePositionBiases:
  return t5_layers.RelativePositionBiases(
      num_buckets=cfg.relative_attention_num_buckets,
      max_distance=cfg.relative_attention_max_distance,
      num_heads=cfg.num_heads,
      dtype=cfg.dtype,
      name="relpos_bias",
  )


class Encoder(nn.Module):
  """Embeds tokens [B, Le] and runs the encoder layers: [B, Le, D]."""

  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens, ids, mask, deterministic):
    cfg = self.config
    length = tokens.shape[-1]
    bias = _relpos(cfg)(length, length, True)  # [1, H, Le, Le], shared.
    ids = _route(cfg, ids)
    x = self.shared_embedding(tokens.astype(jnp.int32))
    x = t5_layers.dropout(cfg, x, deterministic).astype(cfg.dtype)
    x = _run_layers(
        cfg,
        EncoderLayer,
        cfg.num_encoder_layers,
        cfg.adapted("encoder"),
        x,
        ids,
        mask,
        bias,
        deterministic,
        static=(3,),
    )
    x = t5_layers.LayerNorm(cfg.dtype, name="encoder_norm")(x)
    # The one hidden-state dropout whose mask is not shared over length (T5X).
    return t5_layers.dropout(
        cfg, x, deterministic, broadcast=False
    )  # [B, Le, D]


class Decoder(nn.Module):
  """Embeds decoder tokens [B, Ld], runs the layers, gives logits [B, Ld, V]."""

  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(
      self,
      encoded,
      tokens,
      dec_ids,
      enc_ids,
      decoder_mask,
      cross_mask,
      deterministic,
      decode,
      max_decode_length,
  ):
    cfg = self.config
    length = (
        max_decode_length
        if decode and max_decode_length
        else (tokens.shape[-1])
    )
    bias = _relpos(cfg)(length, length, False)  # [1, H, L, L], shared.
    dec_ids, enc_ids = _route(cfg, dec_ids), _route(cfg, enc_ids)
    y = self.shared_embedding(tokens.astype(jnp.int32))
    y = t5_layers.dropout(cfg, y, deterministic).astype(cfg.dtype)
    adapted = cfg.adapted("decoder")
    y = _run_layers(
        cfg,
        DecoderLayer,
        cfg.num_decoder_layers,
        adapted,
        y,
        encoded,
        dec_ids,
        enc_ids,
        decoder_mask,
        cross_mask,
        bias,
        deterministic,
        decode,
        static=(6, 7),
    )
    y = t5_layers.LayerNorm(cfg.dtype, name="decoder_norm")(y)
    y = t5_layers.dropout(cfg, y, deterministic)
    if cfg.rescales_logits:  # T5 1.0 and T5X's tied logits.
      y = y.astype(jnp.float32) * (y.shape[-1] ** -0.5)
    if cfg.logits_via_embedding:
      logits = self.shared_embedding.attend(y)
    else:  # T5 v1.1 / mT5: untied, in float32.
      logits = t5_layers.dense(
          cfg,
          "logits_dense",
          adapted,
          cfg.vocab_size,
          ("embed", "vocab"),
          dtype=jnp.float32,
      )(y, dec_ids)
    return t5_layers.constrain(logits, "batch", "length", "vocab")  # [B, Ld, V]


class Transformer(nn.Module):
  """The mT5 encoder-decoder (T5X `network.Transformer`) with FLix adapters."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = t5_layers.Embed(
        cfg.vocab_size,
        cfg.emb_dim,
        dtype=cfg.dtype,
        one_hot=cfg.one_hot_embedding,
    )
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def _ids(
      self, ids: Optional[Array], length: int, needed: bool, what: str
  ) -> Optional[Array]:
    """Validates feature ids and broadcasts [B, G] to [B, L, G]."""
    space = self.config.feature_space
    if space is None:
      return None
    if ids is None:
      if needed:
        raise ValueError(
            f"The network has FLix adapters that need {what} "
            f"(int [batch, length, {space.num_groups}])."
        )
      return None
    ids = jnp.asarray(ids, jnp.int32)
    if ids.ndim == 2:
      ids = jnp.broadcast_to(
          ids[:, None, :], (ids.shape[0], length, ids.shape[1])
      )
    if ids.ndim != 3 or ids.shape[1:] != (length, space.num_groups):
      raise ValueError(
          f"{what} has shape {ids.shape}; expected [batch, "
          f"{length}, {space.num_groups}] (groups "
          f"{space.group_names})."
      )
    return ids

  def encode(
      self,
      encoder_input_tokens: Array,
      encoder_feature_ids: Optional[Array] = None,
      encoder_segment_ids: Optional[Array] = None,
      enable_dropout: bool = True,
  ) -> Array:
    """Encodes tokens [B, Le] into [B, Le, D]."""
    cfg = self.config
    ids = self._ids(
        encoder_feature_ids,
        encoder_input_tokens.shape[-1],
        bool(cfg.adapted("encoder")),
        "encoder_feature_ids",
    )
    valid = encoder_input_tokens > 0
    mask = t5_layers.attention_mask(valid, valid)
    if encoder_segment_ids is not None:
      mask = t5_layers.and_masks(
          mask,
          t5_layers.attention_mask(
              encoder_segment_ids, encoder_segment_ids, jnp.equal
          ),
      )
    return self.encoder(
        encoder_input_tokens, ids, mask, deterministic=not enable_dropout
    )

  def decode(
      self,
      encoded: Array,
      encoder_input_tokens: Array,
      decoder_input_tokens: Array,
      decoder_target_tokens: Array,
      encoder_feature_ids: Optional[Array] = None,
      decoder_feature_ids: Optional[Array] = None,
      encoder_segment_ids: Optional[Array] = None,
      decoder_segment_ids: Optional[Array] = None,
      decoder_positions: Optional[Array] = None,
      enable_dropout: bool = True,
      decode: bool = False,
      max_decode_length: Optional[int] = None,
  ) -> Array:
    """Decoder logits, float32 [B, Ld, V] (Ld = 1 per call when decoding).

    With `decode=True` one token per call is processed against the 'cache'
    collection (created, at full length, by a first call such as
    `init(..., decode=True)`); `max_decode_length` must then be the cache
    length. `decoder_positions` is accepted and unused (relative attention).
    """
    del decoder_positions
    cfg = self.config
    needs_dec = bool(cfg.adapted("decoder"))
    needs_enc = needs_dec and bool({"key", "value"} & set(cfg.adapter_targets))
    enc_ids = self._ids(
        encoder_feature_ids,
        encoder_input_tokens.shape[-1],
        needs_enc,
        "encoder_feature_ids",
    )
    dec_ids = self._ids(
        decoder_feature_ids,
        decoder_input_tokens.shape[-1],
        needs_dec,
        "decoder_feature_ids",
    )
    enc_valid = encoder_input_tokens > 0
    if decode:
      if encoder_segment_ids is not None or decoder_segment_ids is not None:
        raise ValueError("Packing (segment ids) cannot be used when decoding.")
      decoder_mask = None  # Causality comes from the cache index.
      cross_mask = t5_layers.attention_mask(
          jnp.ones_like(decoder_target_tokens, bool), enc_valid
      )
    else:
      dec_valid = decoder_target_tokens > 0
      length = decoder_target_tokens.shape[-1]
      causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
      decoder_mask = t5_layers.and_masks(
          t5_layers.attention_mask(dec_valid, dec_valid), causal
      )
      cross_mask = t5_layers.attention_mask(dec_valid, enc_valid)
      if decoder_segment_ids is not None:
        decoder_mask = t5_layers.and_masks(
            decoder_mask,
            t5_layers.attention_mask(
                decoder_segment_ids, decoder_segment_ids, jnp.equal
            ),
        )
      if encoder_segment_ids is not None:
        if decoder_segment_ids is None:
          raise ValueError("encoder_segment_ids need decoder_segment_ids.")
        cross_mask = t5_layers.and_masks(
            cross_mask,
            t5_layers.attention_mask(
                decoder_segment_ids, encoder_segment_ids, jnp.equal
            ),
        )
    return self.decoder(
        encoded,
        decoder_input_tokens,
        dec_ids,
        enc_ids,
        decoder_mask,
        cross_mask,
        deterministic=not enable_dropout,
        decode=decode,
        max_decode_length=max_decode_length,
    )

  def __call__(
      self,
      encoder_input_tokens: Array,
      decoder_input_tokens: Array,
      decoder_target_tokens: Array,
      encoder_feature_ids: Optional[Array] = None,
      decoder_feature_ids: Optional[Array] = None,
      encoder_segment_ids: Optional[Array] = None,
      decoder_segment_ids: Optional[Array] = None,
      encoder_positions: Optional[Array] = None,
      decoder_positions: Optional[Array] = None,
      *,
      enable_dropout: bool = True,
      decode: bool = False,
  ) -> Array:
    """Teacher-forced logits, float32 [B, Ld, V]."""
    del encoder_positions  # Relative attention only.
    if decode and (
        encoder_segment_ids is not None or decoder_segment_ids is not None
    ):
      raise ValueError("Packing (segment ids) cannot be used when decoding.")
    encoded = self.encode(
        encoder_input_tokens,
        encoder_feature_ids,
        encoder_segment_ids,
        enable_dropout,
    )
    return self.decode(
        encoded,
        encoder_input_tokens,
        decoder_input_tokens,
        decoder_target_tokens,
        encoder_feature_ids,
        decoder_feature_ids,
        encoder_segment_ids,
        decoder_segment_ids,
        decoder_positions,
        enable_dropout=enable_dropout,
        decode=decode,
    )
