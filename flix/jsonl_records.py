"""Featurized JSONL: one `{"inputs", "targets", "features"}` object per line.

  {"inputs": "...", "targets": "...", "features": {"task": "qa"}}

The one reader of the format, for training data (`flix_tasks.jsonl`) and
inference inputs (`flix.inference`, where `targets` is optional). `features`
may name any groups; a group that is missing, `null` or "" is absent. Blank
lines are skipped; a UTF-8 byte-order mark and CRLF line ends are accepted.
Anything else malformed raises a `ValueError` naming `file:line`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterator, Optional

import tensorflow as tf

_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass(frozen=True)
class Record:
  """One parsed line; `targets` is None where it is optional and absent."""

  inputs: str
  targets: Optional[str]
  features: dict[str, str]


def parse_line(
    line: str, where: str, targets_required: bool = True
) -> Optional[Record]:
  """Parses one line (None if blank); errors start with `where` (file:line).

  Raises:
    ValueError: invalid JSON, not an object, a missing or non-string
      `inputs` / `targets`, `features` not an object, a feature group name
      that is not alphanumeric, or a feature value that is not a string.
  """
  if not line.strip():
    return None
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: invalid JSON ({e.msg}).") from None
  if not isinstance(obj, dict):
    raise ValueError(
        f"{where}: expected a JSON object, got {type(obj).__name__}."
    )
  for key in ("inputs", "targets"):
    if key not in obj:
      if key == "inputs" or targets_required:
        raise ValueError(f"{where}: missing {key!r}.")
      continue
    if not isinstance(obj[key], str):
      raise ValueError(
          f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}."
      )
  raw = obj.get("features")
  if raw is None:
    raw = {}
  if not isinstance(raw, dict):
    raise ValueError(
        f"{where}: 'features' must be an object of strings, got "
        f"{type(raw).__name__}."
    )
  features = {}
  for group, value in raw.items():
    if not group.replace("_", "").isalnum():
      raise ValueError(
          f"{where}: feature group name {group!r} must be alphanumeric "
          "(underscores allowed)."
      )
    if value is None or value == "":
      continue
    if not isinstance(value, str):
      raise ValueError(
          f"{where}: feature {group!r} must be a string, got "
          f"{type(value).__name__} {json.dumps(value)[:60]}."
      )
    features[group] = value
  return Record(obj["inputs"], obj.get("targets"), features)


def read_records(path: str, targets_required: bool = True) -> Iterator[Record]:
  """Parses every non-blank line of `path` (local or any tf.io.gfile URL)."""
  with tf.io.gfile.GFile(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      where = f"{path}:{number}"
      if number == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(
            f"{where}: not valid UTF-8 (byte {e.start}: {e.reason})."
        ) from None
      record = parse_line(line, where, targets_required)
      if record is not None:
        yield record
