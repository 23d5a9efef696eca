"""Autoregressive decoding over a KV cache: greedy, sampling, beam search.

Written, like T5X's `decoding.py`, around a callback

    tokens_to_logits(state: DecodingState) -> (logits [B*, V], new_cache)

that runs the decoder on one token per example (`state.cur_token`, [B*, 1])
at position `state.cur_index` and returns next-token logits and the updated
cache. B* is the flat batch: batch * num_decodes (or * beam_size), each
example repeated consecutively (`flat_batch_beam_expand`). The decoding
functions expand the cache themselves; per-example extras the callback closes
over (encoder outputs, encoder tokens, feature ids) must be expanded by the
caller with `flat_batch_beam_expand`. `model_tokens_to_logits` builds the
callback for `network.Transformer`.

Token conventions (T5): PAD = BOS = 0, EOS = 1. Every sequence starts from
BOS; after EOS a sequence is padded with 0. Results are
`(sequences [B, N, max_decode_len], scores [B, N])`, best first. Everything is
`lax.while_loop`-based and jit-friendly (jit the caller; sizes, temperature
and top-k are static). A scanned network's cache is stacked over layers in
front of the batch: `cache_offset=1` (T5X's name) puts its batch axis second.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp

from flix import network

Array = jax.Array
PyTree = Any

PAD_ID = 0
BOS_ID = 0
EOS_ID = 1
NEG_INF = -1.0e7  # As T5X: large but finite, so sums stay ordered.


@flax.struct.dataclass
class DecodingState:
  """What `tokens_to_logits` sees at one step.

  Attributes:
    cur_index: int32 scalar, position of `cur_token` (0 = BOS).
    sequences: int32 [B*, max_decode_len + 1], BOS then the tokens so far.
    cur_token: int32 [B*, 1], the token to feed.
    cache: the decoder cache for the flat batch.
  """

  cur_index: Array
  sequences: Array
  cur_token: Array
  cache: PyTree


TokensToLogits = Callable[[DecodingState], tuple[Array, PyTree]]


def flat_batch_beam_expand(x: Array, beam_size: int) -> Array:
  """[B, ...] -> [B * beam_size, ...], each example repeated consecutively.

  Scalars (such as a cache index) are returned unchanged.
  """
  x = jnp.asarray(x)
  return x if x.ndim == 0 else jnp.repeat(x, beam_size, axis=0)


def _expand_cache(cache: PyTree, n: int, offset: int = 0) -> PyTree:
  """Repeats each example n times on the batch axis `offset` of every leaf
  that has one (not cache indices)."""
  return jax.tree.map(
      lambda x: x if x.ndim <= offset else jnp.repeat(x, n, axis=offset), cache
  )


def _gather_flat(tree: PyTree, flat_index: Array, offset: int = 0) -> PyTree:
  """Selects rows `flat_index` [B*] on the batch axis `offset` of every leaf
  that has one."""
  return jax.tree.map(
      lambda x: x if x.ndim <= offset else jnp.take(x, flat_index, axis=offset),
      tree,
  )


def _sort_best_first(sequences: Array, scores: Array):
  order = jnp.argsort(-scores, axis=1)
  return (
      jnp.take_along_axis(sequences, order[..., None], axis=1),
      jnp.take_along_axis(scores, order, axis=1),
  )


def temperature_sample(
    tokens_to_logits: TokensToLogits,
    cache: PyTree,
    *,
    batch_size: int,
    max_decode_len: int,
    rng: Optional[Array] = None,
    temperature: float = 1.0,
    topk: int = 0,
    num_decodes: int = 1,
    eos_id: int = EOS_ID,
    cache_offset: int = 0,
) -> tuple[Array, Array]:
  """Samples `num_decodes` continuations per example (temperature 0: greedy).

  Args:
    tokens_to_logits: the decoder step callback (see module docstring); it
      sees a flat batch of batch_size * num_decodes.
    cache: the initial cache for batch_size examples (`init_cache`).
    batch_size: B.
    max_decode_len: L, tokens generated at most (the cache length).
    rng: PRNG key; required unless temperature == 0.
    temperature: softmax temperature; 0 takes the argmax.
    topk: sample among the k most likely tokens only (0: all).
    num_decodes: N samples per example.
    eos_id: end-of-sequence id.
    cache_offset: the batch axis of the cache's arrays (1 when scanned).

  Returns:
    sequences int32 [B, N, L] (0 after EOS) and their log-likelihoods under
    the model (untempered, up to and including EOS) [B, N], best first.
  """
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}.")
  if temperature > 0 and rng is None:
    raise ValueError("Sampling with temperature > 0 needs an rng.")
  rng = jax.random.PRNGKey(0) if rng is None else rng
  flat = batch_size * num_decodes
  if num_decodes > 1:
    cache = _expand_cache(cache, num_decodes, cache_offset)

  def cond(carry):
    i, _, _, ended, _, _ = carry
    return (i < max_decode_len) & ~jnp.all(ended)

  def body(carry):
    i, seqs, cache, ended, log_prob, rng = carry
    cur = jax.lax.dynamic_slice_in_dim(seqs, i, 1, axis=1)  # [B*, 1]
    logits, cache = tokens_to_logits(DecodingState(i, seqs, cur, cache))
    logits = logits.astype(jnp.float32)  # [B*, V]
    if temperature == 0:
      token = jnp.argmax(logits, axis=-1)
    else:
      scaled = logits / temperature
      if topk:
        kth = jax.lax.top_k(scaled, topk)[0][:, -1:]
        scaled = jnp.where(scaled < kth, NEG_INF, scaled)
      rng, step_rng = jax.random.split(rng)
      token = jax.random.categorical(step_rng, scaled, axis=-1)
    token = jnp.where(ended, PAD_ID, token).astype(jnp.int32)  # [B*]
    token_lp = jnp.take_along_axis(
        jax.nn.log_softmax(logits), token[:, None], axis=-1
    )[:, 0]
    log_prob = log_prob + jnp.where(ended, 0.0, token_lp)
    seqs = jax.lax.dynamic_update_slice_in_dim(
        seqs, token[:, None], i + 1, axis=1
    )
    return i + 1, seqs, cache, ended | (token == eos_id), log_prob, rng

  init = (
      jnp.array(0, jnp.int32),
      jnp.full((flat, max_decode_len + 1), BOS_ID, jnp.int32),
      cache,
      jnp.zeros((flat,), bool),
      jnp.zeros((flat,), jnp.float32),
      rng,
  )
  _, seqs, _, _, log_prob, _ = jax.lax.while_loop(cond, body, init)
  seqs = seqs[:, 1:].reshape(batch_size, num_decodes, max_decode_len)
  return _sort_best_first(seqs, log_prob.reshape(batch_size, num_decodes))


def greedy(
    tokens_to_logits: TokensToLogits,
    cache: PyTree,
    *,
    batch_size: int,
    max_decode_len: int,
    eos_id: int = EOS_ID,
    cache_offset: int = 0,
) -> tuple[Array, Array]:
  """Argmax decoding: `temperature_sample` with temperature 0, [B, 1, L]."""
  return temperature_sample(
      tokens_to_logits,
      cache,
      batch_size=batch_size,
      max_decode_len=max_decode_len,
      temperature=0.0,
      eos_id=eos_id,
      cache_offset=cache_offset,
  )


def brevity_penalty(alpha: float, length: Array) -> Array:
  """T5X/GNMT length normalisation ((5 + length) / 6) ** alpha."""
  return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


@flax.struct.dataclass
class _BeamState:
  cur_index: Array  # int32 scalar
  live_seqs: Array  # [B, K, L + 1]
  live_logprobs: Array  # [B, K], best first
  finished_seqs: Array  # [B, K, L + 1]
  finished_scores: Array  # [B, K], length-normalised, best first
  finished_flags: Array  # [B, K]
  cache: PyTree  # flat [B * K, ...]


def beam_search(
    tokens_to_logits: TokensToLogits,
    cache: PyTree,
    *,
    batch_size: int,
    max_decode_len: int,
    beam_size: int = 4,
    alpha: float = 0.6,
    eos_id: int = EOS_ID,
    cache_offset: int = 0,
) -> tuple[Array, Array]:
  """Beam search with T5X's length penalty.

  A sequence that ends with EOS after n tokens scores
  log p(sequence) / ((5 + n) / 6) ** alpha. Each step keeps the best
  `beam_size` live (not ended) beams and the best `beam_size` finished ones,
  and stops when no live beam can still beat every finished one. Beams that
  reach `max_decode_len` without EOS are scored with n = max_decode_len and
  compete with the finished ones, so there are always K real hypotheses.

  Args:
    tokens_to_logits: the decoder step callback; it sees a flat batch of
      batch_size * beam_size.
    cache: the initial cache for batch_size examples.
    batch_size: B.
    max_decode_len: L.
    beam_size: K.
    alpha: length-penalty exponent (0: plain log-probabilities).
    eos_id: end-of-sequence id.
    cache_offset: the batch axis of the cache's arrays (1 when scanned).

  Returns:
    sequences int32 [B, K, L] and scores [B, K], best first.
  """
  k, length = beam_size, max_decode_len

  def cond(s: _BeamState):
    best_live = s.live_logprobs[:, 0] / brevity_penalty(alpha, length)
    done = jnp.all(s.finished_flags, axis=1) & (
        jnp.min(s.finished_scores, axis=1) > best_live
    )
    return (s.cur_index < length) & ~jnp.all(done)

  def body(s: _BeamState):
    i = s.cur_index
    flat_seqs = s.live_seqs.reshape(batch_size * k, length + 1)
    cur = jax.lax.dynamic_slice_in_dim(flat_seqs, i, 1, axis=1)
    logits, cache = tokens_to_logits(DecodingState(i, flat_seqs, cur, s.cache))
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    log_probs = log_probs.reshape(batch_size, k, vocab) + (
        s.live_logprobs[..., None]
    )
    # 2K candidates: enough that K stay live even if K of them end here.
    top_lp, top_index = jax.lax.top_k(log_probs.reshape(batch_size, -1), 2 * k)
    parent, token = top_index // vocab, top_index % vocab  # [B, 2K]
    seqs = jnp.take_along_axis(s.live_seqs, parent[..., None], axis=1)
    seqs = jax.lax.dynamic_update_slice_in_dim(
        seqs, token[..., None].astype(jnp.int32), i + 1, axis=2
    )
    ended = (token == eos_id) & (top_lp > NEG_INF / 2)

    live_lp, keep = jax.lax.top_k(jnp.where(ended, NEG_INF, top_lp), k)
    live_seqs = jnp.take_along_axis(seqs, keep[..., None], axis=1)
    keep_parent = jnp.take_along_axis(parent, keep, axis=1)  # [B, K]
    flat_parent = jnp.arange(batch_size)[:, None] * k + keep_parent
    cache = _gather_flat(cache, flat_parent.reshape(-1), cache_offset)

    scores = jnp.where(ended, top_lp / brevity_penalty(alpha, i + 1), NEG_INF)
    all_scores = jnp.concatenate([s.finished_scores, scores], axis=1)
    fin_scores, pick = jax.lax.top_k(all_scores, k)
    fin_seqs = jnp.take_along_axis(
        jnp.concatenate([s.finished_seqs, seqs], axis=1),
        pick[..., None],
        axis=1,
    )
    fin_flags = jnp.take_along_axis(
        jnp.concatenate([s.finished_flags, ended], axis=1), pick, axis=1
    )
    return _BeamState(
        i + 1, live_seqs, live_lp, fin_seqs, fin_scores, fin_flags, cache
    )

  live_lp = jnp.tile(
      jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch_size, 1)
  )
  zeros = jnp.full((batch_size, k, length + 1), BOS_ID, jnp.int32)
  state = _BeamState(
      jnp.array(0, jnp.int32),
      zeros,
      live_lp,
      zeros,
      jnp.full((batch_size, k), NEG_INF, jnp.float32),
      jnp.zeros((batch_size, k), bool),
      _expand_cache(cache, k, cache_offset),
  )
  s = jax.lax.while_loop(cond, body, state)

  # Beams still live at the end were cut at max_decode_len: they compete,
  # scored with n = max_decode_len, for slots that no finished beam beats
  # (as HF does; T5X would return NEG_INF placeholders there).
  fin_scores = jnp.where(s.finished_flags, s.finished_scores, NEG_INF)
  all_scores = jnp.concatenate(
      [fin_scores, s.live_logprobs / brevity_penalty(alpha, length)], axis=1
  )
  scores, pick = jax.lax.top_k(all_scores, k)
  seqs = jnp.take_along_axis(
      jnp.concatenate([s.finished_seqs, s.live_seqs], axis=1),
      pick[..., None],
      axis=1,
  )
  return seqs[:, :, 1:], scores


# ---- The network's side ----


def init_cache(
    model: network.Transformer,
    config: network.T5Config,
    batch_size: int,
    max_decode_len: int,
) -> PyTree:
  """Zero decoder cache ('cache' collection) for batch x max_decode_len.

  Shapes come from `jax.eval_shape` of `model.init(..., decode=True)` on
  dummy inputs, so nothing but the cache is allocated.
  """
  tokens = jnp.ones((batch_size, max_decode_len), jnp.int32)
  ids = None
  if config.feature_space is not None:
    ids = jnp.zeros((batch_size, 1, config.feature_space.num_groups), jnp.int32)

  def init(rng):
    enc = tokens[:, :1]
    dec_ids = (
        None
        if ids is None
        else jnp.broadcast_to(ids, (batch_size, max_decode_len, ids.shape[-1]))
    )
    return model.init(
        rng,
        enc,
        tokens,
        tokens,
        encoder_feature_ids=ids,
        decoder_feature_ids=dec_ids,
        enable_dropout=False,
        decode=True,
    )

  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def model_tokens_to_logits(
    model: network.Transformer,
    params: PyTree,
    encoded: Array,
    encoder_input_tokens: Array,
    max_decode_len: int,
    encoder_feature_ids: Optional[Array] = None,
    decoder_feature_ids: Optional[Array] = None,
) -> TokensToLogits:
  """The step callback of `network.Transformer` over its decode cache.

  All arrays must already be in the flat batch B* (`flat_batch_beam_expand`
  them by num_decodes / beam_size).

  Args:
    model: the network.
    params: its 'params' collection.
    encoded: encoder outputs [B*, Le, D].
    encoder_input_tokens: [B*, Le] (for the cross-attention mask).
    max_decode_len: the cache length.
    encoder_feature_ids: [B*, Le, G] or [B*, G].
    decoder_feature_ids: per example [B*, G], or per position [B*, L, G]
      (position `cur_index` is used at each step).

  Returns:
    tokens_to_logits(state) -> (logits float32 [B*, V], new cache).
  """

  def tokens_to_logits(state: DecodingState):
    dec_ids = decoder_feature_ids
    if dec_ids is not None:
      dec_ids = jnp.asarray(dec_ids)
      dec_ids = (
          dec_ids[:, None]
          if dec_ids.ndim == 2
          else jax.lax.dynamic_slice_in_dim(dec_ids, state.cur_index, 1, axis=1)
      )  # [B*, 1, G]
    logits, variables = model.apply(
        {"params": params, "cache": state.cache},
        encoded,
        encoder_input_tokens,
        state.cur_token,
        state.cur_token,
        encoder_feature_ids=encoder_feature_ids,
        decoder_feature_ids=dec_ids,
        enable_dropout=False,
        decode=True,
        max_decode_length=max_decode_len,
        method=network.Transformer.decode,
        mutable=["cache"],
    )
    return logits[:, 0, :], variables["cache"]

  return tokens_to_logits
