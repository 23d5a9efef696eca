"""Tests for flix.feature_converter: per-token feature ids, packing included."""

import logging

import numpy as np
import pytest
import seqio
import tensorflow as tf

from flix import features as features_lib
from flix import feature_converter

SPACE = features_lib.FeatureSpace.from_values(
    {"task": ["cardinal", "ordinal"], "language": ["de", "en", "fr"]}
)
LENGTHS = {"inputs": 12, "targets": 9}

# Example i has tokens all equal to 10 + i (then EOS = 1), so every packed
# token tells which example it came from.
EXAMPLES = [
    ({"task": "ordinal", "language": "fr"}, 3, 2),
    ({"task": "cardinal", "language": "en"}, 4, 3),
    ({"task": "cardinal"}, 2, 2),  # No language.
    ({"language": "de"}, 5, 1),  # No task.
    ({"task": "ordinal", "language": "xx_conv_unknown"}, 3, 4),  # Unknown.
    ({}, 2, 2),  # No features at all.
    ({"task": "ordinal", "language": "en"}, 6, 3),
    ({"task": "cardinal", "language": "de"}, 11, 8),  # Fills a row alone.
]


def _expected_ids(features):
  known = {k: v for k, v in features.items() if v != "xx_conv_unknown"}
  return SPACE.encode(known)


def _dataset(examples=EXAMPLES, groups=("task", "language")):
  def _gen():
    for i, (features, n_in, n_tgt) in enumerate(examples):
      row = {
          "inputs": np.array([10 + i] * (n_in - 1) + [1], np.int32),
          "targets": np.array([10 + i] * (n_tgt - 1) + [1], np.int32),
      }
      for g in groups:
        row[f"feature_{g}"] = features.get(g, "")
      yield row

  signature = {
      "inputs": tf.TensorSpec([None], tf.int32),
      "targets": tf.TensorSpec([None], tf.int32),
  }
  signature.update(
      {f"feature_{g}": tf.TensorSpec([], tf.string) for g in groups}
  )
  return tf.data.Dataset.from_generator(_gen, output_signature=signature)


def _convert(pack, space=SPACE, ds=None, **kwargs):
  conv = feature_converter.FlixFeatureConverter(space, pack=pack, **kwargs)
  out = conv(ds if ds is not None else _dataset(), LENGTHS)
  return conv, list(out.as_numpy_iterator())


@pytest.fixture(scope="module")
def unpacked():
  return _convert(pack=False)


@pytest.fixture(scope="module")
def packed():
  return _convert(pack=True)


def test_unpacked_shapes_and_ids(unpacked):
  conv, rows = unpacked
  assert len(rows) == len(EXAMPLES)
  for i, row in enumerate(rows):
    assert row["encoder_feature_ids"].shape == (12, 2)
    assert row["decoder_feature_ids"].shape == (9, 2)
    assert row["encoder_feature_ids"].dtype == np.int32
    ids = _expected_ids(EXAMPLES[i][0])
    for tokens, fids in (
        (row["encoder_input_tokens"], row["encoder_feature_ids"]),
        (row["decoder_target_tokens"], row["decoder_feature_ids"]),
    ):
      real = tokens != 0
      np.testing.assert_array_equal(fids[real], np.tile(ids, (real.sum(), 1)))
      np.testing.assert_array_equal(fids[~real], 0)
  np.testing.assert_array_equal(rows[0]["encoder_feature_ids"][0], [2, 3])
  assert set(conv.get_model_feature_lengths(LENGTHS)) == set(rows[0])


def test_batched_shapes_through_seqio_pipeline():
  conv = feature_converter.FlixFeatureConverter(SPACE, pack=False)
  batch = next(conv(_dataset(), LENGTHS).batch(4).as_numpy_iterator())
  assert batch["encoder_feature_ids"].shape == (4, 12, 2)
  assert batch["decoder_feature_ids"].shape == (4, 9, 2)
  assert batch["encoder_input_tokens"].shape == (4, 12)


def test_one_converter_serves_several_datasets(unpacked):
  """seqio's evaluator (T5X's eval) converts every task with one converter:
  its lookup tables must not belong to the first dataset's graph."""
  conv, rows = unpacked
  again = list(conv(_dataset(), LENGTHS).as_numpy_iterator())
  for first, second in zip(rows, again):
    np.testing.assert_array_equal(
        first["encoder_feature_ids"], second["encoder_feature_ids"]
    )


def test_packed_every_token_keeps_its_example_features(packed):
  conv, rows = packed
  assert len(rows) < len(EXAMPLES)  # Something was packed.
  lengths = conv.get_model_feature_lengths(LENGTHS)
  seen = set()
  for row in rows:
    assert set(row) == set(lengths)
    assert row["encoder_feature_ids"].shape == (12, 2)
    assert row["decoder_feature_ids"].shape == (9, 2)
    for side, tokens_key in (
        ("encoder", "encoder_input_tokens"),
        ("decoder", "decoder_target_tokens"),
    ):
      tokens = row[tokens_key]
      segments = row[f"{side}_segment_ids"]
      fids = row[f"{side}_feature_ids"]
      for t in range(tokens.shape[0]):
        if segments[t] == 0:
          assert tokens[t] == 0
          np.testing.assert_array_equal(fids[t], 0)
          continue
        # Which example this segment is: any non-EOS token of it says so.
        seg_tokens = tokens[(segments == segments[t]) & (tokens > 1)]
        example = int(seg_tokens[0]) - 10 if seg_tokens.size else None
        if example is None:  # A one-token (EOS only) segment.
          continue
        seen.add(example)
        np.testing.assert_array_equal(
            fids[t],
            _expected_ids(EXAMPLES[example][0]),
            err_msg=f"{side} token {t} of example {example}",
        )
    # More than one example in a row, with different features.
    n_segments = row["encoder_segment_ids"].max()
    if n_segments > 1:
      distinct = {
          tuple(
              row["encoder_feature_ids"][
                  np.argmax(row["encoder_segment_ids"] == s)
              ]
          )
          for s in range(1, n_segments + 1)
      }
      assert len(distinct) > 1
  assert seen == set(range(len(EXAMPLES)))


def test_packed_rows_really_mix_features(packed):
  _, rows = packed
  first = rows[0]
  assert first["encoder_segment_ids"].max() >= 2
  segment_ids = first["encoder_segment_ids"]
  ids = first["encoder_feature_ids"]
  np.testing.assert_array_equal(ids[segment_ids == 1][0], [2, 3])  # ord, fr
  np.testing.assert_array_equal(ids[segment_ids == 2][0], [1, 2])  # card, en


def test_unknown_value_is_absent(unpacked):
  _, rows = unpacked
  np.testing.assert_array_equal(rows[4]["encoder_feature_ids"][0], [2, 0])


def test_unknown_value_warns_once(caplog):
  examples = [({"task": "ordinal", "language": "yy_warn_once"}, 3, 2)] * 3
  with caplog.at_level(logging.WARNING):
    _, rows = _convert(pack=False, ds=_dataset(examples))
  assert len(rows) == 3
  assert caplog.text.count("yy_warn_once") == 1
  np.testing.assert_array_equal(rows[0]["encoder_feature_ids"][0], [2, 0])


def test_unknown_value_without_warning_hook():
  _, rows = _convert(pack=True, warn_unknown=False)
  assert rows  # No crash; ids checked in the packed test.


def test_missing_feature_key_and_default_group():
  # The dataset has no feature_* keys at all: no features, ids 0.
  ds = _dataset(groups=())
  _, rows = _convert(pack=False, ds=ds)
  for row in rows:
    np.testing.assert_array_equal(row["encoder_feature_ids"], 0)
  # Plain LoRA: one always-on group -> id 1 on every real token.
  _, rows = _convert(pack=True, space=features_lib.FeatureSpace.lora(), ds=ds)
  for row in rows:
    real = row["encoder_input_tokens"] != 0
    assert row["encoder_feature_ids"].shape == (12, 1)
    np.testing.assert_array_equal(row["encoder_feature_ids"][real, 0], 1)
    np.testing.assert_array_equal(row["encoder_feature_ids"][~real, 0], 0)


def test_bad_arguments():
  with pytest.raises(TypeError, match="FeatureSpace"):
    feature_converter.FlixFeatureConverter({"task": ["a"]}, pack=False)
  conv = feature_converter.FlixFeatureConverter(SPACE, pack=False)
  with pytest.raises(ValueError, match="task_feature_lengths"):
    conv(_dataset(), {"inputs": 4})


def test_encode_examples_matches_converter():
  vocab = seqio.ByteVocabulary()
  raw = [
      {
          "inputs": "cardinal en: 12",
          "targets": "twelve",
          "features": {"task": "cardinal", "language": "en"},
      },
      {
          "inputs": "ordinal fr: 3",
          "targets": "troisième-long-trimmed",
          "features": {"task": "ordinal"},
      },
  ]
  batch = feature_converter.encode_examples(
      raw, SPACE, {"inputs": 20, "targets": 9}, vocabulary=vocab
  )

  def _gen():
    for ex in raw:
      yield {
          "inputs": np.array(vocab.encode(ex["inputs"]), np.int32),
          "targets": np.array(vocab.encode(ex["targets"]), np.int32),
          "feature_task": ex["features"].get("task", ""),
          "feature_language": ex["features"].get("language", ""),
      }

  sig = {
      "inputs": tf.TensorSpec([None], tf.int32),
      "targets": tf.TensorSpec([None], tf.int32),
      "feature_task": tf.TensorSpec([], tf.string),
      "feature_language": tf.TensorSpec([], tf.string),
  }
  ds = tf.data.Dataset.from_generator(_gen, output_signature=sig)
  ds = ds.map(
      lambda x: {  # EOS kept after trimming, as seqio does.
          **x,
          "inputs": tf.concat([x["inputs"][:19], [1]], 0),
          "targets": tf.concat([x["targets"][:8], [1]], 0),
      }
  )
  conv = feature_converter.FlixFeatureConverter(SPACE, pack=False)
  expected = next(
      conv(ds, {"inputs": 20, "targets": 9}).batch(2).as_numpy_iterator()
  )
  assert set(batch) == set(expected)
  for key in batch:
    np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
  # Inference: no targets -> all padding.
  infer = feature_converter.encode_examples(
      [{"inputs": "x", "features": {"task": "ordinal"}}],
      SPACE,
      {"inputs": 4, "targets": 3},
      vocabulary=vocab,
  )
  np.testing.assert_array_equal(infer["decoder_target_tokens"], 0)
  np.testing.assert_array_equal(
      infer["encoder_feature_ids"][0, :2], [[2, 0]] * 2
  )


@pytest.mark.parametrize("pack", [False, True])
def test_empty_feature_space(pack):
  conv = feature_converter.FlixFeatureConverter(
      features_lib.FeatureSpace(groups=()), pack=pack
  )
  ds = conv(_dataset(), LENGTHS)
  assert ds.element_spec["encoder_feature_ids"].shape.as_list() == [12, 0]
  row = next(ds.as_numpy_iterator())
  assert row["decoder_feature_ids"].shape == (9, 0)


def test_encode_examples_of_task_tokens_pads_rows_and_warns_on_unknown(caplog):
  """Tokenized task examples (EOS included, `feature_<group>` strings), as
  evaluation passes them: ids used as they are, rows padded to the batch."""
  batch = feature_converter.encode_examples(
      [
          {
              "inputs": np.array([5, 6, 1]),
              "targets": np.array([8, 1]),
              "feature_task": b"ordinal",
              "feature_language": b"fr",
          },
          {
              "inputs": np.array([7, 1]),
              "feature_task": b"cardinal",
              "feature_language": b"tlh",
          },
      ],
      SPACE,
      {"inputs": 4, "targets": 3},
      batch_size=3,
  )
  ordinal, fr = SPACE.encode({"task": "ordinal", "language": "fr"})
  np.testing.assert_array_equal(
      batch["encoder_feature_ids"][0, :3], [[ordinal, fr]] * 3
  )
  assert batch["encoder_feature_ids"][0, 3].tolist() == [0, 0]  # padding
  assert batch["encoder_feature_ids"][1, 0, 1] == 0  # unknown language
  assert batch["encoder_feature_ids"][1, 0, 0] > 0  # known task still applies
  assert "tlh" in caplog.text
  np.testing.assert_array_equal(batch["decoder_input_tokens"][0], [0, 8, 1])
  np.testing.assert_array_equal(batch["encoder_input_tokens"][2], 0)
  np.testing.assert_array_equal(batch["encoder_feature_ids"][2], 0)
  assert batch["encoder_input_tokens"].shape == (3, 4)
  with pytest.raises(ValueError, match="need a vocabulary"):
    feature_converter.encode_examples(
        [{"inputs": "text"}], SPACE, {"inputs": 4, "targets": 3}
    )
