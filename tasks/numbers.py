"""The embedded default: a multitask x multilingual mixture built offline.

Tasks spell numbers the way the `num2words` package does (its maintainers
wrote converters for ~50 languages):

  cardinal   "cardinal fr: 1234"  -> "mille deux cent trente-quatre"
  ordinal    "ordinal de: 3"      -> "dritte"
  year       "year en: 1999"      -> "nineteen ninety-nine"
  currency   "currency es: 12.34" -> "doce euros con treinta y cuatro céntimos"

Inputs name the task and the language in text and give the digits, so plain
LoRA sees the same information as FLix; every example also carries the
features `feature_task` and `feature_language` (the num2words language code).

A (task, language) pair is used only where num2words really implements it:
`pair_works` checks it on a handful of numbers (no exception, non-empty text
without digits, distinct texts for distinct numbers, and not a silent
fallback: an ordinal that equals the cardinal, a year spelled like the
cardinal for every sample, a currency that is just the cardinal).

Splits are over numbers: a hash of the integer value (the amount in cents for
currency) puts it in train (80%), validation (10%) or test (10%), the same
for every task and language, so no evaluation number is ever trained on.

Registered at import (see `register_numbers` for variants):
  numbers_<task>_<lang>          one task per working pair
  numbers_multitask              all pairs but the held-out ones (training)
  numbers_multitask_eval         all pairs, held-out ones included
  numbers_multilingual_<task>    one task, all its training languages
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Iterable, Optional, Sequence

import num2words
import numpy as np
import seqio

from flix import featurized
from flix_tasks import combinations

TASKS = ("cardinal", "ordinal", "year", "currency")
# Latin, Cyrillic, Hebrew, Arabic and Japanese scripts; Germanic, Romance,
# Slavic, Turkic, Uralic, Semitic and Japonic languages.
DEFAULT_LANGUAGES = (
    "en",
    "de",
    "fr",
    "es",
    "it",
    "ru",
    "pl",
    "tr",
    "fi",
    "he",
    "ar",
    "ja",
)
# Zero-shot pairs: each task and each language still appears in training.
DEFAULT_HELD_OUT = (
    ("ordinal", "fr"),
    ("year", "de"),
    ("currency", "ru"),
    ("cardinal", "he"),
)
DEFAULT_TRAIN_SIZE = 2000
DEFAULT_EVAL_SIZE = 200
DEFAULT_MAX_NUMBER = 10_000
SPLITS = ("train", "validation", "test")
# Hash buckets (of 100) per split.
_SPLIT_BOUNDS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}
_SPLIT_SALT = 1
_ORDER_SALT = 2

VOCABULARY = seqio.ByteVocabulary()


# ---- Numbers and their spelling ----


def value_range(
    task: str, max_number: int = DEFAULT_MAX_NUMBER
) -> tuple[int, int]:
  """Half-open range `[low, high)` of a task's integer values.

  Currency values are amounts in cents, 1.00 up to (not including)
  `max_number / 10` (999.99 at the default 10,000), so that a smaller
  `max_number` also shortens the currency texts.
  """
  if task == "cardinal":
    return 0, max_number
  if task == "ordinal":
    return 1, max_number
  if task == "year":
    return 1000, 2100
  if task == "currency":
    return 100, 10 * max_number
  raise ValueError(f"Unknown numbers task {task!r}; tasks are {TASKS}.")


def digits(task: str, value: int) -> str:
  """The number as written in the inputs: `1234`, or `12.34` for currency."""
  if task == "currency":
    return f"{value // 100}.{value % 100:02d}"
  return str(value)


def spell(task: str, language: str, value: int) -> str:
  """num2words' spelling of `value` for `task` in `language`."""
  number = float(digits(task, value)) if task == "currency" else value
  return num2words.num2words(number, lang=language, to=task)


def make_inputs(task: str, language: str, value: int) -> str:
  return f"{task} {language}: {digits(task, value)}"


def digits_of(inputs: str) -> str:
  """The digits of a `make_inputs` string: "cardinal fr: 994" -> "994"."""
  return inputs.rsplit(" ", 1)[1]


def _mix(values: np.ndarray, salt: int) -> np.ndarray:
  """SplitMix64 finaliser: a fixed, platform-independent integer hash."""
  with np.errstate(over="ignore"):
    z = values.astype(np.uint64) + np.uint64(salt) * np.uint64(
        0x9E3779B97F4A7C15
    )
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def split_of(value: int) -> str:
  """The split a number belongs to, the same for every task and language."""
  bucket = int(_mix(np.array([value]), _SPLIT_SALT)[0] % np.uint64(100))
  for split, (low, high) in _SPLIT_BOUNDS.items():
    if low <= bucket < high:
      return split
  raise AssertionError(bucket)


@functools.lru_cache(maxsize=None)
def split_values(
    task: str, split: str, max_number: int = DEFAULT_MAX_NUMBER
) -> np.ndarray:
  """All values of `task` in `split`, in a fixed pseudo-random order."""
  if split not in _SPLIT_BOUNDS:
    raise ValueError(f"Unknown split {split!r}; splits are {SPLITS}.")
  low, high = value_range(task, max_number)
  values = np.arange(low, high, dtype=np.int64)
  buckets = _mix(values, _SPLIT_SALT) % np.uint64(100)
  lo, hi = _SPLIT_BOUNDS[split]
  values = values[(buckets >= lo) & (buckets < hi)]
  order = np.argsort(_mix(values, _ORDER_SALT), kind="stable")
  values = values[order]
  values.setflags(write=False)
  return values


# ---- Which (task, language) pairs num2words really implements ----

_CHECK_NUMBERS = {
    "cardinal": (
        0,
        1,
        2,
        3,
        7,
        11,
        12,
        20,
        21,
        99,
        100,
        101,
        105,
        110,
        200,
        1000,
        1001,
        1234,
        2000,
        9999,
    ),
    "ordinal": (
        1,
        2,
        3,
        4,
        7,
        10,
        11,
        12,
        20,
        21,
        99,
        100,
        101,
        105,
        110,
        200,
        1000,
        1001,
        1234,
        2000,
        9999,
    ),
    "year": (1066, 1100, 1492, 1789, 1900, 1905, 1999, 2000, 2005, 2024, 2099),
    "currency": (100, 101, 250, 1234, 2000, 9999, 10001, 99950),
}
_DIGIT = re.compile(r"[0-9]")


def _try_spell(task: str, language: str, value: int) -> Optional[str]:
  try:
    text = spell(task, language, value)
  except Exception:  # pylint: disable=broad-except
    return None
  if not isinstance(text, str) or not text.strip() or _DIGIT.search(text):
    return None
  return text


@functools.lru_cache(maxsize=None)
def pair_works(task: str, language: str) -> bool:
  """Whether num2words really implements `task` for `language` (cached)."""
  if task not in TASKS:
    raise ValueError(f"Unknown numbers task {task!r}; tasks are {TASKS}.")
  if language not in num2words.CONVERTER_CLASSES:
    return False
  samples = _CHECK_NUMBERS[task]
  texts = [_try_spell(task, language, v) for v in samples]
  if any(t is None for t in texts) or len(set(texts)) != len(texts):
    return False
  if task == "cardinal":
    return True
  if task == "currency":
    cardinals = [_try_spell("cardinal", language, v // 100) for v in samples]
  else:
    cardinals = [_try_spell("cardinal", language, v) for v in samples]
  same = [t == c for t, c in zip(texts, cardinals)]
  if task == "year":  # Years often read as cardinals, but not all of them.
    return not all(same)
  return not any(same)


def working_pairs(
    tasks: Sequence[str] = TASKS, languages: Sequence[str] = DEFAULT_LANGUAGES
) -> tuple[tuple[str, str], ...]:
  """The `(task, language)` pairs num2words implements, in input order."""
  return tuple((t, l) for t in tasks for l in languages if pair_works(t, l))


# ---- Examples and SeqIO sources ----


@functools.lru_cache(maxsize=None)
def examples(
    task: str,
    language: str,
    split: str,
    size: int,
    max_number: int = DEFAULT_MAX_NUMBER,
) -> tuple[tuple[str, str], ...]:
  """`(inputs, targets)` of up to `size` numbers of `split` (cached)."""
  out = []
  skipped = 0
  for value in split_values(task, split, max_number)[:size]:
    try:
      target = spell(task, language, int(value))
    except Exception:  # pylint: disable=broad-except
      skipped += 1
      continue
    out.append((make_inputs(task, language, int(value)), target))
  if skipped:
    logging.warning(
        "numbers_%s_%s/%s: num2words failed on %d numbers; " "skipped.",
        task,
        language,
        split,
        skipped,
    )
  return tuple(out)


def task_name(task: str, language: str, suffix: str = "") -> str:
  return f"numbers_{combinations.task_suffix((task, language))}{suffix}"


def register_numbers(
    languages: Sequence[str] = DEFAULT_LANGUAGES,
    tasks: Sequence[str] = TASKS,
    held_out: Iterable[Sequence[str]] = DEFAULT_HELD_OUT,
    train_size: int = DEFAULT_TRAIN_SIZE,
    eval_size: int = DEFAULT_EVAL_SIZE,
    suffix: str = "",
    max_number: int = DEFAULT_MAX_NUMBER,
    vocabulary: seqio.Vocabulary = VOCABULARY,
) -> combinations.Registration:
  """Registers the numbers tasks and mixtures (replacing same-named ones).

  Args:
    languages: num2words language codes.
    tasks: subset of `TASKS`.
    held_out: `(task, language)` pairs kept out of the training mixtures.
      Pairs num2words does not implement are ignored with a warning.
    train_size: training examples per pair (at most; years have ~880).
    eval_size: validation and test examples per pair (each, at most).
    suffix: appended to every task and mixture name, for variants.
    max_number: cardinal and ordinal numbers are below this; currency
      amounts below a tenth of it.
    vocabulary: of inputs and targets (bytes by default; the reproduction
      uses `numbers_vocabulary.sentencepiece_vocabulary`).

  Returns:
    A `combinations.Registration` describing what was registered.
  """
  languages, tasks = tuple(languages), tuple(tasks)
  unknown_tasks = [t for t in tasks if t not in TASKS]
  if unknown_tasks:
    raise ValueError(
        f"Unknown numbers tasks {unknown_tasks}; tasks are " f"{TASKS}."
    )
  unknown_langs = [l for l in languages if l not in num2words.CONVERTER_CLASSES]
  if unknown_langs:
    raise ValueError(f"num2words has no language(s) {unknown_langs}.")
  if train_size < 1 or eval_size < 1:
    raise ValueError("train_size and eval_size must be positive.")

  pairs = working_pairs(tasks, languages)
  for task, language in ((t, l) for t in tasks for l in languages):
    if (task, language) not in pairs:
      logging.info(
          "numbers: num2words does not implement %s in %r; skipped.",
          task,
          language,
      )
  held = []
  for pair in held_out:
    pair = tuple(pair)
    if pair in pairs:
      held.append(pair)
    else:
      logging.warning(
          "numbers: held-out pair %s is not registered; ignored.", pair
      )
  held = tuple(held)
  train_pairs = [p for p in pairs if p not in held]
  if not train_pairs:
    raise ValueError(
        f"No (task, language) pair of tasks={tasks}, languages={languages} "
        "is left for training."
    )
  for task, language in held:
    if not any(t == task for t, _ in train_pairs):
      logging.warning("numbers: held-out task %r has no training pair.", task)
    if not any(l == language for _, l in train_pairs):
      logging.warning(
          "numbers: held-out language %r has no training pair.", language
      )

  sizes = {
      pair: {
          split: min(
              train_size if split == "train" else eval_size,
              len(split_values(pair[0], split, max_number)),
          )
          for split in SPLITS
      }
      for pair in pairs
  }
  return combinations.register(
      "numbers",
      ("task", "language"),
      sizes,
      lambda pair, split: examples(
          *pair, split, sizes[pair][split], max_number
      ),
      held_out=held,
      vocabulary=vocabulary,
      suffix=suffix,
  )


DEFAULT = register_numbers()

# The demo's grow step (README "Grow a trained model"): Dutch, which the demo
# model never saw, in every task but one held out (a new language with an old
# task, zero-shot).
GROW_LANGUAGE = "nl"
GROW_HELD_OUT = (("ordinal", GROW_LANGUAGE),)


def register_grown(
    base: combinations.Registration, suffix: str = "", **kwargs
) -> combinations.Registration:
  """Registers `GROW_LANGUAGE`'s tasks next to `base`'s, and the mixtures.

  `numbers_multitask_nl<suffix>` trains the new language (its held-out pair
  excluded); old and new pairs together: `numbers_multitask_with_nl<suffix>`
  (retraining from scratch) and `numbers_multitask_eval_with_nl<suffix>`
  (evaluation). `kwargs` go to `register_numbers` (use `base`'s
  `max_number` and `vocabulary`).
  """
  # Registered without a held-out pair (whose task would have no training
  # pair of this language only, a warning); its training mixture is
  # replaced below.
  grown = register_numbers(
      languages=(GROW_LANGUAGE,),
      held_out=(),
      suffix=f"_{GROW_LANGUAGE}{suffix}",
      **kwargs,
  )
  train_pairs = [p for p in grown.pairs if p not in GROW_HELD_OUT]

  def rated(*selected):
    return [
        (registration.task_names[p], registration.num_examples[p]["train"])
        for registration, pairs in selected
        for p in pairs
    ]

  featurized.add_mixture(grown.train_mixture, rated((grown, train_pairs)))
  featurized.add_mixture(
      f"numbers_multitask_with_{GROW_LANGUAGE}{suffix}",
      rated((base, base.train_pairs), (grown, train_pairs)),
  )
  featurized.add_mixture(
      f"numbers_multitask_eval_with_{GROW_LANGUAGE}{suffix}",
      rated((base, base.pairs), (grown, grown.pairs)),
  )
  return grown


GROWN = register_grown(DEFAULT)
