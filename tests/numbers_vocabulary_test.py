"""The numbers' SentencePiece vocabulary and span corruption over it
(`flix_tasks.sentencepiece_trainer`, `span_corruption`, `numbers_*`)."""

import os

import numpy as np
import pytest

from flix_tasks import numbers
from flix_tasks import numbers_pretrain
from flix_tasks import numbers_vocabulary
from flix_tasks import span_corruption
from flix_tasks import sentencepiece_trainer

PAIRS = (("cardinal", "en"), ("cardinal", "fr"), ("ordinal", "de"))


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
  return numbers_vocabulary.sentencepiece_vocabulary(
      PAIRS,
      str(tmp_path_factory.mktemp("spm")),
      vocab_size=200,
      extra_ids=10,
      size=300,
      max_number=1000,
  )


def test_round_trip_on_test_numbers(vocabulary):
  for pair in PAIRS:
    for inputs, targets in numbers.examples(*pair, "test", 30, 1000):
      for text in (inputs, targets):
        ids = vocabulary.encode(text)
        assert max(ids) < vocabulary.vocab_size - 10  # No sentinel.
        assert vocabulary.decode(ids) == text


def test_pieces_are_words_and_single_digits(vocabulary):
  ids = vocabulary.encode("cardinal fr: 994")
  pieces = [vocabulary.decode([i]) for i in ids]
  assert pieces[-3:] == ["9", "9", "4"]
  # A byte-level target is several times longer than its pieces.
  text = numbers.spell("cardinal", "fr", 994)
  assert len(vocabulary.encode(text)) * 3 <= len(text.encode())


def test_cached_model_is_reused_and_training_is_deterministic(tmp_path):
  first = numbers_vocabulary.sentencepiece_vocabulary(
      PAIRS[:1], str(tmp_path), vocab_size=60, size=200, max_number=1000
  )
  path = first.sentencepiece_model_file
  stamp = os.stat(path).st_mtime_ns
  again = numbers_vocabulary.sentencepiece_vocabulary(
      PAIRS[:1], str(tmp_path), vocab_size=60, size=200, max_number=1000
  )
  assert again.sentencepiece_model_file == path
  assert os.stat(path).st_mtime_ns == stamp
  texts = numbers_vocabulary.training_texts(PAIRS[:1], 200, 1000)
  with open(path, "rb") as f:
    assert sentencepiece_trainer.train_sentencepiece(texts, 60) == f.read()
  other = numbers_vocabulary.sentencepiece_vocabulary(
      PAIRS[:1], str(tmp_path), vocab_size=50, size=200, max_number=1000
  )
  assert other.sentencepiece_model_file != path


@pytest.mark.parametrize("prefix", [False, True])
def test_span_corruption_hides_spans_behind_sentinels(vocabulary, prefix):
  rng = np.random.default_rng(0)
  size = vocabulary.vocab_size
  for _, text in numbers.examples("cardinal", "fr", "train", 20, 1000):
    tokens = vocabulary.encode(text)
    inputs, targets = span_corruption.corrupt(tokens, rng, size, prefix=prefix)
    sentinels = [t for t in inputs if t >= size - 10]
    assert sentinels == [
        span_corruption.sentinel(i, size) for i in range(len(sentinels))
    ]
    assert targets[-1] == span_corruption.sentinel(len(sentinels), size)
    # Filling each sentinel with its span gives the text back.
    spans, current = {}, None
    for t in targets[:-1]:
      if t >= size - 10:
        current = t
        spans[current] = []
      else:
        spans[current].append(t)
    rebuilt = [
        piece for t in inputs for piece in (spans[t] if t in spans else [t])
    ]
    assert rebuilt == tokens
    if prefix and len(tokens) > 1:  # A one-piece text is left whole.
      assert len(sentinels) == 1 and inputs[-1] == sentinels[0]


def test_digit_texts_hide_the_whole_spelling_in_prefix_mode(vocabulary):
  texts = numbers_pretrain.spelled_texts(PAIRS, 50, 1000, digits_rate=0.5)
  with_digits = [t for t in texts if t[0]]
  assert 0.3 < len(with_digits) / len(texts) < 0.7
  digits, spelling = with_digits[0]
  tokens, cut = span_corruption.tokenize(digits, spelling, vocabulary)
  assert vocabulary.decode(tokens[:cut]) == digits
  size = vocabulary.vocab_size
  inputs, targets = span_corruption.corrupt(
      tokens, np.random.default_rng(0), size, prefix=True, prefix_cut=cut
  )
  sentinel = span_corruption.sentinel(0, size)
  assert inputs == [*tokens[:cut], sentinel]
  assert vocabulary.decode(targets[1:-1]).strip() == spelling
