"""The feature space (groups, ids, scales, serialisation) and feature dropout.

Every check is against a hand computation or a naive per-element loop.
"""

import itertools
import json
import logging
import math
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flix import features as features_lib
from flix import models
from flix import network

FeatureGroup = features_lib.FeatureGroup
FeatureSpace = features_lib.FeatureSpace

SPACE = FeatureSpace(
    groups=(
        FeatureGroup("task", ("a", "b"), rank=4, alpha=8.0, dropout=0.25),
        FeatureGroup(
            "language", ("x", "y", "z"), rank=2, value_ranks=(("z", 3),)
        ),
    )
)


# ---- FeatureGroup ----


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name=""), "Feature group name '' must be alphanumeric."),
        (dict(name="a-b"), "Feature group name 'a-b' must be alphanumeric."),
        (dict(values=()), "Feature group 'g' has no values."),
        (dict(values=("a", "a")), "Feature group 'g' has duplicate values."),
        (dict(rank=0), "Feature group 'g': rank must be >= 1."),
        (
            dict(dropout=1.0),
            "Feature group 'g': dropout must be in [0, 1), got 1.0.",
        ),
        (
            dict(dropout=-0.1),
            "Feature group 'g': dropout must be in [0, 1), got -0.1.",
        ),
        (
            dict(value_ranks=(("q", 2),)),
            "Feature group 'g': rank override for unknown value 'q'.",
        ),
        (
            dict(value_ranks=(("a", 0),)),
            "Feature group 'g': rank of 'a' < 1.",
        ),
        (
            dict(default="q"),
            "Feature group 'g': default 'q' is not one of its values.",
        ),
    ],
)
def test_feature_group_validation_messages(kwargs, message):
  args = dict(name="g", values=("a", "b")) | kwargs
  with pytest.raises(ValueError) as error:
    FeatureGroup(**args)
  assert str(error.value) == message


def test_valid_groups_and_duplicate_group_names():
  assert FeatureGroup("task_2", ["a"]).values == ("a",)  # underscore, list
  with pytest.raises(ValueError, match="Duplicate feature group names"):
    FeatureSpace(groups=(FeatureGroup("g", ("a",)), FeatureGroup("g", ("b",))))


@pytest.mark.parametrize(
    "rank, value_ranks",
    [
        (2, ()),
        (2, (("z", 5), ("x", 1))),
        (4, (("x", 1),)),  # Some values keep the group rank.
        (8, (("x", 2), ("y", 3), ("z", 1))),  # Every value overridden.
    ],
)
def test_max_rank_is_the_largest_rank_in_use(rank, value_ranks):
  group = FeatureGroup("g", ("x", "y", "z"), rank=rank, value_ranks=value_ranks)
  overrides = dict(value_ranks)
  expected = {v: overrides.get(v, rank) for v in ("x", "y", "z")}
  assert {v: group.rank_of(v) for v in group.values} == expected
  # Adapters are padded to max_rank: padding that no value uses would be
  # parameters that never influence the output (and are counted as such).
  assert group.max_rank == max(expected.values())


def test_index_is_the_position_in_values():
  group = FeatureGroup("g", ("x", "y", "z"))
  assert [group.index(v) for v in ("x", "y", "z")] == [0, 1, 2]
  assert group.num_values == 3
  with pytest.raises(ValueError):  # tuple.index of an unknown value
    group.index("w")


# ---- FeatureSpace construction ----


def test_lora_is_one_always_on_value():
  space = FeatureSpace.lora(rank=4, alpha=8.0)
  (group,) = space.groups
  assert group.values == (group.default,)  # its own default
  assert (group.rank, group.alpha) == (4, 8.0)
  for example in ({}, {group.name: None}, {group.name: ""}, {"task": "a"}):
    assert space.encode(example).tolist() == [1]  # id of value 0
  assert space.scale(group, 4) == 2.0
  assert FeatureSpace.lora(rank=4, alpha=8.0, rslora=True).scale(group, 4) == (
      8.0 / 2.0
  )
  assert features_lib.lora_space(rank=4, alpha=8.0) == space


def test_from_values_sets_each_groups_knobs():
  space = FeatureSpace.from_values(
      {"task": ["a", "b"], "language": ("x", "y", "z")},
      ranks={"task": 4},
      alphas={"language": 3.0},
      dropout={"task": 0.25},
      value_ranks={"language": {"z": 6, "x": 1}},
      rslora=True,
  )
  default = FeatureGroup("g", ("v",))  # the field defaults
  assert space.group_names == ("task", "language")
  assert space.num_groups == 2
  assert space.rslora
  task, language = space.group("task"), space.group("language")
  assert task.values == ("a", "b")
  assert (task.rank, task.alpha, task.dropout) == (4, None, 0.25)
  assert language.values == ("x", "y", "z")
  assert (language.rank, language.alpha) == (default.rank, 3.0)
  assert language.dropout == default.dropout
  assert [language.rank_of(v) for v in language.values] == [1, default.rank, 6]
  assert task.default is None and language.default is None
  np.testing.assert_array_equal(space.dropout_rates(), [0.25, 0.0])
  assert space.dropout_rates().dtype == np.float32
  with pytest.raises(KeyError, match="No feature group 'genre'"):
    space.group("genre")


# ---- Scales, masks, parameter counts ----


def test_scale_is_alpha_over_rank_or_its_square_root():
  group = FeatureGroup("g", ("a",), rank=4, alpha=8.0)
  no_alpha = FeatureGroup("g", ("a",), rank=4)
  plain, rs = FeatureSpace((group,)), FeatureSpace((group,), rslora=True)
  for rank in (1, 2, 4, 16):
    assert plain.scale(group, rank) == pytest.approx(8.0 / rank)
    assert rs.scale(group, rank) == pytest.approx(8.0 / math.sqrt(rank))
    # Without alpha, alpha is the group's rank.
    assert plain.scale(no_alpha, rank) == pytest.approx(4.0 / rank)
    assert rs.scale(no_alpha, rank) == pytest.approx(4.0 / math.sqrt(rank))
  assert plain.scale(no_alpha, 4) == 1.0


def test_scale_table_and_rank_mask_per_id():
  group = FeatureGroup(
      "g", ("a", "b", "c"), rank=4, alpha=8.0, value_ranks=(("b", 2),)
  )
  # Ids: 0 = no feature, a = 1 (rank 4), b = 2 (rank 2), c = 3 (rank 4).
  table = FeatureSpace((group,)).scale_table(group)
  assert table.dtype == np.float32
  np.testing.assert_allclose(table, [0.0, 2.0, 4.0, 2.0])
  rs_table = FeatureSpace((group,), rslora=True).scale_table(group)
  np.testing.assert_allclose(rs_table, [0.0, 4.0, 8.0 / math.sqrt(2), 4.0])
  mask = FeatureSpace((group,)).rank_mask(group)
  assert mask.dtype == np.float32
  np.testing.assert_array_equal(
      mask,
      [[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]],
  )


def test_num_adapter_params_counts_the_layers_adapters():
  # task: 2 values x rank 4; language: 3 values x rank 3 (padded to z's 3).
  assert SPACE.num_adapter_params(16, 32) == (2 * 4 + 3 * 3) * (16 + 32)
  config = network.preset(
      "tiny",
      vocab_size=32,
      num_encoder_layers=1,
      num_decoder_layers=0,
      feature_space=SPACE,
  )
  params = models.FlixModel(config).abstract_params()
  mlp = params["encoder"]["layers_0"]["mlp"]
  for name, (d_in, d_out) in {
      "wi_0": (config.emb_dim, config.mlp_dim),
      "wo": (config.mlp_dim, config.emb_dim),
  }.items():
    adapters = {k: v for k, v in mlp[name].items() if k.startswith("lora_")}
    assert len(adapters) == 2 * SPACE.num_groups
    assert sum(math.prod(v.value.shape) for v in adapters.values()) == (
        SPACE.num_adapter_params(d_in, d_out)
    )


# ---- Encoding ----


def test_encode_decode_round_trip():
  sizes = [g.num_values + 1 for g in SPACE.groups]
  for ids in itertools.product(*map(range, sizes)):
    example = SPACE.decode(ids)
    assert len(example) == sum(i != 0 for i in ids)
    for group, feature_id in zip(SPACE.groups, ids):
      if feature_id:
        assert example[group.name] == group.values[feature_id - 1]
    encoded = SPACE.encode(example)
    assert encoded.dtype == np.int32 and encoded.shape == (2,)
    assert encoded.tolist() == list(ids)


def test_encode_absent_none_empty_bytes_and_foreign_keys():
  assert SPACE.encode({}).tolist() == [0, 0]
  assert SPACE.encode({"task": None, "language": ""}).tolist() == [0, 0]
  assert SPACE.encode({"task": b"b", "language": b"z"}).tolist() == [2, 3]
  assert SPACE.encode({"language": "y", "genre": "news"}).tolist() == [0, 2]
  # A group with a default uses it wherever the feature is missing.
  space = FeatureSpace(
      (FeatureGroup("task", ("a", "b"), default="b"),) + SPACE.groups[1:]
  )
  for task in (None, "", b""):
    assert space.encode({"task": task}).tolist() == [2, 0]
  assert space.encode({}).tolist() == [2, 0]
  assert space.encode({"task": "a"}).tolist() == [1, 0]


def test_unknown_value_is_absent_and_warns_once_per_group_value(caplog):
  unknown = f"unknown-{uuid.uuid4().hex}"  # unseen by earlier encodes
  other = unknown + "-other"
  space = FeatureSpace(
      (FeatureGroup("task", ("a", "b"), default="a"),) + SPACE.groups[1:]
  )
  with caplog.at_level(logging.WARNING):
    assert SPACE.encode({"task": unknown, "language": "x"}).tolist() == [0, 1]
    assert SPACE.encode({"task": unknown}).tolist() == [0, 0]
    assert SPACE.encode({"task": unknown.encode()}).tolist() == [0, 0]
    assert SPACE.encode({"language": unknown}).tolist() == [0, 0]
    assert SPACE.encode({"task": other}).tolist() == [0, 0]
    # Unknown in a group with a default: the default applies.
    assert space.encode({"task": unknown}).tolist() == [1, 0]
    SPACE.encode({"genre": unknown + "-genre"})  # not a group: no warning
  messages = [
      r.getMessage() for r in caplog.records if unknown in r.getMessage()
  ]
  assert all(r.levelno == logging.WARNING for r in caplog.records)
  assert len(messages) == 3, messages
  task_message = [m for m in messages if repr(unknown) in m][0]
  assert task_message.startswith("Unknown task value")
  assert "known values: a, b" in task_message
  assert sum(m.startswith("Unknown language value") for m in messages) == 1
  assert sum(repr(other) in m for m in messages) == 1


def test_default_id_is_what_an_absent_group_encodes_to():
  space = FeatureSpace(
      (FeatureGroup("task", ("a", "b"), default="b"),) + SPACE.groups[1:]
  )
  assert [g.default_id for g in space.groups] == [2, features_lib.NO_FEATURE]
  assert space.encode({}).tolist() == [g.default_id for g in space.groups]


def test_resolve_gives_the_applied_group_value_pairs(caplog):
  task, language = SPACE.groups
  assert SPACE.resolve({"language": b"z", "task": "a"}) == [
      (task, "a"),
      (language, "z"),
  ]
  assert SPACE.resolve({"task": None, "language": "", "genre": "news"}) == []
  lora = FeatureSpace.lora()
  assert lora.resolve({}) == [(lora.groups[0], "all")]
  unknown = f"unknown-{uuid.uuid4().hex}"
  with caplog.at_level(logging.WARNING):
    assert SPACE.resolve({"task": unknown, "language": "y"}) == [
        (language, "y")
    ]
  assert unknown in caplog.text


def test_strict_resolve_raises_on_unknown_groups_and_values(caplog):
  task, language = SPACE.groups
  assert SPACE.resolve({"task": "b", "language": None}, strict=True) == [
      (task, "b")
  ]
  with pytest.raises(ValueError) as error:
    SPACE.resolve({"task": "a", "genre": "news"}, strict=True)
  assert str(error.value) == (
      "Unknown feature group 'genre'; the model's groups are: task, language."
  )
  unknown = f"unknown-{uuid.uuid4().hex}"
  with caplog.at_level(logging.WARNING):
    with pytest.raises(ValueError) as error:
      SPACE.resolve({"language": unknown.encode()}, strict=True)
  assert str(error.value) == (
      f"Unknown language value {unknown!r}: the model has no adapter for it. "
      "Known language values: x, y, z."
  )
  assert unknown not in caplog.text  # an error, not also a warning


# ---- Serialisation ----

RICH_SPACE = FeatureSpace(
    groups=(
        FeatureGroup("task", ("qa", "mt"), rank=4, alpha=16.0, dropout=0.1),
        FeatureGroup(
            "language",
            ("de", "日本語", "ü"),
            rank=2,
            value_ranks=(("de", 3), ("ü", 1)),
            default="de",
        ),
    ),
    rslora=True,
)


def test_extend_keeps_old_ids_and_appends_new_values_and_groups():
  new = FeatureSpace.from_values(
      {"language": ["w", "x", "z"], "task": ["a", "c"], "domain": ["news"]},
      ranks={"task": 8, "language": 2, "domain": 1},
      dropout={"task": 0.5, "language": 0.1},
  )
  grown = SPACE.extend(new)
  assert grown.group_names == ("task", "language", "domain")
  task, language = grown.group("task"), grown.group("language")
  assert task.values == ("a", "b", "c")
  assert language.values == ("x", "y", "z", "w")
  for features in (
      {"task": "b", "language": "z"},
      {"task": "a"},
      {"language": "y"},
  ):
    np.testing.assert_array_equal(
        grown.encode(features)[:2], SPACE.encode(features)
    )
  np.testing.assert_array_equal(
      grown.encode({"task": "c", "language": "w", "domain": "news"}), [3, 4, 1]
  )
  # Old values keep their ranks and scales; new ones take the new space's.
  for old in SPACE.groups:
    group = grown.group(old.name)
    assert group.rank == old.rank and group.alpha == old.alpha
    for value in old.values:
      assert group.rank_of(value) == old.rank_of(value)
      assert grown.scale(group, group.rank_of(value)) == SPACE.scale(
          old, old.rank_of(value)
      )
  assert task.rank_of("c") == 8 and task.max_rank == 8
  assert language.rank_of("w") == 2 and grown.group("domain").rank == 1
  # Dropout is a training setting: the new space's.
  np.testing.assert_allclose(grown.dropout_rates(), [0.5, 0.1, 0.0])
  assert grown.extend(new) == grown
  assert FeatureSpace.from_dict(grown.to_dict()) == grown


def test_extend_refuses_other_scaling_or_defaults():
  with pytest.raises(ValueError, match="rslora"):
    SPACE.extend(FeatureSpace.from_values({"task": ["a"]}, rslora=True))
  with pytest.raises(ValueError, match="default"):
    FeatureSpace.lora().extend(
        FeatureSpace(groups=(FeatureGroup("lora", ("all", "more")),))
    )


def test_to_dict_from_dict_json_and_file_round_trips(tmp_path):
  data = RICH_SPACE.to_dict()
  assert data == {
      "rslora": True,
      "groups": [
          {
              "name": "task",
              "values": ["qa", "mt"],
              "rank": 4,
              "alpha": 16.0,
              "dropout": 0.1,
              "value_ranks": {},
              "default": None,
          },
          {
              "name": "language",
              "values": ["de", "日本語", "ü"],
              "rank": 2,
              "alpha": None,
              "dropout": 0.0,
              "value_ranks": {"de": 3, "ü": 1},
              "default": "de",
          },
      ],
  }
  assert FeatureSpace.from_dict(data) == RICH_SPACE
  text = RICH_SPACE.to_json()
  assert json.loads(text) == data
  assert "日本語" in text  # written as UTF-8, not \u escapes
  assert FeatureSpace.from_json(text) == RICH_SPACE
  path = tmp_path / "features.json"
  RICH_SPACE.save(str(path))
  assert path.read_text(encoding="utf-8") == text
  assert FeatureSpace.load(str(path)) == RICH_SPACE


def test_from_dict_fills_defaults_of_missing_keys():
  space = FeatureSpace.from_dict(
      {"groups": [{"name": "task", "values": ["a"], "rank": 2}]}
  )
  assert space == FeatureSpace((FeatureGroup("task", ("a",), rank=2),))


# ---- Feature dropout ----


def test_sample_feature_keep_rates_and_independence():
  rates = np.array([0.0, 0.3, 0.9], np.float32)
  keep = np.asarray(
      features_lib.sample_feature_keep(jax.random.PRNGKey(0), 20000, 2, rates)
  )
  assert keep.shape == (20000, 2, 3) and keep.dtype == bool
  drop = ~keep
  assert not drop[..., 0].any()  # rate 0 never drops
  # 40000 draws per group: the standard error is below 0.0025.
  np.testing.assert_allclose(drop.mean((0, 1)), rates, atol=0.01)
  # Groups and slots draw independently.
  np.testing.assert_allclose(
      (drop[..., 1] & drop[..., 2]).mean(), 0.3 * 0.9, atol=0.01
  )
  np.testing.assert_allclose(
      (drop[:, 0, 1] & drop[:, 1, 1]).mean(), 0.3 * 0.3, atol=0.01
  )
  other = features_lib.sample_feature_keep(
      jax.random.PRNGKey(1), 20000, 2, rates
  )
  assert not np.array_equal(keep, np.asarray(other))


def _random_ids_and_keep(seed, batch, length, slots):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 4, (batch, length, 2)).astype(np.int32)
  keep = rng.random((batch, slots, 2)) < 0.5
  return ids, keep


def test_apply_feature_keep_unpacked_uses_slot_0():
  ids, keep = _random_ids_and_keep(0, 6, 5, 3)
  got = np.asarray(features_lib.apply_feature_keep(ids, keep))
  expected = np.zeros_like(ids)
  for b, l, g in np.ndindex(ids.shape):
    expected[b, l, g] = ids[b, l, g] if keep[b, 0, g] else 0
  np.testing.assert_array_equal(got, expected)


def _packed_segments(lengths, total):
  """Segment ids 1, 2, ... for consecutive runs of `lengths`, 0-padded."""
  segments = np.zeros((total,), np.int32)
  start = 0
  for s, n in enumerate(lengths, start=1):
    segments[start : start + n] = s
    start += n
  return segments


def test_apply_feature_keep_packed_shares_one_draw_per_segment():
  batch, slots = 64, 4
  enc_seg = np.stack([_packed_segments((3, 2, 4), 11)] * batch)
  dec_seg = np.stack([_packed_segments((2, 3, 1), 7)] * batch)
  ids, keep = _random_ids_and_keep(1, batch, 11, slots)
  enc_ids = np.where(enc_seg[..., None] > 0, ids, 0)  # padding has no feature
  dec_ids = np.where(dec_seg[..., None] > 0, ids[:, :7], 0)
  got_enc = np.asarray(features_lib.apply_feature_keep(enc_ids, keep, enc_seg))
  got_dec = np.asarray(features_lib.apply_feature_keep(dec_ids, keep, dec_seg))
  for ids_, seg, got in (
      (enc_ids, enc_seg, got_enc),
      (dec_ids, dec_seg, got_dec),
  ):
    expected = np.zeros_like(ids_)
    for b, l, g in np.ndindex(ids_.shape):
      expected[b, l, g] = ids_[b, l, g] if keep[b, seg[b, l], g] else 0
    np.testing.assert_array_equal(got, expected)
  # The encoder and decoder tokens of one example keep the same features.
  for b, s, g in itertools.product(range(batch), (1, 2, 3), range(2)):
    kept_enc = got_enc[b, enc_seg[b] == s, g] != 0
    kept_dec = got_dec[b, dec_seg[b] == s, g] != 0
    assert len(set(kept_enc) | set(kept_dec)) == 1
    assert kept_enc[0] == keep[b, s, g]


def test_feature_dropout_rate_0_keeps_all_and_near_1_drops_nearly_all():
  ids = jnp.asarray(np.random.default_rng(2).integers(1, 4, (3000, 4, 2)))
  rng = jax.random.PRNGKey(3)
  kept = features_lib.feature_dropout(ids, rng, jnp.array([0.0, 0.0]))
  np.testing.assert_array_equal(kept, ids)
  dropped = np.asarray(
      features_lib.feature_dropout(ids, rng, jnp.array([0.999, 1.0]))
  )
  assert (dropped[..., 0] != 0).mean() < 0.005  # about 3 of 3000 survive
  assert not dropped[..., 1].any()
  half = np.asarray(
      features_lib.feature_dropout(ids, rng, jnp.array([0.5, 0.0]))
  )
  # One draw per example: its tokens drop alike; the other group is kept.
  dropped_tokens = half[..., 0] == 0
  assert (dropped_tokens == dropped_tokens[:, :1]).all()
  np.testing.assert_allclose(dropped_tokens[:, 0].mean(), 0.5, atol=0.04)
  np.testing.assert_array_equal(half[..., 1], ids[..., 1])
  np.testing.assert_array_equal(
      half[~dropped_tokens][:, 0], ids[..., 0][~dropped_tokens]
  )


def test_feature_dropout_packed_draws_per_segment():
  segments = np.stack([_packed_segments((2, 3), 6)] * 2000)
  ids = np.where(segments[..., None] > 0, 1, 0).astype(np.int32)  # 1 group
  out = np.asarray(
      features_lib.feature_dropout(
          ids, jax.random.PRNGKey(4), jnp.array([0.5]), segments
      )
  )[..., 0]
  first, second = out[:, :2], out[:, 2:5]
  assert (first == first[:, :1]).all() and (second == second[:, :1]).all()
  assert (out[:, 5] == 0).all()  # padding stays without features
  # The two segments of a row draw independently.
  both_dropped = ((first[:, 0] == 0) & (second[:, 0] == 0)).mean()
  np.testing.assert_allclose(both_dropped, 0.25, atol=0.04)
