"""Tests for flix.run_lock: one writer per MODEL_DIR."""

import json
import os
import socket
import subprocess
import sys

import pytest

from flix import run_lock


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
  with run_lock.RunLock(str(tmp_path)):
    with pytest.raises(run_lock.RunLockedError) as error:
      run_lock.RunLock(str(tmp_path)).acquire()
  message = str(error.value)
  assert message.startswith(f"{tmp_path} is in use by another training run")
  assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
  # Released: the next run takes it without a warning.
  with run_lock.RunLock(str(tmp_path)):
    pass


def test_the_lock_of_a_killed_process_is_taken_over_with_a_warning(
    tmp_path, caplog
):
  # A child takes the lock and is killed while holding it.
  child = subprocess.Popen(
      [
          sys.executable,
          "-c",
          "import sys, time; from flix import run_lock;"
          f" lock = run_lock.RunLock({str(tmp_path)!r}); lock.acquire();"
          " print('locked', flush=True); time.sleep(600)",
      ],
      stdout=subprocess.PIPE,
      text=True,
  )
  assert child.stdout.readline().strip() == "locked"
  with pytest.raises(run_lock.RunLockedError, match=f"pid {child.pid} "):
    run_lock.RunLock(str(tmp_path)).acquire()
  child.kill()
  child.wait()
  lock = run_lock.RunLock(str(tmp_path))
  lock.acquire()
  assert f"no longer running (pid {child.pid} on host" in caplog.text
  with open(lock.path) as f:
    assert json.load(f)["pid"] == os.getpid()
  lock.release()
  with open(lock.path) as f:
    assert f.read() == ""
