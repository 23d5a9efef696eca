"""Tests for flix.featurized: feature registry, vocabulary, seen pairs."""

import functools
import logging

import pytest
import seqio
import tensorflow as tf

from flix import features as features_lib
from flix import featurized
from flix_tasks import metrics

_VOCAB = seqio.ByteVocabulary()
_OUTPUT_FEATURES = {
    "inputs": seqio.Feature(vocabulary=_VOCAB, add_eos=True),
    "targets": seqio.Feature(vocabulary=_VOCAB, add_eos=True),
}
_PREPROCESSORS = [
    seqio.preprocessors.tokenize,
    seqio.preprocessors.append_eos_after_trim,
]


def _rows(split, shuffle_files=False, seed=None, *, rows):
  del split, shuffle_files, seed
  return tf.data.Dataset.from_tensor_slices(
      {k: [r[k] for r in rows] for k in rows[0]}
  )


def _source(rows):
  return seqio.FunctionDataSource(
      functools.partial(_rows, rows=rows), splits=("train", "validation")
  )


_ROWS = [{"inputs": "a", "targets": "b"}, {"inputs": "cc", "targets": "dd"}]


def _add(name, features=None, feature_values=None, rows=_ROWS, **kwargs):
  return featurized.add_task(
      name,
      _source(rows),
      _PREPROCESSORS,
      _OUTPUT_FEATURES,
      metric_fns=metrics.DEFAULT_METRIC_FNS,
      features=features,
      feature_values=feature_values,
      **kwargs
  )


def _first(name, split="train"):
  ds = seqio.get_mixture_or_task(name).get_dataset(
      None, split=split, shuffle=False, num_epochs=1
  )
  return next(ds.as_numpy_iterator())


def test_constant_features_are_added_to_every_example():
  _add("ft_const", features={"task": "qa", "language": "sw"})
  ex = _first("ft_const")
  assert ex["feature_task"] == b"qa"
  assert ex["feature_language"] == b"sw"
  assert ex["inputs_pretokenized"] == b"a"
  assert featurized.feature_values("ft_const") == {
      "task": ("qa",),
      "language": ("sw",),
  }


def test_reregistration_replaces():
  _add("ft_replace", features={"task": "a"})
  _add("ft_replace", features={"task": "b"})
  assert featurized.feature_values("ft_replace") == {"task": ("b",)}
  assert _first("ft_replace")["feature_task"] == b"b"


def test_group_order_and_sorted_values_deterministic():
  _add(
      "ft_m1",
      features={
          "script": "Latn",
          "language": "fr",
          "task": "t2",
          "domain": "news",
      },
  )
  _add("ft_m2", features={"task": "t1", "language": "de"})
  featurized.add_mixture("ft_mix", ["ft_m2", "ft_m1"])
  values = featurized.feature_values("ft_mix")
  assert list(values) == ["task", "language", "domain", "script"]
  assert values["task"] == ("t1", "t2")
  assert values["language"] == ("de", "fr")
  first = featurized.feature_space("ft_mix")
  # Re-registering (in the other order) gives the same vocabulary.
  _add("ft_m2", features={"task": "t1", "language": "de"})
  _add(
      "ft_m1",
      features={
          "script": "Latn",
          "language": "fr",
          "task": "t2",
          "domain": "news",
      },
  )
  featurized.add_mixture("ft_mix", ["ft_m1", "ft_m2"])
  assert featurized.feature_space("ft_mix") == first
  assert first.group_names == ("task", "language", "domain", "script")


def test_feature_space_groups_and_knobs():
  _add("ft_s1", features={"task": "x", "language": "en"})
  _add("ft_s2", features={"task": "y", "language": "en"})
  featurized.add_mixture("ft_smix", ["ft_s1", "ft_s2"])
  space = featurized.feature_space(
      "ft_smix",
      groups=("language", "task"),
      ranks={"task": 4, "language": 2},
      alphas=8.0,
      dropout={"language": 0.25},
      rslora=True,
  )
  assert isinstance(space, features_lib.FeatureSpace)
  assert space.group_names == ("language", "task")
  assert space.group("task").rank == 4
  assert space.group("language").rank == 2
  assert space.group("task").alpha == 8.0
  assert space.group("language").dropout == 0.25
  assert space.group("task").dropout == 0.0
  assert space.rslora
  task_only = featurized.feature_space("ft_smix", groups=("task",), ranks=16)
  assert task_only.group_names == ("task",)
  assert task_only.group("task").values == ("x", "y")
  assert task_only.group("task").rank == 16
  with pytest.raises(ValueError, match="no feature group"):
    featurized.feature_space("ft_smix", groups=("script",))
  with pytest.raises(ValueError, match="unknown feature groups"):
    featurized.feature_space("ft_smix", ranks={"script": 2})
  # A task-only ablation of a config with per-group settings: the dropped
  # group's settings do not apply.
  ablated = featurized.feature_space(
      "ft_smix",
      groups=("task",),
      ranks={"task": 4, "language": 2},
      dropout={"language": 0.25},
  )
  assert ablated.group_names == ("task",)
  assert ablated.group("task").rank == 4 and ablated.group("task").dropout == 0


def test_unknown_name_raises():
  with pytest.raises(ValueError, match="No task or mixture"):
    featurized.feature_values("ft_does_not_exist")


def test_seen_pairs_and_nested_mixtures():
  _add("ft_p_a", features={"task": "qa", "language": "sw"})
  _add("ft_p_b", features={"task": "ner", "language": "yo"})
  _add("ft_p_c", features={"task": "qa"})  # No language: not a pair.
  _add("ft_p_held", features={"task": "qa", "language": "yo"})
  featurized.add_mixture("ft_p_inner", ["ft_p_a", "ft_p_c"])
  featurized.add_mixture("ft_p_train", ["ft_p_inner", "ft_p_b"])
  featurized.add_mixture("ft_p_eval", ["ft_p_train", "ft_p_held"])
  seen = featurized.seen_pairs("ft_p_train")
  assert seen == {("qa", "sw"), ("ner", "yo")}
  assert featurized.seen_pairs("ft_p_train", groups=("task",)) == {
      ("qa",),
      ("ner",),
  }
  assert featurized.is_seen({"task": "qa", "language": "sw"}, seen)
  assert not featurized.is_seen({"task": "qa", "language": "yo"}, seen)
  assert featurized.feature_values("ft_p_eval") == {
      "task": ("ner", "qa"),
      "language": ("sw", "yo"),
  }
  assert frozenset({("task", "qa")}) in featurized.feature_combinations(
      "ft_p_train"
  )


def test_mixture_keeps_features_and_fills_missing_groups():
  _add("ft_f_a", features={"task": "qa", "language": "sw"})
  _add("ft_f_b", features={"task": "ner", "script": "Latn"})
  featurized.add_mixture("ft_f_mix", ["ft_f_a", "ft_f_b"])
  ds = seqio.get_mixture_or_task("ft_f_mix").get_dataset(
      {"inputs": 8, "targets": 8},
      split="train",
      shuffle=False,
      num_epochs=None,
      seed=0,
  )
  rows = list(ds.take(40).as_numpy_iterator())
  assert {row["feature_task"] for row in rows} == {b"qa", b"ner"}
  for row in rows:
    assert {"feature_task", "feature_language", "feature_script"} <= set(row)
    if row["feature_task"] == b"qa":
      assert (row["feature_language"], row["feature_script"]) == (b"sw", b"")
    else:
      assert (row["feature_language"], row["feature_script"]) == (b"", b"Latn")


def test_source_provided_features_are_kept():
  rows = [
      {"inputs": "a", "targets": "b", "feature_language": "sw"},
      {"inputs": "c", "targets": "d", "feature_language": ""},
  ]
  _add(
      "ft_src",
      feature_values={"language": ["sw"]},
      rows=rows,
      feature_combinations=[{"language": "sw"}, {}],
  )
  assert featurized.feature_values("ft_src") == {"language": ("sw",)}
  assert _first("ft_src")["feature_language"] == b"sw"


def test_invalid_features_raise():
  with pytest.raises(ValueError, match="non-empty string"):
    _add("ft_bad", features={"task": ""})
  with pytest.raises(ValueError, match="alphanumeric"):
    _add("ft_bad", features={"bad-group": "x"})
  with pytest.raises(ValueError, match="not a string"):
    _add("ft_bad", feature_values={"task": "abc"})


def test_check_feature_values_warns(caplog):
  _add("ft_chk", features={"task": "qa", "language": "zz_check_unknown"})
  space = features_lib.FeatureSpace.from_values(
      {"task": ["qa"], "language": ["sw"]}
  )
  with caplog.at_level(logging.WARNING):
    unknown = featurized.check_feature_values("ft_chk", space)
  assert unknown == {"language": ("zz_check_unknown",)}
  assert "zz_check_unknown" in caplog.text
