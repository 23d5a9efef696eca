"""scripts/reproduce.py: the whole study on a tiny featurized JSONL fixture.

Base pre-training, every method on the multitask mixture (one seed: the
aggregation over seeds is tested on its own in reproduce_report_test.py),
the single-task runs of Figure 2, evaluation, the paired comparisons and
every output file, on the tiniest config (configs/reproduce/smoke.gin). The
fixture's feature groups are not called task and language, and one of its
combinations is only in the evaluation splits: the study must find it.
Everything, compiled programs included, is written under the test's tmp_path.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from flix_tasks import numbers

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import reproduce  # pylint: disable=g-import-not-at-top,wrong-import-position
import reproduce_data  # pylint: disable=g-import-not-at-top,wrong-import-position

MODES, LANGS = ("cardinal", "ordinal"), ("en", "fr")
HELD_OUT = ("ordinal", "fr")
METHODS = (
    "lora",
    "lora_params",
    "flix",
    "flix_no_dropout",
    "flix_mode_only",
    "flix_lang_only",
    "full",
)


def _write_fixture(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  paths = {}
  for split, size in (("train", 30), ("validation", 3), ("test", 3)):
    lines = []
    for mode in MODES:
      for lang in LANGS:
        if split == "train" and (mode, lang) == HELD_OUT:
          continue
        for inputs, targets in numbers.examples(mode, lang, split, size, 100):
          features = {"mode": mode, "lang": lang}
          lines.append(
              json.dumps(
                  {"inputs": inputs, "targets": targets, "features": features}
              )
          )
    paths[split] = directory / f"{split}.jsonl"
    paths[split].write_text("\n".join(lines) + "\n")
  paths["pretrain"] = directory / "texts.txt"
  paths["pretrain"].write_text("forty-two\nquarante-deux\n")
  return paths


def _run(command, timeout):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      command,
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def test_jsonl_study_writes_every_output(tmp_path):
  files = _write_fixture(tmp_path)
  out, cache = tmp_path / "out", tmp_path / "cache"
  command = [
      sys.executable,
      str(REPO / "scripts" / "reproduce.py"),
      "--smoke",
      "--data=jsonl",
      f"--train_files={files['train']}",
      f"--validation_files={files['validation']}",
      f"--test_files={files['test']}",
      f"--pretrain_files={files['pretrain']}",
      "--seeds=0",
      f"--output_dir={out}",
      f"--cache_dir={cache}",
      f"--jax_cache_dir={tmp_path / 'jax_cache'}",
  ]
  _run(command, 1800)

  results = json.loads((out / "results.json").read_text())
  assert results["preset"] == "smoke" and results["split"] == "test"
  assert results["data"]["groups"] == ["lang", "mode"]
  held_out = [HELD_OUT[1], HELD_OUT[0]]  # In group order: lang, mode.
  assert results["data"]["zero_shot_pairs"] == [held_out]
  assert len(results["data"]["pairs"]) == len(MODES) * len(LANGS)
  assert set(results["methods"]) == set(METHODS)
  for name, method in results["methods"].items():
    assert method["trainable_params"] > 0, name
    for subset in ("supervised", "zero_shot"):
      for metric in ("exact_match", "cer"):
        stats = method[subset][metric]
        assert len(stats["per_seed"]) == 1
        assert all(v >= 0 for v in stats["per_seed"])
    zero_shot = [
        c["pair"] for c in method["cells"] if not c["seen_in_training"]
    ]
    assert zero_shot == [held_out, held_out]  # EM and CER.
  params = {n: m["trainable_params"] for n, m in results["methods"].items()}
  assert params["full"] == results["base"]["num_params"]
  assert params["flix"] == params["flix_no_dropout"] == params["lora_params"]
  assert params["lora"] < params["flix"]
  # Paired differences: per seed, FLix minus the baseline.
  for baseline in ("lora", "lora_params"):
    comparison = results["paired"][baseline]
    assert [e["pair"] for e in comparison["pairs"]] == [held_out]
    flix = results["methods"]["flix"]["zero_shot"]["cer"]["per_seed"]
    other = results["methods"][baseline]["zero_shot"]["cer"]["per_seed"]
    expected = [a - b for a, b in zip(flix, other)]
    assert comparison["zero_shot"]["cer"]["per_seed"] == pytest.approx(expected)
  # Figure 2 on the first group's value with the most training pairs (en:
  # cardinal and ordinal; fr: cardinal only), for its share of the 4 steps.
  for method in results["figure2"].values():
    assert set(method) == {"en", "all"}
    assert method["en"]["multilingual_train_steps"] == 3
    assert len(method["all"]["delta_em"]["per_seed"]) == 1

  table = (out / "results.md").read_text()
  for method in results["methods"].values():
    assert f"| {method['label']} | {method['trainable_params']:,} |" in table
  assert "Paired: FLix −" in table and "Figure 2" in table
  pngs = [f"heatmap_{m}_{k}.png" for m in METHODS for k in ("em", "cer")]
  for name in pngs + ["bars.png", "figure2.png"]:
    data = (out / name).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000, name

  # A second run reuses the cached base and runs.
  again = _run(command, 900)
  assert "Reusing the cached base" in again.stderr
  assert json.loads((out / "results.json").read_text())["base"]["cached"]


def test_numbers_data_and_methods(tmp_path):
  args = reproduce.parse_args(
      [
          "--smoke",
          f"--cache_dir={tmp_path}",
          "--languages=en,fr,ru",
          "--tasks=cardinal,ordinal",
      ]
  )
  data = reproduce_data.numbers_data(args)
  registration = data.registration
  assert registration.groups == ("task", "language")
  assert registration.held_out == (("ordinal", "fr"),)
  base, adaptation = reproduce_data.feature_lengths(data, args.max_length)
  for lengths in (base, adaptation):
    assert all(n % 8 == 0 for n in lengths.values())
  longest = max(
      len(data.vocabulary.encode(t))
      for p in registration.pairs
      for split in ("train", "validation", "test")
      for x in registration.examples(p, split)
      for t in x
  )
  assert max(adaptation.values()) >= longest + 1  # EOS fits.
  methods = reproduce.methods_for(registration)
  assert list(methods) == [
      "lora",
      "lora_params",
      "flix",
      "flix_no_dropout",
      "flix_task_only",
      "flix_language_only",
      "full",
  ]
  # LoRA with FLix's parameters: one rank-RANK adapter per feature value.
  rank = reproduce.RANK * (2 + 3)
  assert methods["lora_params"].bindings == (f"LORA_RANK = {rank}",)
