"""Tests for flix_tasks.jsonl: bring-your-own featurized JSONL tasks."""

import json

import numpy as np
import pytest
import seqio

from flix import feature_converter
from flix import featurized
from flix_tasks import jsonl

TRAIN = [
    {
        "inputs": "ask sw",
        "targets": "jibu",
        "features": {"task": "qa", "language": "sw"},
    },
    {
        "inputs": "tag yo",
        "targets": "B-PER",
        "features": {"task": "ner", "language": "yo", "script": "Latn"},
    },
    {"inputs": "no language", "targets": "x", "features": {"task": "qa"}},
    {"inputs": "no features", "targets": "y"},
]
TEST = [
    {
        "inputs": "zero-shot",
        "targets": "z",
        "features": {"task": "ner", "language": "sw"},
    },
    {
        "inputs": "new language",
        "targets": "w",
        "features": {"task": "qa", "language": "ha"},
    },
]


def _write(path, rows, trailing="\n"):
  path.write_text(
      "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + trailing,
      encoding="utf-8",
  )
  return str(path)


@pytest.fixture
def files(tmp_path):
  train = _write(tmp_path / "train.jsonl", TRAIN, trailing="\n\n  \n")
  test = _write(tmp_path / "test.jsonl", TEST)
  return train, test


def _rows(name, split):
  ds = seqio.get_mixture_or_task(name).get_dataset(
      None, split=split, shuffle=False, num_epochs=1
  )
  return list(ds.as_numpy_iterator())


def test_round_trip_with_features(files):
  train, test = files
  task = jsonl.register_jsonl_task("jl_round", train, test_pattern=test)
  assert set(task.splits) == {"train", "test"}
  rows = _rows("jl_round", "train")
  assert len(rows) == len(TRAIN)  # Blank trailing lines skipped.
  vocab = seqio.ByteVocabulary()
  for row, ref in zip(rows, TRAIN):
    assert row["inputs_pretokenized"].decode() == ref["inputs"]
    assert row["targets_pretokenized"].decode() == ref["targets"]
    assert vocab.decode(row["targets"].tolist()) == ref["targets"]
    assert row["targets"][-1] == vocab.eos_id
    features = ref.get("features", {})
    for group in ("task", "language", "script"):
      assert row[f"feature_{group}"].decode() == features.get(group, "")
  assert task.num_input_examples("train") == len(TRAIN)


def test_feature_values_scanned_and_seen_pairs(files):
  train, test = files
  jsonl.register_jsonl_task("jl_scan", train, test_pattern=test)
  assert featurized.feature_values("jl_scan") == {
      "task": ("ner", "qa"),
      "language": ("ha", "sw", "yo"),
      "script": ("Latn",),
  }
  # Seen combinations come from the training split only.
  assert featurized.seen_pairs("jl_scan") == {("qa", "sw"), ("ner", "yo")}


def test_missing_group_is_absent_id(files):
  train, _ = files
  jsonl.register_jsonl_task("jl_ids", train)
  space = featurized.feature_space("jl_ids")
  conv = feature_converter.FlixFeatureConverter(space, pack=False)
  ds = seqio.get_dataset(
      "jl_ids", {"inputs": 16, "targets": 8}, conv, shuffle=False
  )
  rows = list(ds.as_numpy_iterator())
  first_token_ids = [r["encoder_feature_ids"][0].tolist() for r in rows]
  # Groups: task (ner, qa), language (sw, yo), script (Latn).
  assert first_token_ids == [[2, 1, 0], [1, 2, 1], [2, 0, 0], [0, 0, 0]]
  np.testing.assert_array_equal(
      rows[0]["encoder_feature_ids"][rows[0]["encoder_input_tokens"] == 0], 0
  )


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"inputs": "a", "targets": ', "invalid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"targets": "b"}', "missing 'inputs'"),
        ('{"inputs": "a"}', "missing 'targets'"),
        ('{"inputs": "a", "targets": 3}', "'targets' must be a string"),
        (
            '{"inputs": "a", "targets": "b", "features": ["x"]}',
            "'features' must be an object",
        ),
        (
            '{"inputs": "a", "targets": "b", "features": {"task": 1}}',
            "feature 'task' must be a string",
        ),
        (
            '{"inputs": "a", "targets": "b", "features": {"bad group": "x"}}',
            "alphanumeric",
        ),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, problem):
  path = tmp_path / "bad.jsonl"
  good = json.dumps(TRAIN[0])
  path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n", encoding="utf-8")
  with pytest.raises(ValueError) as error:
    jsonl.register_jsonl_task("jl_bad", str(path))
  message = str(error.value)
  assert f"{path}:4" in message
  assert problem in message


def test_null_and_empty_feature_values_are_absent(tmp_path):
  rows = [
      {
          "inputs": "a",
          "targets": "b",
          "features": {"task": "qa", "language": None},
      },
      {
          "inputs": "c",
          "targets": "d",
          "features": {"task": "", "language": "sw"},
      },
  ]
  path = _write(tmp_path / "t.jsonl", rows)
  jsonl.register_jsonl_task("jl_null", path)
  assert featurized.feature_values("jl_null") == {
      "task": ("qa",),
      "language": ("sw",),
  }
  out = _rows("jl_null", "train")
  assert out[0]["feature_language"] == b""
  assert out[1]["feature_task"] == b""


def test_glob_patterns_and_errors(tmp_path):
  _write(tmp_path / "a-00.jsonl", TRAIN[:2])
  _write(tmp_path / "a-01.jsonl", TRAIN[2:])
  jsonl.register_jsonl_task("jl_glob", str(tmp_path / "a-*.jsonl"))
  assert len(_rows("jl_glob", "train")) == len(TRAIN)
  with pytest.raises(ValueError, match="No file matches"):
    jsonl.register_jsonl_task("jl_none", str(tmp_path / "missing*.jsonl"))
  with pytest.raises(ValueError, match="at least one"):
    jsonl.register_jsonl_task("jl_none")


def test_nothing_registered_at_import():
  assert not any(n.startswith("jsonl") for n in seqio.TaskRegistry.names())
