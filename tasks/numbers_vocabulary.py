"""The numbers mixture's SentencePiece vocabulary (`flix_tasks.sentencepiece_trainer`).

Trained on the texts of the train split only (inputs and targets of every
pair), so no validation or test number shapes the vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import seqio

from flix_tasks import numbers
from flix_tasks import sentencepiece_trainer


def training_texts(
    pairs: Sequence[tuple[str, str]], size: int, max_number: int
) -> list[str]:
  """Inputs and targets of up to `size` train-split numbers of every pair."""
  texts = []
  for task, language in pairs:
    for inputs, targets in numbers.examples(
        task, language, "train", size, max_number
    ):
      texts += [inputs, targets]
  return texts


def sentencepiece_vocabulary(
    pairs: Sequence[tuple[str, str]],
    cache_dir: str,
    vocab_size: int = 1000,
    extra_ids: int = sentencepiece_trainer.EXTRA_IDS,
    size: int = numbers.DEFAULT_TRAIN_SIZE,
    max_number: int = numbers.DEFAULT_MAX_NUMBER,
) -> seqio.SentencePieceVocabulary:
  """The numbers' SentencePiece vocabulary (trained once, then cached).

  Args:
    pairs: `(task, language)` pairs whose train texts train the model.
    cache_dir: where the model file is written and found again.
    vocab_size: pieces of the SentencePiece model (at most).
    extra_ids: sentinels appended on top (span corruption).
    size: train-split numbers per pair.
    max_number: the numbers' range (`numbers.register_numbers`'s).

  Returns:
    A `seqio.SentencePieceVocabulary` with `vocab_size + extra_ids` ids.
  """
  return sentencepiece_trainer.sentencepiece_vocabulary(
      training_texts(pairs, size, max_number),
      cache_dir,
      vocab_size,
      extra_ids,
  )
