"""Tests for flix.t5x_checkpoint (legacy T5X msgpack + zarr checkpoints)."""

import gzip
import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
import pytest

import conftest

from flix import t5x_checkpoint

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TINY_CKPT = os.path.join(
    _REPO, os.pardir, "shared", "testdata", "t5x_t5_1_1_tiny", "checkpoint_3"
)


@pytest.fixture(scope="module")
def tiny_ckpt_dir():
  if not os.path.isfile(os.path.join(_TINY_CKPT, "checkpoint")):
    pytest.skip(
        "The tiny T5X test checkpoint (../shared/testdata) is not at"
        f" {os.path.normpath(_TINY_CKPT)}."
    )
  return _TINY_CKPT


@pytest.fixture(scope="module")
def tiny_params(tiny_ckpt_dir):
  return t5x_checkpoint.read_t5x_checkpoint(tiny_ckpt_dir)


def _expected_shapes(params):
  """docs/mt5_reference.md §2's parameter tree, dims read from `params`."""
  vocab, d = params["token_embedder"]["embedding"].shape
  enc0 = params["encoder"]["layers_0"]
  hk = enc0["attention"]["query"]["kernel"].shape[1]
  f = enc0["mlp"]["wi_0"]["kernel"].shape[1]
  relpos = params["encoder"]["relpos_bias"]["rel_embedding"].shape
  num_enc = len([k for k in params["encoder"] if k.startswith("layers_")])
  num_dec = len([k for k in params["decoder"] if k.startswith("layers_")])
  shapes = conftest.t5x_shapes(
      vocab, d, hk, f, relpos[0], relpos[1], num_enc, num_dec
  )
  dims = dict(
      vocab=vocab,
      d=d,
      hk=hk,
      f=f,
      relpos=relpos,
      num_enc=num_enc,
      num_dec=num_dec,
  )
  return shapes, dims


# ------------------------------------------------------------------------------
# The real tiny T5 v1.1 checkpoint.
# ------------------------------------------------------------------------------


def test_real_checkpoint_has_the_t5x_tree(tiny_params):
  flat = t5x_checkpoint.flatten_params(tiny_params)
  shapes, dims = _expected_shapes(tiny_params)
  assert set(flat) == set(shapes)
  for path, shape in shapes.items():
    assert flat[path].shape == shape, path
    assert flat[path].dtype == np.float32, path
    assert np.all(np.isfinite(flat[path])), path
  # Cross-check against the tiny T5 v1.1 config (docs/mt5_reference.md §3).
  assert dims == dict(
      vocab=32128, d=4, hk=4, f=8, relpos=(2, 4), num_enc=2, num_dec=2
  )
  assert len(flat) == 52


def test_real_checkpoint_values(tiny_params):
  embedding = tiny_params["token_embedder"]["embedding"]
  assert 0.9 < embedding.std() < 1.1  # normal(1.0) initialisation.
  assert abs(embedding.mean()) < 0.05
  # The untied output layer is a different array.
  assert not np.allclose(
      tiny_params["decoder"]["logits_dense"]["kernel"], embedding.T
  )


def test_real_checkpoint_dir_and_file_paths_agree(tiny_ckpt_dir, tiny_params):
  from_file = t5x_checkpoint.read_t5x_checkpoint(
      os.path.join(tiny_ckpt_dir, "checkpoint")
  )
  a = t5x_checkpoint.flatten_params(tiny_params)
  b = t5x_checkpoint.flatten_params(from_file)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_real_checkpoint_numpy_reader_matches_tensorstore(
    tiny_ckpt_dir, tiny_params
):
  pytest.importorskip("tensorstore")
  # A file:// URL makes the reader go through TensorStore (the gs:// path).
  via_ts = t5x_checkpoint.read_t5x_checkpoint(
      "file://" + os.path.abspath(tiny_ckpt_dir)
  )
  a = t5x_checkpoint.flatten_params(tiny_params)
  b = t5x_checkpoint.flatten_params(via_ts)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_real_checkpoint_layout(tiny_ckpt_dir, tiny_params):
  """Kernels/embeddings are zarr folders; scales and relpos tables inline."""
  for path in t5x_checkpoint.flatten_params(tiny_params):
    folder = os.path.join(tiny_ckpt_dir, "target." + path.replace("/", "."))
    inline = path.endswith("/scale") or path.endswith("/rel_embedding")
    assert os.path.isdir(folder) != inline, path
  with open(
      os.path.join(tiny_ckpt_dir, "target.token_embedder.embedding", ".zarray")
  ) as f:
    meta = json.load(f)
  assert meta["shape"] == [32128, 4] and meta["chunks"] == [4096, 4]


def test_real_checkpoint_step(tiny_ckpt_dir):
  assert t5x_checkpoint.read_t5x_step(tiny_ckpt_dir) == 3


def test_real_checkpoint_restore_dtype(tiny_ckpt_dir):
  params = t5x_checkpoint.read_t5x_checkpoint(
      tiny_ckpt_dir, restore_dtype=ml_dtypes.bfloat16
  )
  for path, value in t5x_checkpoint.flatten_params(params).items():
    assert value.dtype == ml_dtypes.bfloat16, path


def test_real_checkpoint_rewrite_round_trip(tiny_params, tmp_path):
  out = str(tmp_path / "checkpoint_7")
  t5x_checkpoint.write_t5x_checkpoint(tiny_params, out, step=7)
  again = t5x_checkpoint.read_t5x_checkpoint(out)
  a = t5x_checkpoint.flatten_params(tiny_params)
  b = t5x_checkpoint.flatten_params(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert t5x_checkpoint.read_t5x_step(out) == 7


# ------------------------------------------------------------------------------
# Synthetic write -> read round trips.
# ------------------------------------------------------------------------------


def _synthetic_params():
  rng = np.random.default_rng(0)
  return {
      "token_embedder": {
          # 37 x 23 f32 with 64-byte chunks -> (3, 4) chunks, edge chunks.
          "embedding": rng.normal(size=(37, 23)).astype(np.float32),
      },
      "encoder": {
          "layers_0": {
              "attention": {
                  "query": {
                      "kernel": rng.normal(size=(10, 7)).astype(
                          ml_dtypes.bfloat16
                      ),
                  },
              },
              "pre_attention_layer_norm": {
                  "scale": np.arange(4, dtype=np.float32),  # Inline.
              },
          },
          "relpos_bias": {
              "rel_embedding": rng.normal(size=(2, 3)).astype(np.float16),
          },
          "encoder_norm": {"scale": np.array(3.0, np.float32)},  # 0-d.
      },
      "counter": {"value": np.arange(50, dtype=np.int32).reshape(5, 10)},
  }


def test_write_read_round_trip(tmp_path):
  params = _synthetic_params()
  out = str(tmp_path / "checkpoint_11")
  assert (
      t5x_checkpoint.write_t5x_checkpoint(
          params, out, step=11, inline_max_size=8, max_chunk_bytes=64
      )
      == out
  )

  # Layout: big leaves are zarr folders, the small one is inline.
  assert sorted(os.listdir(out)) == [
      "checkpoint",
      "target.counter.value",
      "target.encoder.layers_0.attention.query.kernel",
      "target.token_embedder.embedding",
  ]
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
  emb_dir = os.path.join(out, "target.token_embedder.embedding")
  with open(os.path.join(emb_dir, ".zarray")) as f:
    meta = json.load(f)
  assert meta["shape"] == [37, 23] and meta["dtype"] == "<f4"
  assert meta["compressor"] == {"id": "gzip", "level": 1}
  chunks = meta["chunks"]
  assert np.prod(chunks) * 4 <= 64 and chunks != [37, 23]
  grid = [-(-s // c) for s, c in zip(meta["shape"], chunks)]
  assert 37 % chunks[0] and 23 % chunks[1]  # There are edge chunks...
  files = sorted(p for p in os.listdir(emb_dir) if p != ".zarray")
  assert len(files) == grid[0] * grid[1]
  edge = f"{grid[0] - 1}.{grid[1] - 1}"
  with open(os.path.join(emb_dir, edge), "rb") as f:  # ...stored full-size.
    assert len(gzip.decompress(f.read())) == np.prod(chunks) * 4
  with open(
      os.path.join(
          out, "target.encoder.layers_0.attention.query.kernel", ".zarray"
      )
  ) as f:
    assert json.load(f)["dtype"] == "bfloat16"

  # Stored dtypes are kept with restore_dtype=None...
  raw = t5x_checkpoint.flatten_params(
      t5x_checkpoint.read_t5x_checkpoint(out, restore_dtype=None)
  )
  flat = t5x_checkpoint.flatten_params(params)
  assert raw.keys() == flat.keys()
  for k in flat:
    assert raw[k].dtype == flat[k].dtype, k
    np.testing.assert_array_equal(raw[k], flat[k], err_msg=k)
  # ...and floats are cast to float32 by default; ints are untouched.
  cast = t5x_checkpoint.flatten_params(t5x_checkpoint.read_t5x_checkpoint(out))
  for k in flat:
    expected = np.float32 if k != "counter/value" else np.int32
    assert cast[k].dtype == expected, k
    np.testing.assert_array_equal(cast[k], flat[k].astype(expected))
  assert t5x_checkpoint.read_t5x_step(out) == 11


def test_written_zarr_is_readable_by_tensorstore(tmp_path):
  ts = pytest.importorskip("tensorstore")
  params = _synthetic_params()
  out = str(tmp_path / "checkpoint_0")
  t5x_checkpoint.write_t5x_checkpoint(
      params, out, inline_max_size=8, max_chunk_bytes=64
  )
  for path, value in t5x_checkpoint.flatten_params(params).items():
    folder = os.path.join(out, "target." + path.replace("/", "."))
    if not os.path.isdir(folder):
      continue
    store = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "file", "path": folder}}
    ).result()
    read = np.asarray(store.read().result())
    np.testing.assert_array_equal(
        read.astype(np.float64), value.astype(np.float64), err_msg=path
    )


def test_written_msgpack_is_readable_by_flax(tmp_path):
  serialization = pytest.importorskip("flax.serialization")
  params = _synthetic_params()
  out = str(tmp_path / "checkpoint_5")
  t5x_checkpoint.write_t5x_checkpoint(params, out, step=5, inline_max_size=8)
  with open(os.path.join(out, "checkpoint"), "rb") as f:
    contents = serialization.msgpack_restore(f.read())
  assert contents["version"] == 3
  assert int(contents["optimizer"]["state"]["step"]) == 5
  target = contents["optimizer"]["target"]
  np.testing.assert_array_equal(
      target["encoder"]["layers_0"]["pre_attention_layer_norm"]["scale"],
      np.arange(4, dtype=np.float32),
  )
  spec = target["token_embedder"]["embedding"]
  assert spec["driver"] == "zarr"
  assert spec["kvstore"]["path"] == "target.token_embedder.embedding"


def test_zarr_reader_variants(tmp_path):
  """Uncompressed chunks, missing chunks (fill value) and a 0-d array."""
  folder = tmp_path / "arr"
  folder.mkdir()
  meta = {
      "chunks": [2, 2],
      "compressor": None,
      "dtype": "<f2",
      "fill_value": 7.0,
      "filters": None,
      "order": "C",
      "shape": [3, 2],
      "zarr_format": 2,
  }
  (folder / ".zarray").write_text(json.dumps(meta))
  (folder / "0.0").write_bytes(np.array([[1, 2], [3, 4]], "<f2").tobytes())
  out = t5x_checkpoint.read_zarr_array(str(folder))
  np.testing.assert_array_equal(out, [[1, 2], [3, 4], [7, 7]])
  assert out.dtype == np.float16

  scalar_dir = str(tmp_path / "scalar")
  t5x_checkpoint.write_zarr_array(np.array(2.5, np.float32), scalar_dir)
  assert t5x_checkpoint.read_zarr_array(scalar_dir) == np.float32(2.5)


# ------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------


def test_missing_checkpoint_path(tmp_path):
  missing = str(tmp_path / "nope" / "checkpoint_100")
  with pytest.raises(FileNotFoundError) as e:
    t5x_checkpoint.read_t5x_checkpoint(missing)
  message = str(e.value)
  assert missing in message
  assert "does not exist" in message
  assert "msgpack file named 'checkpoint'" in message
  assert "zarr" in message


def test_empty_directory_and_model_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no 'checkpoint' file"):
    t5x_checkpoint.read_t5x_checkpoint(str(tmp_path))
  t5x_checkpoint.write_t5x_checkpoint(
      {"a": {"b": np.ones(3)}}, str(tmp_path / "checkpoint_5")
  )
  with pytest.raises(FileNotFoundError, match=r"model directory.*checkpoint_5"):
    t5x_checkpoint.read_t5x_checkpoint(str(tmp_path))


def test_missing_zarr_folder_names_parameter(tmp_path):
  out = str(tmp_path / "checkpoint_1")
  t5x_checkpoint.write_t5x_checkpoint(
      _synthetic_params(), out, inline_max_size=8
  )
  folder = os.path.join(out, "target.encoder.layers_0.attention.query.kernel")
  shutil.rmtree(folder)
  with pytest.raises(FileNotFoundError) as e:
    t5x_checkpoint.read_t5x_checkpoint(out)
  assert "'encoder/layers_0/attention/query/kernel'" in str(e.value)
  assert folder in str(e.value)


def test_not_a_t5x_checkpoint(tmp_path):
  (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
  with pytest.raises(ValueError, match="TensorFlow checkpoint"):
    t5x_checkpoint.read_t5x_checkpoint(str(tmp_path))


def test_write_refuses_to_overwrite(tmp_path):
  out = str(tmp_path / "checkpoint_1")
  t5x_checkpoint.write_t5x_checkpoint({"a": {"b": np.ones(3)}}, out)
  with pytest.raises(FileExistsError):
    t5x_checkpoint.write_t5x_checkpoint({"a": {"b": np.ones(3)}}, out)
  t5x_checkpoint.write_t5x_checkpoint(
      {"a": {"b": np.zeros(3)}}, out, overwrite=True
  )
  np.testing.assert_array_equal(
      t5x_checkpoint.read_t5x_checkpoint(out)["a"]["b"], np.zeros(3)
  )


def test_write_rejects_bad_keys(tmp_path):
  with pytest.raises(ValueError, match=re.escape("'a.b'")):
    t5x_checkpoint.write_t5x_checkpoint(
        {"a.b": np.ones(3)}, str(tmp_path / "c")
    )
  assert not os.listdir(tmp_path)  # The temporary directory is cleaned up.


# ------------------------------------------------------------------------------
# Tree helpers.
# ------------------------------------------------------------------------------


def test_flatten_unflatten():
  tree = {"a": {"b": {"c": 1}, "d": 2}, "e": 3}
  flat = t5x_checkpoint.flatten_params(tree)
  assert flat == {"a/b/c": 1, "a/d": 2, "e": 3}
  assert t5x_checkpoint.unflatten_params(flat) == tree
  with pytest.raises(ValueError, match="both a leaf and a prefix"):
    t5x_checkpoint.unflatten_params({"a": 1, "a/b": 2})
  with pytest.raises(ValueError, match="both a leaf and a prefix"):
    t5x_checkpoint.unflatten_params({"a/b": 2, "a": 1})
