"""Kill -9 soak: random SIGKILLs of a training run, then a bit-for-bit check.

    python scripts/soak_kill.py --kills 10          # ~25 min on 2 CPU cores

Trains a small FLix config (a generated featurized JSONL task through
configs/byo_jsonl.gin; dropout and feature dropout on, so every step draws
random numbers; a checkpoint every 3 steps, an evaluation every 10) once
without interruption, then again in another
MODEL_DIR, killing it with SIGKILL `--kills` times at random moments of its
training and restarting it each time with the same command. Prints where
each kill landed (a step, a checkpoint write, an evaluation) and the step it
resumed from, then the max |difference| between the two runs' final
parameters and optimizer states (0 is the bar) and whether their data
positions agree. Finally it truncates a file of the killed run's latest
checkpoint, restarts once more, and prints how long the restart took to
detect the damage and pick the previous checkpoint (and that it still ends
equal to the uninterrupted run).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
# A small network: startup, not the steps, should dominate each restart.
SMALL_NETWORK = [
    "--gin.network.preset.emb_dim=32",
    "--gin.network.preset.num_heads=2",
    "--gin.network.preset.head_dim=16",
    "--gin.network.preset.mlp_dim=64",
    "--gin.network.preset.num_encoder_layers=2",
    "--gin.network.preset.num_decoder_layers=2",
]


def write_data(directory: str) -> str:
  """A small featurized JSONL task (train and validation files)."""
  os.makedirs(directory, exist_ok=True)
  for split, count in (("train", 96), ("validation", 4)):
    with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
      for i in range(count):
        task = ("echo", "double")[i % 2]
        record = {
            "inputs": f"{task} {i}",
            "targets": str(i) * (1 + i % 2),
            "features": {"task": task, "language": ("en", "fr", "de")[i % 3]},
        }
        f.write(json.dumps(record) + "\n")
  return directory


def train_args(
    model_dir: str,
    data_dir: str,
    train_steps: int,
    checkpoint_period: int,
    eval_period: int,
    extra: Sequence[str] = (),
) -> list[str]:
  """`python -m flix.train` arguments of a small FLix run in `model_dir`
  on the JSONL task of `write_data(data_dir)`."""
  return [
      "--gin_file=configs/byo_jsonl.gin",
      *SMALL_NETWORK,
      f'--gin.TRAIN_FILES="{data_dir}/train.jsonl"',
      f'--gin.VALIDATION_FILES="{data_dir}/validation.jsonl"',
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}",
      "--gin.BATCH_SIZE=4",
      "--gin.DROPOUT_RATE=0.1",
      "--gin.FEATURE_DROPOUT=0.2",
      "--gin.LOG_PERIOD=1",
      f'--gin.MODEL_DIR="{model_dir}"',
      f"--gin.TRAIN_STEPS={train_steps}",
      f"--gin.CHECKPOINT_PERIOD={checkpoint_period}",
      f"--gin.EVAL_PERIOD={eval_period}",
      "--gin.EVALUATOR_NUM_EXAMPLES=2",
      "--gin.EVAL_BATCH_SIZE=2",
      *extra,
  ]


def start(args: Sequence[str], log_path: str) -> subprocess.Popen:
  """Starts `python -m flix.train ARGS`, output to `log_path`."""
  with open(log_path, "w") as log:
    return subprocess.Popen(
        [sys.executable, "-m", "flix.train", *args],
        cwd=REPO,
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def finish(args: Sequence[str], log_path: str, timeout: float = 1200) -> str:
  """Runs `python -m flix.train ARGS` to the end; returns its log."""
  process = start(args, log_path)
  if process.wait(timeout=timeout) != 0:
    raise RuntimeError(f"flix.train failed; see {log_path}")
  return pathlib.Path(log_path).read_text()


def poll(
    process: subprocess.Popen, condition: Callable[[], Any], timeout: float
) -> Any:
  """Polls `condition()` until it is truthy (returns it) or the process
  ends (returns None)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = condition()
    if value:
      return value
    if process.poll() is not None:
      return None
    time.sleep(0.02)
  raise TimeoutError(f"no result after {timeout} s")


def wait_for(
    process: subprocess.Popen, log_path: str, pattern: str, timeout: float
) -> Optional[re.Match]:
  """Polls the log until `pattern` matches (None if the process ended)."""
  return poll(
      process,
      lambda: re.search(pattern, pathlib.Path(log_path).read_text()),
      timeout,
  )


def checkpoint_writes(model_dir: str) -> list[str]:
  """The temporary directories of checkpoint writes under way."""
  return glob.glob(
      os.path.join(model_dir, "checkpoints", "*.orbax-checkpoint-tmp*")
  )


def step_times(log: str) -> dict[int, float]:
  """Seconds (of the day) at which each step's log line was written."""
  return {
      int(step): int(h) * 3600 + int(m) * 60 + float(s)
      for h, m, s, step in re.findall(
          r"^I\d{4} (\d+):(\d+):([\d.]+) .*\] step (\d+)/", log, re.M
      )
  }


def draw_kill(
    rng: random.Random, times: dict[int, float], lowest: int, highest: int
) -> tuple[int, float]:
  """A moment drawn uniformly in time from the uninterrupted run's span from
  step `lowest` to step `highest` + 1, as (the step logged last before it,
  seconds after that step's line)."""
  moment = rng.uniform(times[lowest], times[highest + 1])
  after = max(s for s in range(lowest, highest + 1) if times[s] <= moment)
  return after, moment - times[after]


def activity(model_dir: str, log: str) -> str:
  """What a run is doing now, from its checkpoints/ and its log."""
  writing = checkpoint_writes(model_dir)
  if writing:
    step = os.path.basename(writing[0]).split(".")[0]
    return f"the checkpoint write of step {step}"
  events = re.findall(r"(step (\d+)/\d+ |Evaluating step (\d+)\.)", log)
  if not events:
    return "start-up (before the first step)"
  text, logged, evaluated = events[-1]
  if evaluated:
    return f"the evaluation of step {evaluated}"
  return f"step {int(logged) + 1} (step {logged} logged)"


def kill(process: subprocess.Popen) -> None:
  process.send_signal(signal.SIGKILL)
  if process.wait(timeout=120) != -signal.SIGKILL:
    raise RuntimeError("the run ended before the kill landed")


def max_difference(model_dir_a: str, model_dir_b: str) -> float:
  """Max |a - b| over the final params and optimizer states of two runs;
  raises if their trees, step or data position differ."""
  from flix import checkpoints  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  params_a, opt_a, meta_a = checkpoints.read_train_state(model_dir_a)
  params_b, opt_b, meta_b = checkpoints.read_train_state(model_dir_b)
  if (meta_a["step"], meta_a["data"]) != (meta_b["step"], meta_b["data"]):
    raise AssertionError(
        f"step/data position differ: {meta_a['step']} {meta_a['data']} vs "
        f"{meta_b['step']} {meta_b['data']}"
    )
  leaves_a = jax.tree.leaves((params_a, opt_a))
  leaves_b = jax.tree.leaves((params_b, opt_b))
  if jax.tree.structure((params_a, opt_a)) != jax.tree.structure(
      (params_b, opt_b)
  ):
    raise AssertionError("the two runs' state trees differ")
  return max(
      float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b))))
      if np.size(a)
      else 0.0
      for a, b in zip(leaves_a, leaves_b)
  )


def truncate_latest_checkpoint(model_dir: str) -> tuple[int, str]:
  """Cuts the largest params file of the newest step in half."""
  directory = os.path.join(model_dir, "checkpoints")
  step = max(int(d) for d in os.listdir(directory) if d.isdigit())
  files = [
      p
      for p in glob.glob(
          os.path.join(directory, str(step), "params", "**", "*"),
          recursive=True,
      )
      if os.path.isfile(p)
  ]
  target = max(files, key=os.path.getsize)
  with open(target, "r+b") as f:
    f.truncate(os.path.getsize(target) // 2)
  return step, os.path.relpath(target, os.path.join(directory, str(step)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--checkpoint_period", type=int, default=3)
  parser.add_argument("--eval_period", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0, help="kill times")
  parser.add_argument("--workdir", default="/tmp/flix_soak_kill")
  flags = parser.parse_args()
  rng = random.Random(flags.seed)
  shutil.rmtree(flags.workdir, ignore_errors=True)
  os.makedirs(flags.workdir)
  reference, killed = (os.path.join(flags.workdir, d) for d in ("ref", "run"))
  data = write_data(os.path.join(flags.workdir, "data"))
  settings = (data, flags.steps, flags.checkpoint_period, flags.eval_period)

  started = time.time()
  log = finish(
      train_args(reference, *settings),
      os.path.join(flags.workdir, "reference.log"),
  )
  times = step_times(log)
  print(
      f"uninterrupted run: {flags.steps} steps in {time.time() - started:.0f}"
      f" s, {times[flags.steps] - times[1]:.0f} s of them from its first to "
      "its last step (saves and evaluations included)",
      flush=True,
  )
  # Each kill lands within the next `window` steps of the restart, so the
  # kills spread over the run instead of piling up near its end.
  window = 2 * flags.checkpoint_period

  args = train_args(killed, *settings)
  for kill_number in range(1, flags.kills + 1):
    log_path = os.path.join(flags.workdir, f"attempt{kill_number}.log")
    process = start(args, log_path)
    first = wait_for(process, log_path, r"step (\d+)/", 1200)
    if first is None:
      raise RuntimeError(f"attempt {kill_number} ended; see {log_path}")
    resumed = re.search(r"Resumed from step (\d+)", open(log_path).read())
    resumed_from = int(resumed.group(1)) if resumed else 0
    # A random moment, uniform in the time the uninterrupted run spent on
    # the same steps (steps, checkpoint writes, evaluations); never after
    # the second-to-last step.
    lowest = int(first.group(1))
    highest = max(min(lowest + window, flags.steps - 2), lowest)
    after, delay = draw_kill(rng, times, lowest, highest)
    if wait_for(process, log_path, rf"step {after}/", 1200) is None:
      raise RuntimeError(f"attempt {kill_number} ended; see {log_path}")
    # The kill lands at the drawn moment after that step, or at the end of
    # the window if this attempt runs faster than the reference did.
    started = time.time()
    poll(
        process,
        lambda: time.time() - started >= delay
        or re.search(rf"step {highest + 1}/", open(log_path).read()),
        1200,
    )
    delay = time.time() - started
    if process.poll() is not None:
      raise RuntimeError(
          f"attempt {kill_number} finished before its kill; see {log_path}"
      )
    where = activity(killed, open(log_path).read())
    kill(process)
    print(
        f"kill {kill_number:2d}: resumed from step {resumed_from}, killed "
        f"{delay:4.1f} s after step {after} logged, during {where}",
        flush=True,
    )
  log = finish(args, os.path.join(flags.workdir, "final.log"))
  resumed = re.search(r"Resumed from step (\d+)", log)
  print(
      f"final restart resumed from step {resumed.group(1) if resumed else 0}"
      " and finished",
      flush=True,
  )
  difference = max_difference(reference, killed)
  print(
      f"after {flags.kills} kills: max |difference| of params and optimizer "
      f"state vs the uninterrupted run = {difference!r}; data positions "
      "equal",
      flush=True,
  )

  step, damaged_file = truncate_latest_checkpoint(killed)
  restarted = time.time()
  log = finish(args, os.path.join(flags.workdir, "damaged.log"))
  verified = re.search(r"Checkpoint step (\d+) verified in ([\d.]+) s", log)
  if verified is None or "is damaged: moved to" not in log:
    raise AssertionError("the restart did not report the damaged step")
  after_damage = max_difference(reference, killed)
  hashed = sum(
      p.stat().st_size
      for d in (
          os.path.join(killed, "checkpoints.damaged", str(step)),
          os.path.join(killed, "checkpoints", verified.group(1)),
      )
      for p in pathlib.Path(d).rglob("*")
      if p.is_file()
  )
  print(
      f"damaged checkpoint: truncated {damaged_file} of step {step}; the "
      f"restart detected it and chose step {verified.group(1)} in "
      f"{verified.group(2)} s ({hashed / 1e6:.1f} MB checked), retrained to "
      f"step {flags.steps} "
      f"({time.time() - restarted:.0f} s with start-up); max |difference| "
      f"vs the uninterrupted run = {after_damage!r}",
      flush=True,
  )
  identical = difference == 0.0 and after_damage == 0.0
  print("bit-identical" if identical else "DIFFERENT")
  sys.exit(0 if identical else 1)


if __name__ == "__main__":
  main()
