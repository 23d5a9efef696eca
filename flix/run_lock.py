"""One writer per MODEL_DIR: a lock file naming the run that holds it.

`MODEL_DIR/flix.lock` is held with `flock` for as long as a training run
writes checkpoints there, and records the holder's pid, host and start time
so a second run can say who holds it. The operating system releases an
`flock` when its process dies, however it dies, so the lock of a killed run
is stale the moment it is killed: the next run takes it over, warning with
the dead holder's record. The lock file is emptied, never deleted, on
release (deleting it would let two runs lock two different files).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from typing import Any, Optional

LOCK_FILE = "flix.lock"


class RunLockedError(OSError):
  """Another live run holds the MODEL_DIR (an OSError, like EBUSY)."""


def _describe(record: dict[str, Any]) -> str:
  return (
      f"pid {record.get('pid')} on host {record.get('host')} (started "
      f"{record.get('started')})"
  )


def _read(f) -> Optional[dict[str, Any]]:
  f.seek(0)
  text = f.read().strip()
  if not text:
    return None
  try:
    return json.loads(text)
  except ValueError:
    return {"pid": "?", "host": "?", "started": f"unreadable: {text[:80]!r}"}


class RunLock:
  """`with RunLock(model_dir):` holds MODEL_DIR for this process."""

  def __init__(self, model_dir: str):
    self.path = os.path.join(model_dir, LOCK_FILE)
    self._file = None

  def acquire(self) -> None:
    """Takes the lock, or raises `RunLockedError` naming the live holder."""
    f = open(self.path, "a+", encoding="utf-8")
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(f)
      f.close()
      raise RunLockedError(
          f"{os.path.dirname(self.path)} is in use by another training run"
          f" ({_describe(holder) if holder else 'holder unknown'}): two runs"
          " cannot write the same checkpoints. Wait for it or stop it, or "
          "give this run another MODEL_DIR."
      ) from None
    stale = _read(f)
    if stale is not None:
      logging.warning(
          "Taking over the lock %s of a run that is no longer running " "(%s).",
          self.path,
          _describe(stale),
      )
    f.seek(0)
    f.truncate()
    f.write(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(
                    timespec="seconds"
                ),
            }
        )
    )
    f.flush()
    os.fsync(f.fileno())
    self._file = f

  def release(self) -> None:
    if self._file is None:
      return
    self._file.seek(0)
    self._file.truncate()
    self._file.flush()
    fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
    self._file.close()
    self._file = None

  def __enter__(self) -> "RunLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
