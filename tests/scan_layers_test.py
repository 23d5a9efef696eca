"""Scanned layer stacks (`T5Config.scan_layers`) and rematerialisation.

The scanned network is the unscanned one with its layers' params stacked
(`flix.layer_layout`): same logits, gradients, decodes and train steps for
the same params, the same checkpoints in and out, and every remat policy
computes the same thing.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from flix import checkpoints
from flix import adapter_export
from flix import features as features_lib
from flix import layer_layout
from flix import models
from flix import network
from flix import t5x_checkpoint
from flix import train_step

SPACE = features_lib.FeatureSpace.from_values(
    {"task": ["a", "b", "c"], "language": ["x", "y", "z", "w"]},
    ranks={"task": 4, "language": 2},
)
# Two packed examples per row, so the routing's slots are exercised.
CFG = network.preset("tiny", vocab_size=64, feature_space=SPACE, max_segments=2)
SCANNED = dataclasses.replace(CFG, scan_layers=True)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _assert_trees_close(a, b, tol=1e-5):
  a, b = _flat(a), _flat(b)
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], atol=tol, rtol=tol, err_msg=key)


@functools.lru_cache(maxsize=None)
def _params(seed=0):
  """Per-layer params of CFG with non-zero B, drawn in NumPy."""
  rng = np.random.default_rng(seed)
  shapes = _flat(
      jax.eval_shape(models.FlixModel(CFG).init_params, jax.random.PRNGKey(0))
  )
  return traverse_util.unflatten_dict(
      {
          k: (
              np.ones(s.shape)
              if k.endswith("/scale")
              else rng.normal(0, 1 if "embedding" in k else 0.3, s.shape)
          ).astype(np.float32)
          for k, s in shapes.items()
      },
      sep="/",
  )


def _batch(seed=0, rows=2, length=8):
  """Rows packing two examples (segments 1, 2) with different features."""
  rng = np.random.default_rng(seed)
  segments = np.repeat([[1] * (length // 2) + [2] * (length // 2)], rows, 0)
  segments[:, -1] = 0  # padding
  tokens = rng.integers(2, 64, (rows, length)) * (segments > 0)
  ids = np.zeros((rows, length, 2), np.int32)
  for r in range(rows):
    for s in (1, 2):
      ids[r, segments[r] == s] = (r + s) % 3 + 1, (r + 2 * s) % 4 + 1
  inputs = np.where(
      np.roll(segments, 1, 1) == segments, np.roll(tokens, 1, 1), 0
  )
  return {
      "encoder_input_tokens": tokens.astype(np.int32),
      "decoder_input_tokens": inputs.astype(np.int32),
      "decoder_target_tokens": tokens.astype(np.int32),
      "decoder_loss_weights": (tokens > 0).astype(np.float32),
      "encoder_feature_ids": ids,
      "decoder_feature_ids": ids,
      "encoder_segment_ids": segments.astype(np.int32),
      "decoder_segment_ids": segments.astype(np.int32),
  }


@functools.lru_cache(maxsize=None)
def _loss_and_grad(cfg):
  model = models.FlixModel(cfg)
  return jax.jit(
      jax.value_and_grad(lambda p, b: model.loss_fn(p, b)[0]),
  )


@functools.lru_cache(maxsize=None)
def _logits(cfg):
  return jax.jit(models.FlixModel(cfg).compute_logits)


# ---- The layout conversion ----


def _scanned_network_init(rng):
  """The scanned network's own params (`nn.scan`'s tree), boxed."""
  return models.FlixModel(SCANNED).module_init(rng)


def test_stacking_gives_the_scanned_networks_tree_and_round_trips():
  boxed = models.FlixModel(CFG).abstract_params()
  scanned_boxed = jax.eval_shape(_scanned_network_init, jax.random.PRNGKey(0))
  stacked = layer_layout.stack_layers(boxed)
  # Same paths, shapes and logical axes as the scanned network's own params.
  assert jax.tree.map(
      lambda b: (b.value.shape, b.names),
      stacked,
      is_leaf=lambda x: isinstance(x, nn.Partitioned),
  ) == jax.tree.map(
      lambda b: (b.value.shape, b.names),
      scanned_boxed,
      is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )
  kernel = _flat(scanned_boxed)["encoder/layers/attention/query/kernel"]
  assert kernel.names == ("layers", "embed", "joined_kv")
  assert layer_layout.is_stacked(stacked) and not layer_layout.is_stacked(boxed)

  params = _params()
  stacked = layer_layout.stack_layers(params)
  np.testing.assert_array_equal(
      _flat(stacked)["decoder/layers/mlp/wo/lora_b_task"][1],
      _flat(params)["decoder/layers_1/mlp/wo/lora_b_task"],
  )
  _assert_trees_close(layer_layout.unstack_layers(stacked), params, tol=0)
  # Both directions leave leaves already in the target layout alone.
  _assert_trees_close(layer_layout.stack_layers(stacked), stacked, tol=0)
  _assert_trees_close(layer_layout.unstack_layers(params), params, tol=0)


def test_initial_values_do_not_depend_on_the_layout():
  """A random base is rebuilt alike with or without scan (a run may resume
  with the other setting)."""
  rng = jax.random.PRNGKey(3)
  scanned = models.FlixModel(SCANNED).init_params(rng)
  assert layer_layout.is_stacked(scanned)
  _assert_trees_close(
      layer_layout.unstack_layers(scanned),
      models.FlixModel(CFG).init_params(rng),
      tol=0,
  )
  # What the scanned model's boxes name is what the network's own init does.
  assert jax.tree.map(
      lambda b: b.names,
      models.FlixModel(SCANNED).abstract_params(),
      is_leaf=lambda x: isinstance(x, nn.Partitioned),
  ) == jax.tree.map(
      lambda b: b.names,
      jax.eval_shape(_scanned_network_init, rng),
      is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def test_mixed_trees_merge_and_conflicts_are_errors():
  params = _params()
  trainable, frozen = train_step.split_params(
      layer_layout.stack_layers(params), train_step.ADAPTER_PATTERNS
  )
  # The trainable part comes back per layer; the frozen one stays stacked.
  assert "layers_0" in trainable["encoder"] and "layers" in frozen["encoder"]
  mixed = train_step.merge_params(trainable, frozen)
  _assert_trees_close(
      layer_layout.stack_layers(mixed), layer_layout.stack_layers(params), 0
  )
  _assert_trees_close(layer_layout.unstack_layers(mixed), params, tol=0)

  both = traverse_util.unflatten_dict(
      {
          **_flat(params),
          **_flat(layer_layout.stack_layers(params)),
      },
      sep="/",
  )
  with pytest.raises(ValueError, match="both per layer and stacked"):
    layer_layout.stack_layers(both)
  gap = _flat(params)
  gap = {k: v for k, v in gap.items() if "/layers_0/" not in k}
  with pytest.raises(ValueError, match="every layer from 0"):
    layer_layout.stack_layers(traverse_util.unflatten_dict(gap, sep="/"))


# ---- The network ----


def test_scanned_stacks_give_the_same_logits_and_gradients():
  params, batch = _params(), _batch()
  loss, grads = _loss_and_grad(CFG)(params, batch)
  stacked = layer_layout.stack_layers(params)
  scan_loss, scan_grads = _loss_and_grad(SCANNED)(stacked, batch)
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
  assert layer_layout.is_stacked(scan_grads)
  _assert_trees_close(layer_layout.unstack_layers(scan_grads), grads)
  np.testing.assert_allclose(
      _logits(SCANNED)(stacked, batch),
      _logits(CFG)(params, batch),
      atol=1e-5,
      rtol=1e-5,
  )


@pytest.mark.parametrize(
    "scan, policy",
    [
        (False, "minimal"),
        (True, "full"),
        (True, "minimal"),
        (True, "dots_saveable"),
    ],
)
def test_remat_policies_give_identical_results(scan, policy):
  params, batch = _params(), _batch()
  base = dataclasses.replace(CFG, scan_layers=scan)
  params = layer_layout.to_layout(params, scan)
  loss, grads = _loss_and_grad(base)(params, batch)
  remat_loss, remat_grads = _loss_and_grad(
      dataclasses.replace(base, remat_policy=policy)
  )(params, batch)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  _assert_trees_close(remat_grads, grads, tol=1e-6)


def test_unknown_remat_policy_is_an_error():
  with pytest.raises(ValueError, match="remat_policy 'some'"):
    network.preset("tiny", remat_policy="some")


def test_scanned_beam_search_matches():
  """Beam search expands and reorders the cache, whose batch axis is second
  when scanned."""
  params = _params()
  batch = {
      "encoder_input_tokens": _batch()["encoder_input_tokens"],
      "encoder_feature_ids": np.array([[[1, 2]] * 8, [[3, 0]] * 8], np.int32),
  }
  got = [
      models.FlixModel(cfg).predict_batch(
          params, batch, max_decode_length=5, method="beam", beam_size=3
      )
      for cfg in (CFG, SCANNED)
  ]
  np.testing.assert_array_equal(got[0][0], got[1][0])
  np.testing.assert_allclose(got[0][1], got[1][1], atol=1e-5)


# ---- Training and checkpoints ----


def test_train_steps_and_optimizer_state_match():
  """Adafactor sees per-layer leaves either way: same updates, same state."""
  params, tx = _params(), train_step.make_optimizer(1e-2)
  states = []
  for cfg in (CFG, SCANNED):
    model = models.FlixModel(cfg)
    state = train_step.create_train_state(
        model.network_layout(params), tx, train_step.ADAPTER_PATTERNS
    )
    step = jax.jit(train_step.make_train_step(model, tx))
    for i in range(2):
      state, _ = step(state, _batch(i), jax.random.PRNGKey(i))
    states.append(state)
  unscanned, scanned = states
  assert layer_layout.is_stacked(scanned.frozen)
  # Adafactor's first steps are nearly sign(g): float rounding of the two
  # summation orders shows at 1e-5.
  _assert_trees_close(scanned.trainable, unscanned.trainable, tol=1e-4)
  assert jax.tree.structure(scanned.opt_state) == jax.tree.structure(
      unscanned.opt_state
  )
  opt_states = (scanned.opt_state, unscanned.opt_state)
  for a, b in zip(*map(jax.tree.leaves, opt_states)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  _assert_trees_close(
      layer_layout.unstack_layers(scanned.frozen), unscanned.frozen, tol=0
  )


@pytest.fixture(scope="module")
def base_checkpoints(tmp_path_factory):
  """The base of `_params()` as a legacy T5X and as an HF checkpoint."""
  root = tmp_path_factory.mktemp("scan_base")
  base = adapter_export.base_params(_params())
  t5x_dir = t5x_checkpoint.write_t5x_checkpoint(base, str(root / "t5x"))
  adapter_export.write_hf_model(str(root / "hf"), base, CFG)
  return {"t5x": t5x_dir, "hf": str(root / "hf")}


@pytest.mark.parametrize("kind", ["t5x", "hf"])
def test_scanned_model_loads_public_checkpoints(base_checkpoints, kind):
  fresh = train_step.ADAPTER_PATTERNS
  loaded = {}
  for cfg in (CFG, SCANNED):
    target = jax.eval_shape(  # adapters stay shapes: only the base is read
        models.FlixModel(cfg).init_params, jax.random.PRNGKey(0)
    )
    loaded[cfg.scan_layers] = checkpoints.restore_base_params(
        target, base_checkpoints[kind], fresh_patterns=fresh
    )
  assert layer_layout.is_stacked(loaded[True])
  base = lambda t: {k: v for k, v in _flat(t).items() if "/lora_" not in k}
  unstacked = base(layer_layout.unstack_layers(loaded[True]))
  written = base(_params())
  assert unstacked.keys() == base(loaded[False]).keys() == written.keys()
  for key, value in base(loaded[False]).items():
    np.testing.assert_allclose(unstacked[key], value, rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(value, written[key], rtol=1e-6, err_msg=key)


def test_flix_checkpoints_are_per_layer_and_interchangeable(
    base_checkpoints, tmp_path
):
  """A scanned run's checkpoint is an unscanned run's, and the reverse."""
  params, tx = _params(), optax.adam(1e-3)
  state = train_step.create_train_state(
      layer_layout.stack_layers(params), tx, train_step.ADAPTER_PATTERNS
  )
  meta = {
      "feature_space": SPACE.to_dict(),
      "base": {"initial_checkpoint": base_checkpoints["t5x"]},
      "step": 1,
  }
  checkpointer = checkpoints.Checkpointer(str(tmp_path / "run"))
  checkpointer.save(1, state.trainable, state.opt_state, meta, force=True)
  checkpointer.close()
  saved, _ = checkpoints.read_flix_checkpoint(str(tmp_path / "run"))
  assert "layers_1" in saved["decoder"] and "layers" not in saved["decoder"]

  loaded = {}
  for cfg in (CFG, SCANNED):
    _, loaded[cfg.scan_layers], _ = checkpoints.load_for_inference(
        models.FlixModel(cfg), str(tmp_path / "run")
    )
  assert layer_layout.is_stacked(loaded[True])
  _assert_trees_close(layer_layout.unstack_layers(loaded[True]), params, 1e-6)
  _assert_trees_close(loaded[False], params, tol=1e-6)
  # Exports are per layer whatever the layout they are given.
  features = {"task": "b", "language": "w"}
  _assert_trees_close(
      adapter_export.merge_features(loaded[True], SPACE, features),
      adapter_export.merge_features(loaded[False], SPACE, features),
      tol=1e-6,
  )
