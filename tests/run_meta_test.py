"""Tests for flix.run_meta: what a restart may change of a saved run."""

import copy

import pytest

from flix import features
from flix import run_meta
from flix import t5_config

SPACE = features.FeatureSpace.from_values(
    {"task": ["qa", "ner"], "language": ["sw", "yo"]},
    ranks={"task": 4, "language": 2},
    dropout={"task": 0.1},
)


def _meta(space=SPACE, config=None, trainable=("adapters-regex",), base=None):
  config = config or t5_config.preset("tiny")
  return {
      "feature_space": space.to_dict() if space is not None else None,
      "model_config": config.to_dict(),
      "trainable_patterns": list(trainable),
      "base": base or {"initial_checkpoint": "/ckpt/base", "init_seed": 0},
  }


def test_the_same_configuration_has_no_difference():
  assert run_meta.differences(_meta(), _meta()) == []
  run_meta.check_resumable(_meta(), _meta(), "/runs/a")


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            dict(
                space=features.FeatureSpace.from_values(
                    {"task": ["qa", "ner", "pos"], "language": ["sw", "yo"]},
                    ranks={"task": 4, "language": 2},
                )
            ),
            ["feature_space.task.values: added ['pos']"],
        ),
        (
            dict(
                space=features.FeatureSpace.from_values(
                    {"task": ["qa", "ner"], "language": ["sw", "yo"]},
                    ranks={"task": 8, "language": 2},
                )
            ),
            ["feature_space.task.rank: saved 4, now 8"],
        ),
        (
            dict(
                space=features.FeatureSpace.from_values(
                    {"task": ["qa", "ner"]}, ranks={"task": 4}
                )
            ),
            [
                "feature_space.groups: removed ['language']",
            ],
        ),
        (dict(space=None), ["feature_space: saved {"]),
        (
            dict(config=t5_config.preset("tiny", emb_dim=32)),
            ["model_config.emb_dim: saved 16, now 32"],
        ),
        (
            dict(config=t5_config.preset("tiny", num_decoder_layers=3)),
            ["model_config.num_decoder_layers: saved 2, now 3"],
        ),
        (
            dict(trainable=(".*",)),
            [
                "trainable_patterns: added ['.*'], removed ['adapters-regex']",
            ],
        ),
        (
            dict(base={"initial_checkpoint": "/ckpt/other", "init_seed": 0}),
            ["base.initial_checkpoint: saved '/ckpt/base', now '/ckpt/other'"],
        ),
    ],
)
def test_a_change_of_what_is_trained_is_named(change, expected):
  found = [str(d) for d in run_meta.differences(_meta(), _meta(**change))]
  assert len(found) == len(expected)
  for text, prefix in zip(found, expected):
    assert text.startswith(prefix), text
  with pytest.raises(run_meta.ResumeMismatchError) as error:
    run_meta.check_resumable(_meta(), _meta(**change), "/runs/a")
  assert str(error.value).startswith(
      "/runs/a holds checkpoints of a run that trained something else"
  )
  assert expected[0] in str(error.value)


def test_how_it_is_computed_may_change():
  config = t5_config.preset(
      "tiny", dtype="bfloat16", dropout_rate=0.3, flix_strategy="dense"
  )
  space = features.FeatureSpace.from_values(
      {"task": ["qa", "ner"], "language": ["sw", "yo"]},
      ranks={"task": 4, "language": 2},
      dropout={"task": 0.5, "language": 0.2},
  )
  assert run_meta.differences(_meta(), _meta(space, config)) == []


def test_a_random_base_is_defined_by_its_seed():
  saved = _meta(base={"initial_checkpoint": None, "init_seed": 0})
  now = _meta(base={"initial_checkpoint": None, "init_seed": 1})
  assert [str(d) for d in run_meta.differences(saved, now)] == [
      "base.init_seed: saved 0, now 1"
  ]
  # With a base checkpoint, the seed only seeds dropout and the data.
  assert (
      run_meta.differences(
          _meta(),
          _meta(base={"initial_checkpoint": "/ckpt/base", "init_seed": 1}),
      )
      == []
  )


def test_feature_space_differences_is_usable_on_its_own():
  grown = copy.deepcopy(SPACE.to_dict())
  grown["groups"][1]["values"].append("ha")
  [difference] = run_meta.feature_space_differences(SPACE.to_dict(), grown)
  assert difference.path == "feature_space.language.values"
  assert difference.saved == ["sw", "yo"]
  assert difference.now == ["sw", "yo", "ha"]
