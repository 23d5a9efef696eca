"""scripts/demo_summary.py: the demo's closing summary."""

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import demo_summary  # pylint: disable=g-import-not-at-top,wrong-import-position


def _row(task, language, metric, value, seen):
  return {
      "features": {"task": task, "language": language},
      "metric": metric,
      "value": value,
      "examples": 8,
      "seen_in_training": seen,
  }


def test_summary_separates_supervised_and_zero_shot(tmp_path):
  rows = [
      _row("cardinal", "en", "exact_match", 50.0, True),
      _row("cardinal", "fr", "exact_match", 30.0, True),
      _row("ordinal", "fr", "exact_match", 12.5, False),
      _row("cardinal", "en", "cer", 10.0, True),
      _row("cardinal", "fr", "cer", 20.0, True),
      _row("ordinal", "fr", "cer", 40.0, False),
  ]
  (tmp_path / "results-validation-600.json").write_text(json.dumps(rows))
  records = [
      {
          "inputs": "cardinal en: 7",
          "target": "seven",
          "prediction": "seven",
          "features": {"task": "cardinal", "language": "en"},
      },
      {
          "inputs": "ordinal fr: 3",
          "target": "troisième",
          "prediction": "troisième",
          "features": {"task": "ordinal", "language": "fr"},
      },
  ]
  (tmp_path / "predictions-validation-600.jsonl").write_text(
      "\n".join(json.dumps(r) for r in records) + "\n"
  )
  text = "\n".join(demo_summary.summary_lines(str(tmp_path)))
  supervised = next(l for l in text.splitlines() if "supervised" in l)
  zero_shot = next(l for l in text.splitlines() if "zero-shot " in l)
  assert "40.0%" in supervised and "15.0%" in supervised
  assert "12.5%" in zero_shot and "40.0%" in zero_shot
  assert "ordinal fr" in zero_shot
  assert "ok ordinal fr: 3 -> troisième" in text  # Only zero-shot samples.
  assert "cardinal en: 7 ->" not in text
  assert str(tmp_path / "results-validation-600.png") in text
