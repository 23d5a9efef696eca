"""Checksums of train checkpoints, and finding the latest intact one.

Orbax writes a step to `<step>.orbax-checkpoint-tmp`, writes its commit
marker `commit_success.txt` and renames the directory to `<step>` when the
write is complete. Just before that commit, flix records the size and SHA-256
of every file of the step in `flix_commit.json` (`write_manifest`), so a
restart can tell an intact checkpoint from one damaged later: a truncated or
overwritten file, a deleted file, a step directory without its commit marker
(`verify`). `latest_intact_step` walks the steps from the newest, reporting
each damaged one, until it finds an intact one.

Steps written before flix recorded checksums (no manifest, commit marker
present) are accepted unverified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from typing import Optional

MANIFEST_FILE = "flix_commit.json"
COMMIT_MARKER = "commit_success.txt"  # Orbax's.
# Written or rewritten by Orbax after the manifest, at the commit itself.
_NOT_CHECKSUMMED = (MANIFEST_FILE, COMMIT_MARKER, "_CHECKPOINT_METADATA")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
DAMAGED_DIR = "checkpoints.damaged"


@dataclasses.dataclass(frozen=True)
class Damaged:
  """A step directory that cannot be restored, and why (names the file)."""

  step: int
  path: str
  problem: str

  def __str__(self) -> str:
    return f"step {self.step} ({self.path}): {self.problem}"


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: str) -> list[str]:
  """Relative paths of the checksummed files of a step directory, sorted."""
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      if name not in _NOT_CHECKSUMMED:
        out.append(os.path.relpath(os.path.join(root, name), step_dir))
  return sorted(out)


def write_manifest(step_dir: str, step: int) -> None:
  """Records size and SHA-256 of every file of `step_dir` (atomically)."""
  files = {}
  for name in _files(step_dir):
    path = os.path.join(step_dir, name)
    files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
  tmp = os.path.join(step_dir, MANIFEST_FILE + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"step": step, "files": files}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST_FILE))


def pending_step_dir(directory: str, step: int) -> Optional[str]:
  """The directory Orbax is writing `step` to: its temporary directory
  (atomic-rename saves) or the step directory itself (commit-file saves)."""
  prefix = f"{step}{_TMP_SUFFIX}"
  tmp = sorted(d for d in os.listdir(directory) if d.startswith(prefix))
  if tmp:
    return os.path.join(directory, tmp[-1])
  final = os.path.join(directory, str(step))
  return final if os.path.isdir(final) else None


def verify(step_dir: str) -> Optional[str]:
  """None if `step_dir` is intact, else what is wrong, naming the file."""
  if not os.path.isdir(step_dir):
    return "the directory is missing"
  if not os.path.exists(os.path.join(step_dir, COMMIT_MARKER)):
    return f"no commit marker {COMMIT_MARKER} (its write did not finish)"
  manifest_path = os.path.join(step_dir, MANIFEST_FILE)
  if not os.path.exists(manifest_path):
    logging.info(
        "%s has no %s (written before flix recorded checksums); restored "
        "unverified.",
        step_dir,
        MANIFEST_FILE,
    )
    return None
  try:
    with open(manifest_path, encoding="utf-8") as f:
      files = json.load(f)["files"]
  except (ValueError, KeyError, UnicodeDecodeError) as e:
    return f"{MANIFEST_FILE} is unreadable ({e})"
  # Sizes first (cheap: a truncated file is found without hashing), then
  # the checksums.
  for name, record in files.items():
    path = os.path.join(step_dir, name)
    if not os.path.exists(path):
      return f"{name} is missing"
    size = os.path.getsize(path)
    if size != record["bytes"]:
      return f"{name} has {size} bytes, {record['bytes']} were written"
  for name, record in files.items():
    if _sha256(os.path.join(step_dir, name)) != record["sha256"]:
      return f"{name} is corrupted (its SHA-256 differs from the one written)"
  return None


def step_dirs(directory: str) -> dict[int, str]:
  """`{step: path}` of the committed-looking step directories, any order."""
  if not os.path.isdir(directory):
    return {}
  return {
      int(name): os.path.join(directory, name)
      for name in os.listdir(directory)
      if name.isdigit() and os.path.isdir(os.path.join(directory, name))
  }


def latest_intact_step(
    directory: str,
) -> tuple[Optional[int], list[Damaged]]:
  """The newest intact step of a checkpoints/ directory, and the damaged
  steps newer than it (newest first). (None, [...]) if none is intact."""
  damaged = []
  for step, path in sorted(step_dirs(directory).items(), reverse=True):
    problem = verify(path)
    if problem is None:
      return step, damaged
    damaged.append(Damaged(step, path, problem))
  return None, damaged


def set_aside(damaged: Damaged, model_dir: str) -> str:
  """Moves a damaged step out of checkpoints/ into `checkpoints.damaged/`
  (kept for inspection; a resumed run writes that step again)."""
  target_root = os.path.join(model_dir, DAMAGED_DIR)
  os.makedirs(target_root, exist_ok=True)
  target, copies = os.path.join(target_root, str(damaged.step)), 1
  while os.path.exists(target):
    copies += 1
    target = os.path.join(target_root, f"{damaged.step}-{copies}")
  shutil.move(damaged.path, target)
  return target
