"""scripts/reproduce_report.py: aggregation over seeds, paired differences,
Figure 2, and the written outputs, on synthetic runs (no training)."""

import itertools
import json
import pathlib
import statistics
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import reproduce_report as report  # pylint: disable=g-import-not-at-top,wrong-import-position

PAIRS = [("cardinal", "en"), ("cardinal", "fr"), ("ordinal", "en")]
HELD_OUT = ("ordinal", "en")


def _run(seed, rng, method, pairs=PAIRS):
  rows = [
      {
          "pair": list(pair),
          "metric": metric,
          "value": float(rng.uniform(0, 100)),
          "examples": 8,
          "seen_in_training": pair != HELD_OUT,
      }
      for pair, metric in itertools.product(pairs, report.METRICS)
  ]
  return {
      "method": method,
      "seed": seed,
      "rows": rows,
      "trainable_params": 10,
      "train_steps": 4,
      "train_seconds": 1.0,
      "eval_seconds": 1.0,
      "samples": [["cardinal en: 7", "seven", "seven"]],
  }


def _value(run, pair, metric):
  return next(
      r["value"]
      for r in run["rows"]
      if tuple(r["pair"]) == pair and r["metric"] == metric
  )


@pytest.fixture(scope="module")
def runs():
  rng = np.random.default_rng(0)
  return {
      m: [_run(seed, rng, m) for seed in (0, 1, 2)] for m in ("flix", "lora")
  }


def test_summary_is_mean_and_std_of_per_seed_macro_averages(runs):
  summary = report.summarize_method(runs["flix"])
  supervised = [p for p in PAIRS if p != HELD_OUT]
  for metric in report.METRICS:
    per_seed = [
        statistics.mean(_value(r, p, metric) for p in supervised)
        for r in runs["flix"]
    ]
    stats = summary["supervised"][metric]
    assert stats["per_seed"] == pytest.approx(per_seed)
    assert stats["mean"] == pytest.approx(statistics.mean(per_seed))
    assert stats["std"] == pytest.approx(statistics.stdev(per_seed))
    zero_shot = [_value(r, HELD_OUT, metric) for r in runs["flix"]]
    assert summary["zero_shot"][metric]["per_seed"] == pytest.approx(zero_shot)
  cell = next(
      c
      for c in summary["cells"]
      if tuple(c["pair"]) == HELD_OUT and c["metric"] == "cer"
  )
  assert cell["seen_in_training"] is False
  assert cell["per_seed"] == pytest.approx(
      [_value(r, HELD_OUT, "cer") for r in runs["flix"]]
  )


def test_paired_differences_are_taken_seed_by_seed(runs):
  # The baseline's runs in another order: pairing is by seed, not position.
  baseline = list(reversed(runs["lora"]))
  comparison = report.paired(runs["flix"], baseline, [HELD_OUT])
  assert comparison["seeds"] == [0, 1, 2]
  for metric in report.METRICS:
    diffs = [
        _value(a, HELD_OUT, metric) - _value(b, HELD_OUT, metric)
        for a, b in zip(runs["flix"], runs["lora"])
    ]
    entry = comparison["pairs"][0]
    assert entry[metric]["per_seed"] == pytest.approx(diffs)
    assert entry[metric]["std"] == pytest.approx(statistics.stdev(diffs))
    assert comparison["zero_shot"][metric]["mean"] == pytest.approx(
        statistics.mean(diffs)
    )


def test_figure2_is_multitask_minus_single_task_on_its_pairs(runs):
  rng = np.random.default_rng(1)
  cardinal = [p for p in PAIRS if p[0] == "cardinal"]
  single = {
      "flix": {"cardinal": [_run(s, rng, "flix", cardinal) for s in (2, 0, 1)]}
  }
  result = report.figure2({"flix": runs["flix"]}, single)["flix"]
  by_seed = {r["seed"]: r for r in runs["flix"]}
  expected = [
      statistics.mean(
          _value(by_seed[r["seed"]], p, "exact_match") for p in cardinal
      )
      - statistics.mean(_value(r, p, "exact_match") for p in cardinal)
      for r in single["flix"]["cardinal"]
  ]
  assert result["cardinal"]["delta_em"]["per_seed"] == pytest.approx(expected)
  assert result["all"]["delta_em"]["per_seed"] == pytest.approx(
      [expected[1], expected[2], expected[0]]  # Ordered by seed.
  )


def test_outputs_are_written(runs, tmp_path):
  methods = {}
  for name, method_runs in runs.items():
    methods[name] = {
        **report.summarize_method(method_runs),
        "label": name.upper(),
        "runs": [
            {k: v for k, v in r.items() if k != "rows"} for r in method_runs
        ],
    }
  results = {
      "data": {
          "description": "toy",
          "details": "toy data.",
          "groups": ["task", "language"],
          "zero_shot_pairs": [list(HELD_OUT)],
      },
      "split": "validation",
      "eval_examples": 8,
      "seeds": [0, 1, 2],
      "train_steps": 4,
      "preset": "smoke",
      "base": {
          "num_params": 100,
          "train_steps": 2,
          "cached": False,
          "gin_files": ["configs/reproduce/base.gin"],
          "train_seconds": 3.0,
      },
      "methods": methods,
      "paired": {"lora": report.paired(runs["flix"], runs["lora"], [HELD_OUT])},
      "figure2": {},
      "wall_seconds": 60.0,
      "runs_seconds": 30.0,
  }
  report.write_all(results, str(tmp_path))
  table = (tmp_path / "results.md").read_text()
  flix = methods["flix"]["supervised"]["exact_match"]
  assert f"| FLIX | 10 | {report.fmt(flix)} |" in table
  assert "Paired: FLix − LORA" in table and "(ordinal, en) zero-shot" in table
  for name in ("heatmap_flix_em.png", "heatmap_lora_cer.png", "bars.png"):
    assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
  json.dumps(results)  # JSON-able as written by the script.
