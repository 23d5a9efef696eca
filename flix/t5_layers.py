"""T5X's mT5 building blocks: RMSNorm, embedding, relative position biases,
multi-head attention with a decode cache, and the gated MLP; dense layers are
`layers.FlixDense`, so they carry FLix adapters where the config says.

Dimension key: B batch, L length, D emb_dim, H heads, K head_dim, F mlp_dim,
V vocab, G feature groups.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flix import layers
from flix.t5_config import T5Config

Array = jax.Array
Initializer = Callable[..., Array]
_MASK_BIAS = -1e10  # T5X's additive bias of disallowed attention positions.


def dense(
    cfg: T5Config,
    name: str,
    adapted: tuple[str, ...],
    features,
    kernel_axes: tuple[str, str],
    axis=-1,
    dtype=None,
    kernel_init: Initializer = layers.default_kernel_init,
) -> layers.FlixDense:
  return layers.FlixDense(
      features=features,
      axis=axis,
      kernel_axes=kernel_axes,
      feature_space=cfg.feature_space if name in adapted else None,
      strategy=cfg.flix_strategy,
      max_segments=cfg.max_segments,
      dtype=dtype or cfg.dtype,
      kernel_init=kernel_init,
      name=name,
  )


def dropout(
    cfg: T5Config, x: Array, deterministic: bool, broadcast: bool = True
) -> Array:
  # T5X shares hidden-state dropout masks across the length axis.
  return nn.Dropout(
      rate=cfg.dropout_rate, broadcast_dims=(-2,) if broadcast else ()
  )(x, deterministic=deterministic)


def constrain(x: Array, *axes: str) -> Array:
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
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        (x.shape[-1],),
        jnp.float32,
    )
    return y * jnp.asarray(scale, self.dtype)


class Embed(nn.Module):
  """Token embedding table [V, D]; `attend` gives tied logits."""

  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  one_hot: bool = False

  def setup(self):
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0), ("vocab", "embed")
        ),
        (self.num_embeddings, self.features),
        jnp.float32,
    )

  def __call__(self, tokens: Array) -> Array:
    table = jnp.asarray(self.embedding, self.dtype)  # [V, D]
    if self.one_hot:
      one_hot = jax.nn.one_hot(tokens, self.num_embeddings, dtype=self.dtype)
      out = jnp.dot(one_hot, table)
    else:
      out = jnp.take(table, tokens, axis=0)
    return constrain(out, "batch", "length", "embed")  # [B, L, D]

  def attend(self, query: Array) -> Array:
    return jnp.dot(query, jnp.asarray(self.embedding, jnp.float32).T)


def relative_position_bucket(
    relative_position: np.ndarray,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> np.ndarray:
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
      np.int32
  )
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
    buckets = relative_position_bucket(
        rel, bidirectional, self.num_buckets, self.max_distance
    )
    table = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
            ("heads", "relpos_buckets"),
        ),
        (self.num_heads, self.num_buckets),
        jnp.float32,
    )
    table = jnp.asarray(table, self.dtype)
    return jnp.take(table, buckets, axis=1)[None]  # [1, H, q, k]


def attention_mask(query: Array, key: Array, fn=jnp.logical_and) -> Array:
  """Pairwise mask [B, 1, q, k] from per-position [B, q] and [B, k]."""
  return fn(query[:, None, :, None], key[:, None, None, :])


def and_masks(*masks: Optional[Array]) -> Optional[Array]:
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
  def __call__(
      self,
      inputs_q: Array,
      inputs_kv: Array,
      q_ids: Optional[Array],
      kv_ids: Optional[Array],
      mask: Optional[Array],
      bias: Optional[Array],
      *,
      deterministic: bool,
      decode: bool = False,
  ) -> Array:
    """inputs [B, Lq, D] / [B, Lk, D]; ids [B, L, G]; mask [B, 1, Lq, Lk]."""
    cfg = self.config
    head_dim = cfg.head_dim
    base_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

    def query_init(*args):  # The 1/sqrt(K) of attention lives here (T5X).
      return base_init(*args) / np.sqrt(head_dim).astype(np.float32)

    def project(name, x, ids, init):
      y = dense(
          cfg,
          name,
          self.adapted,
          (cfg.num_heads, head_dim),
          ("embed", "joined_kv"),
          kernel_init=init,
      )(x, ids)
      return constrain(y, "batch", "length", "heads", "kv")  # [B, L, H, K]

    query = project("query", inputs_q, q_ids, query_init)
    key = project("key", inputs_kv, kv_ids, base_init)
    value = project("value", inputs_kv, kv_ids, base_init)

    if decode:
      initialized = self.has_variable("cache", "cached_key")
      # Cache layout [B, H, K, L] as T5X (TPU-friendly).
      swap = lambda s: s[:-3] + (s[-2], s[-1], s[-3])
      cached_key = self.variable(
          "cache", "cached_key", jnp.zeros, swap(key.shape), key.dtype
      )
      cached_value = self.variable(
          "cache", "cached_value", jnp.zeros, swap(value.shape), value.dtype
      )
      cache_index = self.variable(
          "cache", "cache_index", lambda: jnp.array(0, jnp.int32)
      )
      if initialized:
        batch, heads, _, length = cached_key.value.shape
        if query.shape != (batch, 1, heads, head_dim):
          raise ValueError(
              "Decoding takes one token per call; got query "
              f"{query.shape}, cache {cached_key.value.shape}."
          )
        cur = cache_index.value
        one_hot = jax.nn.one_hot(cur, length, dtype=key.dtype)  # [L]
        key = cached_key.value + jnp.moveaxis(key, -3, -1) * one_hot
        value = cached_value.value + jnp.moveaxis(value, -3, -1) * one_hot
        cached_key.value, cached_value.value = key, value
        cache_index.value = cur + 1
        key, value = jnp.moveaxis(key, -1, -3), jnp.moveaxis(value, -1, -3)
        mask = and_masks(
            mask,
            jnp.broadcast_to(jnp.arange(length) <= cur, (batch, 1, 1, length)),
        )
        if bias is not None:
          if bias.shape[-1] != length:
            raise ValueError(
                f"Decode position bias covers {bias.shape[-1]} "
                f"positions, the cache {length}: pass "
                "max_decode_length."
            )
          bias = jax.lax.dynamic_slice_in_dim(bias, cur, 1, axis=-2)

    attention_bias = None
    if mask is not None:
      attention_bias = jnp.where(mask, 0.0, _MASK_BIAS).astype(cfg.dtype)
    if bias is not None:
      attention_bias = (
          bias if attention_bias is None else (attention_bias + bias)
      )

    if cfg.float32_attention_logits:
      query, key = query.astype(jnp.float32), key.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)  # [B, H, Lq, Lk]
    if attention_bias is not None:
      logits = logits + attention_bias.astype(logits.dtype)
    weights = jax.nn.softmax(logits).astype(cfg.dtype)
    # One dropout mask per (batch, head, key), shared over queries (T5X).
    weights = dropout(cfg, weights, deterministic)
    x = jnp.einsum("bhqk,bkhd->bqhd", weights, value)  # [B, Lq, H, K]
    return dense(
        cfg,
        "out",
        self.adapted,
        inputs_q.shape[-1],
        ("joined_kv", "embed"),
        axis=(-2, -1),
        kernel_init=base_init,
    )(
        x, q_ids
    )  # [B, Lq, D]


class MlpBlock(nn.Module):
  """T5X MlpBlock: per-activation input projections, product, `wo`."""

  config: T5Config
  adapted: tuple[str, ...] = ()

  @nn.compact
  def __call__(
      self, inputs: Array, ids: Optional[Array], deterministic: bool
  ) -> Array:
    cfg = self.config
    hidden = []
    for i, act in enumerate(cfg.mlp_activations):
      name = "wi" if len(cfg.mlp_activations) == 1 else f"wi_{i}"
      h = dense(cfg, name, self.adapted, cfg.mlp_dim, ("embed", "mlp"))(
          inputs, ids
      )  # [B, L, F]
      hidden.append(h if act == "linear" else getattr(nn, act)(h))
    x = functools.reduce(operator.mul, hidden)
    x = dropout(cfg, x, deterministic)
    x = constrain(x, "batch", "length", "mlp")
    return dense(cfg, "wo", self.adapted, inputs.shape[-1], ("mlp", "embed"))(
        x, ids
    )  # [B, L, D]
