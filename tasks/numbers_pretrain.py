"""Pre-training data for the numbers reproduction: span corruption.

Stands in for mT5's pre-training: a small T5 base that has read the
spelled-out numbers of every mode (cardinal, ordinal, year, currency) in every
language, *including the held-out (task, language) pairs' words*, but never
the task format (`"ordinal fr: 12" -> "douzième"`). Adaptation then has to
learn the format and which mode and language to write; for a held-out pair it
can only compose what the task and the language taught it, as in the paper,
where mT5 knows every language but never saw the XTREME-UP task of a held-out
pair.

The texts are the spellings (no task name, no language code); a
`digits_rate` share of them starts with the number's digits, as numbers
appear in running text ("994 neuf cent quatre-vingt-quatorze"). The examples
are T5 span corruption over them (`flix_tasks.span_corruption`); those that
hide the end of a digit-led text hide exactly its spelling, so the base
learns to read a number and write it in some language and mode, and
adaptation teaches which.

Only numbers of the train split (`numbers.split_values(..., "train")`) are
used, so no validation or test number of the adaptation tasks leaks into the
base. Registered at import: `numbers_pretrain`, bytes with 125 sentinels.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import seqio

from flix_tasks import numbers
from flix_tasks import span_corruption

PRETRAIN_VOCABULARY = seqio.ByteVocabulary(extra_ids=125)  # vocab_size 384
DEFAULT_NAME = "numbers_pretrain"


def spelled_texts(
    pairs: Sequence[tuple[str, str]],
    size: int,
    max_number: int = numbers.DEFAULT_MAX_NUMBER,
    digits_rate: float = 0.0,
) -> list[span_corruption.Text]:
  """`(digits, spelling)` of up to `size` train-split numbers of every pair.

  `digits` is the number as written in the inputs ("994") for a
  `digits_rate` share of them (a fixed pseudo-random choice), else "".
  """
  rng = np.random.default_rng(0)
  texts = []
  for task, language in pairs:
    for inputs, target in numbers.examples(
        task, language, "train", size, max_number
    ):
      digits = numbers.digits_of(inputs)
      texts.append((digits if rng.random() < digits_rate else "", target))
  return texts


def register_pretrain(
    name: str = DEFAULT_NAME,
    languages: Sequence[str] = numbers.DEFAULT_LANGUAGES,
    tasks: Sequence[str] = numbers.TASKS,
    size: int = 1000,
    max_number: int = numbers.DEFAULT_MAX_NUMBER,
    vocabulary: seqio.Vocabulary = PRETRAIN_VOCABULARY,
    digits_rate: float = 0.0,
    **corruption,
) -> seqio.Task:
  """Registers (or replaces) the span-corruption task over spelled numbers.

  Args:
    name: task name.
    languages: num2words languages (every mode num2words implements for each
      is used, held-out pairs of the adaptation mixture included).
    tasks: number modes.
    size: train-split numbers spelled per (mode, language).
    max_number: the numbers' range (`numbers.register_numbers`'s).
    vocabulary: tokenizes the texts; its top `extra_ids` are the sentinels.
    digits_rate: share of texts preceded by their digits (never with a task
      name or a language code); the examples that hide their end hide the
      whole spelling.
    **corruption: `span_corruption.register`'s settings (copies,
      noise_density, mean_span_length, prefix_rate, num_validation).

  Returns:
    The registered task; it carries no FLix features.
  """
  pairs = numbers.working_pairs(tuple(tasks), tuple(languages))
  if not pairs:
    raise ValueError(
        f"No working (task, language) pair in {tasks} x {languages}."
    )
  logging.info("%s: %d pairs, %d numbers each.", name, len(pairs), size)
  return span_corruption.register(
      name,
      lambda: spelled_texts(pairs, size, max_number, digits_rate),
      vocabulary,
      **corruption,
  )


DEFAULT = register_pretrain()
