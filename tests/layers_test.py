"""The FLix layer against a naive per-token numpy sum, for every strategy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flix import features as features_lib
from flix import layers

SPACE = features_lib.FeatureSpace(
    groups=(
        features_lib.FeatureGroup("task", ("a", "b", "c"), rank=3, alpha=6.0),
        features_lib.FeatureGroup(
            "language", ("x", "y", "z", "w"), rank=2, value_ranks=(("w", 4),)
        ),
        features_lib.FeatureGroup(
            "script", ("latn", "deva"), rank=1, alpha=0.5
        ),
    )
)


def _random_adapters(space, d_in, d_out, seed=0):
  rng = np.random.default_rng(seed)
  return [
      (
          rng.normal(size=(g.num_values, d_in, g.max_rank)).astype(np.float32),
          rng.normal(size=(g.num_values, g.max_rank, d_out)).astype(np.float32),
      )
      for g in space.groups
  ]


def naive_delta(space, x, ids, adapters):
  """sum over active (g, v) of s_g (x A[g,v][:, :r_v]) B[g,v][:r_v], per token."""
  out = np.zeros(x.shape[:2] + (adapters[0][1].shape[-1],), np.float64)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for g, group in enumerate(space.groups):
        feature_id = int(ids[b, t, g])
        if feature_id == 0:
          continue
        value = group.values[feature_id - 1]
        rank = group.rank_of(value)
        a, bb = adapters[g]
        s = space.scale(group, rank)
        out[b, t] += (
            s
            * (x[b, t] @ a[feature_id - 1][:, :rank])
            @ bb[feature_id - 1][:rank]
        )
  return out


def _packed_ids(rng, batch, length, space):
  """Rows of several segments, each with its own ids; some absent, padding."""
  ids = np.zeros((batch, length, space.num_groups), np.int32)
  for b in range(batch):
    t = 0
    while t < length - 2:
      seg_len = int(rng.integers(1, 5))
      example = [int(rng.integers(0, g.num_values + 1)) for g in space.groups]
      ids[b, t : t + seg_len] = example
      t += seg_len
  return ids


@pytest.mark.parametrize("strategy", layers.STRATEGIES)
@pytest.mark.parametrize("packed", [False, True])
def test_delta_matches_naive_sum(strategy, packed):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 11, 5)).astype(np.float32)
  if packed:
    ids = _packed_ids(rng, 3, 11, SPACE)
    max_segments = 11
  else:  # one example per row, some groups absent, padding at the end
    ids = np.zeros((3, 11, SPACE.num_groups), np.int32)
    ids[:, :8] = np.array([[1, 0, 2], [3, 4, 0], [0, 0, 1]])[:, None]
    max_segments = 1
  adapters = _random_adapters(SPACE, 5, 7)
  got = layers.flix_delta(
      SPACE,
      jnp.asarray(x),
      jnp.asarray(ids),
      [tuple(map(jnp.asarray, ab)) for ab in adapters],
      strategy=strategy,
      max_segments=max_segments,
  )
  np.testing.assert_allclose(
      got, naive_delta(SPACE, x, ids, adapters), rtol=1e-4, atol=1e-4
  )


def test_segment_overflow_is_nan_and_host_check_raises():
  rng = np.random.default_rng(2)
  ids = _packed_ids(rng, 2, 11, SPACE)
  x = jnp.ones((2, 11, 5))
  adapters = [
      tuple(map(jnp.asarray, ab)) for ab in _random_adapters(SPACE, 5, 7)
  ]
  got = layers.flix_delta(
      SPACE, x, jnp.asarray(ids), adapters, strategy="segment", max_segments=1
  )
  assert np.isnan(np.asarray(got)).all()
  with pytest.raises(ValueError, match="max_segments=1"):
    layers.check_max_segments(ids, 1)
  layers.check_max_segments(ids, 11)


def test_unknown_values_encode_as_absent_and_match_known_only():
  ids_unknown = SPACE.encode({"task": "b", "language": "klingon"})
  ids_known = SPACE.encode({"task": "b"})
  np.testing.assert_array_equal(ids_unknown, ids_known)


def test_segment_slots_one_slot_per_run():
  ids = np.array([[[1], [1], [2], [0], [1]]], np.int32)
  slot_ids, token_slot, max_runs = layers.segment_slots(jnp.asarray(ids), 4)
  np.testing.assert_array_equal(slot_ids[0, :, 0], [1, 2, 1, 0])
  np.testing.assert_array_equal(
      np.argmax(np.asarray(token_slot[0]), -1)[[0, 1, 2, 4]], [0, 0, 1, 2]
  )
  assert float(token_slot[0, 3].sum()) == 0.0
  assert int(max_runs) == 3


def test_lora_is_flix_with_one_always_on_feature():
  space = features_lib.FeatureSpace.lora(rank=4, alpha=8.0)
  module = layers.FlixDense(
      features=6, kernel_axes=("embed", "mlp"), feature_space=space
  )
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3))
  ids = jnp.broadcast_to(jnp.asarray(space.encode({})), (2, 5, 1))
  params = jax.tree.map(jnp.asarray, module.init(jax.random.PRNGKey(1), x, ids))
  params = nn.unbox(params)
  b = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 6))
  params["params"]["lora_b_lora"] = b
  got = module.apply(params, x, ids)
  w0 = params["params"]["kernel"]
  a = params["params"]["lora_a_lora"][0]
  expected = x @ w0 + (8.0 / 4) * (x @ a) @ b[0]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_zero_b_gives_base_layer():
  module = layers.FlixDense(
      features=(2, 3), kernel_axes=("embed", "joined_kv"), feature_space=SPACE
  )
  plain = layers.FlixDense(features=(2, 3), kernel_axes=("embed", "joined_kv"))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 5))
  ids = jnp.ones((2, 4, 3), jnp.int32)
  variables = nn.unbox(module.init(jax.random.PRNGKey(1), x, ids))
  base = {"params": {"kernel": variables["params"]["kernel"]}}
  np.testing.assert_allclose(
      module.apply(variables, x, ids), plain.apply(base, x), rtol=1e-6
  )


def test_flattened_kernel_layout_matches_t5x_out_projection():
  module = layers.FlixDense(
      features=4, axis=(-2, -1), kernel_axes=("joined_kv", "embed")
  )
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 2, 5))  # [B, L, H, k]
  variables = nn.unbox(module.init(jax.random.PRNGKey(1), x))
  kernel = variables["params"]["kernel"]
  assert kernel.shape == (10, 4)
  expected = jnp.einsum("blhk,hko->blo", x, kernel.reshape(2, 5, 4))
  np.testing.assert_allclose(module.apply(variables, x), expected, rtol=1e-5)


def test_only_active_features_get_gradients():
  space = SPACE
  adapters = [
      tuple(map(jnp.asarray, ab)) for ab in _random_adapters(space, 4, 3)
  ]
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 4))
  ids = np.zeros((2, 6, 3), np.int32)
  ids[0, :, 0] = 2  # task b
  ids[1, :3, 1] = 4  # language w, first segment only
  grads = jax.grad(
      lambda ad: jnp.sum(layers.flix_delta(space, x, jnp.asarray(ids), ad) ** 2)
  )(adapters)
  for g, group in enumerate(space.groups):
    for v in range(group.num_values):
      active = bool(np.any(ids[..., g] == v + 1))
      norm = float(
          jnp.abs(grads[g][0][v]).sum() + jnp.abs(grads[g][1][v]).sum()
      )
      assert (norm > 0) == active, (group.name, v, norm)
