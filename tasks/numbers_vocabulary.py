"""A SentencePiece vocabulary for the numbers tasks, trained offline.

mT5 reads and writes SentencePiece pieces, not bytes. A byte-level model
spelling "quatre-vingt-dix-neuf euros et quatre-vingt-dix-sept centimes" must
get 61 bytes right in a row; with pieces trained on the numbers' own words it
writes 20 pieces (`▁quatre - vingt - dix - neuf ▁euro s ...`), which a small
model learns in far fewer steps. The reproduction (scripts/reproduce.py)
uses it; the byte-level `numbers.VOCABULARY` stays the default elsewhere.

The model is trained on the texts of the train split only (inputs and
targets of every pair), with digits split into single pieces, so no
validation or test number shapes the vocabulary. Training is deterministic
(one thread) and the model file is cached under `cache_dir`, named by a hash
of its settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Sequence

import seqio
import sentencepiece

from flix_tasks import numbers

# T5's special ids: pad 0, EOS 1, unknown 2, no BOS.
_SPECIAL_IDS = {"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1}


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


def train_sentencepiece(texts: Sequence[str], vocab_size: int) -> bytes:
  """A unigram SentencePiece model of `texts` (serialised proto).

  `vocab_size` is an upper bound: a small corpus gets fewer pieces.
  """
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=model,
      vocab_size=vocab_size,
      model_type="unigram",
      split_digits=True,
      character_coverage=1.0,
      num_threads=1,
      minloglevel=2,
      hard_vocab_limit=False,
      **_SPECIAL_IDS,
  )
  return model.getvalue()


def sentencepiece_vocabulary(
    pairs: Sequence[tuple[str, str]],
    cache_dir: str,
    vocab_size: int = 1000,
    extra_ids: int = 100,
    size: int = numbers.DEFAULT_TRAIN_SIZE,
    max_number: int = numbers.DEFAULT_MAX_NUMBER,
) -> seqio.SentencePieceVocabulary:
  """The numbers' SentencePiece vocabulary (trained once, then cached).

  Args:
    pairs: `(task, language)` pairs whose train texts train the model.
    cache_dir: where the model file is written and found again.
    vocab_size: pieces of the SentencePiece model (special ids included; at
      most, a small corpus gets fewer).
    extra_ids: sentinels appended on top (span corruption), so the model's
      embedding needs `vocab_size + extra_ids` rows.
    size: train-split numbers per pair.
    max_number: the numbers' range (`numbers.register_numbers`'s).

  Returns:
    A `seqio.SentencePieceVocabulary` with `vocab_size + extra_ids` ids.
  """
  settings = {
      "pairs": [list(p) for p in pairs],
      "vocab_size": vocab_size,
      "size": size,
      "max_number": max_number,
      "sentencepiece": sentencepiece.__version__,
  }
  key = hashlib.sha256(
      json.dumps(settings, sort_keys=True).encode()
  ).hexdigest()[:12]
  path = os.path.join(cache_dir, f"numbers_spm-{key}.model")
  if not os.path.exists(path):
    os.makedirs(cache_dir, exist_ok=True)
    proto = train_sentencepiece(
        training_texts(pairs, size, max_number), vocab_size
    )
    # Atomic: concurrent runs never read a half-written model.
    handle, temporary = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(handle, "wb") as f:
      f.write(proto)
    os.replace(temporary, path)
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
