"""The model: loss, metrics, scoring, feature dropout and decoding.

Each is checked on a tiny random network against a naive reference built from
`compute_logits` (teacher forcing) and NumPy.
"""

import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flix import decoding
from flix import features as features_lib
from flix import models
from flix import network

from network_test import numpy_params, random_b

VOCAB = 64
SPACE = features_lib.FeatureSpace(
    groups=(
        features_lib.FeatureGroup("task", ("a", "b"), rank=2),
        features_lib.FeatureGroup("language", ("x", "y", "z"), rank=2),
    )
)
DROP_SPACE = features_lib.FeatureSpace(
    groups=tuple(dataclasses.replace(g, dropout=0.5) for g in SPACE.groups)
)
CONFIG = network.preset(
    "tiny",
    vocab_size=VOCAB,
    num_encoder_layers=1,
    num_decoder_layers=1,
    feature_space=SPACE,
    max_segments=2,
)
MODEL = models.FlixModel(CONFIG, z_loss=1e-2, label_smoothing=0.1)
DROP_MODEL = dataclasses.replace(
    MODEL, config=dataclasses.replace(CONFIG, feature_space=DROP_SPACE)
)
# Loss normalisations: NUM_REAL_TARGET_TOKENS (MODEL's), a sum, a number.
FACTORS = {"tokens": models.NUM_REAL_TARGET_TOKENS, "sum": None, "2.5": 2.5}


@jax.jit
def _run(params, batch, rng):
  """Every model output the tests check, for one batch layout in one compile
  (the tiny model compiles in seconds; its runs take milliseconds)."""
  unweighted = {k: v for k, v in batch.items() if k != "decoder_loss_weights"}
  return {
      "logits": MODEL.compute_logits(params, batch),
      "dropped_logits": DROP_MODEL.compute_logits(params, batch, None, rng),
      "score": MODEL.score_batch(params, batch),
      "loss": {
          name: dataclasses.replace(
              MODEL, loss_normalizing_factor=factor
          ).loss_fn(params, batch)
          for name, factor in FACTORS.items()
      },
      "default_weights_loss": MODEL.loss_fn(params, unweighted)[0],
      "rate_0_rng_loss": MODEL.loss_fn(params, batch, None, rng)[0],
      "dropout_no_rng_loss": DROP_MODEL.loss_fn(params, batch)[0],
      "dropout_rng_loss": DROP_MODEL.loss_fn(params, batch, None, rng)[0],
  }


def _logits(params, batch):
  return np.asarray(_run(params, batch, jax.random.PRNGKey(0))["logits"])


@jax.jit
def _packed_logits(params, batch, rng):
  """(logits, logits with feature dropout) of a packed batch."""
  return (
      MODEL.compute_logits(params, batch),
      DROP_MODEL.compute_logits(params, batch, None, rng),
  )


@pytest.fixture(scope="module")
def params():
  """Random params with non-zero B, so that every feature changes the output."""
  return random_b(numpy_params(CONFIG))


def _batch(ids, seed=0, enc_len=7, dec_len=6, same_inputs=False):
  """Unpacked batch; `ids` int [B, G] per example; some rows end in padding."""
  ids = np.asarray(ids, np.int32)
  size = len(ids)
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, VOCAB, (size, enc_len)).astype(np.int32)
  targets = rng.integers(2, VOCAB, (size, dec_len)).astype(np.int32)
  for b in range(size):
    enc[b, enc_len - b % 3 :] = 0
    targets[b, dec_len - b % 4 :] = 0
  if same_inputs:
    enc[:] = enc[0]
  return {
      "encoder_input_tokens": enc,
      "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": (targets > 0).astype(np.float32),
      "encoder_feature_ids": np.repeat(ids[:, None], enc_len, 1),
      "decoder_feature_ids": np.repeat(ids[:, None], dec_len, 1),
  }


# Every value of every group, and some examples without a group.
IDS = [[1, 1], [2, 2], [1, 3], [0, 2], [2, 0]]


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _reference_cross_entropy(logits, targets, weights, label_smoothing, z_loss):
  """(sum of weighted token losses + z-losses, sum of weighted z-losses)."""
  logits = np.asarray(logits, np.float64)
  vocab = logits.shape[-1]
  log_z = np.log(np.exp(logits).sum(-1))
  log_p = logits - log_z[..., None]
  soft = np.full(logits.shape, label_smoothing / (vocab - 1))
  np.put_along_axis(soft, targets[..., None], 1.0 - label_smoothing, -1)
  # Minus the targets' entropy, so that predicting them exactly costs 0.
  entropy = -np.sum(soft * np.log(np.where(soft > 0, soft, 1.0)), -1)
  token = -np.sum(soft * log_p, -1) - entropy
  z = z_loss * log_z**2
  return np.sum((token + z) * weights), np.sum(z * weights)


# ---- Cross entropy ----


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_cross_entropy_matches_numpy(label_smoothing, z_loss):
  rng = np.random.default_rng(0)
  logits = (3 * rng.standard_normal((2, 5, 7))).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  weights = (rng.random((2, 5)) * (rng.random((2, 5)) < 0.7)).astype(np.float32)
  assert (weights == 0).any() and (weights > 0).any()
  total, z_total = models.cross_entropy_with_z_loss(
      jnp.asarray(logits), targets, weights, label_smoothing, z_loss
  )
  expected = _reference_cross_entropy(
      logits, targets, weights, label_smoothing, z_loss
  )
  np.testing.assert_allclose(total, expected[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(z_total, expected[1], rtol=1e-5, atol=1e-6)
  # Zero-weight tokens do not count: changing their logits changes nothing.
  noisy = np.where(weights[..., None] == 0, logits + 5.0, logits)
  np.testing.assert_allclose(
      models.cross_entropy_with_z_loss(
          jnp.asarray(noisy), targets, weights, label_smoothing, z_loss
      )[0],
      total,
      rtol=1e-6,
  )


def test_cross_entropy_of_the_smoothed_targets_is_zero():
  targets = np.array([[3, 0, 6]])
  soft = np.full((1, 3, 7), 0.1 / 6)
  np.put_along_axis(soft, targets[..., None], 0.9, -1)
  total, z_total = models.cross_entropy_with_z_loss(
      jnp.log(jnp.asarray(soft, jnp.float32)) + 2.0,  # any shift of log Z
      targets,
      np.ones((1, 3), np.float32),
      label_smoothing=0.1,
  )
  np.testing.assert_allclose(total, 0.0, atol=1e-5)
  assert float(z_total) == 0.0


# ---- loss_fn: normalisation and metrics ----


@pytest.mark.parametrize("name", FACTORS)
def test_loss_normalisation_and_metrics(params, name):
  factor = FACTORS[name]
  batch = _batch(IDS)
  # Fractional weights, zero on padding.
  batch["decoder_loss_weights"] = batch["decoder_loss_weights"] * np.array(
      [[1.0], [0.5], [2.0], [1.0], [0.25]], np.float32
  )
  out = _run(params, batch, jax.random.PRNGKey(0))
  logits = np.asarray(out["logits"])
  weights = batch["decoder_loss_weights"]
  targets = batch["decoder_target_tokens"]
  total, z_total = _reference_cross_entropy(logits, targets, weights, 0.1, 1e-2)
  weight_sum = weights.sum()
  denominator = {
      models.NUM_REAL_TARGET_TOKENS: weight_sum,
      None: 1.0,
      2.5: 2.5,
  }[factor]
  loss, metrics = out["loss"][name]
  np.testing.assert_allclose(loss, total / denominator, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], total / denominator, rtol=1e-5)
  np.testing.assert_allclose(
      metrics["z_loss"], z_total / denominator, rtol=1e-5
  )
  np.testing.assert_allclose(metrics["weight_sum"], weight_sum, rtol=1e-6)
  np.testing.assert_allclose(
      metrics["token_loss"], (total - z_total) / weight_sum, rtol=1e-5
  )
  correct = (logits.argmax(-1) == targets) * weights
  np.testing.assert_allclose(
      metrics["accuracy"], correct.sum() / weight_sum, atol=1e-7
  )


def test_loss_weights_default_to_real_targets(params):
  batch = _batch(IDS)
  out = _run(params, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(
      out["default_weights_loss"], out["loss"]["tokens"][0], rtol=1e-6
  )


def test_accuracy_counts_weighted_argmax_hits(params):
  batch = _batch(IDS, seed=1)
  argmax = _logits(params, batch).argmax(-1)
  real = batch["decoder_target_tokens"] > 0
  rng = np.random.default_rng(1)
  hit = real & (rng.random(real.shape) < 0.5) & (argmax > 0)
  miss = np.where(argmax + 1 < VOCAB, argmax + 1, 2)
  # Targets change, inputs do not: the logits stay as they were.
  batch["decoder_target_tokens"] = np.where(
      hit, argmax, np.where(real, miss, 0)
  ).astype(np.int32)
  weights = batch["decoder_loss_weights"] * np.arange(1, 6)[:, None]
  batch["decoder_loss_weights"] = weights.astype(np.float32)
  out = _run(params, batch, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(out["logits"]).argmax(-1), argmax)
  assert 0 < hit.sum() < real.sum()
  _, metrics = out["loss"]["tokens"]
  np.testing.assert_allclose(
      metrics["accuracy"], weights[hit].sum() / weights.sum(), rtol=1e-6
  )


# ---- Scoring ----


def test_score_batch_sums_target_log_probs(params):
  batch = _batch(IDS, seed=2)
  out = _run(params, batch, jax.random.PRNGKey(0))
  log_probs = _log_softmax(out["logits"])
  targets = batch["decoder_target_tokens"]
  expected = [
      sum(log_probs[b, t, targets[b, t]] for t in range(6) if targets[b, t])
      for b in range(len(IDS))
  ]
  scores = out["score"]
  assert scores.shape == (len(IDS),)
  np.testing.assert_allclose(scores, expected, rtol=1e-5)


# ---- Feature dropout ----

KEEP_COMBOS = list(itertools.product((True, False), repeat=2))  # per group
ALL_ACTIVE = [[1, 1], [2, 2], [1, 3], [2, 1], [1, 2]]  # no absent group


def _with_keep(batch, keep):
  """`batch` whose examples keep group g's feature iff keep[..., g]."""
  keep = np.asarray(keep, np.int32)
  if keep.ndim == 2:  # [B, G] per example
    keep = keep[:, None]
  return dict(
      batch,
      encoder_feature_ids=batch["encoder_feature_ids"] * keep,
      decoder_feature_ids=batch["decoder_feature_ids"] * keep,
  )


def test_feature_dropout_changes_the_loss_only_with_rates_and_rng(params):
  batch = _batch(ALL_ACTIVE)
  out = _run(params, batch, jax.random.PRNGKey(0))
  plain = float(out["loss"]["tokens"][0])
  assert float(out["rate_0_rng_loss"]) == plain
  assert float(out["dropout_no_rng_loss"]) == plain
  assert float(out["dropout_rng_loss"]) != plain


def _matching_combos(got, candidates, where):
  return [
      combo
      for combo, logits in zip(KEEP_COMBOS, candidates)
      if np.allclose(got[where], logits[where], atol=1e-5)
  ]


def test_feature_dropout_draws_per_example_for_encoder_and_decoder(params):
  """Each example's logits equal those of exactly one way of dropping its
  features on both sides (never a mix of encoder kept, decoder dropped)."""
  batch = _batch(ALL_ACTIVE)
  rng = jax.random.PRNGKey(1)
  out = _run(params, batch, rng)
  got = np.asarray(out["dropped_logits"])
  candidates = [_logits(params, _with_keep(batch, c)) for c in KEEP_COMBOS]
  drawn = []
  for b in range(len(ALL_ACTIVE)):
    matches = _matching_combos(got, candidates, b)
    assert len(matches) == 1, (b, matches)
    drawn.append(matches[0])
  assert len(set(drawn)) > 1  # features were dropped, not alike everywhere
  # The loss is that of the dropped features.
  dropped = _run(params, _with_keep(batch, drawn), rng)
  np.testing.assert_allclose(
      out["dropout_rng_loss"], dropped["loss"]["tokens"][0], rtol=1e-6
  )


def _packed_batch():
  """Rows of two packed examples with their own features, shaped as `_batch`."""
  rng = np.random.default_rng(3)
  ids = np.array([[[1, 2], [2, 3]], [[2, 1], [1, 2]]] * 3)[: len(IDS)]
  batch = {k: np.zeros_like(v) for k, v in _batch(IDS).items()}
  for key in ("encoder", "decoder"):
    batch[f"{key}_segment_ids"] = np.zeros_like(batch[f"{key}_input_tokens"])
  for r in range(len(ids)):
    e = d = 0
    for s, (n_enc, n_dec) in enumerate(((3, 2), (4, 3))):  # decoder: 1 pad
      targets = rng.integers(2, VOCAB, n_dec)
      batch["encoder_input_tokens"][r, e : e + n_enc] = rng.integers(
          2, VOCAB, n_enc
      )
      batch["decoder_target_tokens"][r, d : d + n_dec] = targets
      batch["decoder_input_tokens"][r, d + 1 : d + n_dec] = targets[:-1]
      batch["decoder_loss_weights"][r, d : d + n_dec] = 1.0
      batch["encoder_segment_ids"][r, e : e + n_enc] = s + 1
      batch["decoder_segment_ids"][r, d : d + n_dec] = s + 1
      batch["encoder_feature_ids"][r, e : e + n_enc] = ids[r, s]
      batch["decoder_feature_ids"][r, d : d + n_dec] = ids[r, s]
      e, d = e + n_enc, d + n_dec
  return batch


def test_feature_dropout_draws_per_packed_segment(params):
  """In a packed row each example (segment) draws its own features, shared
  by its encoder and decoder tokens."""
  batch = _packed_batch()
  rng = jax.random.PRNGKey(2)
  got = np.asarray(_packed_logits(params, batch, rng)[1])
  candidates = [
      np.asarray(_packed_logits(params, _with_keep(batch, c), rng)[0])
      for c in KEEP_COMBOS
  ]
  drawn = []
  for r, s in itertools.product(range(len(IDS)), (1, 2)):
    tokens = (r, batch["decoder_segment_ids"][r] == s)
    matches = _matching_combos(got, candidates, tokens)
    assert len(matches) == 1, (r, s, matches)
    drawn.append(matches[0])
  # The two examples of some row draw differently.
  assert any(drawn[2 * r] != drawn[2 * r + 1] for r in range(len(IDS)))


# ---- Host check of packed batches ----


def _with_config(model, **overrides):
  return dataclasses.replace(
      model, config=dataclasses.replace(model.config, **overrides)
  )


def test_check_batch_counts_the_examples_with_features_per_row():
  batch = _packed_batch()  # two examples per row, different features
  MODEL.check_batch(batch)  # max_segments=2
  with pytest.raises(ValueError, match="max_segments=1 .*MAX_SEGMENTS"):
    _with_config(MODEL, max_segments=1).check_batch(batch)
  # The limit holds for every strategy; no adapters, nothing to check.
  with pytest.raises(ValueError, match="max_segments=1"):
    _with_config(MODEL, max_segments=1, flix_strategy="dense").check_batch(
        batch
    )
  _with_config(MODEL, max_segments=1, feature_space=None).check_batch(batch)


def test_check_batch_passes_only_what_feature_dropout_can_compute(params):
  """Packed examples with equal features form one run of ids, but feature
  dropout draws per example and can split it: a batch that check_batch
  passes must still compute (not NaN) under feature dropout."""
  batch = _packed_batch()
  for key in ("encoder_feature_ids", "decoder_feature_ids"):
    batch[key] = np.where(batch[key] > 0, 1, 0).astype(np.int32)
  model = _with_config(DROP_MODEL, max_segments=1)
  try:
    model.check_batch(batch)
  except ValueError:
    return  # rejected on the host with the readable error
  loss, _ = jax.jit(model.loss_fn)(params, batch, None, jax.random.PRNGKey(0))
  assert np.isfinite(loss), loss


# ---- Decoding ----

DECODE_LENGTH = 6


@functools.lru_cache(maxsize=None)
def _predict(**kwargs):
  return jax.jit(
      functools.partial(
          MODEL.predict_batch, max_decode_length=DECODE_LENGTH, **kwargs
      )
  )


def _next_log_probs(params, batch, prefixes, t):
  """Log-probs [B, V] of the token after each row's prefix[:, : t + 1]
  (BOS first), from teacher-forced `compute_logits` with each example's ids."""
  size = len(prefixes)
  ids = batch["encoder_feature_ids"][:, 0]  # [B, G]
  logits = _logits(
      params,
      {
          "encoder_input_tokens": batch["encoder_input_tokens"],
          "encoder_feature_ids": batch["encoder_feature_ids"],
          "decoder_input_tokens": prefixes,
          "decoder_target_tokens": np.ones((size, DECODE_LENGTH), np.int32),
          "decoder_loss_weights": np.ones((size, DECODE_LENGTH), np.float32),
          "decoder_feature_ids": np.repeat(ids[:, None], DECODE_LENGTH, 1),
      },
  )
  return _log_softmax(logits[:, t])


def _manual_greedy(params, batch):
  """Argmax loop, each step teacher-forcing the tokens chosen so far."""
  size = len(batch["encoder_input_tokens"])
  inputs = np.zeros((size, DECODE_LENGTH), np.int32)  # BOS first
  tokens = np.zeros((size, DECODE_LENGTH), np.int32)
  score = np.zeros((size,))
  ended = np.zeros((size,), bool)
  for t in range(DECODE_LENGTH):
    log_probs = _next_log_probs(params, batch, inputs, t)
    token = np.where(ended, decoding.PAD_ID, log_probs.argmax(-1))
    score += np.where(ended, 0.0, log_probs[np.arange(size), token])
    tokens[:, t] = token
    if t + 1 < DECODE_LENGTH:
      inputs[:, t + 1] = token
    ended |= token == decoding.EOS_ID
  return tokens, score


def _manual_beam_of_one(params, batch):
  """Beam search with one beam and no length penalty, written out.

  The live path takes the best non-EOS token. Wherever EOS is among the two
  best next tokens (the 2K candidates), the path + EOS is a finished
  hypothesis. The result is the best of these and the live path cut at the
  end: greedy's result, unless a shorter ending scores higher.
  """
  size = len(batch["encoder_input_tokens"])
  inputs = np.zeros((size, DECODE_LENGTH), np.int32)
  live = np.zeros((size, DECODE_LENGTH), np.int32)
  live_score = np.zeros((size,))
  best, best_score = np.zeros_like(live), np.full((size,), -np.inf)
  for t in range(DECODE_LENGTH):
    log_probs = _next_log_probs(params, batch, inputs, t)
    for b in range(size):
      top2 = np.argsort(-log_probs[b])[:2]
      ending = live_score[b] + log_probs[b, decoding.EOS_ID]
      if decoding.EOS_ID in top2 and ending > best_score[b]:
        best[b], best_score[b] = live[b], ending
        best[b, t] = decoding.EOS_ID
      token = [x for x in top2 if x != decoding.EOS_ID][0]
      live[b, t] = token
      live_score[b] += log_probs[b, token]
    if t + 1 < DECODE_LENGTH:
      inputs[:, t + 1] = live[:, t]
  cut = live_score > best_score
  return np.where(cut[:, None], live, best), np.where(
      cut, live_score, best_score
  )


def test_greedy_equals_argmax_over_teacher_forcing(params):
  batch = _batch(IDS)
  expected_tokens, expected_scores = _manual_greedy(params, batch)
  ended_early = (expected_tokens[:, :-1] == decoding.EOS_ID).any(-1)
  assert ended_early.any() and not ended_early.all()  # both paths are tested
  tokens, scores = _predict(method="greedy")(params, batch)
  assert tokens.shape == (len(IDS), 1, DECODE_LENGTH)
  np.testing.assert_array_equal(tokens[:, 0], expected_tokens)
  np.testing.assert_allclose(scores[:, 0], expected_scores, rtol=1e-5)


@pytest.fixture(scope="module")
def eos_params(params):
  """`params` with EOS's logit tripled: where EOS is already likely it comes
  close to the top, so beam search finds endings that greedy passes by."""
  params = jax.tree.map(np.copy, params)
  params["decoder"]["logits_dense"]["kernel"][:, decoding.EOS_ID] *= 3.0
  return params


def test_beam_of_one_is_greedy_with_its_finished_alternatives(eos_params):
  batch = _batch(IDS)
  expected_tokens, expected_scores = _manual_beam_of_one(eos_params, batch)
  tokens, scores = _predict(method="beam", beam_size=1, alpha=0.0)(
      eos_params, batch
  )
  assert tokens.shape == (len(IDS), 1, DECODE_LENGTH)
  np.testing.assert_array_equal(tokens[:, 0], expected_tokens)
  np.testing.assert_allclose(scores[:, 0], expected_scores, rtol=1e-5)
  # Where no shorter ending scores higher, beam search of one is greedy.
  greedy_tokens, greedy_scores = _manual_greedy(eos_params, batch)
  same = (expected_tokens == greedy_tokens).all(-1)
  assert same.any() and not same.all()  # both cases are tested
  np.testing.assert_allclose(scores[same, 0], greedy_scores[same], rtol=1e-5)
  assert (scores[~same, 0] > greedy_scores[~same]).all()


def test_each_example_decodes_with_its_own_features(params):
  """Same inputs, different features: the rows differ, and each equals the
  example decoded in a batch of copies of itself."""
  batch = _batch(IDS, same_inputs=True)
  together, scores = _predict(method="greedy")(params, batch)
  assert len({tuple(row) for row in np.asarray(together[:, 0])}) > 1
  for b in range(len(IDS)):
    alone = {k: np.repeat(v[b : b + 1], len(IDS), 0) for k, v in batch.items()}
    tokens, score = _predict(method="greedy")(params, alone)
    np.testing.assert_array_equal(tokens[0], together[b])
    np.testing.assert_allclose(score[0], scores[b], rtol=1e-5)


def test_unknown_decoding_method(params):
  predict = functools.partial(
      MODEL.predict_batch, max_decode_length=DECODE_LENGTH, method="magic"
  )
  with pytest.raises(ValueError, match="Unknown decoding method 'magic'"):
    jax.eval_shape(predict, params, _batch(IDS))  # traced, not run


# ---- Parameters ----


def test_params_abstract_params_and_logical_axes_share_one_tree():
  # The traced init (shapes and dtypes, no compute; train_step_test runs it).
  params = jax.eval_shape(MODEL.init_params, jax.random.PRNGKey(0))
  abstract = MODEL.abstract_params()
  axes = MODEL.param_logical_axes()
  structure = jax.tree.structure(params)
  unboxed = nn.unbox(abstract)
  assert jax.tree.structure(unboxed) == structure
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  assert jax.tree.structure(axes, is_leaf=is_spec) == structure
  for leaf, shape, spec in zip(
      jax.tree.leaves(params),
      jax.tree.leaves(unboxed),
      jax.tree.leaves(axes, is_leaf=is_spec),
  ):
    assert isinstance(shape, jax.ShapeDtypeStruct)
    assert (leaf.shape, leaf.dtype) == (shape.shape, shape.dtype)
    assert len(spec) == len(leaf.shape)
  kernel = axes["decoder"]["logits_dense"]["kernel"]
  assert tuple(kernel) == ("embed", "vocab")
  lora_a = axes["encoder"]["layers_0"]["mlp"]["wi_0"]["lora_a_task"]
  # The adapter side of a kernel's `embed` dimension is sharded (own axis).
  assert tuple(lora_a) == ("flix_values", "adapter_embed", "lora_rank")
