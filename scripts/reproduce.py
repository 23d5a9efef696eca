"""Reproduces FLix's main claims on CPU, on the multilingual numbers mixture.

Claims of the paper (arXiv 2402.17934) tested here, with small models:
  1. On a multitask multilingual mixture FLix beats LoRA (supervised pairs).
  2. FLix generalises to (task, language) pairs never seen in training
     (zero-shot), and feature dropout helps it do so.
  3. Going from a multilingual-only (single-task) mixture to the multitask
     multilingual one hurts LoRA, while FLix holds (Figure 2).

One command:

    python scripts/reproduce.py                # ~44 min on 2 CPU cores
    python scripts/reproduce.py --smoke --output_dir=/tmp/smoke   # seconds

Data (`DATA`, also with --smoke): the numbers mixture with cardinals and
ordinals below --max_number=1000 (currency below 100.00, years 1000-2099),
tokenized by a SentencePiece model trained on its train split
(`flix_tasks.numbers_vocabulary`; bytes made every target 3-5x longer and
nothing converged in the budget).

Stages (each a gin config under configs/reproduce/, parsed with gin and run
in this process through `flix.trainer.train`):
  1. base.gin: a small T5 v1.1, fully trained on span corruption over
     spelled-out numbers of every mode in every language (held-out pairs'
     words included, never the task format; `flix_tasks.numbers_pretrain`).
     A --digits_rate share of the texts starts with the number's digits and
     some of those hide the whole spelling, so the base learns to read a
     number and write it in some language and mode; adaptation teaches which.
     Cached under --cache_dir, keyed by its configuration, and reused.
  2. Adaptation of the base on `numbers_multitask` (4 held-out pairs) with
     lora.gin, flix.gin, flix_no_dropout.gin, flix_task_only.gin,
     flix_language_only.gin and full.gin; and on the multilingual-only
     single-task mixtures `numbers_multilingual_<task>` with lora.gin and
     flix.gin (each with its task's share of the multitask steps, so it sees
     as many examples of its task as the multitask run does).
  3. Greedy decoding of --split (test by default; use validation for any
     tuning) per (task, language): exact match and CER, supervised and
     zero-shot pairs apart, for every seed; mean and spread over seeds.
  4. Outputs in --output_dir: results.json, results.md, heatmap_<method>.png,
     bars.png, figure2.png.

Budget (`BUDGET`): 3000 base steps, 1000 adaptation steps, 32 test examples
per pair, Figure 2 on the cardinal task: ~44 minutes on 2 CPU cores
(measured), still short of convergence; `--base_steps=0 --steps=0 --eval_examples=0
--figure2_tasks=all` uses the gin files' settings instead.

Runs are cached too (a run directory per configuration and seed: a finished
run is reloaded, an interrupted one resumes), so a re-run only redoes what
changed.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import gin  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

CONFIG_DIR = os.path.join(REPO, "configs", "reproduce")

# name -> (gin file, label). Order = table order.
METHODS = collections.OrderedDict(
    [
        ("lora", ("lora.gin", "LoRA (r=8)")),
        ("flix", ("flix.gin", "FLix task+language (r=4+4, fd=0.2)")),
        (
            "flix_no_dropout",
            ("flix_no_dropout.gin", "FLix, no feature dropout"),
        ),
        ("flix_task_only", ("flix_task_only.gin", "FLix task-only (r=8)")),
        (
            "flix_language_only",
            ("flix_language_only.gin", "FLix language-only (r=8)"),
        ),
        ("full", ("full.gin", "Full fine-tuning")),
    ]
)
MULTILINGUAL_METHODS = ("lora", "flix")
# The data of the reproduction (--smoke too).
DATA = {"max_number": 1000, "vocabulary": "sentencepiece", "digits_rate": 0.8}
# Defaults of the one command: ~44 minutes on 2 CPU cores (measured: ~6.7
# base steps/s, ~8 LoRA/FLix steps/s, 2.3-2.6 min per 1000-step adaptation
# run with its evaluation). The gin files hold a longer
# setting (flags = 0).
BUDGET = {
    "base_steps": 3000,
    "steps": 1000,
    "eval_examples": 32,
    "figure2_tasks": "cardinal",
}
METRICS = ("exact_match", "cer")


# ---- Gin ----


def _config_text(files: Sequence[str]) -> str:
  """The text of gin files and of everything they include (for cache keys)."""
  seen, out = set(), []

  def visit(path):
    for base in (REPO, CONFIG_DIR):
      full = os.path.join(base, path)
      if os.path.exists(full):
        break
    else:
      full = path
    if full in seen:
      return
    seen.add(full)
    with open(full) as f:
      text = f.read()
    out.append(f"## {path}\n{text}")
    for line in text.splitlines():
      line = line.strip()
      if line.startswith("include "):
        visit(line.split(None, 1)[1].strip().strip("'\""))

  for path in files:
    visit(path)
  return "\n".join(out)


def _key(*parts: Any) -> str:
  return hashlib.sha256(
      json.dumps(parts, sort_keys=True, default=str).encode()
  ).hexdigest()[:12]


def parse(files: Sequence[str], bindings: Sequence[str]) -> None:
  from flix import gin_utils  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  gin_utils.parse_gin(list(files), list(bindings))


def macro(name: str) -> Any:
  return gin.query_parameter(f"%{name}")


def train_configured(files: Sequence[str], bindings: Sequence[str]):
  """Parses `files` + `bindings` and runs the gin-configured trainer.train."""
  from flix import trainer  # pylint: disable=g-import-not-at-top

  parse(files, bindings)
  settings = {
      name: macro(name)
      for name in (
          "TASK_FEATURE_LENGTHS",
          "TRAIN_STEPS",
          "MIXTURE_OR_TASK_NAME",
      )
  }
  for name in ("EVAL_MIXTURE", "EVAL_BATCH_SIZE", "EVALUATOR_NUM_EXAMPLES"):
    try:
      settings[name] = macro(name)
    except (ValueError, KeyError):
      settings[name] = None
  run = gin.get_configurable(trainer.train)()
  return run, settings


# ---- Stages ----


def base_stage(args, extra_files: Sequence[str]) -> tuple[str, dict]:
  """Trains (or reuses) the base model; returns its directory and info."""
  from flix import checkpoints  # pylint: disable=g-import-not-at-top
  from flix import train_step  # pylint: disable=g-import-not-at-top

  files = ["configs/reproduce/base.gin", *extra_files]
  bindings = list(args.base_binding)
  if args.base_steps:
    bindings.append(f"TRAIN_STEPS = {args.base_steps}")
  key = _key(
      _config_text(files),
      bindings,
      args.pretrain_size,
      args.languages,
      args.tasks,
      args.max_number,
      args.vocabulary,
      args.vocab_size,
      args.digits_rate,
  )
  model_dir = os.path.join(args.cache_dir, f"base-{key}")
  bindings.append(f"MODEL_DIR = '{model_dir}'")
  start = time.time()
  parse(files, bindings)
  steps = macro("TRAIN_STEPS")
  latest = (
      checkpoints.Checkpointer(model_dir, keep=1).latest_step()
      if (os.path.isdir(model_dir))
      else None
  )
  if latest == steps:
    logging.info("Reusing the cached base %s (step %d).", model_dir, steps)
    cached = True
  else:
    logging.info("Pre-training the base (%d steps) in %s.", steps, model_dir)
    run, _ = train_configured(files, bindings)
    with open(os.path.join(model_dir, "num_params.json"), "w") as f:
      json.dump(
          {
              "num_params": train_step.count_params(run.params),
              "train_seconds": round(time.time() - start, 1),
          },
          f,
      )
    del run
    cached = False
  info = {
      "model_dir": model_dir,
      "train_steps": steps,
      "cached": cached,
      "seconds": round(time.time() - start, 1),
      "gin_files": files,
      "bindings": bindings[:-1],
      "num_params": None,
  }
  params_path = os.path.join(model_dir, "num_params.json")
  if os.path.exists(params_path):
    with open(params_path) as f:
      saved = json.load(f)
    info["num_params"] = saved["num_params"]
    info["train_seconds"] = saved.get("train_seconds")
  return model_dir, info


_EXAMPLES: dict[Any, list] = {}


def _task_examples(task_name, split, lengths, max_examples):
  """`input_pipeline.task_examples`, cached (building TF graphs is slow)."""
  from flix import input_pipeline  # pylint: disable=g-import-not-at-top

  key = (task_name, split, tuple(sorted(lengths.items())), max_examples)
  if key not in _EXAMPLES:
    _EXAMPLES[key] = input_pipeline.task_examples(
        task_name, split, lengths, max_examples
    )
  return _EXAMPLES[key]


def evaluate_tasks(
    model,
    params,
    task_names: Sequence[str],
    split: str,
    lengths: dict[str, int],
    seen: set,
    batch_size: int,
    max_examples: Optional[int],
) -> tuple[list[dict], list[list[str]]]:
  """Greedy decoding + the tasks' metrics per (task, language) (as
  `flix.evaluation.evaluate_tasks`, with the examples cached across runs)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from flix import evaluation  # pylint: disable=g-import-not-at-top
  from flix import feature_converter  # pylint: disable=g-import-not-at-top
  from flix import featurized  # pylint: disable=g-import-not-at-top

  rows, samples = [], []
  for task_name in task_names:
    task = seqio.get_mixture_or_task(task_name)
    examples = _task_examples(task_name, split, lengths, max_examples)
    vocabulary = task.output_features["targets"].vocabulary
    predictions = evaluation.predict_examples(
        model,
        params,
        examples,
        vocabulary,
        lengths["inputs"],
        lengths["targets"],
        batch_size,
    )
    targets = [ex["targets_pretokenized"].decode("utf-8") for ex in examples]
    features = feature_converter.example_features(examples[0])
    for metric_fn in task.predict_metric_fns:
      for metric, value in metric_fn(targets, predictions).items():
        rows.append(
            {
                "features": features,
                "metric": metric,
                "value": float(value),
                "examples": len(targets),
                "seen_in_training": featurized.is_seen(features, seen),
            }
        )
    samples += [
        [ex["inputs_pretokenized"].decode("utf-8"), t, p]
        for ex, t, p in list(zip(examples, targets, predictions))[:2]
    ]
  return rows, samples


def adapt_and_evaluate(
    args,
    method: str,
    mixture: str,
    seed: int,
    base_dir: str,
    extra_files: Sequence[str],
    eval_tasks: Sequence[str],
    train_steps: Optional[int],
) -> dict:
  """Trains one (method, mixture, seed) run (or reloads it) and evaluates."""
  from flix import train_step  # pylint: disable=g-import-not-at-top
  from flix import featurized  # pylint: disable=g-import-not-at-top

  files = [f"configs/reproduce/{METHODS[method][0]}", *extra_files]
  bindings = [
      f"MIXTURE_OR_TASK_NAME = '{mixture}'",
      f"RANDOM_SEED = {seed}",
      f"INITIAL_CHECKPOINT_PATH = '{base_dir}'",
  ]
  bindings += list(args.binding)
  if train_steps:  # Last: overrides --steps (a later binding wins).
    bindings.append(f"TRAIN_STEPS = {train_steps}")
  key = _key(_config_text(files), bindings)
  model_dir = os.path.join(
      args.cache_dir, "runs", mixture, method, f"seed{seed}-{key}"
  )
  eval_examples = args.eval_examples
  result_path = os.path.join(
      model_dir, f"rows-{args.split}-{eval_examples or 'all'}.json"
  )
  if os.path.exists(result_path):
    with open(result_path) as f:
      cached = json.load(f)
    logging.info("Reusing %s.", result_path)
    return cached
  start = time.time()
  run, settings = train_configured(
      files, bindings + [f"MODEL_DIR = '{model_dir}'"]
  )
  train_seconds = time.time() - start
  trainable = train_step.count_params(run.state.trainable)
  start = time.time()
  rows, samples = evaluate_tasks(
      run.model,
      run.params,
      eval_tasks,
      args.split,
      settings["TASK_FEATURE_LENGTHS"],
      featurized.seen_pairs(mixture),
      settings["EVAL_BATCH_SIZE"] or 64,
      eval_examples,
  )
  eval_seconds = time.time() - start
  out = {
      "method": method,
      "mixture": mixture,
      "seed": seed,
      "train_steps": settings["TRAIN_STEPS"],
      "trainable_params": trainable,
      "model_dir": model_dir,
      "gin_files": files,
      "bindings": bindings,
      "train_seconds": round(train_seconds, 1),
      "eval_seconds": round(eval_seconds, 1),
      "rows": rows,
      "samples": samples,
  }
  logging.info(
      "%s / %s / seed %d: %d trainable params, train %.0fs, eval " "%.0fs.",
      mixture,
      method,
      seed,
      trainable,
      train_seconds,
      eval_seconds,
  )
  with open(result_path, "w") as f:
    json.dump(out, f, indent=1, ensure_ascii=False)
  del run
  return out


# ---- Aggregation ----


def _cells(rows: Sequence[dict]) -> dict[tuple[str, str, str], dict]:
  """{(task, language, metric): row}."""
  return {
      (r["features"]["task"], r["features"]["language"], r["metric"]): r
      for r in rows
  }


def _stats(values: Sequence[float]) -> dict[str, Any]:
  values = [float(v) for v in values]
  return {
      "mean": float(np.mean(values)) if values else float("nan"),
      "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
      "per_seed": values,
  }


def summarize_method(runs: Sequence[dict], held_out: set) -> dict[str, Any]:
  """Per-seed macro averages over pairs, then mean and spread over seeds."""
  out = {
      "trainable_params": runs[0]["trainable_params"],
      "seeds": [r["seed"] for r in runs],
      "train_steps": runs[0]["train_steps"],
  }
  for subset in ("supervised", "zero_shot"):
    out[subset] = {}
    for metric in METRICS:
      per_seed = []
      for run in runs:
        values = [
            r["value"]
            for r in run["rows"]
            if r["metric"] == metric
            and (r["seen_in_training"] is True) == (subset == "supervised")
        ]
        per_seed.append(float(np.mean(values)) if values else float("nan"))
      out[subset][metric] = _stats(per_seed)
  # Per-cell mean and spread over seeds.
  cells = collections.defaultdict(list)
  seen = {}
  for run in runs:
    for (t, l, m), row in _cells(run["rows"]).items():
      cells[(t, l, m)].append(row["value"])
      seen[(t, l)] = row["seen_in_training"]
  out["cells"] = [
      {
          "task": t,
          "language": l,
          "metric": m,
          "seen_in_training": seen[(t, l)],
          **_stats(v),
      }
      for (t, l, m), v in sorted(cells.items())
  ]
  out["zero_shot_pairs"] = sorted(
      [list(p) for p, s in seen.items() if s is False]
  )
  del held_out
  return out


def figure2(
    multitask: dict[str, list[dict]],
    multilingual: dict[str, dict[str, list[dict]]],
) -> dict:
  """Multitask minus multilingual-only EM (and CER) on each task's pairs.

  Over the supervised pairs of the multilingual-only run. Paired by seed: the
  difference of per-seed macro averages, then mean and spread over seeds;
  "all" averages the per-task differences.
  """
  names = {"exact_match": "em", "cer": "cer"}
  out = {}
  for method, per_task in multilingual.items():
    by_seed_mt = {r["seed"]: r for r in multitask[method]}
    result = {}
    all_diffs = collections.defaultdict(lambda: collections.defaultdict(list))
    for task, runs in per_task.items():
      values = collections.defaultdict(list)
      for run in runs:
        ml_cells = _cells(run["rows"])
        mt_cells = _cells(by_seed_mt[run["seed"]]["rows"])
        pairs = [
            (t, l)
            for (t, l, m), row in ml_cells.items()
            if m == "exact_match" and row["seen_in_training"]
        ]
        for metric, short in names.items():
          ml = float(
              np.mean([ml_cells[(t, l, metric)]["value"] for t, l in pairs])
          )
          mt = float(
              np.mean([mt_cells[(t, l, metric)]["value"] for t, l in pairs])
          )
          values[f"multilingual_{short}"].append(ml)
          values[f"multitask_{short}"].append(mt)
          values[f"delta_{short}"].append(mt - ml)
          all_diffs[short][run["seed"]].append(mt - ml)
      result[task] = {k: _stats(v) for k, v in values.items()}
      result[task]["multilingual_train_steps"] = runs[0]["train_steps"]
    result["all"] = {
        f"delta_{short}": _stats(
            [float(np.mean(v)) for _, v in sorted(all_diffs[short].items())]
        )
        for short in names.values()
    }
    out[method] = result
  return out


# ---- Outputs ----


def _fmt(stats: dict, digits: int = 1) -> str:
  if stats["mean"] != stats["mean"]:
    return "n/a"
  return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def write_markdown(path: str, results: dict) -> None:
  methods = results["methods"]
  lines = [
      "# FLix reproduction on the multilingual numbers mixture",
      "",
      f"Split: **{results['split']}**, up to {results['eval_examples']} "
      f"examples per (task, language); seeds {results['seeds']}; "
      "mean ± sample std over seeds of the per-seed macro average over "
      "pairs. EM = exact match (%), CER = character error rate (%, lower is "
      "better). Zero-shot pairs: "
      + ", ".join(f"({t}, {l})" for t, l in results["zero_shot_pairs"])
      + ".",
      "",
      "| method | trainable params | supervised EM | zero-shot EM | "
      "supervised CER | zero-shot CER |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for name, m in methods.items():
    lines.append(
        f"| {m['label']} | {m['trainable_params']:,} | "
        f"{_fmt(m['supervised']['exact_match'])} | "
        f"{_fmt(m['zero_shot']['exact_match'])} | "
        f"{_fmt(m['supervised']['cer'])} | {_fmt(m['zero_shot']['cer'])} |"
    )
  lines += [
      "",
      "## Per zero-shot pair",
      "",
      "| method | "
      + " | ".join(
          f"({t}, {l}) EM | CER" for t, l in results["zero_shot_pairs"]
      )
      + " |",
      "|---|" + "---:|---:|" * len(results["zero_shot_pairs"]),
  ]
  for name, m in methods.items():
    cells = {(c["task"], c["language"], c["metric"]): c for c in m["cells"]}
    lines.append(
        f"| {m['label']} | "
        + " | ".join(
            f"{_fmt(cells[(t, l, 'exact_match')])} | {_fmt(cells[(t, l, 'cer')])}"
            for t, l in results["zero_shot_pairs"]
        )
        + " |"
    )
  if not results["figure2"]:
    lines += ["", "(Figure-2 runs skipped.)"]
  lines += [
      "",
      "## Multitask vs multilingual-only (Figure 2)",
      "",
      "EM on each task's supervised pairs; delta = multitask − "
      "multilingual-only (EM below 0 or CER above 0: the multitask mixture "
      "hurts). The "
      "multilingual-only run of a task trains for that task's share of "
      "the multitask steps (the same number of its examples).",
      "",
      "| method | task | multilingual-only EM | multitask EM | delta EM "
      "| multilingual-only CER | multitask CER | delta CER |",
      "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for method, per_task in results["figure2"].items():
    for task, r in per_task.items():
      if task == "all":
        continue
      lines.append(
          f"| {methods[method]['label']} | {task} | "
          f"{_fmt(r['multilingual_em'])} | {_fmt(r['multitask_em'])}"
          f" | {_fmt(r['delta_em'])} | {_fmt(r['multilingual_cer'])} "
          f"| {_fmt(r['multitask_cer'])} | {_fmt(r['delta_cer'])} |"
      )
    lines.append(
        f"| {methods[method]['label']} | **mean** | | | "
        f"**{_fmt(per_task['all']['delta_em'])}** | | | "
        f"**{_fmt(per_task['all']['delta_cer'])}** |"
    )
  base = results["base"]
  lines += [
      "",
      "## Setup",
      "",
      f"- Base: {base['num_params'] or 0:,} params, "
      f"{base['train_steps']} steps of span corruption "
      f"(`configs/reproduce/base.gin`), "
      + (
          f"trained in {base['train_seconds']:.0f} s"
          if base.get("train_seconds")
          else "trained earlier"
      )
      + (" (reused from the cache)" if base["cached"] else "")
      + ".",
      f"- Adaptation: {results['train_steps']} steps per multitask run "
      "(`configs/reproduce/<method>.gin`).",
      f"- Wall time of this invocation: "
      f"{results['wall_seconds'] / 60:.1f} min; adaptation runs "
      f"(train + eval, summed over runs, cached ones included): "
      f"{results['runs_seconds'] / 60:.1f} min.",
      "",
      "Plots: `heatmap_<method>.png` (EM per task x language, mean "
      "over seeds; hatched = zero-shot), `bars.png`, `figure2.png`.",
      "",
  ]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def plot_heatmaps(results: dict, output_dir: str) -> list[str]:
  from flix import evaluation  # pylint: disable=g-import-not-at-top

  paths = []
  for name, m in results["methods"].items():
    rows = [
        {
            "features": {"task": c["task"], "language": c["language"]},
            "metric": c["metric"],
            "value": c["mean"],
            "seen_in_training": c["seen_in_training"],
        }
        for c in m["cells"]
    ]
    path = os.path.join(output_dir, f"heatmap_{name}.png")
    sup, zs = m["supervised"]["exact_match"], m["zero_shot"]["exact_match"]
    title = (
        f"{m['label']}\nEM, mean of {len(m['seeds'])} seeds: "
        f"supervised {sup['mean']:.1f},\nzero-shot (* hatched) "
        f"{zs['mean']:.1f}"
    )
    if evaluation.plot_heatmap(rows, "exact_match", path, title):
      paths.append(path)
  return paths


def plot_bars(results: dict, path: str) -> None:
  plt = _plt()
  names = list(results["methods"])
  labels = [n.replace("flix_", "flix\n").replace("_", " ") for n in names]
  x = np.arange(len(names))
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  for ax, metric, title in zip(
      axes,
      METRICS,
      ("exact match (%, higher is better)", "CER (%, lower is better)"),
  ):
    for offset, subset, color in (
        (-0.2, "supervised", "tab:blue"),
        (0.2, "zero_shot", "tab:orange"),
    ):
      stats = [results["methods"][n][subset][metric] for n in names]
      means = [s["mean"] for s in stats]
      ax.bar(
          x + offset,
          means,
          0.4,
          yerr=[s["std"] for s in stats],
          capsize=3,
          color=color,
          label=subset.replace("_", "-"),
      )
      for xi, s in zip(x + offset, stats):
        for v in s["per_seed"]:
          ax.plot(xi, v, "k.", markersize=3)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(
      f"Supervised vs zero-shot pairs ({results['split']} split; "
      "bars: mean over seeds, error bars: std, dots: seeds)",
      fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_figure2(results: dict, path: str) -> None:
  plt = _plt()
  fig2 = results["figure2"]
  methods = list(fig2)
  tasks = [t for t in next(iter(fig2.values())) if t != "all"] + ["all"]
  x = np.arange(len(tasks))
  width = 0.8 / max(len(methods), 1)
  colors = {"lora": "tab:gray", "flix": "tab:green"}
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  for ax, key, ylabel in (
      (
          axes[0],
          "delta_em",
          "EM: multitask − multilingual-only\n(below 0: " "multitask hurts)",
      ),
      (
          axes[1],
          "delta_cer",
          "CER: multitask − multilingual-only\n(above 0: " "multitask hurts)",
      ),
  ):
    for i, method in enumerate(methods):
      stats = [fig2[method][t][key] for t in tasks]
      offset = (i - (len(methods) - 1) / 2) * width
      ax.bar(
          x + offset,
          [s["mean"] for s in stats],
          width,
          yerr=[s["std"] for s in stats],
          capsize=3,
          color=colors.get(method),
          label=results["methods"][method]["label"],
      )
      for xi, s in zip(x + offset, stats):
        for v in s["per_seed"]:
          ax.plot(xi, v, "k.", markersize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [t if t != "all" else "mean" for t in tasks])
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(
      "Figure 2: multitask multilingual vs multilingual-only "
      "(single-task) training, on each task's supervised pairs "
      "(mean ± std over seeds; dots: seeds)",
      fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---- Main ----


def feature_lengths(
    registration, pretrain_size: int, vocabulary
) -> tuple[dict[str, int], dict[str, int]]:
  """Feature lengths that fit every example: (pre-training, adaptation).

  Token lengths + EOS, rounded up to a multiple of 8. A span-corrupted text
  of n tokens (digits included, `numbers_pretrain.tokenize`) has at most n
  input and n + 1 target tokens.
  """
  from flix_tasks import numbers  # pylint: disable=g-import-not-at-top
  from flix_tasks import numbers_pretrain  # pylint: disable=g-import-not-at-top

  longest_inputs = longest_targets = longest_pretrain = 1
  for (task, language), sizes in registration.num_examples.items():
    for split, size in sizes.items():
      for inputs, targets in numbers.examples(
          task,
          language,
          split,
          max(size, pretrain_size),
          registration.max_number,
      ):
        longest_inputs = max(longest_inputs, len(vocabulary.encode(inputs)))
        longest_targets = max(longest_targets, len(vocabulary.encode(targets)))
        tokens, _ = numbers_pretrain.tokenize(
            numbers.digits_of(inputs), targets, vocabulary
        )
        longest_pretrain = max(longest_pretrain, len(tokens))
  round_up = lambda n: -(-(n + 1) // 8) * 8
  return (
      {
          "inputs": round_up(longest_pretrain),
          "targets": round_up(longest_pretrain + 1),
      },
      {
          "inputs": round_up(longest_inputs),
          "targets": round_up(longest_targets),
      },
  )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument(
      "--output_dir", default=os.path.join(REPO, "docs", "reproduce")
  )
  parser.add_argument(
      "--cache_dir",
      default=os.path.join(os.path.expanduser("~"), ".cache", "flix_reproduce"),
      help="Base model and run directories (reused).",
  )
  parser.add_argument(
      "--jax_cache_dir",
      default=None,
      help="JAX persistent compilation cache (default: "
      "<cache_dir>/jax_cache).",
  )
  parser.add_argument(
      "--seeds",
      default="0,1",
      help="Comma-separated adaptation seeds (>= 2 for a " "spread).",
  )
  parser.add_argument(
      "--methods",
      default=",".join(METHODS),
      help="Subset of " + ",".join(METHODS),
  )
  parser.add_argument(
      "--split",
      default="test",
      choices=("validation", "test"),
      help="Evaluation split: tune on validation only.",
  )
  parser.add_argument(
      "--eval_examples",
      type=int,
      default=None,
      help="Examples per (task, language) (default: %d, "
      "the CPU budget; 0: the gin "
      "EVALUATOR_NUM_EXAMPLES)." % BUDGET["eval_examples"],
  )
  parser.add_argument(
      "--base_steps",
      type=int,
      default=None,
      help="Base pre-training steps (default: %d, the "
      "CPU budget; 0: base.gin's TRAIN_STEPS)." % BUDGET["base_steps"],
  )
  parser.add_argument(
      "--steps",
      type=int,
      default=None,
      help="Multitask adaptation steps (default: %d, the "
      "CPU budget; 0: common.gin's TRAIN_STEPS)." % BUDGET["steps"],
  )
  parser.add_argument(
      "--max_number",
      type=int,
      default=None,
      help="Cardinals and ordinals below this, currency "
      "amounts below a tenth of it (default: %d; 0: "
      "numbers.DEFAULT_MAX_NUMBER)." % DATA["max_number"],
  )
  parser.add_argument(
      "--vocabulary",
      default=None,
      choices=("sentencepiece", "bytes"),
      help="Tokens of inputs and targets (default: %s): a "
      "SentencePiece model trained on the train split "
      "(flix_tasks.numbers_vocabulary), or bytes." % DATA["vocabulary"],
  )
  parser.add_argument(
      "--vocab_size",
      type=int,
      default=1000,
      help="SentencePiece pieces (sentinels come on top).",
  )
  parser.add_argument(
      "--digits_rate",
      type=float,
      default=None,
      help="Share of pre-training texts preceded by their "
      "digits (default: %s)." % DATA["digits_rate"],
  )
  parser.add_argument(
      "--pretrain_size",
      type=int,
      default=None,
      help="Train-split numbers spelled per (mode, language) "
      "for pre-training (default 1000; 20 with --smoke).",
  )
  parser.add_argument(
      "--languages",
      default=None,
      help="Comma-separated num2words languages (default: "
      "numbers.DEFAULT_LANGUAGES; en,de,fr with --smoke).",
  )
  parser.add_argument(
      "--tasks",
      default=None,
      help="Comma-separated numbers tasks (default: all; "
      "cardinal,ordinal,year with --smoke).",
  )
  parser.add_argument(
      "--train_size",
      type=int,
      default=None,
      help="Training examples per pair (default: "
      "numbers.DEFAULT_TRAIN_SIZE; 50 with --smoke).",
  )
  parser.add_argument(
      "--figure2_tasks",
      default=None,
      help="Comma-separated tasks with multilingual-only runs "
      "(default: %s, the CPU budget; 'all': every "
      "task)." % BUDGET["figure2_tasks"],
  )
  parser.add_argument(
      "--no_multilingual",
      action="store_true",
      help="Skip the Figure-2 multilingual-only runs.",
  )
  parser.add_argument(
      "--binding",
      action="append",
      default=[],
      help="Extra gin binding for every adaptation run.",
  )
  parser.add_argument(
      "--base_binding",
      action="append",
      default=[],
      help="Extra gin binding for the base run.",
  )
  parser.add_argument(
      "--smoke",
      action="store_true",
      help="Tiny model, a handful of steps, 2 eval examples: "
      "checks the pipeline end to end.",
  )
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parse_args(argv)
  logging.basicConfig(
      level=logging.INFO, format="%(asctime)s %(message)s", force=True
  )
  logging.getLogger("absl").setLevel(logging.WARNING)
  for handler in logging.getLogger().handlers:  # gin's file-search chatter
    handler.addFilter(lambda r: f"{os.sep}gin{os.sep}" not in r.pathname)
  start = time.time()
  import jax  # pylint: disable=g-import-not-at-top
  # Runs of one method share their compiled programs (seeds, Figure-2 runs).
  jax.config.update(
      "jax_compilation_cache_dir",
      args.jax_cache_dir or os.path.join(args.cache_dir, "jax_cache"),
  )
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from flix_tasks import numbers  # pylint: disable=g-import-not-at-top
  from flix_tasks import numbers_pretrain  # pylint: disable=g-import-not-at-top
  from flix_tasks import numbers_vocabulary  # pylint: disable=g-import-not-at-top

  defaults = DATA if args.smoke else {**DATA, **BUDGET}
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.figure2_tasks == "all":
    args.figure2_tasks = None
  if args.smoke:
    args.languages = args.languages or "en,de,fr"
    args.tasks = args.tasks or "cardinal,ordinal,year"
    args.train_size = args.train_size or 50
  languages = (
      tuple(args.languages.split(","))
      if args.languages
      else (numbers.DEFAULT_LANGUAGES)
  )
  tasks = tuple(args.tasks.split(",")) if args.tasks else numbers.TASKS
  max_number = args.max_number or numbers.DEFAULT_MAX_NUMBER
  train_size = args.train_size or numbers.DEFAULT_TRAIN_SIZE
  if args.pretrain_size is None:
    args.pretrain_size = 20 if args.smoke else 1000
  if args.vocabulary == "sentencepiece":
    vocabulary = numbers_vocabulary.sentencepiece_vocabulary(
        numbers.working_pairs(tasks, languages),
        args.cache_dir,
        vocab_size=args.vocab_size,
        size=max(train_size, args.pretrain_size),
        max_number=max_number,
    )
    pretrain_vocabulary = vocabulary
  else:
    vocabulary = numbers.VOCABULARY
    pretrain_vocabulary = numbers_pretrain.PRETRAIN_VOCABULARY
  if (languages, tasks, train_size, max_number, args.vocabulary) == (
      numbers.DEFAULT_LANGUAGES,
      numbers.TASKS,
      numbers.DEFAULT_TRAIN_SIZE,
      numbers.DEFAULT_MAX_NUMBER,
      "bytes",
  ):
    registration = numbers.DEFAULT
  else:  # Held-out pairs: numbers.DEFAULT_HELD_OUT's that exist here.
    registration = numbers.register_numbers(
        languages=languages,
        tasks=tasks,
        suffix="_reproduce",
        train_size=train_size,
        max_number=max_number,
        vocabulary=vocabulary,
    )
  numbers_pretrain.register_pretrain(
      languages=languages,
      tasks=tasks,
      size=args.pretrain_size,
      max_number=max_number,
      vocabulary=pretrain_vocabulary,
      digits_rate=args.digits_rate,
  )
  base_lengths, lengths = feature_lengths(
      registration, args.pretrain_size, vocabulary
  )
  model_bindings = [
      f"network.preset.vocab_size = {pretrain_vocabulary.vocab_size}"
  ]
  args.base_binding = [
      *model_bindings,
      f"TASK_FEATURE_LENGTHS = {base_lengths}",
      *args.base_binding,
  ]
  args.binding = [
      *model_bindings,
      f"TASK_FEATURE_LENGTHS = {lengths}",
      *args.binding,
  ]
  extra = ["configs/reproduce/smoke.gin"] if args.smoke else []
  if args.smoke:
    args.eval_examples = args.eval_examples or 2
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"Unknown methods {unknown}; methods: {list(METHODS)}.")
  if args.steps:
    args.binding = [f"TRAIN_STEPS = {args.steps}", *args.binding]
  os.makedirs(args.output_dir, exist_ok=True)

  base_dir, base_info = base_stage(args, extra)

  eval_tasks = [registration.task_names[p] for p in registration.pairs]
  # Steps and eval examples of the multitask runs, from the gin files.
  parse(
      [f"configs/reproduce/{METHODS[methods[0]][0]}", *extra],
      args.binding + ["MODEL_DIR = '/unused'"],
  )
  steps = macro("TRAIN_STEPS")
  if not args.eval_examples:
    args.eval_examples = macro("EVALUATOR_NUM_EXAMPLES")

  multitask = collections.defaultdict(list)
  for method in methods:
    for seed in seeds:
      multitask[method].append(
          adapt_and_evaluate(
              args,
              method,
              registration.train_mixture,
              seed,
              base_dir,
              extra,
              eval_tasks,
              None,
          )
      )

  multilingual = {}
  if not args.no_multilingual:
    counts = {
        p: registration.num_examples[p]["train"]
        for p in registration.train_pairs
    }
    total = sum(counts.values())
    for method in [m for m in MULTILINGUAL_METHODS if m in methods]:
      multilingual[method] = {}
      for task, mixture in registration.multilingual_mixtures.items():
        if args.figure2_tasks and task not in args.figure2_tasks.split(","):
          continue
        share = sum(c for (t, _), c in counts.items() if t == task) / total
        task_steps = max(1, int(round(steps * share)))
        tasks = [
            registration.task_names[p]
            for p in registration.train_pairs
            if p[0] == task
        ]
        multilingual[method][task] = [
            adapt_and_evaluate(
                args, method, mixture, seed, base_dir, extra, tasks, task_steps
            )
            for seed in seeds
        ]

  held = set(registration.held_out)
  results = {
      "claims": {
          "supervised": "FLix >= LoRA on supervised pairs",
          "zero_shot": "FLix well ahead of LoRA on zero-shot pairs; feature "
          "dropout helps zero-shot",
          "figure2": "multitask vs multilingual-only hurts LoRA, FLix holds",
      },
      "split": args.split,
      "eval_examples": args.eval_examples,
      "seeds": seeds,
      "train_steps": steps,
      "smoke": args.smoke,
      "base": base_info,
      "zero_shot_pairs": sorted([list(p) for p in held]),
      "methods": {},
      "figure2": {},
      "multilingual_runs": {},
  }
  for method in methods:
    summary = summarize_method(multitask[method], held)
    summary["label"] = METHODS[method][1]
    summary["gin_file"] = f"configs/reproduce/{METHODS[method][0]}"
    summary["runs"] = [
        {k: v for k, v in r.items() if k != "rows"} for r in multitask[method]
    ]  # with prediction samples
    results["methods"][method] = summary
  if multilingual:
    results["figure2"] = figure2(multitask, multilingual)
    for method, per_task in multilingual.items():
      results["multilingual_runs"][method] = {
          task: [
              {k: v for k, v in r.items() if k not in ("rows", "samples")}
              for r in runs
          ]
          for task, runs in per_task.items()
      }
  results["wall_seconds"] = round(time.time() - start, 1)
  every_run = [r for runs in multitask.values() for r in runs] + [
      r
      for per_task in multilingual.values()
      for runs in per_task.values()
      for r in runs
  ]
  results["runs_seconds"] = round(
      sum(r["train_seconds"] + r["eval_seconds"] for r in every_run), 1
  )

  out = args.output_dir
  plot_heatmaps(results, out)
  plot_bars(results, os.path.join(out, "bars.png"))
  if results["figure2"]:
    plot_figure2(results, os.path.join(out, "figure2.png"))
  write_markdown(os.path.join(out, "results.md"), results)
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, ensure_ascii=False)
  logging.info(
      "Done in %.1f min; results in %s.", results["wall_seconds"] / 60, out
  )
  with open(os.path.join(out, "results.md"), encoding="utf-8") as f:
    print(f.read())
  return results


if __name__ == "__main__":
  main()
