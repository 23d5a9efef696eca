"""Starting a training run in its MODEL_DIR, the first time or after a kill.

`prepare` finds where to resume: the newest intact checkpoint
(`flix.checkpoint_integrity`; damaged newer steps are reported and moved to
`MODEL_DIR/checkpoints.damaged/`), after checking that this configuration
trains what the saved run trained (`flix.run_meta`). With checkpoints but
none intact, or another configuration, it raises before changing anything.
`last_evaluated_step` / `record_evaluated_step` let a restart redo an
evaluation a kill interrupted.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping, Optional

from flix import checkpoint_integrity
from flix import checkpoints
from flix import run_meta

# MODEL_DIR file naming the last step whose evaluation finished.
EVAL_RECORD_FILE = "last_evaluated_step"


def create_model_dir(model_dir: str) -> None:
  """Creates MODEL_DIR; an error naming it if it cannot be written."""
  try:
    os.makedirs(model_dir, exist_ok=True)
  except OSError as e:
    raise OSError(
        e.errno, f"MODEL_DIR {model_dir} cannot be created ({e.strerror})"
    ) from None
  if not os.access(model_dir, os.W_OK | os.X_OK):
    raise PermissionError(f"MODEL_DIR {model_dir} is not writable.")


def prepare(model_dir: str, meta: Mapping[str, Any]) -> Optional[int]:
  """The step to resume from (None: start from scratch).

  Args:
    model_dir: the run's MODEL_DIR (held by this process).
    meta: this run's meta (`checkpoints.run_meta`), compared with the saved.

  Returns:
    the newest intact checkpoint step, or None if there is no checkpoint.

  Raises:
    ValueError: every checkpoint is damaged, or (`run_meta.
      ResumeMismatchError`) the saved run trained something else; in both
      cases nothing was changed.
  """
  directory = checkpoints.checkpoint_dir(model_dir)
  started = time.time()
  step, damaged = checkpoint_integrity.latest_intact_step(directory)
  if step is None:
    if damaged:
      raise ValueError(
          f"No intact checkpoint to resume in {directory}: "
          + "; ".join(str(d) for d in damaged)
          + ". Nothing was changed; move the damaged steps away (or give a "
          "new MODEL_DIR) to start the run again."
      )
    return None
  logging.info(
      "Checkpoint step %d verified in %.2f s (%d damaged newer steps).",
      step,
      time.time() - started,
      len(damaged),
  )
  saved = checkpoints.read_step_meta(os.path.join(directory, str(step)))
  run_meta.check_resumable(saved, meta, model_dir)
  for bad in damaged:
    logging.warning(
        "Checkpoint %s is damaged: moved to %s; resuming from step %d.",
        bad,
        checkpoint_integrity.set_aside(bad, model_dir),
        step,
    )
  return step


def last_evaluated_step(model_dir: str) -> Optional[int]:
  try:
    with open(os.path.join(model_dir, EVAL_RECORD_FILE)) as f:
      return int(f.read().strip())
  except (OSError, ValueError):
    return None


def record_evaluated_step(model_dir: str, step: int) -> None:
  path = os.path.join(model_dir, EVAL_RECORD_FILE)
  with open(path + ".tmp", "w") as f:
    f.write(str(step))
  os.replace(path + ".tmp", path)
