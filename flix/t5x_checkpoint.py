"""Reads and writes the legacy T5X checkpoint format (public mT5 checkpoints).

A legacy T5X checkpoint is a directory `.../checkpoint_<step>/` holding

* `checkpoint`: a msgpack file (flax.serialization encoding) with
  `{'version': 3, 'optimizer': {'target': <params tree>, 'state': {'step':
  <int32 array>, 'param_states': <optimizer slots tree>}}}`. Each leaf is
  either an inline array (msgpack ext type 1: packed `(shape, dtype name, raw
  C-order bytes)`; ext type 3: the same for a numpy scalar) or a TensorStore
  spec dict `{'driver': 'zarr', 'kvstore': {'driver': 'file' | 'gfile' |
  'gcs', 'path': 'target.encoder.layers_0.attention.query.kernel'}, ...}`
  whose path is relative to the checkpoint directory (so checkpoints can be
  moved; the GCS bucket named in a spec is a dummy);
* one zarr v2 array folder per such leaf: a `.zarray` JSON file and chunk
  files named `i.j` holding gzip-compressed C-order chunk bytes (edge chunks
  are stored full-size, padded past the array's end).

T5X's default writer since 2024 is Orbax (`checkpoint_<step>/state/`, an
Orbax PyTree of `{'target': params, 'state': ...}`); `read_t5x_checkpoint`
reads its `target` with orbax-checkpoint as well.

This module reads `optimizer/target` into a nested dict of numpy arrays keyed
exactly like the T5X parameter tree, with a small numpy zarr v2 reader for
local checkpoints and TensorStore for URLs (`gs://...`, `file://...`). It
ignores the optimizer slots (`state/param_states`). It can also write the
same format (used for tests and for exporting merged models).

Example:

  params = read_t5x_checkpoint('/ckpts/mt5_small/checkpoint_1000000')
  params['encoder']['layers_0']['attention']['query']['kernel'].shape
  # -> (512, 384): [emb_dim, num_heads * head_dim]
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import re
import shutil
import time
import zlib
from typing import Any, Mapping, Optional, Union

import ml_dtypes
import msgpack
import numpy as np

PyTree = Any
DTypeLike = Any
Params = dict[str, Any]

CHECKPOINT_FILENAME = "checkpoint"
# Default zarr chunk size target of T5X (64 MiB).
DEFAULT_MAX_CHUNK_BYTES = 64 * 2**20
# Leaves with at most this many elements are written inline by default.
DEFAULT_INLINE_MAX_SIZE = 4096

# flax.serialization msgpack extension type codes.
_EXT_NDARRAY = 1
_EXT_NATIVE_COMPLEX = 2
_EXT_NPSCALAR = 3
# Marker of flax's chunked encoding of arrays larger than 1 GiB.
_CHUNKED_ARRAY_KEY = "__msgpack_chunked_array__"

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

_FORMAT_HELP = (
    "A legacy T5X checkpoint is a directory such as `.../checkpoint_1000000` "
    "containing a msgpack file named 'checkpoint' and one zarr folder per "
    "large parameter (e.g. 'target.encoder.layers_0.attention.query.kernel/'); "
    "pass that directory or the path of its 'checkpoint' file."
)


# ------------------------------------------------------------------------------
# Tree helpers.
# ------------------------------------------------------------------------------


def flatten_params(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """Flattens a nested dict into `{'a/b/c': leaf}`.

  Args:
    tree: nested mapping; anything that is not a Mapping is a leaf.
    sep: separator joining the keys of a path.

  Returns:
    A flat dict from joined paths to leaves, in depth-first key order. Empty
    sub-dicts are dropped.
  """
  flat = {}

  def _walk(node: Mapping[str, Any], prefix: str) -> None:
    for key, value in node.items():
      path = f"{prefix}{sep}{key}" if prefix else str(key)
      if isinstance(value, Mapping):
        _walk(value, path)
      else:
        flat[path] = value

  _walk(tree, "")
  return flat


def unflatten_params(flat: Mapping[str, Any], sep: str = "/") -> Params:
  """Inverse of `flatten_params`: `{'a/b/c': leaf}` -> nested dicts.

  Args:
    flat: mapping from joined paths to leaves.
    sep: separator used in the paths.

  Returns:
    The nested dict.

  Raises:
    ValueError: if a path is both a leaf and a prefix of another path.
  """
  tree: Params = {}
  for path, value in flat.items():
    keys = path.split(sep)
    node = tree
    for i, key in enumerate(keys[:-1]):
      child = node.setdefault(key, {})
      if not isinstance(child, dict):
        raise ValueError(
            f"{sep.join(keys[:i + 1])!r} is both a leaf and a "
            f"prefix of {path!r}."
        )
      node = child
    if keys[-1] in node:
      raise ValueError(
          f"{path!r} is both a leaf and a prefix of another path "
          "(or is duplicated)."
      )
    node[keys[-1]] = value
  return tree


# ------------------------------------------------------------------------------
# dtypes and msgpack encoding (compatible with flax.serialization).
# ------------------------------------------------------------------------------


def _dtype_from_name(name: Union[str, bytes]) -> np.dtype:
  """Returns the numpy dtype of a numpy/zarr dtype name ('bfloat16' too)."""
  if isinstance(name, bytes):
    name = name.decode("ascii")
  if name == "bfloat16":
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def _zarr_dtype_name(dtype: np.dtype) -> str:
  """The zarr v2 `.zarray` dtype string of `dtype` (T5X spells bf16 out)."""
  if dtype == ml_dtypes.bfloat16:
    return "bfloat16"
  if dtype.kind == "V" or dtype.hasobject:
    raise ValueError(f"Unsupported dtype for a zarr array: {dtype}.")
  return dtype.str


def _decode_ndarray(data: bytes) -> np.ndarray:
  shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
  dtype = _dtype_from_name(dtype_name)
  return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
  if code == _EXT_NDARRAY:
    return _decode_ndarray(data)
  if code == _EXT_NPSCALAR:
    return _decode_ndarray(data)[()]
  if code == _EXT_NATIVE_COMPLEX:
    real, imag = msgpack.unpackb(data)
    return complex(real, imag)
  return msgpack.ExtType(code, data)


def _unchunk_in_place(node: Any) -> Any:
  """Reassembles arrays that flax split into 1 GiB flat chunks."""
  if not isinstance(node, dict):
    return node
  if _CHUNKED_ARRAY_KEY in node:
    shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
    chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
    return np.concatenate(chunks).reshape(shape)
  for key, value in node.items():
    node[key] = _unchunk_in_place(value)
  return node


def _ext_default(obj: Any) -> Any:
  """msgpack `default` hook writing numpy values as flax ext types."""

  def _pack(arr: np.ndarray) -> bytes:
    return msgpack.packb(
        (list(arr.shape), arr.dtype.name, arr.tobytes("C")), use_bin_type=True
    )

  if isinstance(obj, np.ndarray):
    return msgpack.ExtType(_EXT_NDARRAY, _pack(obj))
  if isinstance(obj, np.generic):
    return msgpack.ExtType(_EXT_NPSCALAR, _pack(np.asarray(obj)))
  if hasattr(obj, "__array__"):  # jax.Array and friends.
    return msgpack.ExtType(_EXT_NDARRAY, _pack(np.asarray(obj)))
  raise TypeError(f"Cannot msgpack-serialize {type(obj)}.")


# ------------------------------------------------------------------------------
# Locating and decoding the msgpack file.
# ------------------------------------------------------------------------------


def _is_url(path: str) -> bool:
  return bool(_URL_RE.match(path))


def _join(directory: str, name: str) -> str:
  if _is_url(directory):
    return directory.rstrip("/") + "/" + name
  return os.path.join(directory, name)


def _read_url_bytes(url: str) -> bytes:
  """Reads one object through TensorStore's kvstore (gs://, file://, ...)."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  parent, name = url.rstrip("/").rsplit("/", 1)
  result = ts.KvStore.open(parent + "/").result().read(name).result()
  if result.state != "value":
    raise FileNotFoundError(f"No T5X checkpoint at {url!r}. {_FORMAT_HELP}")
  return bytes(result.value)


def _missing_checkpoint_error(path: str) -> FileNotFoundError:
  """Builds a helpful FileNotFoundError for a path that is not a checkpoint."""
  hint = ""
  if os.path.isdir(path):
    entries = sorted(os.listdir(path))
    steps = [e for e in entries if re.fullmatch(r"checkpoint_\d+", e)]
    if steps:
      hint = (
          " It looks like a model directory; pass one of its checkpoint "
          f"directories, e.g. {os.path.join(path, steps[-1])!r}."
      )
    elif "_CHECKPOINT_METADATA" in entries:
      hint = " It looks like an Orbax checkpoint without T5X's 'state' item."
    else:
      hint = f" It contains {entries[:10]}."
  if os.path.isdir(path):
    problem = f"the directory has no '{CHECKPOINT_FILENAME}' file."
  else:
    problem = "the path does not exist."
  return FileNotFoundError(
      f"No T5X checkpoint at {path!r}: {problem}{hint} {_FORMAT_HELP}"
  )


def _resolve_checkpoint(path: str) -> tuple[str, str]:
  """Returns (checkpoint dir, msgpack file path) for a dir or file path."""
  path = os.fspath(path)
  if _is_url(path):
    if path.rstrip("/").endswith("/" + CHECKPOINT_FILENAME):
      file_path = path.rstrip("/")
      return file_path.rsplit("/", 1)[0], file_path
    return path.rstrip("/"), _join(path, CHECKPOINT_FILENAME)
  if os.path.isfile(path):
    return os.path.dirname(os.path.abspath(path)), path
  file_path = os.path.join(path, CHECKPOINT_FILENAME)
  if not os.path.isfile(file_path):
    raise _missing_checkpoint_error(path)
  return path, file_path


def _load_msgpack(path: str) -> tuple[str, dict[str, Any]]:
  """Decodes the checkpoint's msgpack file; returns (ckpt dir, contents)."""
  ckpt_dir, file_path = _resolve_checkpoint(path)
  if _is_url(file_path):
    data = _read_url_bytes(file_path)
  else:
    with open(file_path, "rb") as f:
      data = f.read()
  if data.startswith(b"model_checkpoint_path"):
    raise ValueError(
        f"{file_path!r} is a TensorFlow checkpoint index, not a "
        f"T5X msgpack checkpoint. {_FORMAT_HELP}"
    )
  try:
    contents = msgpack.unpackb(
        data, ext_hook=_ext_hook, raw=False, strict_map_key=False
    )
  except (msgpack.UnpackException, ValueError) as e:
    raise ValueError(
        f"{file_path!r} is not a msgpack T5X checkpoint file: " f"{e}"
    ) from e
  if not isinstance(contents, dict) or "optimizer" not in contents:
    keys = list(contents) if isinstance(contents, dict) else type(contents)
    raise ValueError(
        f"{file_path!r} has no 'optimizer' entry (found {keys}); "
        f"not a legacy T5X checkpoint. {_FORMAT_HELP}"
    )
  return ckpt_dir, _unchunk_in_place(contents)


# ------------------------------------------------------------------------------
# zarr v2 arrays.
# ------------------------------------------------------------------------------


def _decompress(
    data: bytes, compressor: Optional[Mapping[str, Any]], chunk_path: str
) -> bytes:
  if compressor is None:
    return data
  codec = compressor.get("id")
  if codec == "gzip":
    return gzip.decompress(data)
  if codec == "zlib":
    return zlib.decompress(data)
  raise ValueError(
      f"{chunk_path}: unsupported zarr compressor {compressor!r} "
      "(supported: 'gzip', 'zlib', null)."
  )


def _fill_value(value: Any) -> Any:
  """Decodes a zarr v2 `fill_value` (null reads as 0, as in TensorStore)."""
  if value is None:
    return 0
  if isinstance(value, str):  # 'NaN', 'Infinity', '-Infinity'.
    return float(value.replace("Infinity", "inf"))
  return value


def read_zarr_array(directory: str) -> np.ndarray:
  """Reads a local zarr v2 array folder into numpy.

  Supports C/F order, gzip/zlib/no compression, no filters, dtypes numpy
  understands plus 'bfloat16'. Missing chunk files read as the fill value.

  Args:
    directory: folder holding `.zarray` and the chunk files.

  Returns:
    The array, with the dtype named in `.zarray`.

  Raises:
    FileNotFoundError: if `directory/.zarray` does not exist.
    ValueError: for unsupported metadata or corrupt chunks.
  """
  meta_path = os.path.join(directory, ".zarray")
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(
        f"No zarr array at {directory!r} (missing " f"'.zarray')."
    )
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("zarr_format", 2) != 2:
    raise ValueError(f"{meta_path}: only zarr_format 2 is supported.")
  if meta.get("filters"):
    raise ValueError(f"{meta_path}: zarr filters are not supported.")
  shape = tuple(meta["shape"])
  chunks = tuple(meta["chunks"])
  dtype = _dtype_from_name(meta["dtype"])
  order = meta.get("order", "C")
  sep = meta.get("dimension_separator", ".")
  compressor = meta.get("compressor")
  out = np.full(shape, _fill_value(meta.get("fill_value")), dtype=dtype)
  if out.size == 0:
    return out
  chunk_size = math.prod(chunks) * dtype.itemsize
  grid = [range(math.ceil(s / c)) for s, c in zip(shape, chunks)]
  for index in itertools.product(*grid):
    key = sep.join(str(i) for i in index) if index else "0"
    chunk_path = os.path.join(directory, key)
    if not os.path.isfile(chunk_path):
      continue  # zarr semantics: an absent chunk is all fill value.
    with open(chunk_path, "rb") as f:
      raw = _decompress(f.read(), compressor, chunk_path)
    if len(raw) != chunk_size:
      raise ValueError(
          f"{chunk_path}: expected {chunk_size} bytes for a "
          f"{chunks} chunk of {dtype}, got {len(raw)}."
      )
    chunk = np.frombuffer(raw, dtype=dtype).reshape(chunks, order=order)
    starts = [i * c for i, c in zip(index, chunks)]
    region = tuple(
        slice(b, min(b + c, s)) for b, c, s in zip(starts, chunks, shape)
    )
    out[region] = chunk[tuple(slice(0, r.stop - r.start) for r in region)]
  return out


def _default_chunks(
    shape: tuple[int, ...], itemsize: int, max_chunk_bytes: int
) -> tuple[int, ...]:
  """Halves the largest chunk dimension until a chunk fits the byte budget."""
  chunks = [max(1, s) for s in shape]
  while math.prod(chunks) * itemsize > max_chunk_bytes and max(chunks) > 1:
    i = int(np.argmax(chunks))
    chunks[i] = -(-chunks[i] // 2)
  return tuple(chunks)


def write_zarr_array(
    array: np.ndarray,
    directory: str,
    chunks: Optional[tuple[int, ...]] = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    compression_level: int = 1,
) -> dict[str, Any]:
  """Writes `array` as a gzip-compressed zarr v2 folder (T5X's layout).

  Args:
    array: the array; any numpy dtype (not object) or bfloat16.
    directory: folder to create; must not exist yet.
    chunks: chunk shape; defaults to the array shape halved along its largest
      dimension until a chunk is at most `max_chunk_bytes`.
    max_chunk_bytes: chunk size budget used when `chunks` is None.
    compression_level: gzip level.

  Returns:
    The zarr metadata written to `.zarray` (also the `metadata` of a T5X
    TensorStore spec).
  """
  array = np.asarray(array)
  shape = tuple(array.shape)
  if chunks is None:
    chunks = _default_chunks(shape, array.dtype.itemsize, max_chunk_bytes)
  chunks = tuple(int(c) for c in chunks)
  if len(chunks) != len(shape) or any(c < 1 for c in chunks):
    raise ValueError(f"Bad chunk shape {chunks} for an array of shape {shape}.")
  meta = {
      "chunks": list(chunks),
      "compressor": {"id": "gzip", "level": compression_level},
      "dtype": _zarr_dtype_name(array.dtype),
      "fill_value": None,
      "filters": None,
      "order": "C",
      "shape": list(shape),
      "zarr_format": 2,
  }
  os.makedirs(directory)
  with open(os.path.join(directory, ".zarray"), "w") as f:
    json.dump(meta, f, sort_keys=True)
  grid = [range(math.ceil(s / c)) for s, c in zip(shape, chunks)]
  for index in itertools.product(*grid):
    region = tuple(
        slice(i * c, min((i + 1) * c, s))
        for i, c, s in zip(index, chunks, shape)
    )
    chunk = np.zeros(chunks, dtype=array.dtype)  # Edge chunks stored padded.
    chunk[tuple(slice(0, r.stop - r.start) for r in region)] = array[region]
    key = ".".join(str(i) for i in index) if index else "0"
    with open(os.path.join(directory, key), "wb") as f:
      f.write(
          gzip.compress(
              chunk.tobytes("C"), compresslevel=compression_level, mtime=0
          )
      )
  return {k: meta[k] for k in ("chunks", "compressor", "dtype", "shape")}


def _read_zarr_with_tensorstore(url: str) -> np.ndarray:
  """Reads a zarr array at a URL (gs://bucket/..., file:///...) via TensorStore.

  This is the path used for checkpoints on GCS (e.g. the public
  `gs://t5-data/pretrained_models/t5x/mt5_*` checkpoints); it needs network
  access and credentials that TensorStore finds on its own.
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  store = ts.open(
      {"driver": "zarr", "kvstore": url.rstrip("/") + "/", "open": True}
  ).result()
  return np.asarray(store.read().result())


# ------------------------------------------------------------------------------
# Reading T5X checkpoints.
# ------------------------------------------------------------------------------


def _is_ts_spec(node: Any) -> bool:
  return (
      isinstance(node, Mapping)
      and "driver" in node
      and ("kvstore" in node or "path" in node)
  )


def _leaf_location(ckpt_dir: str, spec: Mapping[str, Any]) -> str:
  """Where a TensorStore-spec leaf's zarr folder is (local path or URL)."""
  kvstore = spec.get("kvstore")
  if isinstance(kvstore, str):  # Already a URL / path.
    return kvstore if _is_url(kvstore) else _join(ckpt_dir, kvstore)
  rel = (kvstore or {}).get("path", spec.get("path"))  # Old specs: top level.
  if rel is None:
    raise ValueError(f"TensorStore spec without a path: {spec!r}.")
  if _is_url(rel) or (os.path.isabs(rel) and not _is_url(ckpt_dir)):
    return rel  # Like T5X: an absolute path is used as is.
  return _join(ckpt_dir, rel)


def _cast(array: np.ndarray, restore_dtype: Optional[DTypeLike]) -> np.ndarray:
  if restore_dtype is not None and (
      np.issubdtype(array.dtype, np.floating)
      or array.dtype == ml_dtypes.bfloat16
  ):
    array = array.astype(restore_dtype, copy=False)
  if not array.flags.writeable:
    array = array.copy()
  return array


def read_t5x_checkpoint(
    path: str, restore_dtype: Optional[DTypeLike] = np.float32
) -> Params:
  """Reads the parameters (`optimizer/target`) of a legacy T5X checkpoint.

  Args:
    path: checkpoint directory (`.../checkpoint_<step>`) or its `checkpoint`
      msgpack file; local, or a URL TensorStore understands (`gs://...`).
    restore_dtype: dtype floating-point leaves are cast to (default float32);
      None keeps the stored dtype (e.g. bfloat16). Integer leaves are kept.

  Returns:
    Nested dict of numpy arrays keyed exactly as the T5X parameter tree, e.g.
    `params['encoder']['layers_0']['attention']['query']['kernel']` of shape
    [emb_dim, num_heads * head_dim].

  Raises:
    FileNotFoundError: if `path` is not a checkpoint, or a parameter's zarr
      folder is missing (the message names the parameter and folder).
    ValueError: if the file is not a legacy T5X msgpack checkpoint.
  """
  if _is_orbax_checkpoint(path):
    return _read_orbax_target(path, restore_dtype)
  ckpt_dir, contents = _load_msgpack(path)
  target = contents["optimizer"].get("target")
  if not isinstance(target, Mapping):
    raise ValueError(f"Checkpoint {path!r} has no 'optimizer/target' tree.")

  def _restore(node: Any, param_path: str) -> Any:
    if _is_ts_spec(node):
      location = _leaf_location(ckpt_dir, node)
      if _is_url(location):
        array = _read_zarr_with_tensorstore(location)
      else:
        if not os.path.isdir(location):
          raise FileNotFoundError(
              f"Parameter {param_path!r} of checkpoint {path!r} is stored in "
              f"the zarr folder {location!r}, which does not exist (the "
              "checkpoint directory is incomplete or was copied without its "
              "array folders)."
          )
        array = read_zarr_array(location)
      return _cast(array, restore_dtype)
    if isinstance(node, Mapping):
      return {
          k: _restore(v, f"{param_path}/{k}" if param_path else k)
          for k, v in node.items()
      }
    return _cast(np.asarray(node), restore_dtype)

  return _restore(target, "")


def _is_orbax_checkpoint(path: str) -> bool:
  """A T5X Orbax checkpoint: `state/` (an Orbax PyTree), no msgpack file."""
  return (
      not _is_url(path)
      and os.path.isdir(os.path.join(path, "state"))
      and not os.path.isfile(os.path.join(path, CHECKPOINT_FILENAME))
  )


def _read_orbax_target(path: str, restore_dtype: Optional[DTypeLike]) -> Params:
  """The `target` params of a T5X Orbax checkpoint, as numpy arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  state_dir = os.path.join(os.path.abspath(path), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(state_dir).item_metadata
  if "target" not in metadata:
    raise ValueError(
        f"The Orbax checkpoint {path!r} has no 'target' (found "
        f"{sorted(metadata)}); not a T5X checkpoint."
    )
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata.tree
  )
  restored = checkpointer.restore(
      state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args)
  )
  checkpointer.close()
  return jax.tree.map(
      lambda x: _cast(np.asarray(x), restore_dtype), restored["target"]
  )


def read_t5x_step(path: str) -> int:
  """Returns the training step stored in a legacy T5X checkpoint.

  Falls back to the `checkpoint_<step>` directory name when the msgpack file
  holds no `optimizer/state/step`.

  Args:
    path: checkpoint directory or its `checkpoint` file.

  Raises:
    FileNotFoundError: if `path` is not a checkpoint.
    ValueError: if no step is stored and the directory name has none.
  """
  ckpt_dir, contents = _load_msgpack(path)
  state = contents["optimizer"].get("state")
  if isinstance(state, Mapping) and state.get("step") is not None:
    return int(np.asarray(state["step"]))
  match = re.fullmatch(
      r"checkpoint_(\d+)", os.path.basename(ckpt_dir.rstrip("/"))
  )
  if match:
    return int(match.group(1))
  raise ValueError(f"Checkpoint {path!r} stores no step.")


# ------------------------------------------------------------------------------
# Writing T5X checkpoints.
# ------------------------------------------------------------------------------


def write_t5x_checkpoint(
    params: Mapping[str, Any],
    path: str,
    step: int = 0,
    inline_max_size: int = DEFAULT_INLINE_MAX_SIZE,
    *,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    overwrite: bool = False,
) -> str:
  """Writes `params` as a legacy T5X checkpoint directory.

  The msgpack file holds `{'version': 3, 'optimizer': {'target': ..., 'state':
  {'step': int32 array, 'param_states': {}}}}`; leaves with more than
  `inline_max_size` elements are written as gzip zarr v2 folders named by the
  '.'-joined path (`target.encoder.layers_0.mlp.wo.kernel/`) and referenced by
  TensorStore specs, smaller leaves are stored inline. Leaves keep their dtype
  (bfloat16 included). The directory is written under a temporary name and
  renamed, as T5X does.

  Args:
    params: nested dict of arrays (numpy or jax), keyed like T5X.
    path: checkpoint directory to create, usually `.../checkpoint_<step>`.
    step: training step to store.
    inline_max_size: largest number of elements of an inline leaf.
    max_chunk_bytes: zarr chunk size budget.
    overwrite: replace an existing `path` instead of raising.

  Returns:
    `path`.

  Raises:
    FileExistsError: if `path` exists and `overwrite` is False.
    ValueError: for keys that cannot be used as path components.
  """
  path = os.fspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path!r} already exists.")
  tmp_dir = f"{path.rstrip(os.sep)}.tmp-{int(time.time() * 1e6)}"
  os.makedirs(tmp_dir)
  try:

    def _encode(node: Any, keys: tuple[str, ...]) -> Any:
      if isinstance(node, Mapping):
        out = {}
        for key, value in node.items():
          if not isinstance(key, str) or not key or "/" in key or "." in key:
            raise ValueError(
                f"Bad parameter key {key!r} under "
                f"{'/'.join(keys)!r}: keys must be non-empty "
                "strings without '/' or '.'."
            )
          out[key] = _encode(value, keys + (key,))
        return out
      array = np.asarray(node)
      if array.size <= inline_max_size:
        return array
      name = ".".join(("target",) + keys)
      metadata = write_zarr_array(
          array, os.path.join(tmp_dir, name), max_chunk_bytes=max_chunk_bytes
      )
      return {
          "driver": "zarr",
          "kvstore": {"driver": "file", "path": name},
          "metadata": metadata,
      }

    contents = {
        "version": 3,
        "optimizer": {
            "target": _encode(params, ()),
            "state": {"step": np.asarray(step, np.int32), "param_states": {}},
        },
    }
    with open(os.path.join(tmp_dir, CHECKPOINT_FILENAME), "wb") as f:
      f.write(
          msgpack.packb(
              contents,
              default=_ext_default,
              use_bin_type=True,
              strict_types=True,
          )
      )
    if os.path.exists(path):
      shutil.rmtree(path)
    os.rename(tmp_dir, path)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return path
