"""The demo's numbers data (configs/demo_*.gin, `bash scripts/demo.sh`).

What scripts/reproduce.py's study found makes a small model learn in minutes
(docs/reproduce/RUN.md), at the demo's scale:

  - numbers below 1000 (`MAX_NUMBER`), `LANGUAGES` x every task, the default
    held-out pairs;
  - a SentencePiece vocabulary trained on the train split (byte-level
    targets are 3-5x longer);
  - a base pre-trained by span corruption over the spellings of every pair
    (held-out pairs' words included, never the task format), each led by its
    digits, `PREFIX_RATE` of the examples hiding the whole spelling: the base
    learns to read a number and write it in some language and mode.

Registered at import:
  numbers_demo_pretrain             the base's pre-training task
  numbers_multitask_demo            FLix training (held-out pairs excluded)
  numbers_multitask_eval_demo       every pair
  numbers_<task>_<language>_demo    one task per pair
  numbers_multitask_nl_demo         the grow stage's Dutch pairs (one held
                                    out; configs/demo_grow.gin)
  numbers_multitask_eval_with_nl_demo   old and Dutch pairs

The vocabulary is trained on first import (seconds) and cached under
$FLIX_CACHE_DIR (default ~/.cache/flix). Gin binds the model's embedding
size to it: `network.preset.vocab_size = @numbers_demo.vocab_size()`.
"""

from __future__ import annotations

import os

import seqio

from flix_tasks import numbers
from flix_tasks import numbers_pretrain
from flix_tasks import numbers_vocabulary

LANGUAGES = numbers.DEFAULT_LANGUAGES
MAX_NUMBER = 1000
VOCAB_SIZE = 1000  # SentencePiece pieces (sentinels come on top)
PRETRAIN_SIZE = 1000  # Train-split numbers spelled per pair.
DIGITS_RATE = 1.0
PREFIX_RATE = 0.5
COPIES = 4
CACHE_DIR = os.environ.get(
    "FLIX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "flix")
)


def _vocabulary() -> seqio.SentencePieceVocabulary:
  return numbers_vocabulary.sentencepiece_vocabulary(
      numbers.working_pairs(numbers.TASKS, LANGUAGES),
      CACHE_DIR,
      VOCAB_SIZE,
      size=PRETRAIN_SIZE,
      max_number=MAX_NUMBER,
  )


VOCABULARY = _vocabulary()


def vocab_size() -> int:
  """Embedding rows the demo's model needs (sentinels included)."""
  return VOCABULARY.vocab_size


REGISTRATION = numbers.register_numbers(
    languages=LANGUAGES,
    suffix="_demo",
    max_number=MAX_NUMBER,
    vocabulary=VOCABULARY,
)
PRETRAIN = numbers_pretrain.register_pretrain(
    "numbers_demo_pretrain",
    LANGUAGES,
    size=PRETRAIN_SIZE,
    max_number=MAX_NUMBER,
    vocabulary=VOCABULARY,
    digits_rate=DIGITS_RATE,
    copies=COPIES,
    prefix_rate=PREFIX_RATE,
)
# The grow stage: Dutch, a language the base and the vocabulary never saw
# (its letters are those of the other Latin-script languages).
GROWN = numbers.register_grown(
    REGISTRATION, "_demo", max_number=MAX_NUMBER, vocabulary=VOCABULARY
)
