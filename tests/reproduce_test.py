"""Smoke test of scripts/reproduce.py: the whole pipeline, a handful of steps.

Base pre-training, every adaptation method on the multitask mixture (2 seeds),
the multilingual-only runs of Figure 2, evaluation and every output file, on
the tiniest config (configs/reproduce/smoke.gin) and a 2-language, 2-task
numbers mixture. Compiled programs are cached across test runs under
~/.cache/flix_reproduce/jax_cache_smoke (the first run compiles everything).
"""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = (
    "lora",
    "flix",
    "flix_no_dropout",
    "flix_task_only",
    "flix_language_only",
    "full",
)


def test_reproduce_smoke_writes_every_output(tmp_path):
  out, cache = tmp_path / "out", tmp_path / "cache"
  jax_cache = (
      pathlib.Path.home() / ".cache" / "flix_reproduce" / ("jax_cache_smoke")
  )
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  command = [
      sys.executable,
      str(REPO / "scripts" / "reproduce.py"),
      "--smoke",
      "--seeds=0,1",
      "--steps=4",
      "--languages=en,fr",
      "--tasks=cardinal,ordinal",
      f"--output_dir={out}",
      f"--cache_dir={cache}",
      f"--jax_cache_dir={jax_cache}",
  ]
  result = subprocess.run(
      command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900
  )
  assert result.returncode == 0, result.stderr[-4000:]

  # results.json: every method, both subsets, both metrics, 2 seeds.
  results = json.loads((out / "results.json").read_text())
  assert results["smoke"] is True
  assert results["split"] == "test"
  assert results["seeds"] == [0, 1]
  assert results["zero_shot_pairs"] == [["ordinal", "fr"]]
  assert set(results["methods"]) == set(METHODS)
  for name, method in results["methods"].items():
    assert method["trainable_params"] > 0, name
    for subset in ("supervised", "zero_shot"):
      for metric in ("exact_match", "cer"):
        stats = method[subset][metric]
        assert set(stats) >= {"mean", "std", "per_seed"}
        assert len(stats["per_seed"]) == 2
        assert all(v >= 0 for v in stats["per_seed"])
    cells = {(c["task"], c["language"]) for c in method["cells"]}
    assert cells == {
        ("cardinal", "en"),
        ("cardinal", "fr"),
        ("ordinal", "en"),
        ("ordinal", "fr"),
    }
    zero_shot = {
        (c["task"], c["language"])
        for c in method["cells"]
        if c["seen_in_training"] is False
    }
    assert zero_shot == {("ordinal", "fr")}
  params = {n: m["trainable_params"] for n, m in results["methods"].items()}
  assert params["full"] == results["base"]["num_params"]
  assert params["flix"] == params["flix_no_dropout"]
  assert params["lora"] < params["flix"]
  assert set(results["figure2"]) == {"lora", "flix"}
  assert results["train_steps"] == 4
  for method in results["figure2"].values():
    assert set(method) == {"cardinal", "ordinal", "all"}
    assert len(method["all"]["delta_em"]["per_seed"]) == 2
    # A task's share of the multitask steps: cardinal has 2 of the 3
    # training pairs, ordinal 1 (ordinal fr is held out).
    assert method["cardinal"]["multilingual_train_steps"] == 3
    assert method["ordinal"]["multilingual_train_steps"] == 1

  # results.md: one table row per method, plus the Figure-2 table.
  table = (out / "results.md").read_text()
  rows = [l for l in table.splitlines() if l.startswith("| ")]
  for name, method in results["methods"].items():
    assert any(
        r.startswith(f"| {method['label']} | ")
        and f"{method['trainable_params']:,}" in r
        for r in rows
    ), name
  assert "Figure 2" in table

  # Plots: non-empty PNGs.
  pngs = [f"heatmap_{m}.png" for m in METHODS] + ["bars.png", "figure2.png"]
  for name in pngs:
    data = (out / name).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000, name

  # A second run reuses the cached base and runs.
  again = subprocess.run(
      command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert again.returncode == 0, again.stderr[-4000:]
  assert "Reusing the cached base" in again.stderr
  assert json.loads((out / "results.json").read_text())["base"]["cached"]
