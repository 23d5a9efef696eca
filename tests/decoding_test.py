"""Decoding: a toy history-dependent model against brute force, and the
network's KV cache against teacher forcing."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flix import decoding
from flix import features as features_lib
from flix import network

from network_test import numpy_params, random_b

# ---- A toy model with a real cache ----
#
# The cache holds a per-row hash of the whole history, so the logits depend on
# every earlier token and a beam search that mixed up cache rows would be
# caught by the brute-force comparison.

VOCAB, STATES = 4, 11


def _toy(table):
  def tokens_to_logits(state: decoding.DecodingState):
    h = (state.cache["h"] * 3 + state.cur_token[:, 0] + 1) % STATES
    cache = {"h": h, "cache_index": state.cache["cache_index"] + 1}
    return table[h], cache

  return tokens_to_logits


def _toy_cache(h0):
  return {"h": jnp.asarray(h0, jnp.int32), "cache_index": jnp.array(0)}


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _toy_score(table, h0, seq, alpha=None):
  """Log-likelihood of `seq` (through its first EOS) and its length."""
  h, cur, total = h0, decoding.BOS_ID, 0.0
  for n, token in enumerate(seq, start=1):
    h = (h * 3 + cur + 1) % STATES
    total += _log_softmax(np.asarray(table[h], np.float64))[token]
    cur = token
    if token == decoding.EOS_ID:
      break
  if alpha is not None:
    total /= ((5.0 + n) / 6.0) ** alpha
  return total, n


def _toy_table(seed=0, eos_bias=0.0):
  table = 2.0 * np.random.default_rng(seed).standard_normal((STATES, VOCAB))
  table[:, decoding.EOS_ID] += eos_bias
  return jnp.asarray(table, jnp.float32)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_exhaustive_beam_search_equals_brute_force(alpha):
  length, h0 = 3, [0, 5]
  table = _toy_table()
  # 18 beams: 2K >= every candidate of every step, so nothing is pruned.
  seqs, scores = jax.jit(
      functools.partial(
          decoding.beam_search,
          _toy(table),
          batch_size=2,
          max_decode_len=length,
          beam_size=18,
          alpha=alpha,
      )
  )(_toy_cache(h0))
  assert seqs.shape == (2, 18, length)
  for b in range(2):
    candidates = {}  # Every EOS-ended sequence, and every cut-off one.
    for seq in itertools.product(range(VOCAB), repeat=length):
      if decoding.EOS_ID in seq:
        n = seq.index(decoding.EOS_ID) + 1
        seq = seq[:n] + (0,) * (length - n)
      candidates[seq] = _toy_score(table, h0[b], seq, alpha)[0]
    best = sorted(candidates.items(), key=lambda kv: -kv[1])[:18]
    got = [tuple(int(t) for t in s) for s in np.asarray(seqs[b])]
    assert got == [s for s, _ in best]
    np.testing.assert_allclose(scores[b], [v for _, v in best], rtol=1e-5)


def test_toy_greedy_and_beam_of_one():
  table, h0, length = _toy_table(1), [0, 3, 7], 6
  cache = _toy_cache(h0)
  seqs, log_probs = jax.jit(
      functools.partial(
          decoding.greedy, _toy(table), batch_size=3, max_decode_len=length
      )
  )(cache)
  assert seqs.shape == (3, 1, length)
  for b in range(3):
    seq = [int(t) for t in seqs[b, 0]]
    # Each token is the argmax after its own history; zeros after EOS.
    h, cur = h0[b], 0
    for i, token in enumerate(seq):
      h = (h * 3 + cur + 1) % STATES
      assert token == int(np.argmax(table[h]))
      cur = token
      if token == decoding.EOS_ID:
        assert all(t == 0 for t in seq[i + 1 :])
        break
    np.testing.assert_allclose(
        log_probs[b, 0], _toy_score(table, h0[b], seq)[0], rtol=1e-5
    )
  beam_seqs, beam_scores = decoding.beam_search(
      _toy(table),
      cache,
      batch_size=3,
      max_decode_len=length,
      beam_size=1,
      alpha=0.0,
  )
  np.testing.assert_array_equal(beam_seqs, seqs)
  np.testing.assert_allclose(beam_scores, log_probs, rtol=1e-5)


def test_beam_search_stops_early_and_sorts():
  table = _toy_table(2, eos_bias=3.0)  # EOS likely: the search ends early.
  seqs, scores = decoding.beam_search(
      _toy(table),
      _toy_cache([1, 2]),
      batch_size=2,
      max_decode_len=12,
      beam_size=4,
      alpha=0.6,
  )
  assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)
  for b in range(2):
    for k in range(4):
      seq = [int(t) for t in seqs[b, k]]
      assert decoding.EOS_ID in seq
      score, n = _toy_score(table, [1, 2][b], seq, alpha=0.6)
      assert all(t == 0 for t in seq[n:])
      np.testing.assert_allclose(scores[b, k], score, rtol=1e-5)


def test_temperature_sampling():
  table, h0, length = _toy_table(3), [0, 4], 8
  cache = _toy_cache(h0)
  sample = jax.jit(
      functools.partial(
          decoding.temperature_sample,
          _toy(table),
          batch_size=2,
          max_decode_len=length,
          num_decodes=16,
      ),
      static_argnames=("temperature", "topk"),
  )
  greedy_seqs, _ = decoding.greedy(
      _toy(table), cache, batch_size=2, max_decode_len=length
  )
  # Top-1 sampling is greedy at any temperature.
  top1, _ = sample(cache, rng=jax.random.PRNGKey(0), temperature=5.0, topk=1)
  np.testing.assert_array_equal(top1, jnp.repeat(greedy_seqs, 16, axis=1))
  seqs, log_probs = sample(
      cache, rng=jax.random.PRNGKey(1), temperature=1.0, topk=2
  )
  assert seqs.shape == (2, 16, length) and log_probs.shape == (2, 16)
  assert np.all(np.diff(np.asarray(log_probs), axis=1) <= 0)
  assert len({tuple(np.asarray(s)) for s in seqs[0]}) > 1
  for b in range(2):
    for s in range(16):
      seq = [int(t) for t in seqs[b, s]]
      np.testing.assert_allclose(
          log_probs[b, s],
          _toy_score(table, h0[b], seq)[0],
          rtol=1e-5,
          atol=1e-6,
      )
      h, cur = h0[b], 0  # Every token is one of its step's top 2.
      for token in seq:
        h = (h * 3 + cur + 1) % STATES
        assert token in np.argsort(-np.asarray(table[h]))[:2]
        cur = token
        if token == decoding.EOS_ID:
          break
  with pytest.raises(ValueError, match="rng"):
    decoding.temperature_sample(
        _toy(table), cache, batch_size=2, max_decode_len=length, temperature=1.0
    )


def test_flat_batch_beam_expand():
  x = jnp.arange(6).reshape(3, 2)
  np.testing.assert_array_equal(
      decoding.flat_batch_beam_expand(x, 2),
      [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5]],
  )
  assert decoding.flat_batch_beam_expand(jnp.array(3), 4).shape == ()


# ---- The network over its cache ----

SPACE = features_lib.FeatureSpace(
    groups=(
        features_lib.FeatureGroup("task", ("a", "b"), rank=4),
        features_lib.FeatureGroup("language", ("x", "y", "z"), rank=2),
    )
)
CFG = network.preset("tiny", feature_space=SPACE)
MODEL = network.Transformer(CFG)
LENGTH = 6


@pytest.fixture(scope="module")
def setup():
  params = random_b(numpy_params(CFG), scale=0.3)
  # EOS takes over a token that row 1 would emit at step 5, so one greedy
  # decode ends early (exercises the EOS path) and the others run full length.
  kernel = params["decoder"]["logits_dense"]["kernel"]
  kernel[:, decoding.EOS_ID] = 1.05 * kernel[:, 100]
  rng = np.random.default_rng(0)
  enc = rng.integers(2, 384, size=(3, 7)).astype(np.int32)
  enc[1, 5:] = 0  # padding
  ids = np.array([[1, 2], [2, 0], [0, 3]], np.int32)  # per example [B, G]
  encoded = jax.jit(
      functools.partial(MODEL.apply, method=MODEL.encode, enable_dropout=False)
  )({"params": params}, enc, ids)
  return params, enc, ids, encoded


@pytest.fixture(scope="module")
def cache():
  return decoding.init_cache(MODEL, CFG, 3, LENGTH)


@jax.jit
def _teacher_forced(params, enc, ids, targets):
  dec_in = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))  # BOS = 0 first.
  return MODEL.apply(
      {"params": params}, enc, dec_in, targets, ids, ids, enable_dropout=False
  )


def _callback(setup, beams=1):
  params, enc, ids, encoded = setup
  expand = functools.partial(decoding.flat_batch_beam_expand, beam_size=beams)
  return decoding.model_tokens_to_logits(
      MODEL,
      params,
      expand(encoded),
      expand(enc),
      LENGTH,
      encoder_feature_ids=expand(ids),
      decoder_feature_ids=expand(ids),
  )


def test_cached_decoding_equals_teacher_forcing(setup, cache):
  params, enc, ids, _ = setup
  targets = np.random.default_rng(1).integers(2, 384, (3, LENGTH))
  targets = jnp.asarray(targets, jnp.int32)
  full = _teacher_forced(params, enc, ids, targets)
  step = jax.jit(_callback(setup))
  dec_in = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
  for t in range(LENGTH):
    logits, cache = step(
        decoding.DecodingState(
            jnp.array(t), dec_in, dec_in[:, t : t + 1], cache
        )
    )
    np.testing.assert_allclose(logits, full[:, t], atol=1e-4, rtol=1e-4)


def _until_eos(seq):
  seq = [int(t) for t in seq]
  return seq[: seq.index(1) + 1] if 1 in seq else seq


def test_greedy_is_argmax_of_its_own_teacher_forcing(setup, cache):
  params, enc, ids, _ = setup
  seqs, log_probs = jax.jit(
      functools.partial(
          decoding.greedy, _callback(setup), batch_size=3, max_decode_len=LENGTH
      )
  )(cache)
  seqs = seqs[:, 0]
  assert any(1 in _until_eos(s) for s in seqs)  # Some decode ended early.
  logits = _teacher_forced(params, enc, ids, seqs)
  lp = jax.nn.log_softmax(logits)
  for b in range(3):
    seq = _until_eos(seqs[b])
    assert 0 not in seq  # A PAD inside would be masked by teacher forcing.
    np.testing.assert_array_equal(np.argmax(logits[b, : len(seq)], -1), seq)
    np.testing.assert_allclose(
        log_probs[b, 0], sum(lp[b, i, t] for i, t in enumerate(seq)), rtol=1e-4
    )
  beam, scores = jax.jit(
      functools.partial(
          decoding.beam_search,
          _callback(setup, 1),
          batch_size=3,
          max_decode_len=LENGTH,
          beam_size=1,
          alpha=0.0,
      )
  )(cache)
  np.testing.assert_array_equal(beam[:, 0], seqs)
  np.testing.assert_allclose(scores, log_probs, rtol=1e-4)


def test_beam_scores_are_sorted_and_consistent(setup, cache):
  params, enc, ids, _ = setup
  beams, alpha = 3, 0.6
  seqs, scores = jax.jit(
      functools.partial(
          decoding.beam_search,
          _callback(setup, beams),
          batch_size=3,
          max_decode_len=LENGTH,
          beam_size=beams,
          alpha=alpha,
      )
  )(cache)
  assert seqs.shape == (3, beams, LENGTH)
  assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)
  for k in range(beams):  # 3-row teacher forcing: reuses one compile.
    lp = jax.nn.log_softmax(_teacher_forced(params, enc, ids, seqs[:, k]))
    for b in range(3):
      seq = _until_eos(seqs[b, k])
      total = sum(lp[b, j, t] for j, t in enumerate(seq))
      np.testing.assert_allclose(
          scores[b, k],
          total / decoding.brevity_penalty(alpha, len(seq)),
          rtol=1e-4,
      )
