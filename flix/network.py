"""mT5 / T5 v1.1 encoder-decoder with T5X semantics, and FLix adapters.

The network computes what T5X's `examples/t5/network.py` computes, with the
same parameter tree (`token_embedder/embedding`,
`encoder/layers_0/attention/query/kernel`, ..., `decoder/logits_dense/kernel`;
T5X_NOTES.md §1.3), so public T5X mT5 checkpoints and HF `google/mt5-*`
weights map 1:1. T5X quirks kept for checkpoint compatibility: RMSNorm in
float32, no 1/sqrt(head_dim) at run time (it is folded into the query
initializer), 2-D joined attention kernels, one relative-position table per
stack, dropout masks shared over the length axis, float32 untied logits.

FLix: the dense layers named in `T5Config.adapter_targets` (in every attention
kind and MLP of the stacks in `adapter_stacks`) carry per-feature low-rank
adapters (`layers.FlixDense`), stored as leaves `lora_a_<group>` /
`lora_b_<group>` next to `kernel`. Feature ids are per token, int [B, L, G],
aligned with the tokens they belong to (a [B, G] per-example array is
broadcast over L): encoder layers use the encoder ids; decoder self-attention
and MLP the decoder ids; cross-attention's query/out the decoder ids and its
key/value, which project encoder outputs, the encoder ids.

Dimension key: B batch, L length (Le encoder, Ld decoder), D emb_dim,
H heads, K head_dim, F mlp_dim, V vocab, G feature groups.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flix import features as features_lib
from flix import layers

Array = jax.Array
Initializer = Callable[..., Array]

# Dense layers that can carry adapters ('wi_<n>' for gated MLPs).
_TARGET_RE = re.compile(r"^(query|key|value|out|wi|wi_\d+|wo|logits_dense)$")
_STACKS = ("encoder", "decoder")
_MASK_BIAS = -1e10  # T5X's additive bias of disallowed attention positions.


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Global hyperparameters of the network (T5X `network.T5Config` + FLix).

  Attributes:
    vocab_size: V, rows of the token embedding and logits.
    dtype: activation dtype name ('float32', 'bfloat16'); params stay float32.
    emb_dim: D.
    num_heads: H.
    num_encoder_layers: encoder depth.
    num_decoder_layers: decoder depth.
    head_dim: K; the joined attention width H * K may differ from D.
    mlp_dim: F.
    mlp_activations: one activation per input projection (`flax.linen` names
      or 'linear'), multiplied elementwise: ('gelu', 'linear') is gated GELU.
    dropout_rate: the one rate used everywhere.
    logits_via_embedding: tie logits to the embedding (T5 1.0 style).
    float32_attention_logits: compute q.k and softmax in float32.
    relative_attention_num_buckets: relative position buckets per stack.
    relative_attention_max_distance: distance of the last (log) bucket.
    one_hot_embedding: look tokens up as one-hot @ table (T5X's TPU trick)
      instead of a gather.
    feature_space: FLix feature groups; None means no adapters and feature
      ids are ignored.
    adapter_targets: names of the dense layers that get adapters.
    adapter_stacks: 'encoder' and/or 'decoder'.
    flix_strategy: `layers.STRATEGIES` entry of the adapter computation.
    max_segments: per-row slots of the 'segment' strategy (>= the number of
      packed examples per row).
  """

  vocab_size: int
  dtype: Any = "float32"
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  mlp_activations: tuple[str, ...] = ("gelu", "linear")
  dropout_rate: float = 0.1
  logits_via_embedding: bool = False
  float32_attention_logits: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  one_hot_embedding: bool = False
  feature_space: Optional[features_lib.FeatureSpace] = None
  adapter_targets: tuple[str, ...] = ("query", "key", "value", "out", "wi_0",
                                      "wi_1", "wo")
  adapter_stacks: tuple[str, ...] = ("encoder", "decoder")
  flix_strategy: str = "segment"
  max_segments: int = 1

  def __post_init__(self):
    try:
      dtype = jnp.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(f"T5Config: unknown dtype {self.dtype!r}.") from e
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"T5Config: dtype must be floating, got {dtype}.")
    # Canonical string: hashable, gin- and JSON-friendly.
    object.__setattr__(self, "dtype", dtype.name)
    for name in ("mlp_activations", "adapter_targets", "adapter_stacks"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                 "max_segments", "relative_attention_max_distance"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"T5Config: {name} must be >= 1.")
    if self.num_encoder_layers < 0 or self.num_decoder_layers < 0:
      raise ValueError("T5Config: layer counts must be >= 0.")
    if self.relative_attention_num_buckets < 4:
      raise ValueError("T5Config: relative_attention_num_buckets must be >= 4.")
    if (self.relative_attention_max_distance <=
        self.relative_attention_num_buckets // 2):
      raise ValueError("T5Config: relative_attention_max_distance must exceed "
                       "the exact buckets (num_buckets // 2).")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5Config: dropout_rate {self.dropout_rate} not in "
                       "[0, 1).")
    if not self.mlp_activations:
      raise ValueError("T5Config: mlp_activations is empty.")
    for act in self.mlp_activations:
      if act != "linear" and not callable(getattr(nn, act, None)):
        raise ValueError(f"T5Config: unknown activation {act!r}.")
    bad = [t for t in self.adapter_targets if not _TARGET_RE.match(t)]
    if bad:
      raise ValueError(f"T5Config: unknown adapter_targets {bad}; use query, "
                       "key, value, out, wi, wi_<n>, wo, logits_dense.")
    bad = [s for s in self.adapter_stacks if s not in _STACKS]
    if bad:
      raise ValueError(f"T5Config: unknown adapter_stacks {bad}.")
    if self.flix_strategy not in layers.STRATEGIES:
      raise ValueError(f"T5Config: flix_strategy {self.flix_strategy!r} not "
                       f"in {layers.STRATEGIES}.")
    if not isinstance(self.feature_space, (features_lib.FeatureSpace,
                                           type(None))):
      raise ValueError("T5Config: feature_space must be a FeatureSpace.")

  def adapted(self, stack: str) -> tuple[str, ...]:
    """Names of the dense layers with adapters in `stack`."""
    if self.feature_space is None or stack not in self.adapter_stacks:
      return ()
    return self.adapter_targets


def _mt5(emb, heads, mlp, layers_, **kw) -> T5Config:
  return T5Config(vocab_size=250112, dtype="bfloat16", emb_dim=emb,
                  num_heads=heads, head_dim=64, mlp_dim=mlp,
                  num_encoder_layers=layers_, num_decoder_layers=layers_, **kw)


def _byt5(emb, heads, mlp, enc, dec) -> T5Config:
  return T5Config(vocab_size=384, dtype="bfloat16", emb_dim=emb,
                  num_heads=heads, head_dim=64, mlp_dim=mlp,
                  num_encoder_layers=enc, num_decoder_layers=dec)


PRESETS: dict[str, T5Config] = {
    # t5x/examples/t5/mt5/*.gin; dropout 0.1 = finetune.gin's DROPOUT_RATE.
    "mt5_small": _mt5(512, 6, 1024, 8),
    "mt5_base": _mt5(768, 12, 2048, 12),
    "mt5_large": _mt5(1024, 16, 2816, 24),
    "mt5_xl": _mt5(2048, 32, 5120, 24),
    "mt5_xxl": _mt5(4096, 64, 10240, 24),
    # t5x/examples/t5/byt5/*.gin.
    "byt5_small": _byt5(1472, 6, 3584, 12, 4),
    "byt5_base": _byt5(1536, 12, 3968, 18, 6),
    # The real checkpoint in shared/testdata (prompt-tuning's test model).
    "t5_1_1_tiny": T5Config(
        vocab_size=32128, emb_dim=4, num_heads=2, head_dim=2, mlp_dim=8,
        num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
        relative_attention_num_buckets=4, relative_attention_max_distance=8),
    # For tests: byte-sized vocabulary.
    "tiny": T5Config(
        vocab_size=384, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
        num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0),
}


def preset(name: str, **overrides: Any) -> T5Config:
  """A `PRESETS` config with fields replaced: `preset('tiny', dtype=...)`."""
  if name not in PRESETS:
    raise KeyError(f"Unknown preset {name!r}; presets: {sorted(PRESETS)}.")
  return dataclasses.replace(PRESETS[name], **overrides)


# ---- Building blocks ----


def _dense(cfg: T5Config, name: str, adapted: tuple[str, ...], features,
           kernel_axes: tuple[str, str], axis=-1, dtype=None,
           kernel_init: Initializer = layers.default_kernel_init
           ) -> layers.FlixDense:
  return layers.FlixDense(
      features=features, axis=axis, kernel_axes=kernel_axes,
      feature_space=cfg.feature_space if name in adapted else None,
      strategy=cfg.flix_strategy, max_segments=cfg.max_segments,
      dtype=dtype or cfg.dtype, kernel_init=kernel_init,
      name=name)


def _dropout(cfg: T5Config, x: Array, deterministic: bool,
             broadcast: bool = True) -> Array:
  # T5X shares hidden-state dropout masks across the length axis.
  return nn.Dropout(rate=cfg.dropout_rate,
                    broadcast_dims=(-2,) if broadcast else ())(
                        x, deterministic=deterministic)


def _constrain(x: Array, *axes: str) -> Array:
  return nn.with_logical_constraint(x, axes)  # No-op without axis rules.


class LayerNorm(nn.Module):
  """T5 LayerNorm (RMSNorm): float32 statistics, no mean, no bias."""

  dtype: Any = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    mean2 = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = jnp.asarray(x * jax.lax.rsqrt(mean2 + self.epsilon), self.dtype)
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones,
                                              ("embed",)),
        (x.shape[-1],), jnp.float32)
    return y * jnp.asarray(scale, self.dtype)


class Embed(nn.Module):
  """Token embedding table [V, D]; `attend` gives tied logits."""

  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  one_hot: bool = False

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, tokens: Array) -> Array:
    table = jnp.asarray(self.embedding, self.dtype)  # [V, D]
    if self.one_hot:
      one_hot = jax.nn.one_hot(tokens, self.num_embeddings, dtype=self.dtype)
      out = jnp.dot(one_hot, table)
    else:
      out = jnp.take(table, tokens, axis=0)
    return _constrain(out, "batch", "length", "embed")  # [B, L, D]

  def attend(self, query: Array) -> Array:
    return jnp.dot(query, jnp.asarray(self.embedding, jnp.float32).T)


def relative_position_bucket(relative_position: np.ndarray,
                             bidirectional: bool = True,
                             num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
  """T5's bucket of `memory_position - query_position`, int32 (NumPy).

  Exact buckets for small distances, log-spaced up to `max_distance`, one
  bucket beyond; bidirectional tables split the buckets by sign. Computed in
  float32 with +eps inside the log, as T5X/Mesh TF do, so distances at exact
  powers of two land in the mathematically right bucket.
  """
  n = -np.asarray(relative_position, np.int32)
  bucket = np.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  eps = np.finfo(np.float32).eps
  log_ratio = np.log(n.astype(np.float32) / np.float32(max_exact) + eps)
  log_ratio = log_ratio / np.float32(np.log(max_distance / max_exact))
  large = max_exact + (log_ratio * np.float32(num_buckets - max_exact)).astype(
      np.int32)
  large = np.minimum(large, num_buckets - 1)
  return bucket + np.where(n < max_exact, n, large)


class RelativePositionBiases(nn.Module):
  """Per-head learned bias of each relative position bucket."""

  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, qlen: int, klen: int, bidirectional: bool) -> Array:
    rel = np.arange(klen)[None, :] - np.arange(qlen)[:, None]  # [q, k]
    buckets = relative_position_bucket(rel, bidirectional, self.num_buckets,
                                       self.max_distance)
    table = self.param(
        "rel_embedding", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
            ("heads", "relpos_buckets")),
        (self.num_heads, self.num_buckets), jnp.float32)
    table = jnp.asarray(table, self.dtype)
    return jnp.take(table, buckets, axis=1)[None]  # [1, H, q, k]


def _mask(query: Array, key: Array, fn=jnp.logical_and) -> Array:
  """Pairwise mask [B, 1, q, k] from per-position [B, q] and [B, k]."""
  return fn(query[:, None, :, None], key[:, None, None, :])


def _and(*masks: Optional[Array]) -> Optional[Array]:
  masks = [m for m in masks if m is not None]
  return functools.reduce(jnp.logical_and, masks) if masks else None


class Attention(nn.Module):
  """T5X MultiHeadDotProductAttention (no scaling; kernels 2-D) with FLix.

  Attributes:
    config: the network config.
    adapted: names of this block's dense layers with adapters.
  """

  config: T5Config
  adapted: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array,
               q_ids: Optional[Array], kv_ids: Optional[Array],
               mask: Optional[Array], bias: Optional[Array], *,
               deterministic: bool, decode: bool = False) -> Array:
    """inputs [B, Lq, D] / [B, Lk, D]; ids [B, L, G]; mask [B, 1, Lq, Lk]."""
    cfg = self.config
    head_dim = cfg.head_dim
    base_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

    def query_init(*args):  # The 1/sqrt(K) of attention lives here (T5X).
      return base_init(*args) / np.sqrt(head_dim).astype(np.float32)

    def project(name, x, ids, init):
      y = _dense(cfg, name, self.adapted, (cfg.num_heads, head_dim),
                 ("embed", "joined_kv"), kernel_init=init)(x, ids)
      return _constrain(y, "batch", "length", "heads", "kv")  # [B, L, H, K]

    query = project("query", inputs_q, q_ids, query_init)
    key = project("key", inputs_kv, kv_ids, base_init)
    value = project("value", inputs_kv, kv_ids, base_init)

    if decode:
      initialized = self.has_variable("cache", "cached_key")
      # Cache layout [B, H, K, L] as T5X (TPU-friendly).
      swap = lambda s: s[:-3] + (s[-2], s[-1], s[-3])
      cached_key = self.variable("cache", "cached_key", jnp.zeros,
                                 swap(key.shape), key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros,
                                   swap(value.shape), value.dtype)
      cache_index = self.variable("cache", "cache_index",
                                  lambda: jnp.array(0, jnp.int32))
      if initialized:
        batch, heads, _, length = cached_key.value.shape
        if query.shape != (batch, 1, heads, head_dim):
          raise ValueError(f"Decoding takes one token per call; got query "
                           f"{query.shape}, cache {cached_key.value.shape}.")
        cur = cache_index.value
        one_hot = jax.nn.one_hot(cur, length, dtype=key.dtype)  # [L]
        key = cached_key.value + jnp.moveaxis(key, -3, -1) * one_hot
        value = cached_value.value + jnp.moveaxis(value, -3, -1) * one_hot
        cached_key.value, cached_value.value = key, value
        cache_index.value = cur + 1
        key, value = jnp.moveaxis(key, -1, -3), jnp.moveaxis(value, -1, -3)
        mask = _and(mask, jnp.broadcast_to(
            jnp.arange(length) <= cur, (batch, 1, 1, length)))
        if bias is not None:
          if bias.shape[-1] != length:
            raise ValueError(f"Decode position bias covers {bias.shape[-1]} "
                             f"positions, the cache {length}: pass "
                             "max_decode_length.")
          bias = jax.lax.dynamic_slice_in_dim(bias, cur, 1, axis=-2)

    attention_bias = None
    if mask is not None:
      attention_bias = jnp.where(mask, 0.0, _MASK_BIAS).astype(cfg.dtype)
    if bias is not None:
      attention_bias = bias if attention_bias is None else (
          attention_bias + bias)

    if cfg.float32_attention_logits:
      query, key = query.astype(jnp.float32), key.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)  # [B, H, Lq, Lk]
    if attention_bias is not None:
      logits = logits + attention_bias.astype(logits.dtype)
    weights = jax.nn.softmax(logits).astype(cfg.dtype)
    # One dropout mask per (batch, head, key), shared over queries (T5X).
    weights = _dropout(cfg, weights, deterministic)
    x = jnp.einsum("bhqk,bkhd->bqhd", weights, value)  # [B, Lq, H, K]
    return _dense(cfg, "out", self.adapted, inputs_q.shape[-1],
                  ("joined_kv", "embed"), axis=(-2, -1),
                  kernel_init=base_init)(x, q_ids)  # [B, Lq, D]


class MlpBlock(nn.Module):
  """T5X MlpBlock: per-activation input projections, product, `wo`."""

  config: T5Config
  adapted: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, inputs: Array, ids: Optional[Array],
               deterministic: bool) -> Array:
    cfg = self.config
    hidden = []
    for i, act in enumerate(cfg.mlp_activations):
      name = "wi" if len(cfg.mlp_activations) == 1 else f"wi_{i}"
      h = _dense(cfg, name, self.adapted, cfg.mlp_dim, ("embed", "mlp"))(
          inputs, ids)  # [B, L, F]
      hidden.append(h if act == "linear" else getattr(nn, act)(h))
    x = functools.reduce(operator.mul, hidden)
    x = _dropout(cfg, x, deterministic)
    x = _constrain(x, "batch", "length", "mlp")
    return _dense(cfg, "wo", self.adapted, inputs.shape[-1],
                  ("mlp", "embed"))(x, ids)  # [B, L, D]


# ---- Stacks ----


class EncoderLayer(nn.Module):
  """Pre-norm self-attention and MLP blocks with residuals (T5X names)."""

  config: T5Config
  adapted: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, inputs, ids, mask, bias, deterministic):
    cfg = self.config
    x = LayerNorm(cfg.dtype, name="pre_attention_layer_norm")(inputs)
    x = Attention(cfg, self.adapted, name="attention")(
        x, x, ids, ids, mask, bias, deterministic=deterministic)
    x = _dropout(cfg, x, deterministic) + inputs
    y = LayerNorm(cfg.dtype, name="pre_mlp_layer_norm")(x)
    y = MlpBlock(cfg, self.adapted, name="mlp")(y, ids, deterministic)
    y = _dropout(cfg, y, deterministic) + x
    return _constrain(y, "batch", "length", "embed")  # [B, L, D]


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention, cross-attention and MLP blocks."""

  config: T5Config
  adapted: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, inputs, encoded, dec_ids, enc_ids, decoder_mask,
               cross_mask, bias, deterministic, decode):
    cfg = self.config
    x = LayerNorm(cfg.dtype, name="pre_self_attention_layer_norm")(inputs)
    x = Attention(cfg, self.adapted, name="self_attention")(
        x, x, dec_ids, dec_ids, decoder_mask, bias,
        deterministic=deterministic, decode=decode)
    x = _dropout(cfg, x, deterministic) + inputs
    y = LayerNorm(cfg.dtype, name="pre_cross_attention_layer_norm")(x)
    y = Attention(cfg, self.adapted, name="encoder_decoder_attention")(
        y, encoded, dec_ids, enc_ids, cross_mask, None,
        deterministic=deterministic)
    y = _dropout(cfg, y, deterministic) + x
    z = LayerNorm(cfg.dtype, name="pre_mlp_layer_norm")(y)
    z = MlpBlock(cfg, self.adapted, name="mlp")(z, dec_ids, deterministic)
    z = _dropout(cfg, z, deterministic) + y
    return _constrain(z, "batch", "length", "embed")  # [B, L, D]


def _relpos(cfg: T5Config) -> RelativePositionBiases:
  return RelativePositionBiases(
      num_buckets=cfg.relative_attention_num_buckets,
      max_distance=cfg.relative_attention_max_distance,
      num_heads=cfg.num_heads, dtype=cfg.dtype, name="relpos_bias")


class Encoder(nn.Module):
  """Embeds tokens [B, Le] and runs the encoder layers: [B, Le, D]."""

  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens, ids, mask, deterministic):
    cfg = self.config
    length = tokens.shape[-1]
    bias = _relpos(cfg)(length, length, True)  # [1, H, Le, Le], shared.
    x = self.shared_embedding(tokens.astype(jnp.int32))
    x = _dropout(cfg, x, deterministic).astype(cfg.dtype)
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, cfg.adapted("encoder"), name=f"layers_{i}")(
          x, ids, mask, bias, deterministic)
    x = LayerNorm(cfg.dtype, name="encoder_norm")(x)
    # The one hidden-state dropout whose mask is not shared over length (T5X).
    return _dropout(cfg, x, deterministic, broadcast=False)  # [B, Le, D]


class Decoder(nn.Module):
  """Embeds decoder tokens [B, Ld], runs the layers, gives logits [B, Ld, V]."""

  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded, tokens, dec_ids, enc_ids, decoder_mask,
               cross_mask, deterministic, decode, max_decode_length):
    cfg = self.config
    length = max_decode_length if decode and max_decode_length else (
        tokens.shape[-1])
    bias = _relpos(cfg)(length, length, False)  # [1, H, L, L], shared.
    y = self.shared_embedding(tokens.astype(jnp.int32))
    y = _dropout(cfg, y, deterministic).astype(cfg.dtype)
    adapted = cfg.adapted("decoder")
    for i in range(cfg.num_decoder_layers):
      y = DecoderLayer(cfg, adapted, name=f"layers_{i}")(
          y, encoded, dec_ids, enc_ids, decoder_mask, cross_mask, bias,
          deterministic, decode)
    y = LayerNorm(cfg.dtype, name="decoder_norm")(y)
    y = _dropout(cfg, y, deterministic)
    if cfg.logits_via_embedding:
      logits = self.shared_embedding.attend(y) / jnp.sqrt(y.shape[-1])
    else:  # T5 v1.1 / mT5: untied, in float32, no rescaling.
      logits = _dense(cfg, "logits_dense", adapted, cfg.vocab_size,
                      ("embed", "vocab"), dtype=jnp.float32)(y, dec_ids)
    return _constrain(logits, "batch", "length", "vocab")  # [B, Ld, V]


class Transformer(nn.Module):
  """The mT5 encoder-decoder (T5X `network.Transformer`) with FLix adapters."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.dtype,
                                one_hot=cfg.one_hot_embedding)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def _ids(self, ids: Optional[Array], length: int, needed: bool,
           what: str) -> Optional[Array]:
    """Validates feature ids and broadcasts [B, G] to [B, L, G]."""
    space = self.config.feature_space
    if space is None:
      return None
    if ids is None:
      if needed:
        raise ValueError(f"The network has FLix adapters that need {what} "
                         f"(int [batch, length, {space.num_groups}]).")
      return None
    ids = jnp.asarray(ids, jnp.int32)
    if ids.ndim == 2:
      ids = jnp.broadcast_to(ids[:, None, :],
                             (ids.shape[0], length, ids.shape[1]))
    if ids.ndim != 3 or ids.shape[1:] != (length, space.num_groups):
      raise ValueError(f"{what} has shape {ids.shape}; expected [batch, "
                       f"{length}, {space.num_groups}] (groups "
                       f"{space.group_names}).")
    return ids

  def encode(self, encoder_input_tokens: Array,
             encoder_feature_ids: Optional[Array] = None,
             encoder_segment_ids: Optional[Array] = None,
             enable_dropout: bool = True) -> Array:
    """Encodes tokens [B, Le] into [B, Le, D]."""
    cfg = self.config
    ids = self._ids(encoder_feature_ids, encoder_input_tokens.shape[-1],
                    bool(cfg.adapted("encoder")), "encoder_feature_ids")
    valid = encoder_input_tokens > 0
    mask = _mask(valid, valid)
    if encoder_segment_ids is not None:
      mask = _and(mask, _mask(encoder_segment_ids, encoder_segment_ids,
                              jnp.equal))
    return self.encoder(encoder_input_tokens, ids, mask,
                        deterministic=not enable_dropout)

  def decode(self, encoded: Array, encoder_input_tokens: Array,
             decoder_input_tokens: Array, decoder_target_tokens: Array,
             encoder_feature_ids: Optional[Array] = None,
             decoder_feature_ids: Optional[Array] = None,
             encoder_segment_ids: Optional[Array] = None,
             decoder_segment_ids: Optional[Array] = None,
             decoder_positions: Optional[Array] = None,
             enable_dropout: bool = True, decode: bool = False,
             max_decode_length: Optional[int] = None) -> Array:
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
    enc_ids = self._ids(encoder_feature_ids, encoder_input_tokens.shape[-1],
                        needs_enc, "encoder_feature_ids")
    dec_ids = self._ids(decoder_feature_ids, decoder_input_tokens.shape[-1],
                        needs_dec, "decoder_feature_ids")
    enc_valid = encoder_input_tokens > 0
    if decode:
      if encoder_segment_ids is not None or decoder_segment_ids is not None:
        raise ValueError("Packing (segment ids) cannot be used when decoding.")
      decoder_mask = None  # Causality comes from the cache index.
      cross_mask = _mask(jnp.ones_like(decoder_target_tokens, bool), enc_valid)
    else:
      dec_valid = decoder_target_tokens > 0
      length = decoder_target_tokens.shape[-1]
      causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
      decoder_mask = _and(_mask(dec_valid, dec_valid), causal)
      cross_mask = _mask(dec_valid, enc_valid)
      if decoder_segment_ids is not None:
        decoder_mask = _and(decoder_mask, _mask(
            decoder_segment_ids, decoder_segment_ids, jnp.equal))
      if encoder_segment_ids is not None:
        if decoder_segment_ids is None:
          raise ValueError("encoder_segment_ids need decoder_segment_ids.")
        cross_mask = _and(cross_mask, _mask(
            decoder_segment_ids, encoder_segment_ids, jnp.equal))
    return self.decoder(encoded, decoder_input_tokens, dec_ids, enc_ids,
                        decoder_mask, cross_mask,
                        deterministic=not enable_dropout, decode=decode,
                        max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array,
               encoder_feature_ids: Optional[Array] = None,
               decoder_feature_ids: Optional[Array] = None,
               encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               encoder_positions: Optional[Array] = None,
               decoder_positions: Optional[Array] = None, *,
               enable_dropout: bool = True, decode: bool = False) -> Array:
    """Teacher-forced logits, float32 [B, Ld, V]."""
    del encoder_positions  # Relative attention only.
    if decode and (encoder_segment_ids is not None or
                   decoder_segment_ids is not None):
      raise ValueError("Packing (segment ids) cannot be used when decoding.")
    encoded = self.encode(encoder_input_tokens, encoder_feature_ids,
                          encoder_segment_ids, enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_feature_ids,
                       decoder_feature_ids, encoder_segment_ids,
                       decoder_segment_ids, decoder_positions,
                       enable_dropout=enable_dropout, decode=decode)
