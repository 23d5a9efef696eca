"""Pre-training data for the numbers reproduction: span corruption.

Stands in for mT5's pre-training: a byte-level T5 base that has read the
spelled-out numbers of every mode (cardinal, ordinal, year, currency) in every
language, *including the held-out (task, language) pairs' words*, but never
the task format (`"ordinal fr: 12" -> "douzième"`). Adaptation then has to
learn the mapping from digits to words; for a held-out pair it can only
compose what the task and the language taught it, as in the paper, where mT5
knows every language but never saw the XTREME-UP task of a held-out pair.

Examples are T5-style span corruption over the spelled text alone (no task
name, no language code, no digits): random byte spans are replaced by
sentinels in the inputs and the targets are the sentinels followed by the
spans they hide:

  text     "douze mille trois cent quarante-deux"
  inputs   "douze m<X0>e trois cen<X1>quarante-deux"
  targets  "<X0>ill<X1>t <X2>"

Sentinels are the vocabulary's extra ids, from the top down (T5's
convention); `PRETRAIN_VOCABULARY` is the numbers ByteVocabulary with extra
ids up to the 384 embeddings of the byte-level presets. A share of the
examples (`prefix_rate`) hide one long span at the end of the text instead,
so the decoder also learns to write whole words.

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

from flix_tasks import featurized
from flix_tasks import numbers

PRETRAIN_VOCABULARY = seqio.ByteVocabulary(extra_ids=125)  # vocab_size 384
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(vocabulary=PRETRAIN_VOCABULARY, add_eos=True),
    "targets": seqio.Feature(vocabulary=PRETRAIN_VOCABULARY, add_eos=True),
}
DEFAULT_NAME = "numbers_pretrain"


def sentinel(index: int, vocabulary: seqio.ByteVocabulary = PRETRAIN_VOCABULARY
             ) -> int:
  """Token id of sentinel `index` (0 = the vocabulary's last id)."""
  return vocabulary.vocab_size - 1 - index


def spelled_texts(pairs: Sequence[tuple[str, str]], size: int,
                  max_number: int = numbers.DEFAULT_MAX_NUMBER
                  ) -> list[str]:
  """Spellings of up to `size` train-split numbers of every pair."""
  texts = []
  for task, language in pairs:
    for _, target in numbers.examples(task, language, "train", size,
                                      max_number):
      texts.append(target)
  return texts


def corrupt(tokens: Sequence[int], rng: np.random.Generator,
            noise_density: float = 0.3, mean_span_length: float = 4.0,
            prefix: bool = False,
            vocabulary: seqio.ByteVocabulary = PRETRAIN_VOCABULARY
            ) -> tuple[list[int], list[int]]:
  """T5 span corruption of one token list -> (inputs, targets), no EOS.

  Args:
    tokens: the text's token ids.
    rng: numpy random generator.
    noise_density: share of tokens masked.
    mean_span_length: mean length of a masked span.
    prefix: mask one span at the end instead (30-60% of the text).
    vocabulary: where the sentinel ids come from.

  Returns:
    `(inputs, targets)` token lists.
  """
  tokens = list(tokens)
  n = len(tokens)
  if n < 2:
    return tokens, [sentinel(0, vocabulary)]
  mask = np.zeros(n, bool)
  if prefix:
    cut = int(round(n * rng.uniform(0.4, 0.7)))
    cut = min(max(cut, 1), n - 1)
    mask[cut:] = True
  else:
    num_noise = min(max(int(round(n * noise_density)), 1), n - 1)
    num_spans = max(1, min(int(round(num_noise / mean_span_length)),
                           num_noise, n - num_noise))
    # Split noise and non-noise tokens into spans of random (>= 1) lengths.
    def _segments(total, parts):
      cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)
                     ) if parts > 1 else np.array([], int)
      return np.diff(np.concatenate([[0], cuts, [total]])).astype(int)
    noise = _segments(num_noise, num_spans)
    keep = _segments(n - num_noise, num_spans)
    start_with_noise = bool(rng.integers(2))
    position = 0
    for k, z in zip(keep, noise):
      if start_with_noise:
        mask[position:position + z] = True
        position += z + k
      else:
        position += k
        mask[position:position + z] = True
        position += z
  inputs, targets = [], []
  index = 0
  previous = False
  for token, masked in zip(tokens, mask):
    if masked:
      if not previous:
        inputs.append(sentinel(index, vocabulary))
        targets.append(sentinel(index, vocabulary))
        index += 1
      targets.append(token)
    else:
      inputs.append(token)
    previous = masked
  targets.append(sentinel(index, vocabulary))
  return inputs, targets


@functools.lru_cache(maxsize=4)
def corrupted_examples(pairs: tuple[tuple[str, str], ...], size: int,
                       copies: int, seed: int, noise_density: float,
                       mean_span_length: float, prefix_rate: float
                       ) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
  """`copies` corruptions of every text, as (inputs, targets) token arrays."""
  rng = np.random.default_rng(seed)
  inputs, targets = [], []
  for text in spelled_texts(pairs, size):
    tokens = PRETRAIN_VOCABULARY.encode(text)
    for _ in range(copies):
      x, y = corrupt(tokens, rng, noise_density, mean_span_length,
                     prefix=bool(rng.random() < prefix_rate))
      inputs.append(np.asarray(x, np.int32))
      targets.append(np.asarray(y, np.int32))
  order = rng.permutation(len(inputs))
  return (tuple(inputs[i] for i in order), tuple(targets[i] for i in order))


def _dataset_fn(split: str, shuffle_files: bool = False,
                seed: Optional[int] = None, *, pairs, size, copies,
                noise_density, mean_span_length, prefix_rate,
                num_validation) -> tf.data.Dataset:
  del shuffle_files, seed  # Deterministic; the Task shuffles examples.
  if split == "train":
    inputs, targets = corrupted_examples(pairs, size, copies, 0,
                                         noise_density, mean_span_length,
                                         prefix_rate)
  else:
    inputs, targets = corrupted_examples(pairs, size, 1, 1, noise_density,
                                         mean_span_length, prefix_rate)
    inputs, targets = inputs[:num_validation], targets[:num_validation]
  return tf.data.Dataset.from_tensor_slices({
      "inputs": tf.ragged.constant([x.tolist() for x in inputs],
                                   dtype=tf.int32),
      "targets": tf.ragged.constant([y.tolist() for y in targets],
                                    dtype=tf.int32),
  })


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

  Returns:
    The registered task; it carries no FLix features.
  """
  pairs = numbers.working_pairs(tuple(tasks), tuple(languages))
  if not pairs:
    raise ValueError(f"No working (task, language) pair in {tasks} x "
                     f"{languages}.")
  num = len(pairs) * size * copies
  logging.info("%s: %d pairs, ~%d examples.", name, len(pairs), num)
  source = seqio.FunctionDataSource(
      dataset_fn=functools.partial(
          _dataset_fn, pairs=tuple(pairs), size=size, copies=copies,
          noise_density=noise_density, mean_span_length=mean_span_length,
          prefix_rate=prefix_rate, num_validation=num_validation),
      splits=("train", "validation"))
  return featurized.add_task(
      name,
      source=source,
      preprocessors=[seqio.preprocessors.append_eos_after_trim],
      output_features=OUTPUT_FEATURES,
      features=None)


DEFAULT = register_pretrain()
