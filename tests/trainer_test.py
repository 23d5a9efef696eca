"""Tests for flix.trainer: resume, damaged checkpoints, resume safety, the
MODEL_DIR lock, non-finite steps, evaluation after a stop, argument checks.

In process, on a tiny network and a 24-line JSONL task; the SIGKILL tests of
the same behaviour through the command line are in kill_resume_test.py.
"""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flix import checkpoint_integrity
from flix import checkpoints
from flix import featurized
from flix import models
from flix import resume
from flix import run_lock
from flix import run_meta
from flix import t5_config
from flix import train_step
from flix import trainer
from flix_tasks import jsonl

TASK = "trainer_test_jsonl"
LENGTHS = {"inputs": 16, "targets": 16}


@pytest.fixture(scope="module", autouse=True)
def task(tmp_path_factory):
  rows = [
      {
          "inputs": f"say {i}",
          # Every sixth is longer than LENGTHS: truncated.
          "targets": str(i) * (1 + i % 5) + ("x" * 20 if i % 6 == 0 else ""),
          "features": {"task": ["echo", "double"][i % 2], "language": lang},
      }
      for i, lang in zip(range(24), ["en", "fr", "de"] * 8)
  ]
  path = tmp_path_factory.mktemp("data") / "train.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  jsonl.register_jsonl_task(TASK, train_pattern=str(path))


def _model(rank=2):
  space = featurized.feature_space(TASK, ranks=rank, dropout=0.2)
  return models.FlixModel(
      t5_config.preset("tiny", feature_space=space, dropout_rate=0.1)
  )


def _train(model_dir, train_steps, **overrides):
  kwargs = dict(
      model=_model(),
      model_dir=str(model_dir),
      mixture_or_task_name=TASK,
      task_feature_lengths=LENGTHS,
      train_steps=train_steps,
      batch_size=2,
      optimizer=train_step.make_optimizer(1e-2, "adamw"),
      checkpoint_period=2,
      log_period=1,
  )
  kwargs.update(overrides)
  return trainer.train(**kwargs)


def _state(model_dir):
  return checkpoints.read_train_state(str(model_dir))


def _assert_same_state(a, b):
  params_a, opt_a, meta_a = a
  params_b, opt_b, meta_b = b
  assert (meta_a["step"], meta_a["data"]) == (meta_b["step"], meta_b["data"])
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  jax.tree.map(np.testing.assert_array_equal, opt_a, opt_b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 4-step run (checkpoints 2 and 4)."""
  model_dir = tmp_path_factory.mktemp("reference") / "run"
  _train(model_dir, 4)
  return model_dir


@pytest.fixture
def copy_of_reference(reference, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(reference, copy)
  return copy


def _step_dir(model_dir, step):
  return os.path.join(model_dir, "checkpoints", str(step))


def _truncate_params_file(step_dir):
  path = max(
      (p for p in pathlib.Path(step_dir, "params").rglob("*") if p.is_file()),
      key=lambda p: p.stat().st_size,
  )
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)
  return os.path.relpath(path, step_dir)


def _snapshot(directory):
  """Size and mtime of every file but the lock (taken and released)."""
  return {
      str(p): (p.stat().st_size, p.stat().st_mtime_ns)
      for p in pathlib.Path(directory).rglob("*")
      if p.name != run_lock.LOCK_FILE
  }


def test_the_reference_records_its_data_position(reference):
  meta = _state(reference)[2]
  assert meta["step"] == 4
  assert meta["data"] == {
      "mixture_or_task_name": TASK,
      "seed": 0,
      "batches_consumed": 4,
  }


def test_a_damaged_latest_checkpoint_is_set_aside_and_retrained(
    reference, copy_of_reference, caplog
):
  name = _truncate_params_file(_step_dir(copy_of_reference, 4))
  _train(copy_of_reference, 4)
  assert (
      f"Checkpoint step 4 ({_step_dir(copy_of_reference, 4)}): {name} has"
      in caplog.text
  )
  assert "resuming from step 2" in caplog.text
  assert "Checkpoint step 2 verified in" in caplog.text
  assert os.path.isdir(
      os.path.join(copy_of_reference, checkpoint_integrity.DAMAGED_DIR, "4")
  )
  # Resumed from step 2, it ends where the uninterrupted run ended.
  _assert_same_state(_state(copy_of_reference), _state(reference))


def test_with_no_intact_checkpoint_the_run_stops_and_changes_nothing(
    copy_of_reference,
):
  for step in (2, 4):
    _truncate_params_file(_step_dir(copy_of_reference, step))
  before = _snapshot(copy_of_reference)
  with pytest.raises(ValueError) as error:
    _train(copy_of_reference, 4, operative_config="# new config")
  message = str(error.value)
  assert message.startswith("No intact checkpoint to resume in")
  assert "step 4 (" in message and "step 2 (" in message
  assert "Nothing was changed" in message
  assert _snapshot(copy_of_reference) == before


def test_resuming_with_another_feature_space_is_an_error(copy_of_reference):
  before = _snapshot(copy_of_reference)
  with pytest.raises(run_meta.ResumeMismatchError) as error:
    _train(
        copy_of_reference,
        6,
        model=_model(rank=4),
        operative_config="# another config",
    )
  assert "feature_space.task.rank: saved 2, now 4" in str(error.value)
  assert "feature_space.language.rank: saved 2, now 4" in str(error.value)
  assert _snapshot(copy_of_reference) == before  # config.gin kept too


def test_resuming_with_another_trainable_set_is_an_error(copy_of_reference):
  with pytest.raises(
      run_meta.ResumeMismatchError, match=r"trainable_patterns: added \['.\*'\]"
  ):
    _train(copy_of_reference, 6, trainable_patterns="all")


def test_a_second_run_on_the_same_model_dir_is_refused(tmp_path):
  with run_lock.RunLock(str(tmp_path)):
    with pytest.raises(run_lock.RunLockedError, match=f"pid {os.getpid()}"):
      _train(tmp_path, 2)
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def _nan_from_step(step):
  """SGD whose learning rate is NaN from optimizer step `step` on."""
  return optax.sgd(lambda count: jnp.where(count >= step - 1, jnp.nan, 1e-2))


def test_a_non_finite_step_stops_the_run_keeping_the_last_checkpoint(
    tmp_path,
):
  with pytest.raises(trainer.NonFiniteLossError) as error:
    _train(
        tmp_path,
        6,
        optimizer=_nan_from_step(3),
        checkpoint_period=1,
        log_period=10,
    )
  message = str(error.value)
  assert message.startswith("Non-finite loss at step 3 (loss ")
  assert f"the last checkpoint, step 2 in {tmp_path}/checkpoints" in message
  assert "nonfinite_loss = 'skip'" in message
  assert checkpoint_integrity.latest_intact_step(
      os.path.join(tmp_path, "checkpoints")
  ) == (2, [])
  assert not os.path.exists(_step_dir(tmp_path, 3))


def test_skipping_non_finite_steps_keeps_the_last_good_state(tmp_path, caplog):
  _train(
      tmp_path,
      4,
      optimizer=_nan_from_step(3),
      nonfinite_loss="skip",
      checkpoint_period=2,
  )
  assert "Step 3 skipped" in caplog.text and "Step 4 skipped" in caplog.text
  # Truncation is reported once, not per example or per step.
  assert caplog.text.count("had targets longer than TASK_FEATURE_") == 1
  params_2, opt_2, _ = checkpoints.read_train_state(_step_dir(tmp_path, 2))
  params_4, opt_4, meta_4 = checkpoints.read_train_state(str(tmp_path))
  assert meta_4["step"] == 4 and meta_4["data"]["batches_consumed"] == 4
  jax.tree.map(np.testing.assert_array_equal, params_2, params_4)
  jax.tree.map(np.testing.assert_array_equal, opt_2, opt_4)


def test_an_evaluation_a_stop_interrupted_is_run_again(reference, tmp_path):
  calls = []

  def evaluate_fn(run, step, model_dir):
    del run, model_dir
    calls.append(step)

  shutil.copytree(reference, tmp_path / "run")
  # The reference had no evaluation: step 4 counts as interrupted.
  _train(tmp_path / "run", 4, evaluate_fn=evaluate_fn, eval_period=2)
  assert calls == [4]
  # Recorded as done, so a restart does not evaluate it again.
  assert resume.last_evaluated_step(str(tmp_path / "run")) == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(train_steps="ten"),
            "trainer.train: train_steps must be an integer >= 1, got 'ten' "
            "(str).",
        ),
        (
            dict(batch_size=2.5),
            "trainer.train: batch_size must be an integer >= 1, got 2.5 "
            "(float).",
        ),
        (
            dict(task_feature_lengths={"inputs": 16}),
            "trainer.train: task_feature_lengths must be a dict with 'inputs'"
            " and 'targets' lengths, got {'inputs': 16}.",
        ),
        (
            dict(nonfinite_loss="ignore"),
            "trainer.train: nonfinite_loss must be one of ('stop', 'skip'), "
            "got 'ignore'.",
        ),
    ],
)
def test_mistyped_arguments_are_named_before_anything_is_written(
    tmp_path, overrides, message
):
  overrides = {"train_steps": 2, **overrides}
  with pytest.raises(ValueError) as error:
    _train(tmp_path / "run", **overrides)
  assert str(error.value) == message
  assert not os.path.exists(tmp_path / "run")


def test_a_model_dir_that_cannot_be_created_is_named(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(OSError, match=f"MODEL_DIR {tmp_path}/file/run cannot"):
    _train(tmp_path / "file" / "run", 2)
