"""SIGKILL a training run twice (during a checkpoint write, then during an
evaluation), restart it with the same command: it ends bit-identical to an
uninterrupted run. `scripts/soak_kill.py` does the same with random kills."""

import os
import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import soak_kill  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS, CHECKPOINT_PERIOD, EVAL_PERIOD = 6, 2, 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("kill")
  data = soak_kill.write_data(str(root / "data"))
  settings = (data, STEPS, CHECKPOINT_PERIOD, EVAL_PERIOD)
  reference, killed = str(root / "reference"), str(root / "killed")
  soak_kill.finish(
      soak_kill.train_args(reference, *settings), str(root / "reference.log")
  )
  args = soak_kill.train_args(killed, *settings)

  # Kill 1: as soon as a checkpoint write is under way.
  process = soak_kill.start(args, str(root / "kill1.log"))
  writing = soak_kill.poll(
      process, lambda: soak_kill.checkpoint_writes(killed), 1200
  )
  assert writing, (root / "kill1.log").read_text()[-3000:]
  soak_kill.kill(process)

  # Kill 2: during an evaluation.
  process = soak_kill.start(args, str(root / "kill2.log"))
  evaluating = soak_kill.wait_for(
      process, str(root / "kill2.log"), r"Evaluating step (\d+)\.", 1200
  )
  assert evaluating, (root / "kill2.log").read_text()[-3000:]
  soak_kill.kill(process)

  final = soak_kill.finish(args, str(root / "final.log"))
  return {
      "reference": reference,
      "killed": killed,
      "writing": writing,
      "kill2": (root / "kill2.log").read_text(),
      "evaluated": int(evaluating.group(1)),
      "final": final,
  }


def test_two_kills_end_bit_identical_to_an_uninterrupted_run(runs):
  assert soak_kill.max_difference(runs["reference"], runs["killed"]) == 0.0


def test_the_restarts_resume_from_committed_checkpoints(runs):
  # The first kill landed in a write: no temporary directory is left, and
  # every step directory is intact.
  assert not soak_kill.checkpoint_writes(runs["killed"])
  from flix import checkpoint_integrity  # pylint: disable=g-import-not-at-top

  directory = os.path.join(runs["killed"], "checkpoints")
  assert checkpoint_integrity.latest_intact_step(directory) == (STEPS, [])
  # The second kill landed in the evaluation of a saved step: the final
  # restart resumed there and ran that evaluation again.
  assert runs["evaluated"] == EVAL_PERIOD
  assert f"Resumed from step {EVAL_PERIOD} " in runs["final"]
  assert f"Evaluating step {EVAL_PERIOD}." in runs["final"]
  assert re.search(r"Taking over the lock .* no longer running", runs["final"])
  eval_dir = os.path.join(runs["killed"], "eval")
  for step in (EVAL_PERIOD, STEPS):
    assert os.path.exists(
        os.path.join(eval_dir, f"results-validation-{step}.json")
    )
