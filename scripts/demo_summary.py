"""The demo's last word: supervised vs zero-shot, samples, where things are.

    python scripts/demo_summary.py /tmp/flix_demo/flix/eval

Reads the newest `results-*.json` (and its predictions) that `flix.train`'s
evaluation wrote there and prints exact match and CER on the pairs seen in
training and on the held-out (zero-shot) pairs, a few zero-shot predictions,
and the paths of the table, heatmap and predictions.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from flix import evaluation


def summary_lines(eval_dir: str, samples: int = 4) -> list[str]:
  """The summary of the newest evaluation in `eval_dir`, as lines."""
  paths = sorted(
      glob.glob(os.path.join(eval_dir, "results-*.json")),
      key=os.path.getmtime,
  )
  if not paths:
    raise SystemExit(f"No results-*.json in {eval_dir}: did training finish?")
  results = paths[-1]
  name = os.path.basename(results)[: -len(".json")]
  with open(results, encoding="utf-8") as f:
    rows = json.load(f)
  means = evaluation.summarize(rows)
  pairs = {
      subset: sorted(
          {
              f"{r['features'].get('task')} {r['features'].get('language')}"
              for r in rows
              if r["seen_in_training"] is (subset == "supervised")
          }
      )
      for subset in ("supervised", "zero_shot")
  }
  examples = max((r["examples"] for r in rows), default=0)
  lines = [
      "",
      f"FLix on the numbers mixture ({name}, up to {examples} examples per "
      "pair):",
      f"  {'':<11} {'exact match':>12} {'CER':>8}   pairs",
  ]
  for subset in ("supervised", "zero_shot"):
    em = means.get(f"exact_match/{subset}", float("nan"))
    cer = means.get(f"cer/{subset}", float("nan"))
    held = ": " + ", ".join(pairs[subset]) if subset == "zero_shot" else ""
    lines.append(
        f"  {subset.replace('_', '-'):<11} {em:11.1f}% {cer:7.1f}%   "
        f"{len(pairs[subset])}{held}"
    )
  predictions = os.path.join(
      eval_dir, name.replace("results-", "predictions-") + ".jsonl"
  )
  if os.path.exists(predictions):
    held_out = set(pairs["zero_shot"])
    with open(predictions, encoding="utf-8") as f:
      records = [json.loads(line) for line in f]
    chosen = [
        r
        for r in records
        if f"{r['features'].get('task')} {r['features'].get('language')}"
        in held_out
    ][:samples]
    if chosen:
      lines.append("  zero-shot samples (input -> prediction | target):")
      for r in chosen:
        mark = "ok" if r["prediction"] == r["target"] else "  "
        lines.append(
            f"    {mark} {r['inputs']} -> {r['prediction']} | {r['target']}"
        )
  lines += [
      f"Table:       {os.path.join(eval_dir, name + '.txt')}",
      f"Heatmap:     {os.path.join(eval_dir, name + '.png')}",
      f"Predictions: {predictions}",
  ]
  return lines


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit(__doc__)
  print("\n".join(summary_lines(sys.argv[1])))
