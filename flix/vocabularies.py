"""The one place that decides a model's vocabulary (SentencePiece or bytes).

A training run records its mixture's vocabulary with every checkpoint (meta
key 'vocabulary', `record`); flix.infer, flix.eval, flix.export and the T5X
plug-in get it back with `vocabulary_for_checkpoint`. A run without one (or
a caller who wants to say it) names it in gin: `VOCABULARY = 'bytes'` or a
SentencePiece `.model` path (`vocabulary_from_config`); named and recorded
vocabularies must then agree.

Recorded forms:

  {"type": "bytes", "extra_ids": n, "size": N}
  {"type": "sentencepiece", "sha256": ..., "size": N, "extra_ids": n,
   "reverse_extra_ids": bool, "source": <the .model path trained with>,
   "file": <its copy, MODEL_DIR/vocabulary/spm-<sha256[:16]>.model>}

A SentencePiece copy is the tokenizer's complete model proto (seqio's
`sp_model`: extra ids and normalizer overrides included), loaded with
extra_ids=0: every piece, id and the size are the training run's. `sha256`
is that proto's digest; the copy is looked for next to the checkpoint (a
moved MODEL_DIR), at the recorded path, then as the source (rebuilt with its
extra ids), and whichever is found must have that digest.

Inconsistencies are errors: a vocabulary with more ids than the model has
embedding rows, a named vocabulary or a task's that differs from the
recorded one, a SentencePiece file whose digest differs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Mapping, Optional, Union

import seqio
import tensorflow as tf

from flix import checkpoints

VOCABULARY_DIR = "vocabulary"
META_KEY = "vocabulary"

VocabularySpec = Union[None, str, seqio.Vocabulary]


def _sha256(vocabulary: seqio.SentencePieceVocabulary) -> str:
  return hashlib.sha256(vocabulary.sp_model).hexdigest()


def fingerprint(vocabulary: seqio.Vocabulary) -> tuple[Any, ...]:
  """What two vocabularies must share to tokenize identically."""
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    return ("sentencepiece", _sha256(vocabulary))
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return ("bytes", vocabulary.extra_ids)
  return (type(vocabulary).__name__, str(vocabulary))


def describe(vocabulary: seqio.Vocabulary) -> str:
  """One line naming a vocabulary, e.g. for error messages."""
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    return (
        f"SentencePiece {vocabulary.sentencepiece_model_file} "
        f"({vocabulary.vocab_size} ids, sha256 {_sha256(vocabulary)[:16]})"
    )
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return f"bytes ({vocabulary.vocab_size} ids)"
  return str(vocabulary)


def check_same(
    vocabulary: seqio.Vocabulary, expected: seqio.Vocabulary, what: str
) -> None:
  """Raises unless `vocabulary` (named by `what`) tokenizes as `expected`."""
  if fingerprint(vocabulary) != fingerprint(expected):
    raise ValueError(
        f"{what} is {describe(vocabulary)}, but the model was trained with "
        f"{describe(expected)}: its token ids would mean other pieces."
    )


def check_fits(
    vocabulary: seqio.Vocabulary, embedding_rows: int, where: str = ""
) -> None:
  """Raises if the vocabulary has ids the model has no embedding row for."""
  if vocabulary.vocab_size > embedding_rows:
    raise ValueError(
        f"The vocabulary {describe(vocabulary)} has {vocabulary.vocab_size} "
        f"token ids, but the model{' ' + where if where else ''} has "
        f"{embedding_rows} embedding rows (network vocab_size): this is not "
        "the model's vocabulary."
    )


def mixture_vocabulary(mixture_or_task_name: str) -> seqio.Vocabulary:
  """The vocabulary of a SeqIO mixture's (or task's) output features."""
  features = seqio.get_mixture_or_task(mixture_or_task_name).output_features
  vocabulary = features["targets"].vocabulary
  if "inputs" in features:
    check_same(
        features["inputs"].vocabulary,
        vocabulary,
        f"{mixture_or_task_name}'s inputs vocabulary (flix uses one "
        "vocabulary for inputs and targets)",
    )
  return vocabulary


def vocabulary_from_config(
    vocabulary: VocabularySpec, extra_ids: int = 0
) -> Optional[seqio.Vocabulary]:
  """A vocabulary named in gin: 'bytes', a SentencePiece .model path, a
  `seqio.Vocabulary`, or None (none named)."""
  if vocabulary is None or isinstance(vocabulary, seqio.Vocabulary):
    return vocabulary
  if not isinstance(vocabulary, str):
    raise ValueError(
        f"VOCABULARY {vocabulary!r}: give 'bytes', a SentencePiece .model "
        "path or a seqio.Vocabulary."
    )
  if vocabulary == "bytes":
    return seqio.ByteVocabulary(extra_ids=extra_ids)
  if not tf.io.gfile.exists(vocabulary):
    raise FileNotFoundError(
        f"VOCABULARY {vocabulary}: no such file; give 'bytes' or a "
        "SentencePiece .model path."
    )
  return _load_sentencepiece(vocabulary, extra_ids, True)


def _load_sentencepiece(
    path: str, extra_ids: int, reverse_extra_ids: bool
) -> seqio.SentencePieceVocabulary:
  vocabulary = seqio.SentencePieceVocabulary(
      path, extra_ids=extra_ids, reverse_extra_ids=reverse_extra_ids
  )
  try:
    vocabulary.load_model()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is not a SentencePiece model ({e}).") from e
  return vocabulary


def run_meta(
    model,
    mixture_or_task_name: str,
    trainable_patterns,
    initial_checkpoint_path: Optional[str],
    random_seed: Optional[int],
    model_dir: Optional[str] = None,
) -> dict:
  """`checkpoints.run_meta` of a run on `mixture_or_task_name`, with the
  record of the mixture's vocabulary (which must fit the model's embedding,
  `check_fits`); `model_dir` as in `record`."""
  vocabulary = mixture_vocabulary(mixture_or_task_name)
  check_fits(vocabulary, model.config.vocab_size)
  meta = checkpoints.run_meta(
      model,
      trainable_patterns,
      initial_checkpoint_path,
      random_seed,
      mixture_or_task_name,
  )
  meta[META_KEY] = record(vocabulary, model_dir)
  return meta


def record(
    vocabulary: seqio.Vocabulary, model_dir: Optional[str] = None
) -> Optional[dict]:
  """The meta record of a run's vocabulary; copies a SentencePiece model
  into `model_dir`/vocabulary/ (once per content; without `model_dir`, the
  record without its "file", e.g. to compare with a saved one)."""
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return {
        "type": "bytes",
        "extra_ids": vocabulary.extra_ids,
        "size": vocabulary.vocab_size,
    }
  if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
    logging.warning(
        "The vocabulary %s is not recorded with the checkpoints (only "
        "SentencePiece and bytes are); name it with VOCABULARY for "
        "inference.",
        vocabulary,
    )
    return None
  digest = _sha256(vocabulary)
  entry = {
      "type": "sentencepiece",
      "sha256": digest,
      "size": vocabulary.vocab_size,
      "extra_ids": vocabulary.extra_ids,
      "reverse_extra_ids": vocabulary._reverse_extra_ids,  # pylint: disable=protected-access
      "source": vocabulary.sentencepiece_model_file,
  }
  if model_dir is None:
    return entry
  directory = os.path.join(model_dir, VOCABULARY_DIR)
  path = os.path.join(directory, f"spm-{digest[:16]}.model")
  if not tf.io.gfile.exists(path):
    tf.io.gfile.makedirs(directory)
    temporary = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(temporary, "wb") as f:
      f.write(vocabulary.sp_model)
    tf.io.gfile.rename(temporary, path, overwrite=True)
  return {**entry, "file": path}


def _model_dir_of(checkpoint: str) -> Optional[str]:
  """The MODEL_DIR of a flix checkpoint path (MODEL_DIR, checkpoints/, step)."""
  path = os.path.abspath(checkpoint)
  for _ in range(3):
    if os.path.isdir(os.path.join(path, VOCABULARY_DIR)):
      return path
    path = os.path.dirname(path)
  return None


def from_record(
    entry: Mapping[str, Any], model_dir: Optional[str] = None
) -> seqio.Vocabulary:
  """Rebuilds a recorded vocabulary (see the module docstring)."""
  if entry.get("type") == "bytes":
    return seqio.ByteVocabulary(extra_ids=int(entry.get("extra_ids", 0)))
  if entry.get("type") != "sentencepiece":
    raise ValueError(f"Unknown recorded vocabulary {dict(entry)}.")
  copies = [entry["file"]]
  if model_dir:
    copies.insert(
        0, os.path.join(model_dir, VOCABULARY_DIR, os.path.basename(copies[0]))
    )
  candidates = [(path, 0, True) for path in copies] + [
      (
          entry["source"],
          int(entry.get("extra_ids", 0)),
          bool(entry.get("reverse_extra_ids", True)),
      )
  ]
  differing = []
  for path, extra_ids, reverse in candidates:
    if not tf.io.gfile.exists(path):
      continue
    vocabulary = _load_sentencepiece(path, extra_ids, reverse)
    if _sha256(vocabulary) == entry["sha256"]:
      return vocabulary
    differing.append(f"{path} (sha256 {_sha256(vocabulary)[:16]})")
  if differing:
    raise ValueError(
        f"The SentencePiece model recorded with the checkpoint (sha256 "
        f"{entry['sha256'][:16]}) differs from {', '.join(differing)}: the "
        "file changed since training."
    )
  raise FileNotFoundError(
      "The checkpoint's SentencePiece model is gone: none of "
      f"{', '.join(dict.fromkeys(p for p, _, _ in candidates))} exists. "
      "Name it with VOCABULARY (its sha256 must be "
      f"{entry['sha256'][:16]}...)."
  )


def vocabulary_for_checkpoint(
    checkpoint: Union[str, Mapping[str, Any]],
    configured: VocabularySpec = None,
    embedding_rows: Optional[int] = None,
    required: bool = True,
) -> Optional[seqio.Vocabulary]:
  """The vocabulary of a flix checkpoint: the recorded one, else the named.

  Args:
    checkpoint: a flix checkpoint path (MODEL_DIR, its checkpoints/ or a
      step directory) or its meta dict.
    configured: a vocabulary named in gin (see `vocabulary_from_config`);
      with a recorded one it must agree.
    embedding_rows: the model's vocab_size, checked besides the recorded
      model config's.
    required: without a recorded or named vocabulary, raise (True) or
      return None (callers that can use a task's own, e.g. evaluation).

  Returns:
    The vocabulary, checked against the model's embedding rows.

  Raises:
    ValueError: no vocabulary recorded or named; named and recorded differ;
      more ids than embedding rows; a SentencePiece file that changed.
  """
  if isinstance(checkpoint, str):
    meta, model_dir, where = (
        checkpoints.read_meta(checkpoint),
        _model_dir_of(checkpoint),
        checkpoint,
    )
  else:
    meta, model_dir, where = checkpoint, None, "the checkpoint"
  entry = meta.get(META_KEY)
  recorded = from_record(entry, model_dir) if entry else None
  named = vocabulary_from_config(configured)
  if recorded is not None and named is not None:
    check_same(named, recorded, "VOCABULARY")
  vocabulary = recorded or named
  if vocabulary is None and not required:
    return None
  if vocabulary is None:
    raise ValueError(
        f"{where} records no vocabulary (trained before flix recorded one); "
        'name it with --gin.VOCABULARY=\\"bytes\\" or a SentencePiece '
        ".model path."
    )
  for rows in (
      (meta.get("model_config") or {}).get("vocab_size"),
      embedding_rows,
  ):
    if rows:
      check_fits(vocabulary, int(rows), f"of {where}")
  return vocabulary


def check_task(task_name: str, vocabulary: seqio.Vocabulary) -> None:
  """Raises unless a SeqIO task tokenizes with the model's vocabulary."""
  check_same(
      mixture_vocabulary(task_name),
      vocabulary,
      f"Task {task_name}'s vocabulary",
  )


def write_sentencepiece(vocabulary: seqio.Vocabulary, directory: str) -> bool:
  """Writes a SentencePiece vocabulary as `directory`/spiece.model (the
  file name of transformers' T5 tokenizers); False for other kinds."""
  if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
    return False
  tf.io.gfile.makedirs(directory)
  with tf.io.gfile.GFile(os.path.join(directory, "spiece.model"), "wb") as f:
    f.write(vocabulary.sp_model)
  return True
