"""The FLix layer against a naive per-token numpy sum, for every strategy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flix import features as features_lib
from flix import layers
from flix import routing

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


def reference_delta(space, x, ids, adapters):
  """The per-token formulation in jnp (differentiable): gather each token's
  A and B per group, mask ranks past the value's rank and absent groups."""
  delta = 0.0
  for g, (group, (a, b)) in enumerate(zip(space.groups, adapters)):
    coef = jnp.asarray(layers._coefficients(space, group))  # [V + 1, R]
    index = jnp.clip(ids[..., g] - 1, 0, group.num_values - 1)
    h = jnp.einsum("bld,bldr->blr", x, a[index]) * coef[ids[..., g]]
    delta = delta + jnp.einsum("blr,blro->blo", h, b[index])
  return delta


def _packed_ids(rng, batch, length, space, segments, lead=0):
  """Rows of exactly `segments` runs (consecutive examples differ), random
  lengths, some groups absent, padding after (and `lead` tokens before)."""
  ids = np.zeros((batch, length, space.num_groups), np.int32)
  for b in range(batch):
    cuts = np.sort(
        rng.choice(np.arange(1, length - lead - 2), segments - 1, replace=False)
    )
    bounds = [lead] + [lead + c for c in cuts] + [length - 2]
    previous = None
    for start, stop in zip(bounds[:-1], bounds[1:]):
      example = previous
      while example == previous or not any(example):
        example = [int(rng.integers(0, g.num_values + 1)) for g in space.groups]
      ids[b, start:stop] = example
      previous = example
  return ids


def _case(name):
  """(x [B, L, D], ids [B, L, G], max_segments) of a named test case."""
  rng = np.random.default_rng(1)
  if name == "unpacked":  # one example per row, groups absent, padding
    x = rng.normal(size=(3, 11, 5)).astype(np.float32)
    ids = np.zeros((3, 11, SPACE.num_groups), np.int32)
    ids[:, :8] = np.array([[1, 0, 2], [3, 4, 0], [0, 0, 1]])[:, None]
    return x, ids, 1
  segments = int(name.split("_")[1])
  x = rng.normal(size=(3, 40, 5)).astype(np.float32)
  ids = _packed_ids(rng, 3, 40, SPACE, segments)
  ids[2] = _packed_ids(rng, 1, 40, SPACE, segments, lead=3)[0]
  return x, ids, segments


CASES = ("unpacked", "packed_4", "packed_16")


def _adapters(space, d_in, d_out, seed=0):
  return [
      tuple(map(jnp.asarray, ab))
      for ab in _random_adapters(space, d_in, d_out, seed)
  ]


@pytest.mark.parametrize("strategy", layers.STRATEGIES)
@pytest.mark.parametrize("case", CASES)
def test_delta_matches_naive_sum(strategy, case):
  x, ids, max_segments = _case(case)
  assert routing.count_runs(ids).max() == max_segments
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


@pytest.mark.parametrize("strategy", layers.STRATEGIES)
@pytest.mark.parametrize("case", CASES[1:])
def test_gradients_match_reference(strategy, case):
  x, ids, max_segments = _case(case)
  adapters = _adapters(SPACE, 5, 7)
  cotangent = jax.random.normal(jax.random.PRNGKey(0), x.shape[:2] + (7,))

  def loss(fn):
    return lambda x, ad: jnp.vdot(fn(x, ad), cotangent)

  got = jax.grad(
      loss(
          lambda x, ad: layers.flix_delta(
              SPACE, x, jnp.asarray(ids), ad, strategy, max_segments
          )
      ),
      argnums=(0, 1),
  )(jnp.asarray(x), adapters)
  want = jax.grad(
      loss(lambda x, ad: reference_delta(SPACE, x, jnp.asarray(ids), ad)),
      argnums=(0, 1),
  )(jnp.asarray(x), adapters)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


# A group with one always-on value next to a 20-value group with a rank
# override: on CPU the default strategy mixes formulations per group.
MIXED_SPACE = features_lib.FeatureSpace(
    groups=(
        features_lib.FeatureGroup("base", ("on",), rank=2, alpha=3.0),
        features_lib.FeatureGroup(
            "language",
            tuple(f"l{i}" for i in range(20)),
            rank=8,
            value_ranks=(("l5", 1),),
        ),
    )
)


@pytest.mark.parametrize(
    "case,formulations",
    [("packed_4", ("dense", "slots")), ("packed_16", ("dense", "sorted"))],
)
def test_default_mixes_formulations_per_group(case, formulations):
  x, _, max_segments = _case(case)
  rng = np.random.default_rng(3)
  ids = _packed_ids(rng, 3, 40, MIXED_SPACE, max_segments)
  ids[..., 0] = np.where(ids.any(-1), 1, 0)  # "base" on for every example
  routed = layers.route(jnp.asarray(ids), "segment", max_segments)
  assert layers.plan(MIXED_SPACE, routed, backend="cpu") == formulations
  adapters = _random_adapters(MIXED_SPACE, 5, 7)
  got = layers.flix_delta(
      MIXED_SPACE,
      jnp.asarray(x),
      routed,
      [tuple(map(jnp.asarray, ab)) for ab in adapters],
  )
  np.testing.assert_allclose(
      got, naive_delta(MIXED_SPACE, x, ids, adapters), rtol=1e-4, atol=1e-4
  )


@pytest.mark.parametrize("strategy", layers.STRATEGIES)
def test_too_many_runs_is_nan_and_host_check_raises(strategy):
  x, ids, _ = _case("packed_4")
  got = layers.flix_delta(
      SPACE,
      jnp.asarray(x),
      jnp.asarray(ids),
      _adapters(SPACE, 5, 7),
      strategy=strategy,
      max_segments=3,
  )
  active = ids.any(-1)
  assert np.isnan(np.asarray(got)[active]).all()
  with pytest.raises(ValueError, match="max_segments=3"):
    routing.check_max_segments(ids, 3)
  routing.check_max_segments(ids, 4)


def test_plan_picks_per_backend_and_group():
  space = features_lib.FeatureSpace(
      groups=(
          features_lib.FeatureGroup("lora", ("on",), rank=4),
          features_lib.FeatureGroup(
              "language", tuple(f"l{i}" for i in range(100)), rank=8
          ),
      )
  )
  unpacked = layers.route(jnp.ones((32, 128, 2), jnp.int32), "segment", 1)
  packed = layers.route(jnp.ones((32, 128, 2), jnp.int32), "segment", 16)
  for backend in ("gpu", "tpu"):
    assert layers.plan(space, packed, backend=backend) == ("dense", "ragged")
  assert layers.plan(space, unpacked, backend="cpu") == ("dense", "slots")
  # 16 examples per row: slots would do 16x the FLOPs; sorting does not.
  assert layers.plan(space, packed, backend="cpu") == ("dense", "sorted")
  assert layers.plan(space, packed, "slots") == ("slots", "slots")


def test_route_tiles_rows_with_runs():
  ids = np.array([[[0], [1], [1], [2], [0], [1], [0]]], np.int32)
  r = layers.route(jnp.asarray(ids), "segment", 4)
  np.testing.assert_array_equal(r.slot_ids[0, :, 0], [1, 2, 1, 0])
  # Leading padding joins the first run, trailing padding the run before.
  np.testing.assert_array_equal(r.token_slot[0], [0, 0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(r.slot_sizes()[0], [3, 2, 2, 0])
  assert int(r.max_runs) == 3
  assert layers.route(jnp.asarray(ids), "segment", 16).num_slots == 7  # <= L


def test_value_chunks_place_every_token_once():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 6, size=70).astype(np.int32)
  chunks = routing.value_chunks(jnp.asarray(ids), 5, 5, 8)
  token, position = np.asarray(chunks.token), np.asarray(chunks.position)
  valid = np.asarray(chunks.valid).reshape(-1)
  value = np.repeat(np.asarray(chunks.value), 8)
  assert not valid[-1]  # the last position is always padding
  active = np.flatnonzero(ids)
  np.testing.assert_array_equal(token[position[active]], active)
  assert valid[position[active]].all()
  np.testing.assert_array_equal(value[position[active]], ids[active])
  assert (position[ids == 0] == len(token) - 1).all()
  assert valid.sum() == len(active)


def test_unknown_values_encode_as_absent_and_match_known_only():
  ids_unknown = SPACE.encode({"task": "b", "language": "klingon"})
  ids_known = SPACE.encode({"task": "b"})
  np.testing.assert_array_equal(ids_unknown, ids_known)


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
