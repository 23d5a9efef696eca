"""Tests for flix.checkpoints and flix.checkpoint_integrity: save/restore,
the checksum manifest, damaged steps, base-checkpoint formats."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from flix import checkpoint_integrity
from flix import checkpoints
from flix import t5x_checkpoint


def _params(step):
  return {"encoder": {"w": np.full((3, 4), float(step), np.float32)}}


def _meta(step):
  return {
      "step": step,
      "feature_space": None,
      "base": {"initial_checkpoint": None, "init_seed": 0},
      "data": {"batches_consumed": step},
  }


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A MODEL_DIR with steps 1 and 2 saved by `Checkpointer`."""
  model_dir = str(tmp_path_factory.mktemp("saved") / "run")
  checkpointer = checkpoints.Checkpointer(model_dir, keep=None)
  for step in (1, 2):
    params = _params(step)
    checkpointer.save(step, params, {"mu": params}, _meta(step), force=True)
  checkpointer.close()
  return model_dir


@pytest.fixture
def run_dir(saved_run, tmp_path):
  """A fresh copy of `saved_run` a test may damage."""
  copy = str(tmp_path / "run")
  shutil.copytree(saved_run, copy)
  return copy


def _step_dir(model_dir, step):
  return os.path.join(model_dir, "checkpoints", str(step))


def _largest_params_file(step_dir):
  files = [
      p for p in pathlib.Path(step_dir, "params").rglob("*") if p.is_file()
  ]
  return max(files, key=lambda p: p.stat().st_size)


# ---- Save, checksums, restore ----


def test_each_step_is_committed_with_a_manifest_of_its_files(run_dir):
  for step in (1, 2):
    step_dir = _step_dir(run_dir, step)
    with open(os.path.join(step_dir, checkpoint_integrity.MANIFEST_FILE)) as f:
      manifest = json.load(f)
    assert manifest["step"] == step
    assert "meta/metadata" in manifest["files"]
    assert any(name.startswith("params/") for name in manifest["files"])
    assert checkpoint_integrity.verify(step_dir) is None
  assert checkpoint_integrity.latest_intact_step(
      os.path.join(run_dir, "checkpoints")
  ) == (2, [])


def test_restore_and_read_back_what_was_saved(run_dir):
  checkpointer = checkpoints.Checkpointer(run_dir)
  assert checkpointer.latest_step() == 2
  params, opt_state, meta = checkpointer.restore(
      2, _params(0), {"mu": _params(0)}
  )
  checkpointer.close()
  np.testing.assert_array_equal(params["encoder"]["w"], np.full((3, 4), 2.0))
  np.testing.assert_array_equal(
      opt_state["mu"]["encoder"]["w"], np.full((3, 4), 2.0)
  )
  assert meta == _meta(2)
  assert checkpoints.read_meta(run_dir) == _meta(2)
  params, opt_state, meta = checkpoints.read_train_state(_step_dir(run_dir, 1))
  np.testing.assert_array_equal(params["encoder"]["w"], np.full((3, 4), 1.0))
  assert meta["step"] == 1


def test_restore_of_a_damaged_step_is_an_error_naming_it(run_dir):
  with open(_largest_params_file(_step_dir(run_dir, 2)), "r+b") as f:
    f.truncate(3)
  checkpointer = checkpoints.Checkpointer(run_dir)
  with pytest.raises(ValueError, match=r"Checkpoint step 2 in .* cannot be"):
    checkpointer.restore(2, _params(0), {"mu": _params(0)})
  checkpointer.close()


def test_a_save_interrupted_by_a_kill_is_ignored_and_cleaned(run_dir):
  leftover = os.path.join(run_dir, "checkpoints", "3.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(leftover, "params"))
  assert checkpoint_integrity.latest_intact_step(
      os.path.join(run_dir, "checkpoints")
  ) == (2, [])
  checkpointer = checkpoints.Checkpointer(run_dir)
  checkpointer.save(3, _params(3), {"mu": _params(3)}, _meta(3), force=True)
  checkpointer.close()
  assert not os.path.exists(leftover)
  assert checkpoint_integrity.verify(_step_dir(run_dir, 3)) is None


# ---- Damage ----


def _truncate(step_dir):
  path = _largest_params_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)
  return os.path.relpath(path, step_dir), "bytes"


def _flip_byte(step_dir):
  path = _largest_params_file(step_dir)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))
  return os.path.relpath(path, step_dir), "corrupted"


def _remove_commit_marker(step_dir):
  os.remove(os.path.join(step_dir, checkpoint_integrity.COMMIT_MARKER))
  return checkpoint_integrity.COMMIT_MARKER, "did not finish"


def _remove_meta(step_dir):
  os.remove(os.path.join(step_dir, "meta", "metadata"))
  return "meta/metadata", "missing"


@pytest.mark.parametrize(
    "damage", [_truncate, _flip_byte, _remove_commit_marker, _remove_meta]
)
def test_damage_is_detected_naming_the_file(run_dir, damage):
  step_dir = _step_dir(run_dir, 2)
  name, words = damage(step_dir)
  problem = checkpoint_integrity.verify(step_dir)
  assert name in problem and words in problem
  step, damaged = checkpoint_integrity.latest_intact_step(
      os.path.join(run_dir, "checkpoints")
  )
  assert step == 1
  assert [(d.step, d.problem) for d in damaged] == [(2, problem)]
  assert f"step 2 ({step_dir}): {problem}" == str(damaged[0])


def test_readers_skip_a_damaged_latest_step_with_a_warning(run_dir, caplog):
  name, _ = _truncate(_step_dir(run_dir, 2))
  assert checkpoints.resolve_step_dir(run_dir) == _step_dir(run_dir, 1)
  assert "Skipping damaged checkpoint step 2" in caplog.text
  assert name in caplog.text
  assert checkpoints.read_meta(run_dir)["step"] == 1
  with pytest.raises(ValueError, match=f"is damaged: {name}"):
    checkpoints.resolve_step_dir(_step_dir(run_dir, 2))


def test_no_intact_step_is_an_error_listing_each(run_dir):
  for step in (1, 2):
    _truncate(_step_dir(run_dir, step))
  step, damaged = checkpoint_integrity.latest_intact_step(
      os.path.join(run_dir, "checkpoints")
  )
  assert step is None and [d.step for d in damaged] == [2, 1]
  with pytest.raises(ValueError, match=r"No intact checkpoint in .*step 2.*"):
    checkpoints.read_meta(run_dir)


def test_set_aside_moves_a_damaged_step_out_of_checkpoints(run_dir):
  _truncate(_step_dir(run_dir, 2))
  _, damaged = checkpoint_integrity.latest_intact_step(
      os.path.join(run_dir, "checkpoints")
  )
  target = checkpoint_integrity.set_aside(damaged[0], run_dir)
  assert target == os.path.join(run_dir, "checkpoints.damaged", "2")
  assert not os.path.exists(_step_dir(run_dir, 2))
  shutil.copytree(target, _step_dir(run_dir, 2))
  _, damaged = checkpoint_integrity.latest_intact_step(
      os.path.join(run_dir, "checkpoints")
  )
  assert checkpoint_integrity.set_aside(damaged[0], run_dir).endswith("2-2")


def test_a_step_without_manifest_is_accepted_unverified(run_dir):
  step_dir = _step_dir(run_dir, 2)
  os.remove(os.path.join(step_dir, checkpoint_integrity.MANIFEST_FILE))
  assert checkpoint_integrity.verify(step_dir) is None


def test_write_manifest_matches_a_naive_listing(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "x.bin").write_bytes(b"hello")
  (tmp_path / "y").write_bytes(b"")
  (tmp_path / checkpoint_integrity.COMMIT_MARKER).write_text("later")
  checkpoint_integrity.write_manifest(str(tmp_path), 7)
  manifest = json.loads(
      (tmp_path / checkpoint_integrity.MANIFEST_FILE).read_text()
  )
  assert manifest == {
      "step": 7,
      "files": {
          "a/x.bin": {
              "bytes": 5,
              "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e7304"
              "3362938b9824",
          },
          "y": {
              "bytes": 0,
              "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495"
              "991b7852b855",
          },
      },
  }


# ---- Base checkpoints ----


def test_missing_base_path_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/nowhere does not"):
    checkpoints.load_any_params(str(tmp_path / "nowhere"))


def test_unknown_format_lists_the_known_ones(tmp_path):
  (tmp_path / "weights.npz").write_bytes(b"\0")
  with pytest.raises(ValueError, match="is not a checkpoint flix can read"):
    checkpoints.load_any_params(str(tmp_path))


def test_hf_directory_without_weights(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="config.json but no weights"):
    checkpoints.load_any_params(str(tmp_path))


def test_t5x_directory_without_its_checkpoint_file(tmp_path):
  out = str(tmp_path / "checkpoint_5")
  t5x_checkpoint.write_t5x_checkpoint(
      {"encoder": {"w": np.ones((4, 4), np.float32)}},
      out,
      step=5,
      inline_max_size=1,
  )
  os.remove(os.path.join(out, "checkpoint"))
  with pytest.raises(FileNotFoundError, match="no `checkpoint` file"):
    checkpoints.load_any_params(out)


def test_shape_mismatch_names_the_parameter(run_dir):
  target = {"encoder": {"w": np.zeros((3, 5), np.float32)}}
  with pytest.raises(ValueError, match=r"encoder/w: checkpoint \(3, 4\)"):
    checkpoints.restore_base_params(target, run_dir)


def test_base_params_load_from_a_flix_run(run_dir):
  target = {"encoder": {"w": np.zeros((3, 4), np.float32)}}
  loaded = checkpoints.restore_base_params(target, run_dir)
  np.testing.assert_array_equal(loaded["encoder"]["w"], np.full((3, 4), 2.0))


def test_a_flix_run_without_its_vocabulary_file(run_dir):
  for step in (1, 2):
    os.remove(os.path.join(_step_dir(run_dir, step), "meta", "metadata"))
    os.remove(
        os.path.join(
            _step_dir(run_dir, step), checkpoint_integrity.MANIFEST_FILE
        )
    )
  with pytest.raises(FileNotFoundError, match="meta/metadata is missing"):
    checkpoints.read_meta(run_dir)
