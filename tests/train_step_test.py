"""The train step: only the trainable subset changes; losses; microbatches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flix import features as features_lib
from flix import models
from flix import network
from flix import train_step

SPACE = features_lib.FeatureSpace(
    groups=(
        features_lib.FeatureGroup("task", ("a", "b"), rank=2, dropout=0.3),
        features_lib.FeatureGroup(
            "language", ("x", "y", "z"), rank=2, dropout=0.3
        ),
    )
)


def _batch(seed=0, batch=4, length=6):
  rng = np.random.default_rng(seed)
  targets = rng.integers(2, 50, (batch, length)).astype(np.int32)
  targets[:, -1] = 0
  # Every value of every group is active in some example.
  ids = np.stack([np.arange(batch) % 2 + 1, np.arange(batch) % 3 + 1], -1)
  return {
      "encoder_input_tokens": rng.integers(2, 50, (batch, length)).astype(
          np.int32
      ),
      "decoder_input_tokens": np.concatenate(
          [np.zeros((batch, 1), np.int32), targets[:, :-1]], 1
      ),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": (targets > 0).astype(np.float32),
      "encoder_feature_ids": np.repeat(ids[:, None], length, 1).astype(
          np.int32
      ),
      "decoder_feature_ids": np.repeat(ids[:, None], length, 1).astype(
          np.int32
      ),
  }


def _model(space=SPACE):
  return models.FlixModel(
      network.preset("tiny", vocab_size=64, feature_space=space)
  )


def test_only_adapters_change_and_base_is_bit_identical():
  model = _model()
  params = model.init_params(jax.random.PRNGKey(0))
  tx = train_step.make_optimizer(1e-2, "adamw")
  state = train_step.create_train_state(params, tx, train_step.ADAPTER_PATTERNS)
  frozen_before = jax.tree.map(np.array, state.frozen)
  trainable_before = jax.tree.map(np.array, state.trainable)
  step = jax.jit(train_step.make_train_step(model, tx))
  for i in range(4):  # B = 0 at init: A gets gradients from step 2 on
    state, metrics = step(state, _batch(i), jax.random.PRNGKey(1))
  assert np.isfinite(float(metrics["loss"]))
  jax.tree.map(
      np.testing.assert_array_equal,
      frozen_before,
      jax.tree.map(np.array, state.frozen),
  )
  changed = jax.tree.map(
      lambda a, b: bool(np.any(a != np.asarray(b))),
      trainable_before,
      state.trainable,
  )
  assert all(jax.tree.leaves(changed))
  # The optimizer state holds the adapters only.
  opt_leaves = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert opt_leaves <= 3 * train_step.count_params(state.trainable)


def test_split_params_by_pattern():
  params = _model().init_params(jax.random.PRNGKey(0))
  trainable, frozen = train_step.split_params(
      params, train_step.ADAPTER_PATTERNS
  )
  flat = jax.tree_util.tree_flatten_with_path(trainable)[0]
  assert flat and all("lora_" in jax.tree_util.keystr(p) for p, _ in flat)
  assert "lora_a_task" not in str(jax.tree_util.tree_structure(frozen))
  with pytest.raises(ValueError, match="No parameter matches"):
    train_step.split_params(params, ["nothing_matches"])


def test_microbatched_gradients_equal_full_batch():
  model = _model(
      features_lib.FeatureSpace(
          groups=tuple(
              features_lib.FeatureGroup(g.name, g.values, rank=2)
              for g in SPACE.groups
          )
      )
  )  # no dropout: deterministic
  params = model.init_params(jax.random.PRNGKey(0))
  tx = train_step.make_optimizer(1e-1, "sgd")
  batch = _batch(3)
  results = []
  for num in (1, 2):
    state = train_step.create_train_state(
        params, tx, train_step.ADAPTER_PATTERNS
    )
    step = jax.jit(train_step.make_train_step(model, tx, num_microbatches=num))
    state, _ = step(state, batch, jax.random.PRNGKey(0))
    state, _ = step(state, _batch(4), jax.random.PRNGKey(0))
    results.append(state.trainable)
  # Equal when every microbatch has the same number of target tokens.
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), *results
  )


def test_a_non_finite_step_is_not_applied():
  model = _model()
  params = model.init_params(jax.random.PRNGKey(0))
  tx = train_step.make_optimizer(1e-2, "adamw")
  state = train_step.create_train_state(params, tx, train_step.ADAPTER_PATTERNS)
  step = jax.jit(train_step.make_train_step(model, tx))
  state, metrics = step(state, _batch(0), jax.random.PRNGKey(1))
  assert float(metrics["nonfinite"]) == 0.0
  before = jax.tree.map(np.array, (state.trainable, state.opt_state))
  # A NaN in the frozen base makes the loss NaN.
  bad = state.replace(frozen=jax.tree.map(lambda x: x * np.nan, state.frozen))
  after, metrics = step(bad, _batch(1), jax.random.PRNGKey(1))
  assert float(metrics["nonfinite"]) == 1.0
  assert np.isnan(float(metrics["loss"]))
  assert int(after.step) == int(state.step) + 1
  jax.tree.map(
      np.testing.assert_array_equal,
      before,
      jax.tree.map(np.array, (after.trainable, after.opt_state)),
  )
