"""Pre-training data for the numbers reproduction: span corruption.

Stands in for mT5's pre-training: a small T5 base that has read the
spelled-out numbers of every mode (cardinal, ordinal, year, currency) in every
language, *including the held-out (task, language) pairs' words*, but never
the task format (`"ordinal fr: 12" -> "douzième"`). Adaptation then has to
learn the format and which mode and language to write; for a held-out pair it
can only compose what the task and the language taught it, as in the paper,
where mT5 knows every language but never saw the XTREME-UP task of a held-out
pair.

Examples are T5-style span corruption over the spelled text (no task name,
no language code; a `digits_rate` share of the texts starts with the
number's digits, as numbers appear in running text): random token spans are
replaced by sentinels in the inputs and the targets are the sentinels
followed by the spans they hide (here with bytes):

  text     "douze mille trois cent quarante-deux"
  inputs   "douze m<X0>e trois cen<X1>quarante-deux"
  targets  "<X0>ill<X1>t <X2>"

Sentinels are the vocabulary's extra ids, from the top down (T5's
convention); `PRETRAIN_VOCABULARY` (the default) is the numbers ByteVocabulary
with extra ids up to the 384 embeddings of the byte-level presets; any
vocabulary with extra ids works (the reproduction uses the SentencePiece one
of `numbers_vocabulary`). A share of the examples (`prefix_rate`) hide one
long span at the end of the text instead, so the decoder also learns to write
whole words; where the text starts with digits, the span is the whole
spelling: the base learns to read a number and write it in some language and
mode, and adaptation teaches which.

Only numbers of the train split (`numbers.split_values(..., "train")`) are
used, so no validation or test number of the adaptation tasks leaks into the
base. Registered at import: `numbers_pretrain` (train split only; its
validation split holds a few examples for completeness, also from train
numbers but another corruption).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from flix import featurized
from flix_tasks import numbers

PRETRAIN_VOCABULARY = seqio.ByteVocabulary(extra_ids=125)  # vocab_size 384
DEFAULT_NAME = "numbers_pretrain"


def sentinel(
    index: int, vocab_size: int = PRETRAIN_VOCABULARY.vocab_size
) -> int:
  """Token id of sentinel `index` (0 = the vocabulary's last id)."""
  return vocab_size - 1 - index


def spelled_texts(
    pairs: Sequence[tuple[str, str]],
    size: int,
    max_number: int = numbers.DEFAULT_MAX_NUMBER,
    digits_rate: float = 0.0,
) -> list[tuple[str, str]]:
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


def tokenize(
    digits: str, spelling: str, vocabulary: seqio.Vocabulary
) -> tuple[tuple[int, ...], int]:
  """Tokens of "<digits> <spelling>" (or the spelling alone) and how many
  of them spell the digits (0 without digits)."""
  if not digits:
    return tuple(vocabulary.encode(spelling)), 0
  return (
      tuple(vocabulary.encode(f"{digits} {spelling}")),
      len(vocabulary.encode(digits)),
  )


def corrupt(
    tokens: Sequence[int],
    rng: np.random.Generator,
    noise_density: float = 0.3,
    mean_span_length: float = 4.0,
    prefix: bool = False,
    vocab_size: int = PRETRAIN_VOCABULARY.vocab_size,
    prefix_cut: int = 0,
) -> tuple[list[int], list[int]]:
  """T5 span corruption of one token list -> (inputs, targets), no EOS.

  Args:
    tokens: the text's token ids.
    rng: numpy random generator.
    noise_density: share of tokens masked.
    mean_span_length: mean length of a masked span.
    prefix: mask one span at the end instead (30-60% of the text).
    vocab_size: the vocabulary's size; sentinels are its top ids.
    prefix_cut: with `prefix`, mask everything after this many tokens (the
      digits of a "<digits> <spelling>" text: the model reads the number
      and writes its words); 0 = a random cut.

  Returns:
    `(inputs, targets)` token lists.
  """
  tokens = list(tokens)
  n = len(tokens)
  if n < 2:
    return tokens, [sentinel(0, vocab_size)]
  mask = np.zeros(n, bool)
  if prefix:
    cut = prefix_cut or int(round(n * rng.uniform(0.4, 0.7)))
    cut = min(max(cut, 1), n - 1)
    mask[cut:] = True
  else:
    num_noise = min(max(int(round(n * noise_density)), 1), n - 1)
    num_spans = max(
        1,
        min(int(round(num_noise / mean_span_length)), num_noise, n - num_noise),
    )

    # Split noise and non-noise tokens into spans of random (>= 1) lengths.
    def _segments(total, parts):
      cuts = (
          np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
          if parts > 1
          else np.array([], int)
      )
      return np.diff(np.concatenate([[0], cuts, [total]])).astype(int)

    noise = _segments(num_noise, num_spans)
    keep = _segments(n - num_noise, num_spans)
    start_with_noise = bool(rng.integers(2))
    position = 0
    for k, z in zip(keep, noise):
      if start_with_noise:
        mask[position : position + z] = True
        position += z + k
      else:
        position += k
        mask[position : position + z] = True
        position += z
  inputs, targets = [], []
  index = 0
  previous = False
  for token, masked in zip(tokens, mask):
    if masked:
      if not previous:
        inputs.append(sentinel(index, vocab_size))
        targets.append(sentinel(index, vocab_size))
        index += 1
      targets.append(token)
    else:
      inputs.append(token)
    previous = masked
  targets.append(sentinel(index, vocab_size))
  return inputs, targets


def corrupted_examples(
    texts: Sequence[tuple[Sequence[int], int]],
    vocab_size: int,
    copies: int,
    seed: int,
    noise_density: float,
    mean_span_length: float,
    prefix_rate: float,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
  """`copies` corruptions of every `tokenize`d text, as (inputs, targets)."""
  rng = np.random.default_rng(seed)
  inputs, targets = [], []
  for tokens, digits_length in texts:
    for _ in range(copies):
      x, y = corrupt(
          tokens,
          rng,
          noise_density,
          mean_span_length,
          prefix=bool(rng.random() < prefix_rate),
          vocab_size=vocab_size,
          prefix_cut=digits_length,
      )
      inputs.append(np.asarray(x, np.int32))
      targets.append(np.asarray(y, np.int32))
  order = rng.permutation(len(inputs))
  return (tuple(inputs[i] for i in order), tuple(targets[i] for i in order))


def _dataset_fn(
    split: str,
    shuffle_files: bool = False,
    seed: Optional[int] = None,
    *,
    texts_fn,
    vocab_size,
    copies,
    noise_density,
    mean_span_length,
    prefix_rate,
    num_validation,
) -> tf.data.Dataset:
  del shuffle_files, seed  # Deterministic; the Task shuffles examples.
  texts = texts_fn()
  if split == "train":
    inputs, targets = corrupted_examples(
        texts,
        vocab_size,
        copies,
        0,
        noise_density,
        mean_span_length,
        prefix_rate,
    )
  else:
    inputs, targets = corrupted_examples(
        texts[:num_validation],
        vocab_size,
        1,
        1,
        noise_density,
        mean_span_length,
        prefix_rate,
    )
  return tf.data.Dataset.from_tensor_slices(
      {
          "inputs": tf.ragged.constant(
              [x.tolist() for x in inputs], dtype=tf.int32
          ),
          "targets": tf.ragged.constant(
              [y.tolist() for y in targets], dtype=tf.int32
          ),
      }
  )


def register_pretrain(
    name: str = DEFAULT_NAME,
    languages: Sequence[str] = numbers.DEFAULT_LANGUAGES,
    tasks: Sequence[str] = numbers.TASKS,
    size: int = 1000,
    copies: int = 2,
    noise_density: float = 0.3,
    mean_span_length: float = 4.0,
    prefix_rate: float = 0.3,
    num_validation: int = 256,
    max_number: int = numbers.DEFAULT_MAX_NUMBER,
    vocabulary: seqio.Vocabulary = PRETRAIN_VOCABULARY,
    digits_rate: float = 0.0,
) -> seqio.Task:
  """Registers (or replaces) the span-corruption task over spelled numbers.

  Args:
    name: task name.
    languages: num2words languages (every mode num2words implements for each
      is used, held-out pairs of the adaptation mixture included).
    tasks: number modes.
    size: train-split numbers spelled per (mode, language).
    copies: corruptions per text (different masks).
    noise_density: share of bytes masked.
    mean_span_length: mean masked span, in bytes.
    prefix_rate: share of examples that mask the end of the text instead.
    num_validation: examples of the (unused) validation split.
    max_number: the numbers' range (`numbers.register_numbers`'s).
    vocabulary: tokenizes the texts; its top `extra_ids` are the sentinels.
    digits_rate: share of texts preceded by their digits, as numbers appear
      in running text (never with a task name or a language code); their
      `prefix_rate` share hides the whole spelling after the digits.

  Returns:
    The registered task; it carries no FLix features.
  """
  pairs = numbers.working_pairs(tuple(tasks), tuple(languages))
  if not pairs:
    raise ValueError(
        f"No working (task, language) pair in {tasks} x " f"{languages}."
    )
  if not vocabulary.extra_ids:
    raise ValueError(
        "Span corruption needs a vocabulary with extra ids " "(sentinels)."
    )

  @functools.lru_cache(maxsize=1)
  def tokenized_texts():  # On first use: registering at import stays cheap.
    return tuple(
        tokenize(digits, spelling, vocabulary)
        for digits, spelling in spelled_texts(
            pairs, size, max_number, digits_rate
        )
    )

  logging.info(
      "%s: %d pairs, ~%d examples.",
      name,
      len(pairs),
      len(pairs) * size * copies,
  )
  source = seqio.FunctionDataSource(
      dataset_fn=functools.partial(
          _dataset_fn,
          texts_fn=tokenized_texts,
          vocab_size=vocabulary.vocab_size,
          copies=copies,
          noise_density=noise_density,
          mean_span_length=mean_span_length,
          prefix_rate=prefix_rate,
          num_validation=num_validation,
      ),
      splits=("train", "validation"),
  )
  return featurized.add_task(
      name,
      source=source,
      preprocessors=[seqio.preprocessors.append_eos_after_trim],
      output_features=numbers.output_features(vocabulary),
      features=None,
  )


DEFAULT = register_pretrain()
