"""Tests for flix.vocabularies: the one place that decides the vocabulary."""

import os
import shutil

import pytest
import seqio

from flix import vocabularies
from flix_tasks import sentencepiece_trainer

_TEXTS = [
    f"{word} {number} habari za asubuhi rafiki yangu"
    for number in range(60)
    for word in ("Paka analala", "Die Katze schläft", "weka kengele")
]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("spm") / "test.model"
  path.write_bytes(sentencepiece_trainer.train_sentencepiece(_TEXTS, 120))
  return str(path)


def _meta(entry, vocab_size=200):
  return {"vocabulary": entry, "model_config": {"vocab_size": vocab_size}}


def _encodings(vocabulary):
  return [list(vocabulary.encode(t)) for t in _TEXTS[:9] + ["<extra_id_0> x"]]


@pytest.mark.parametrize("extra_ids", [0, 7])
def test_sentencepiece_round_trips_through_the_record(
    spm_path, tmp_path, extra_ids
):
  original = seqio.SentencePieceVocabulary(spm_path, extra_ids=extra_ids)
  entry = vocabularies.record(original, str(tmp_path / "run"))
  assert entry["type"] == "sentencepiece"
  assert entry["size"] == original.vocab_size
  assert os.path.dirname(entry["file"]) == str(tmp_path / "run/vocabulary")
  # The training file may go away: the copy in MODEL_DIR is enough.
  moved = str(tmp_path / "moved.model")
  shutil.copy(spm_path, moved)
  entry = {**entry, "source": moved}
  os.remove(moved)
  again = vocabularies.vocabulary_for_checkpoint(_meta(entry))
  assert again.vocab_size == original.vocab_size
  assert _encodings(again) == _encodings(original)
  assert vocabularies.fingerprint(again) == vocabularies.fingerprint(original)
  ids = list(range(3, original.vocab_size))
  assert again.decode(ids) == original.decode(ids)


def test_a_moved_model_dir_finds_its_copy(spm_path, tmp_path):
  original = seqio.SentencePieceVocabulary(spm_path)
  entry = vocabularies.record(original, str(tmp_path / "run"))
  os.rename(tmp_path / "run", tmp_path / "elsewhere")
  found = vocabularies.from_record(entry, str(tmp_path / "elsewhere"))
  assert vocabularies.fingerprint(found) == vocabularies.fingerprint(original)
  # Copy and recorded path gone: the source, rebuilt with its extra ids.
  shutil.rmtree(tmp_path / "elsewhere")
  assert _encodings(vocabularies.from_record(entry)) == _encodings(original)


def test_a_changed_sentencepiece_file_is_an_error(spm_path, tmp_path):
  entry = vocabularies.record(
      seqio.SentencePieceVocabulary(spm_path), str(tmp_path / "run")
  )
  other = sentencepiece_trainer.train_sentencepiece(_TEXTS[::2], 100)
  with open(entry["file"], "wb") as f:
    f.write(other)
  source = str(tmp_path / "source.model")
  with open(source, "wb") as f:
    f.write(other)
  with pytest.raises(ValueError, match="differs from .*the file changed"):
    vocabularies.from_record({**entry, "source": source})
  os.remove(entry["file"])
  os.remove(source)
  with pytest.raises(FileNotFoundError, match="SentencePiece model is gone"):
    vocabularies.from_record({**entry, "source": source})


def test_named_and_recorded_vocabularies_must_agree(spm_path, tmp_path):
  entry = vocabularies.record(
      seqio.SentencePieceVocabulary(spm_path), str(tmp_path)
  )
  same = vocabularies.vocabulary_for_checkpoint(_meta(entry), spm_path)
  assert same.vocab_size == seqio.SentencePieceVocabulary(spm_path).vocab_size
  with pytest.raises(ValueError, match="VOCABULARY is bytes .* trained with"):
    vocabularies.vocabulary_for_checkpoint(_meta(entry), "bytes")
  byte_entry = vocabularies.record(seqio.ByteVocabulary(), str(tmp_path))
  assert byte_entry == {"type": "bytes", "extra_ids": 0, "size": 259}
  with pytest.raises(ValueError, match="VOCABULARY is SentencePiece"):
    vocabularies.vocabulary_for_checkpoint(_meta(byte_entry, 384), spm_path)


def test_more_ids_than_embedding_rows_is_an_error(spm_path, tmp_path):
  vocabulary = seqio.SentencePieceVocabulary(spm_path, extra_ids=100)
  entry = vocabularies.record(vocabulary, str(tmp_path))
  rows = vocabulary.vocab_size - 1
  with pytest.raises(ValueError, match=f"has {rows} embedding rows"):
    vocabularies.vocabulary_for_checkpoint(_meta(entry, rows))
  with pytest.raises(ValueError, match="has 100 embedding rows"):
    vocabularies.vocabulary_for_checkpoint(
        _meta(entry, None), embedding_rows=100
    )


def test_no_vocabulary_recorded_or_named():
  with pytest.raises(ValueError, match="records no vocabulary.*VOCABULARY"):
    vocabularies.vocabulary_for_checkpoint({"model_config": {}})
  assert vocabularies.vocabulary_for_checkpoint({}, required=False) is None
  named = vocabularies.vocabulary_for_checkpoint({}, "bytes")
  assert isinstance(named, seqio.ByteVocabulary)
  with pytest.raises(FileNotFoundError, match="VOCABULARY /no/such.model"):
    vocabularies.vocabulary_from_config("/no/such.model")


def test_not_a_sentencepiece_file(tmp_path):
  path = tmp_path / "bad.model"
  path.write_text("not a model")
  with pytest.raises(ValueError, match="is not a SentencePiece model"):
    vocabularies.vocabulary_from_config(str(path))
