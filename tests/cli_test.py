"""End to end through the CLI on a tiny config: train, kill, resume, eval,
infer. Each command runs as `python -m flix.<entry>` in a subprocess."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
from flax import traverse_util

import conftest
from flix import checkpoints
from flix import layers

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--gin_file=configs/models/tiny.gin",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 48}",
    "--gin.BATCH_SIZE=4",
    "--gin.LOG_PERIOD=1",
]


_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")


_run = conftest.run_module


def _run_and_kill(module, args, log_line, committed_dir):
  """Starts `python -m module`, SIGKILLs it once it logged `log_line` and
  `committed_dir` exists (a checkpoint Orbax has finished); returns its log."""
  log_path = pathlib.Path(committed_dir).parents[2] / "killed.log"
  with open(log_path, "w") as log:
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=_ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
  deadline = time.time() + 600
  while time.time() < deadline and process.poll() is None:
    if log_line in log_path.read_text() and os.path.isdir(committed_dir):
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  assert process.wait(timeout=60) == -signal.SIGKILL, log_path.read_text()
  return log_path.read_text()


def _meta(model_dir, step):
  with open(
      os.path.join(model_dir, "checkpoints", str(step), "meta", "metadata")
  ) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A base run, then a FLix run killed after 3 steps and resumed.

  The base (full fine-tuning) and the resumed run scan their layers, the
  killed run does not: checkpoints are per layer, so runs are interchangeable.
  """
  root = tmp_path_factory.mktemp("cli")
  base, flix = str(root / "base"), str(root / "flix")
  _run(
      "flix.train",
      "--gin_file=configs/demo_base.gin",
      *TINY,
      f'--gin.MODEL_DIR="{base}"',
      "--gin.TRAIN_STEPS=2",
      "--gin.CHECKPOINT_PERIOD=2",
      "--gin.SCAN_LAYERS=True",
  )
  flix_args = [
      "--gin_file=configs/demo.gin",
      *TINY,
      f'--gin.MODEL_DIR="{flix}"',
      f'--gin.INITIAL_CHECKPOINT_PATH="{base}"',
      "--gin.TRAIN_STEPS=6",
      "--gin.CHECKPOINT_PERIOD=2",
      "--gin.EVALUATOR_NUM_EXAMPLES=2",
      "--gin.EVAL_BATCH_SIZE=8",
  ]
  first = _run_and_kill(
      "flix.train",
      flix_args,
      "step 3/6",
      os.path.join(flix, "checkpoints", "2"),
  )
  second = _run(
      "flix.train",
      *flix_args,
      "--gin.SCAN_LAYERS=True",
      "--gin.REMAT_POLICY='minimal'",
  )
  return {
      "root": root,
      "base": base,
      "flix": flix,
      "first": first,
      "second": second,
  }


def test_training_resumes_at_saved_step_and_data_position(trained):
  assert "step 3/6" in trained["first"]
  # Killed after step 3 with checkpoint 2 complete (a later one may have
  # completed before the kill landed): training resumes at the latest.
  resumed = re.search(r"Resumed from step (\d+)", trained["second"])
  assert resumed and int(resumed.group(1)) in (2, 4)
  assert f"step {int(resumed.group(1)) + 1}/6" in trained["second"]
  meta = _meta(trained["flix"], 6)
  assert meta["step"] == 6
  assert meta["data"]["batches_consumed"] == 6
  assert meta["base"]["initial_checkpoint"] == trained["base"]
  assert {g["name"] for g in meta["feature_space"]["groups"]} == {
      "task",
      "language",
  }
  steps = sorted(
      int(d)
      for d in os.listdir(os.path.join(trained["flix"], "checkpoints"))
      if d.isdigit()
  )
  assert steps[-1] == 6


def test_checkpoint_is_adapter_only(trained):
  """The FLix run's checkpoint holds its adapters and nothing of the base."""
  params, _ = checkpoints.read_flix_checkpoint(trained["flix"])
  names = traverse_util.flatten_dict(params, sep="/")
  assert names and all(
      layers.ADAPTER_LEAF_RE.match(n.split("/")[-1]) for n in names
  )
  base, _ = checkpoints.read_flix_checkpoint(trained["base"])
  assert not set(names) & set(traverse_util.flatten_dict(base, sep="/"))


def test_eval_writes_results_table_and_heatmap(trained):
  eval_dir = os.path.join(trained["flix"], "eval")
  rows = json.load(open(os.path.join(eval_dir, "results-validation-6.json")))
  assert {"features", "metric", "value", "examples", "seen_in_training"} <= set(
      rows[0]
  )
  zero_shot = {
      (r["features"]["task"], r["features"]["language"])
      for r in rows
      if r["seen_in_training"] is False
  }
  assert ("ordinal", "fr") in zero_shot
  assert (
      os.path.getsize(os.path.join(eval_dir, "results-validation-6.png")) > 1000
  )
  assert (
      "ZERO-SHOT"
      in open(os.path.join(eval_dir, "results-validation-6.txt")).read()
  )


def test_standalone_eval(trained):
  out = str(trained["root"] / "eval")
  _run(
      "flix.eval",
      "--gin_file=configs/demo_eval.gin",
      "--gin_file=configs/models/tiny.gin",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 48}",
      f'--gin.CHECKPOINT_PATH="{trained["flix"]}"',
      f'--gin.EVAL_OUTPUT_DIR="{out}"',
      "--gin.EVALUATOR_NUM_EXAMPLES=1",
      "--gin.MIXTURE_OR_TASK_NAME='numbers_ordinal_fr_demo'",
      "--gin.EVAL_SPLIT='test'",
  )
  rows = json.load(open(os.path.join(out, "results-test-6.json")))
  assert rows and all(r["seen_in_training"] is False for r in rows)


def test_infer_composes_unseen_pairs_and_warns_on_unknown(trained):
  inputs = trained["root"] / "inputs.jsonl"
  inputs.write_text(
      '{"inputs": "ordinal fr: 12", "features": {"task": "ordinal", '
      '"language": "fr"}}\n'
      '{"inputs": "cardinal xx: 7", "features": {"task": "cardinal", '
      '"language": "klingon"}}\n\n'
  )
  out = str(trained["root"] / "infer")
  log = _run(
      "flix.infer",
      "--gin_file=configs/demo_infer.gin",
      "--gin_file=configs/models/tiny.gin",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 48}",
      f'--gin.CHECKPOINT_PATH="{trained["flix"]}"',
      f'--gin.INFER_OUTPUT_DIR="{out}"',
      f'--gin.INPUT_FILE="{inputs}"',
  )
  assert "klingon" in log  # the unknown value's warning
  lines = [
      json.loads(l) for l in open(os.path.join(out, "inputs-predictions.jsonl"))
  ]
  assert [l["inputs"] for l in lines] == ["ordinal fr: 12", "cardinal xx: 7"]
  assert all(isinstance(l["prediction"], str) for l in lines)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "flix.train",
          "--gin_file=configs/demo.gin",
          *TINY,
          f'--gin.MODEL_DIR="{tmp_path}/run"',
          f'--gin.INITIAL_CHECKPOINT_PATH="{tmp_path}/nowhere"',
          "--gin.TRAIN_STEPS=1",
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode != 0
  assert f"{tmp_path}/nowhere does not exist" in result.stderr


def test_bring_your_own_jsonl_trains_without_python(tmp_path):
  lines = [
      json.dumps(
          {
              "inputs": f"say {i}",
              "targets": str(i) * 2,
              "features": {"task": "echo", "language": lang},
          }
      )
      for i, lang in zip(range(12), ["en", "fr", "de"] * 4)
  ]
  lines.append(json.dumps({"inputs": "x", "targets": "y", "features": {}}))
  (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
  model_dir = str(tmp_path / "run")
  _run(
      "flix.train",
      "--gin_file=configs/byo_jsonl.gin",
      *TINY,
      f'--gin.MODEL_DIR="{model_dir}"',
      f'--gin.TRAIN_FILES="{tmp_path}/train*.jsonl"',
      "--gin.TRAIN_STEPS=2",
      "--gin.trainer.train.evaluate_fn=None",
  )
  meta = _meta(model_dir, 2)
  groups = {g["name"]: g["values"] for g in meta["feature_space"]["groups"]}
  assert groups == {"task": ["echo"], "language": ["de", "en", "fr"]}
