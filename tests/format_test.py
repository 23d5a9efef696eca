"""The tree is formatted with pyink (config in pyproject.toml)."""

import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_tree_is_pyink_formatted():
  pyink = shutil.which("pyink")
  if pyink is None:
    pytest.skip("pyink is not installed (pip install -e '.[test]' brings it)")
  result = subprocess.run(
      [pyink, "--check", "--quiet", "."],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert result.returncode == 0, (
      "Files need formatting; run `pyink .` at the repository root:\n"
      + result.stderr
  )
