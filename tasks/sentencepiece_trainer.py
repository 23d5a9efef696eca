"""SentencePiece vocabularies trained on a dataset's own texts, cached.

mT5 reads and writes SentencePiece pieces, not bytes. A byte-level model
spelling "quatre-vingt-dix-neuf euros et quatre-vingt-dix-sept centimes" must
get 61 bytes right in a row; with pieces trained on the data's own words it
writes 20 pieces (`▁quatre - vingt - dix - neuf ▁euro s ...`), which a small
model learns in far fewer steps. scripts/reproduce.py trains one on the train
split of its data (the numbers mixture or any featurized JSONL).

A unigram model with digits split into single pieces and T5's special ids
(pad 0, EOS 1, unknown 2), trained deterministically (one thread); the model
file is cached under `cache_dir`, named by a hash of the texts and settings.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from typing import Sequence

import seqio
import sentencepiece

EXTRA_IDS = 100  # Sentinels on top of the pieces (span corruption).
# T5's special ids: pad 0, EOS 1, unknown 2, no BOS.
_SPECIAL_IDS = {"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1}


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
    texts: Sequence[str],
    cache_dir: str,
    vocab_size: int = 1000,
    extra_ids: int = EXTRA_IDS,
) -> seqio.SentencePieceVocabulary:
  """The SentencePiece vocabulary of `texts` (trained once, then cached).

  Args:
    texts: the training texts (a dataset's train split).
    cache_dir: where the model file is written and found again.
    vocab_size: pieces of the SentencePiece model (special ids included; at
      most, a small corpus gets fewer).
    extra_ids: sentinels appended on top (span corruption), so the model's
      embedding needs `vocab_size + extra_ids` rows.

  Returns:
    A `seqio.SentencePieceVocabulary`.
  """
  if not texts:
    raise ValueError("No text to train a SentencePiece vocabulary on.")
  digest = hashlib.sha256(f"{vocab_size} {sentencepiece.__version__}".encode())
  for text in texts:
    digest.update(text.encode("utf-8") + b"\0")
  path = os.path.join(cache_dir, f"spm-{digest.hexdigest()[:12]}.model")
  if not os.path.exists(path):
    os.makedirs(cache_dir, exist_ok=True)
    proto = train_sentencepiece(texts, vocab_size)
    # Atomic: concurrent runs never read a half-written model.
    handle, temporary = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(handle, "wb") as f:
      f.write(proto)
    os.replace(temporary, path)
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
