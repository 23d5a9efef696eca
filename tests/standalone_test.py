"""The repository stands alone: it cites only files it contains.

Notes outside the repository (design or research notes, machine paths) are
not available to users; the facts the code relies on live in docs/. Tests may
read the tiny T5X test checkpoint beside the repository (../shared/testdata)
and say so when skipping.
"""

import pathlib
import re

from conftest import run_python

REPO = pathlib.Path(__file__).resolve().parents[1]
_TEXT_SUFFIXES = {".py", ".md", ".gin", ".sh", ".toml", ".ini", ".cfg", ".txt"}
_SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache"}
# Spelled in pieces so that this file does not match itself.
_EXTERNAL_NOTES = re.compile(
    "|".join(
        [
            r"DESIGN" + r"\.md",
            r"T5X" + r"_NOTES",
            r"XTREME_UP" + r"\.md",
            r"ANCHORS" + r"\.md",
            r"STYLE" + r"\.md",
            r"/" + r"work/",
        ]
    )
)
_SHARED_DIR = re.compile(r"\.\./" + r"shared|" + r"shared/" + r"testdata")
_DOCS_CITATION = re.compile(r"\bdocs/[\w/.-]+\.md\b")


def _text_files():
  for path in sorted(REPO.rglob("*")):
    relative = path.relative_to(REPO)
    if _SKIPPED_DIRS.intersection(relative.parts) or not path.is_file():
      continue
    if path.suffix in _TEXT_SUFFIXES and "egg-info" not in str(relative):
      yield relative, path.read_text(encoding="utf-8", errors="replace")


def _hits(pattern):
  return [
      f"{relative}:{number}: {line.strip()}"
      for relative, text in _text_files()
      for number, line in enumerate(text.splitlines(), start=1)
      if pattern.search(line)
  ]


def test_no_citation_of_notes_outside_the_repository():
  assert not _hits(_EXTERNAL_NOTES), "\n".join(_hits(_EXTERNAL_NOTES))


def test_shared_test_data_is_named_only_by_tests():
  outside_tests = [h for h in _hits(_SHARED_DIR) if not h.startswith("tests")]
  assert not outside_tests, "\n".join(outside_tests)


def test_cited_docs_exist():
  missing = sorted(
      {
          f"{relative}: {match}"
          for relative, text in _text_files()
          for match in _DOCS_CITATION.findall(text)
          if not (REPO / match).is_file()
      }
  )
  assert not missing, "\n".join(missing)


def test_importing_flix_never_imports_t5x():
  """T5X is optional: only the plug-in modules (`t5x_model`, `t5x_driver`)
  import it, and nothing else imports them."""

  modules = sorted(
      f"flix.{p.stem}"
      for p in (REPO / "flix").glob("*.py")
      if p.stem not in ("__init__", "t5x_model", "t5x_driver")
  ) + sorted(f"flix_tasks.{p.stem}" for p in (REPO / "tasks").glob("*.py"))
  script = (
      "import importlib, sys\n"
      f"for m in {modules!r}: importlib.import_module(m)\n"
      "print(sorted(m for m in sys.modules if m.split('.')[0] == 't5x'))\n"
  )
  output = run_python("-c", script)
  assert output.strip().splitlines()[-1] == "[]"
