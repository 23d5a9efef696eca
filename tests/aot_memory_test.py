"""scripts/aot_memory.py reads the shipped XL gin and compiles its train step.

Run on a tiny model (gin bindings over `configs/flix_mt5_xl.gin`) on 8
simulated devices, in subprocesses (the device count must be set before JAX
is imported): every adapter leaf is split over the 2-way 'model' axis, and
replicating the adapters' `embed` dimensions (the old rule) costs memory.
"""

import json
import os
import subprocess
import sys

from conftest import REPO

_BINDINGS = (
    "network.preset.name = 'tiny'",
    "NUM_PARTITIONS = 2",
    "BATCH_SIZE = 8",
    "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 8}",
)


def _start(*extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  args = [f"--gin_bindings={b}" for b in _BINDINGS]
  return subprocess.Popen(
      [
          sys.executable,
          "scripts/aot_memory.py",
          "--devices=8",
          "--tasks=3",
          "--languages=5",
          *args,
          *extra,
      ],
      cwd=str(REPO),
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


def _result(proc):
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-4000:]
  lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, stdout[-2000:]
  return stdout, json.loads(lines[-1][len("RESULT ") :])


def test_compiles_the_shipped_run_and_shards_every_adapter():
  procs = [_start(), _start("--replicate_adapter_embed")]
  (out, sharded), (_, replicated) = map(_result, procs)
  # The shipped run's settings come through gin.
  assert "scan_layers=True, remat_policy=minimal" in out
  assert "strategy segment (planned for cpu)" in out  # per group, here
  assert "max_segments 16" in out and "pack True" in out
  assert "task 3 x r16, language 5 x r8" in out
  assert sharded["mesh"] == {"data": 4, "model": 2}
  # float32 adapters, every leaf halved by the 2-way 'model' axis.
  assert sharded["trainable_bytes"] * 2 == sharded["trainable"] * 4
  assert replicated["trainable_bytes"] > sharded["trainable_bytes"]
  assert replicated["trainable"] == sharded["trainable"]
  for row in (sharded, replicated):
    assert row["argument"] >= row["trainable_bytes"] + row["frozen_bytes"]
    assert row["peak"] >= row["argument"] and row["temp"] > 0
