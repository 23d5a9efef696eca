"""Tests for flix_tasks.numbers, the embedded multitask multilingual mixture."""

import re

import num2words
import numpy as np
import pytest
import seqio

from flix import featurized
from flix_tasks import numbers

DEFAULT = numbers.DEFAULT
_INPUTS = re.compile(r"^(\w+) (\w+): (\d+(?:\.\d\d)?)$")


def _value(task, text_digits):
  """Integer value (cents for currency) of the digits in the inputs."""
  if task == "currency":
    whole, cents = text_digits.split(".")
    return int(whole) * 100 + int(cents)
  return int(text_digits)


def _reference(task, language, text_digits):
  """num2words called directly on the digits of the inputs."""
  number = float(text_digits) if task == "currency" else int(text_digits)
  return num2words.num2words(number, lang=language, to=task)


@pytest.fixture(scope="module")
def small():
  """A small registered variant that is cheap to iterate through SeqIO."""
  return numbers.register_numbers(
      languages=("en", "fr", "ru", "ja"),
      held_out=(("ordinal", "fr"),),
      train_size=40,
      eval_size=10,
      suffix="_small",
  )


def test_default_registration():
  assert set(DEFAULT.held_out) == set(numbers.DEFAULT_HELD_OUT)
  assert len(DEFAULT.pairs) >= 30
  for task, language in DEFAULT.pairs:
    assert f"numbers_{task}_{language}" in seqio.TaskRegistry.names()
  # Every held-out task and language is still trained on in other pairs.
  train = DEFAULT.train_pairs
  for task, language in DEFAULT.held_out:
    assert any(t == task for t, _ in train)
    assert any(l == language for _, l in train)
  assert {t for t, _ in DEFAULT.pairs} == set(numbers.TASKS)
  assert {l for _, l in DEFAULT.pairs} == set(numbers.DEFAULT_LANGUAGES)


def test_broken_num2words_pairs_are_excluded():
  pairs = set(DEFAULT.pairs)
  # Not implemented, raising, or silently falling back to the cardinal.
  assert ("ordinal", "ar") not in pairs  # Partly the cardinal.
  assert ("currency", "ja") not in pairs  # No cents.
  assert ("year", "fr") not in pairs  # Same as the cardinal.
  assert not numbers.pair_works("ordinal", "lt")  # NotImplementedError.
  assert not numbers.pair_works("cardinal", "xx")  # No such language.
  assert ("year", "en") in pairs and ("ordinal", "ru") in pairs


def test_held_out_pairs_only_in_eval_mixture():
  train = {t.name for t in seqio.get_mixture_or_task("numbers_multitask").tasks}
  evaluation = {
      t.name for t in seqio.get_mixture_or_task("numbers_multitask_eval").tasks
  }
  held = {numbers.task_name(t, l) for t, l in DEFAULT.held_out}
  assert held and not held & train
  assert held <= evaluation
  assert evaluation == set(DEFAULT.task_names.values())
  assert train == evaluation - held
  seen = featurized.seen_pairs("numbers_multitask")
  for pair in DEFAULT.held_out:
    assert pair not in seen
  assert seen == set(DEFAULT.train_pairs)
  # Held-out tasks and languages stay in the training feature vocabulary.
  space = featurized.feature_space("numbers_multitask")
  for task, language in DEFAULT.held_out:
    assert task in space.group("task").values
    assert language in space.group("language").values


def test_multilingual_mixtures_are_single_task():
  for task, name in DEFAULT.multilingual_mixtures.items():
    assert name == f"numbers_multilingual_{task}"
    values = featurized.feature_values(name)
    assert values["task"] == (task,)
    expected = {l for t, l in DEFAULT.train_pairs if t == task}
    assert set(values["language"]) == expected


def test_splits_are_disjoint_over_numbers():
  for task in numbers.TASKS:
    parts = [
        set(numbers.split_values(task, s).tolist()) for s in numbers.SPLITS
    ]
    low, high = numbers.value_range(task)
    assert sum(len(p) for p in parts) == high - low
    assert set().union(*parts) == set(range(low, high))
    for split, part in zip(numbers.SPLITS, parts):
      for value in list(part)[:50]:
        assert numbers.split_of(value) == split
    fractions = [len(p) / (high - low) for p in parts]
    assert fractions[0] == pytest.approx(0.8, abs=0.05)


def test_digits_of_inverts_make_inputs():
  assert numbers.digits_of(numbers.make_inputs("cardinal", "fr", 994)) == "994"
  assert numbers.digits_of(numbers.make_inputs("currency", "ru", 1205)) == (
      "12.05"
  )


def test_max_number_bounds_every_task_but_year():
  assert numbers.value_range("cardinal", 1000) == (0, 1000)
  assert numbers.value_range("ordinal", 1000) == (1, 1000)
  assert numbers.value_range("currency", 1000) == (100, 10_000)  # < 100.00
  assert numbers.value_range("currency") == (100, 100_000)  # < 1000.00
  assert numbers.value_range("year", 1000) == numbers.value_range("year")


def test_no_evaluation_number_in_any_training_example():
  train_values, eval_values = set(), set()
  for (task, language), sizes in DEFAULT.num_examples.items():
    for split in numbers.SPLITS:
      # The examples of a split are the first `size` of its values.
      values = set(numbers.split_values(task, split)[: sizes[split]].tolist())
      for inputs, _ in numbers.examples(task, language, split, 100):
        assert _value(task, _INPUTS.match(inputs).group(3)) in values
      (train_values if split == "train" else eval_values).update(values)
  assert train_values and eval_values
  assert not train_values & eval_values


def test_every_pair_is_num2words_output():
  for (task, language), sizes in DEFAULT.num_examples.items():
    for split in numbers.SPLITS:
      rows = numbers.examples(task, language, split, 100)
      assert len(rows) == min(100, sizes[split])
      for inputs, targets in rows[::3]:
        match = _INPUTS.match(inputs)
        assert match, inputs
        assert match.group(1) == task and match.group(2) == language
        assert targets == _reference(task, language, match.group(3))
        assert not re.search(r"[0-9]", targets)


def test_full_split_sizes():
  rows = numbers.examples("cardinal", "ja", "train", 2000)
  assert len(rows) == 2000 and len(set(rows)) == 2000


def test_sizes_and_determinism():
  sizes = DEFAULT.num_examples
  assert sizes[("cardinal", "en")] == {
      "train": 2000,
      "validation": 200,
      "test": 200,
  }
  assert 800 < sizes[("year", "en")]["train"] < 1000
  again = numbers.split_values("cardinal", "test")
  np.testing.assert_array_equal(
      again, numbers.split_values.__wrapped__("cardinal", "test")
  )


def test_seqio_task_examples(small):
  name = numbers.task_name("currency", "fr", "_small")
  ds = seqio.get_mixture_or_task(name).get_dataset(
      {"inputs": 32, "targets": 128}, split="test", shuffle=False, num_epochs=1
  )
  rows = list(ds.as_numpy_iterator())
  assert len(rows) == 10
  vocab = numbers.VOCABULARY
  for row in rows:
    inputs = row["inputs_pretokenized"].decode()
    targets = row["targets_pretokenized"].decode()
    assert inputs.startswith("currency fr: ")
    assert row["feature_task"] == b"currency"
    assert row["feature_language"] == b"fr"
    assert targets == _reference("currency", "fr", inputs.split(": ")[1])
    assert row["inputs"][-1] == vocab.eos_id
    assert vocab.decode(row["targets"].tolist()) == targets


def test_small_mixture_carries_features(small):
  assert small.held_out == (("ordinal", "fr"),)
  ds = seqio.get_mixture_or_task("numbers_multitask_small").get_dataset(
      {"inputs": 32, "targets": 128},
      split="train",
      shuffle=False,
      num_epochs=1,
      seed=0,
      copy_pretokenized=True,
  )
  rows = list(ds.take(60).as_numpy_iterator())
  pairs = set()
  for row in rows:
    match = _INPUTS.match(row["inputs_pretokenized"].decode())
    pair = (row["feature_task"].decode(), row["feature_language"].decode())
    assert pair == (match.group(1), match.group(2))
    pairs.add(pair)
  assert ("ordinal", "fr") not in pairs
  assert len(pairs) > 3
  assert featurized.feature_values("numbers_multitask_small") == {
      "task": tuple(sorted({t for t, _ in small.train_pairs})),
      "language": ("en", "fr", "ja", "ru"),
  }


def test_reregistration_is_stable(small):
  space = featurized.feature_space("numbers_multitask_small")
  again = numbers.register_numbers(
      languages=("en", "fr", "ru", "ja"),
      held_out=(("ordinal", "fr"),),
      train_size=40,
      eval_size=10,
      suffix="_small",
  )
  assert again.pairs == small.pairs
  assert featurized.feature_space("numbers_multitask_small") == space


def test_bad_arguments():
  with pytest.raises(ValueError, match="Unknown numbers tasks"):
    numbers.register_numbers(tasks=("roman",), suffix="_bad")
  with pytest.raises(ValueError, match="no language"):
    numbers.register_numbers(languages=("xx",), suffix="_bad")
  with pytest.raises(ValueError, match="left for training"):
    numbers.register_numbers(
        languages=("en",),
        tasks=("cardinal",),
        held_out=(("cardinal", "en"),),
        suffix="_bad",
    )
