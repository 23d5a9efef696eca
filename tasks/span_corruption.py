"""T5 span corruption over a dataset's own texts: a small base's pre-training.

Stands in for mT5's pre-training in scripts/reproduce.py: a base that has
read the texts a dataset's targets are made of (every feature combination's,
held-out ones included) but never the task format. Each text may carry a
`lead` (e.g. the digits of a spelled number, "994"): the text is then
"<lead> <text>" and the examples that hide the end of it hide exactly the
text after the lead, so the base learns to write a text from its lead (to
read a number and spell it in some language and mode).

Examples are T5-style span corruption: random token spans are replaced by
sentinels in the inputs and the targets are the sentinels followed by the
spans they hide (here with bytes):

  text     "douze mille trois cent quarante-deux"
  inputs   "douze m<X0>e trois cen<X1>quarante-deux"
  targets  "<X0>ill<X1>t <X2>"

Sentinels are the vocabulary's extra ids, from the top down (T5's
convention). A share of the examples (`prefix_rate`) hide one long span at
the end of the text instead, so the decoder also learns to write whole texts.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from flix import featurized

Text = tuple[str, str]  # (lead, text); lead "" for none.


def sentinel(index: int, vocab_size: int) -> int:
  """Token id of sentinel `index` (0 = the vocabulary's last id)."""
  return vocab_size - 1 - index


def tokenize(
    lead: str, text: str, vocabulary: seqio.Vocabulary
) -> tuple[tuple[int, ...], int]:
  """Tokens of "<lead> <text>" (or the text alone) and how many of them
  are the lead's (0 without a lead)."""
  if not lead:
    return tuple(vocabulary.encode(text)), 0
  return (
      tuple(vocabulary.encode(f"{lead} {text}")),
      len(vocabulary.encode(lead)),
  )


def corrupt(
    tokens: Sequence[int],
    rng: np.random.Generator,
    vocab_size: int,
    noise_density: float = 0.3,
    mean_span_length: float = 4.0,
    prefix: bool = False,
    prefix_cut: int = 0,
) -> tuple[list[int], list[int]]:
  """T5 span corruption of one token list -> (inputs, targets), no EOS.

  Args:
    tokens: the text's token ids.
    rng: numpy random generator.
    vocab_size: the vocabulary's size; sentinels are its top ids.
    noise_density: share of tokens masked.
    mean_span_length: mean length of a masked span.
    prefix: mask one span at the end instead (40-70% of the text).
    prefix_cut: with `prefix`, mask everything after this many tokens (the
      lead of a "<lead> <text>" text, e.g. a number's digits: the model
      reads the number and writes its words); 0 = a random cut.

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
  for tokens, lead_length in texts:
    for _ in range(copies):
      x, y = corrupt(
          tokens,
          rng,
          vocab_size,
          noise_density,
          mean_span_length,
          prefix=bool(rng.random() < prefix_rate),
          prefix_cut=lead_length,
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


def register(
    name: str,
    texts_fn: Callable[[], Sequence[Text]],
    vocabulary: seqio.Vocabulary,
    copies: int = 2,
    noise_density: float = 0.3,
    mean_span_length: float = 4.0,
    prefix_rate: float = 0.3,
    num_validation: int = 256,
) -> seqio.Task:
  """Registers (or replaces) a span-corruption task over `texts_fn()`.

  Args:
    name: task name.
    texts_fn: returns the `(lead, text)` texts; called when the dataset is
      first built, so registering stays cheap.
    vocabulary: tokenizes the texts; its top `extra_ids` are the sentinels.
    copies: corruptions per text (different masks).
    noise_density: share of tokens masked.
    mean_span_length: mean masked span, in tokens.
    prefix_rate: share of examples that hide the end of the text instead
      (all of it after a lead).
    num_validation: examples of the (unused) validation split, corrupted
      from the first texts with another seed.

  Returns:
    The registered task; it carries no FLix features.
  """
  if not vocabulary.extra_ids:
    raise ValueError("Span corruption needs a vocabulary with extra ids.")

  @functools.lru_cache(maxsize=1)
  def tokenized_texts():
    texts = texts_fn()
    if not texts:
      raise ValueError(f"{name}: no text to pre-train on.")
    return tuple(tokenize(lead, text, vocabulary) for lead, text in texts)

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
      output_features={
          key: seqio.Feature(vocabulary=vocabulary, add_eos=True)
          for key in ("inputs", "targets")
      },
      features=None,
  )
