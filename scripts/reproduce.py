"""Reproduces FLix's main claims on CPU, on the multilingual numbers mixture.

Claims of the paper (arXiv 2402.17934) tested here, with small models:
  1. On a multitask multilingual mixture FLix beats LoRA (supervised pairs).
  2. FLix generalises to (task, language) pairs never seen in training
     (zero-shot), and feature dropout helps it do so.
  3. Going from a multilingual-only (single-task) mixture to the multitask
     multilingual one hurts LoRA, while FLix holds (Figure 2).

One command:

    python scripts/reproduce.py                # ~40 min on 2 CPU cores
    python scripts/reproduce.py --smoke --output_dir=/tmp/smoke   # seconds

Stages (each a gin config under configs/reproduce/, parsed with gin and run
in this process through `flix.trainer.train`):
  1. base.gin: a small byte-level T5, fully trained on span corruption over
     spelled-out numbers of every mode in every language (held-out pairs'
     words included, never the task format; `flix_tasks.numbers_pretrain`).
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
METHODS = collections.OrderedDict([
    ("lora", ("lora.gin", "LoRA (r=8)")),
    ("flix", ("flix.gin", "FLix task+language (r=4+4, fd=0.2)")),
    ("flix_no_dropout", ("flix_no_dropout.gin",
                         "FLix, no feature dropout")),
    ("flix_task_only", ("flix_task_only.gin", "FLix task-only (r=8)")),
    ("flix_language_only", ("flix_language_only.gin",
                            "FLix language-only (r=8)")),
    ("full", ("full.gin", "Full fine-tuning")),
])
MULTILINGUAL_METHODS = ("lora", "flix")
METRICS = ("exact_match", "cer")


# ---- Gin ----


def _config_text(files: Sequence[str]) -> str:
  """The text of gin files and of everything they include (for cache keys)."""
  seen, out = set(), []

  def visit(path):
    for base in (os.path.join(REPO, "configs"), REPO, CONFIG_DIR):
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
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str)
                        .encode()).hexdigest()[:12]


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
  settings = {name: macro(name) for name in (
      "TASK_FEATURE_LENGTHS", "TRAIN_STEPS", "MIXTURE_OR_TASK_NAME")}
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
  files = ["reproduce/base.gin", *extra_files]
  bindings = list(args.base_binding)
  if args.base_steps:
    bindings.append(f"TRAIN_STEPS = {args.base_steps}")
  key = _key(_config_text(files), bindings, args.pretrain_size)
  model_dir = os.path.join(args.cache_dir, f"base-{key}")
  bindings.append(f"MODEL_DIR = '{model_dir}'")
  start = time.time()
  parse(files, bindings)
  steps = macro("TRAIN_STEPS")
  latest = checkpoints.Checkpointer(model_dir, keep=1).latest_step() if (
      os.path.isdir(model_dir)) else None
  if latest == steps:
    logging.info("Reusing the cached base %s (step %d).", model_dir, steps)
    cached = True
  else:
    logging.info("Pre-training the base (%d steps) in %s.", steps, model_dir)
    run, _ = train_configured(files, bindings)
    del run
    cached = False
  info = {"model_dir": model_dir, "train_steps": steps, "cached": cached,
          "seconds": round(time.time() - start, 1),
          "gin_files": files, "bindings": bindings[:-1]}
  params_path = os.path.join(model_dir, "num_params.json")
  if not cached or not os.path.exists(params_path):
    parse(files, bindings)
    model = macro("MODEL")
    count = train_step.count_params(model.abstract_params())
    with open(params_path, "w") as f:
      json.dump({"num_params": count}, f)
  with open(params_path) as f:
    info["num_params"] = json.load(f)["num_params"]
  return model_dir, info


def adapt_and_evaluate(args, method: str, mixture: str, seed: int,
                       base_dir: str, extra_files: Sequence[str],
                       eval_tasks: Sequence[str], train_steps: Optional[int],
                       ) -> dict:
  """Trains one (method, mixture, seed) run (or reloads it) and evaluates."""
  from flix import evaluation  # pylint: disable=g-import-not-at-top
  from flix import train_step  # pylint: disable=g-import-not-at-top
  from flix_tasks import featurized  # pylint: disable=g-import-not-at-top
  files = [f"reproduce/{METHODS[method][0]}", *extra_files]
  bindings = [f"MIXTURE_OR_TASK_NAME = '{mixture}'",
              f"RANDOM_SEED = {seed}",
              f"INITIAL_CHECKPOINT_PATH = '{base_dir}'"]
  if train_steps:
    bindings.append(f"TRAIN_STEPS = {train_steps}")
  bindings += list(args.binding)
  key = _key(_config_text(files), bindings)
  model_dir = os.path.join(args.cache_dir, "runs", mixture, method,
                           f"seed{seed}-{key}")
  eval_examples = args.eval_examples
  result_path = os.path.join(
      model_dir, f"rows-{args.split}-{eval_examples or 'all'}.json")
  if os.path.exists(result_path):
    with open(result_path) as f:
      cached = json.load(f)
    logging.info("Reusing %s.", result_path)
    return cached
  start = time.time()
  run, settings = train_configured(
      files, bindings + [f"MODEL_DIR = '{model_dir}'"])
  train_seconds = time.time() - start
  trainable = train_step.count_params(run.state.trainable)
  start = time.time()
  rows, _ = evaluation.evaluate_tasks(
      run.model, run.params, eval_tasks, args.split,
      settings["TASK_FEATURE_LENGTHS"], featurized.seen_pairs(mixture),
      batch_size=settings["EVAL_BATCH_SIZE"] or 64,
      max_examples_per_task=eval_examples)
  eval_seconds = time.time() - start
  for row in rows:
    row.pop("task_name", None)
  out = {"method": method, "mixture": mixture, "seed": seed,
         "train_steps": settings["TRAIN_STEPS"],
         "trainable_params": trainable, "model_dir": model_dir,
         "gin_files": files, "bindings": bindings,
         "train_seconds": round(train_seconds, 1),
         "eval_seconds": round(eval_seconds, 1), "rows": rows}
  logging.info("%s / %s / seed %d: %d trainable params, train %.0fs, eval "
               "%.0fs.", mixture, method, seed, trainable, train_seconds,
               eval_seconds)
  with open(result_path, "w") as f:
    json.dump(out, f, indent=1, ensure_ascii=False)
  del run
  return out


# ---- Aggregation ----


def _cells(rows: Sequence[dict]) -> dict[tuple[str, str, str], dict]:
  """{(task, language, metric): row}."""
  return {(r["features"]["task"], r["features"]["language"], r["metric"]): r
          for r in rows}


def _stats(values: Sequence[float]) -> dict[str, Any]:
  values = [float(v) for v in values]
  return {"mean": float(np.mean(values)) if values else float("nan"),
          "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
          "per_seed": values}


def summarize_method(runs: Sequence[dict], held_out: set) -> dict[str, Any]:
  """Per-seed macro averages over pairs, then mean and spread over seeds."""
  out = {"trainable_params": runs[0]["trainable_params"],
         "seeds": [r["seed"] for r in runs],
         "train_steps": runs[0]["train_steps"]}
  for subset in ("supervised", "zero_shot"):
    out[subset] = {}
    for metric in METRICS:
      per_seed = []
      for run in runs:
        values = [r["value"] for r in run["rows"] if r["metric"] == metric
                  and (r["seen_in_training"] is True) == (
                      subset == "supervised")]
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
      {"task": t, "language": l, "metric": m,
       "seen_in_training": seen[(t, l)], **_stats(v)}
      for (t, l, m), v in sorted(cells.items())]
  out["zero_shot_pairs"] = sorted(
      [list(p) for p, s in seen.items() if s is False])
  del held_out
  return out


def figure2(multitask: dict[str, list[dict]],
            multilingual: dict[str, dict[str, list[dict]]]) -> dict:
  """Multitask minus multilingual-only EM on each task's supervised pairs.

  Paired by seed: the difference of per-seed macro averages, then mean and
  spread over seeds; "all" averages the per-task differences.
  """
  out = {}
  for method, per_task in multilingual.items():
    by_seed_mt = {r["seed"]: r for r in multitask[method]}
    result = {}
    all_diffs = collections.defaultdict(list)
    for task, runs in per_task.items():
      diffs, ml_values, mt_values = [], [], []
      for run in runs:
        pairs = [(t, l) for (t, l, m), row in _cells(run["rows"]).items()
                 if m == "exact_match" and row["seen_in_training"]]
        ml = np.mean([_cells(run["rows"])[(t, l, "exact_match")]["value"]
                      for t, l in pairs])
        mt_cells = _cells(by_seed_mt[run["seed"]]["rows"])
        mt = np.mean([mt_cells[(t, l, "exact_match")]["value"]
                      for t, l in pairs])
        diffs.append(mt - ml)
        ml_values.append(ml)
        mt_values.append(mt)
        all_diffs[run["seed"]].append(mt - ml)
      result[task] = {"multitask_em": _stats(mt_values),
                      "multilingual_em": _stats(ml_values),
                      "delta_em": _stats(diffs),
                      "multilingual_train_steps": runs[0]["train_steps"]}
    result["all"] = {"delta_em": _stats(
        [float(np.mean(v)) for _, v in sorted(all_diffs.items())])}
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
      + ", ".join(f"({t}, {l})" for t, l in results["zero_shot_pairs"]) + ".",
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
        f"{_fmt(m['supervised']['cer'])} | {_fmt(m['zero_shot']['cer'])} |")
  lines += ["", "## Multitask vs multilingual-only (Figure 2)", "",
            "EM on each task's supervised pairs; delta = multitask − "
            "multilingual-only (negative: the multitask mixture hurts). The "
            "multilingual-only run of a task trains for that task's share of "
            "the multitask steps (the same number of its examples).", "",
            "| method | task | multilingual-only EM | multitask EM | delta |",
            "|---|---|---:|---:|---:|"]
  for method, per_task in results["figure2"].items():
    for task, r in per_task.items():
      if task == "all":
        continue
      lines.append(f"| {methods[method]['label']} | {task} | "
                   f"{_fmt(r['multilingual_em'])} | {_fmt(r['multitask_em'])}"
                   f" | {_fmt(r['delta_em'])} |")
    lines.append(f"| {methods[method]['label']} | **mean** | | | "
                 f"**{_fmt(per_task['all']['delta_em'])}** |")
  base = results["base"]
  lines += ["", "## Setup", "",
            f"- Base: {base['num_params']:,} params, "
            f"{base['train_steps']} steps of span corruption "
            f"(`configs/reproduce/base.gin`), "
            + ("reused from the cache" if base["cached"] else
               f"trained in {base['seconds']:.0f} s") + ".",
            f"- Adaptation: {results['train_steps']} steps per multitask run "
            "(`configs/reproduce/<method>.gin`).",
            f"- Wall time: {results['wall_seconds'] / 60:.1f} min.",
            "", "Plots: `heatmap_<method>.png` (EM per task x language, mean "
            "over seeds; hatched = zero-shot), `bars.png`, `figure2.png`.",
            ""]
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
    rows = [{"features": {"task": c["task"], "language": c["language"]},
             "metric": c["metric"], "value": c["mean"],
             "seen_in_training": c["seen_in_training"]}
            for c in m["cells"]]
    path = os.path.join(output_dir, f"heatmap_{name}.png")
    sup, zs = m["supervised"]["exact_match"], m["zero_shot"]["exact_match"]
    title = (f"{m['label']}: exact match, mean of {len(m['seeds'])} seeds\n"
             f"supervised {sup['mean']:.1f}, zero-shot (* hatched) "
             f"{zs['mean']:.1f}")
    if evaluation.plot_heatmap(rows, "exact_match", path, title):
      paths.append(path)
  return paths


def plot_bars(results: dict, path: str) -> None:
  plt = _plt()
  names = list(results["methods"])
  labels = [n.replace("flix_", "flix\n").replace("_", " ") for n in names]
  x = np.arange(len(names))
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  for ax, metric, title in zip(axes, METRICS, (
      "exact match (%, higher is better)", "CER (%, lower is better)")):
    for offset, subset, color in ((-0.2, "supervised", "tab:blue"),
                                  (0.2, "zero_shot", "tab:orange")):
      stats = [results["methods"][n][subset][metric] for n in names]
      means = [s["mean"] for s in stats]
      ax.bar(x + offset, means, 0.4, yerr=[s["std"] for s in stats],
             capsize=3, color=color, label=subset.replace("_", "-"))
      for xi, s in zip(x + offset, stats):
        for v in s["per_seed"]:
          ax.plot(xi, v, "k.", markersize=3)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"Supervised vs zero-shot pairs ({results['split']} split; "
               "bars: mean over seeds, error bars: std, dots: seeds)",
               fontsize=10)
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
  fig, ax = plt.subplots(figsize=(8, 4))
  for i, method in enumerate(methods):
    stats = [fig2[method][t]["delta_em"] for t in tasks]
    offset = (i - (len(methods) - 1) / 2) * width
    ax.bar(x + offset, [s["mean"] for s in stats], width,
           yerr=[s["std"] for s in stats], capsize=3,
           color=colors.get(method), label=results["methods"][method]["label"])
    for xi, s in zip(x + offset, stats):
      for v in s["per_seed"]:
        ax.plot(xi, v, "k.", markersize=3)
  ax.axhline(0, color="black", linewidth=0.8)
  ax.set_xticks(x, [t if t != "all" else "mean" for t in tasks])
  ax.set_ylabel("EM multitask − multilingual-only")
  ax.set_title("Figure 2: effect of the multitask mixture on each task's "
               "supervised pairs\n(below 0: multitask training hurts)",
               fontsize=10)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---- Main ----


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--output_dir", default=os.path.join(
      REPO, "docs", "reproduce"))
  parser.add_argument("--cache_dir", default=os.path.join(
      os.path.expanduser("~"), ".cache", "flix_reproduce"),
                      help="Base model and run directories (reused).")
  parser.add_argument("--seeds", default="0,1",
                      help="Comma-separated adaptation seeds (>= 2 for a "
                      "spread).")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help="Subset of " + ",".join(METHODS))
  parser.add_argument("--split", default="test",
                      choices=("validation", "test"),
                      help="Evaluation split: tune on validation only.")
  parser.add_argument("--eval_examples", type=int, default=None,
                      help="Examples per (task, language) (default: the "
                      "gin EVALUATOR_NUM_EXAMPLES).")
  parser.add_argument("--base_steps", type=int, default=None,
                      help="Override base.gin's TRAIN_STEPS.")
  parser.add_argument("--steps", type=int, default=None,
                      help="Override the multitask runs' TRAIN_STEPS.")
  parser.add_argument("--pretrain_size", type=int, default=None,
                      help="Train-split numbers spelled per (mode, language) "
                      "for pre-training (default 1000; 20 with --smoke).")
  parser.add_argument("--no_multilingual", action="store_true",
                      help="Skip the Figure-2 multilingual-only runs.")
  parser.add_argument("--binding", action="append", default=[],
                      help="Extra gin binding for every adaptation run.")
  parser.add_argument("--base_binding", action="append", default=[],
                      help="Extra gin binding for the base run.")
  parser.add_argument("--smoke", action="store_true",
                      help="Tiny model, a handful of steps, 2 eval examples: "
                      "checks the pipeline end to end.")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                      force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  start = time.time()
  from flix_tasks import numbers  # pylint: disable=g-import-not-at-top
  from flix_tasks import numbers_pretrain  # pylint: disable=g-import-not-at-top
  if args.pretrain_size is None:
    args.pretrain_size = 20 if args.smoke else 1000
  numbers_pretrain.register_pretrain(size=args.pretrain_size)
  extra = ["reproduce/smoke.gin"] if args.smoke else []
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

  registration = numbers.DEFAULT
  eval_tasks = [registration.task_names[p] for p in registration.pairs]
  # Steps and eval examples of the multitask runs, from the gin files.
  parse([f"reproduce/{METHODS[methods[0]][0]}", *extra], args.binding)
  steps = macro("TRAIN_STEPS")
  if args.eval_examples is None:
    args.eval_examples = macro("EVALUATOR_NUM_EXAMPLES")

  multitask = collections.defaultdict(list)
  for method in methods:
    for seed in seeds:
      multitask[method].append(adapt_and_evaluate(
          args, method, registration.train_mixture, seed, base_dir, extra,
          eval_tasks, None))

  multilingual = {}
  if not args.no_multilingual:
    counts = {p: registration.num_examples[p]["train"]
              for p in registration.train_pairs}
    total = sum(counts.values())
    for method in [m for m in MULTILINGUAL_METHODS if m in methods]:
      multilingual[method] = {}
      for task, mixture in registration.multilingual_mixtures.items():
        share = sum(c for (t, _), c in counts.items() if t == task) / total
        task_steps = max(1, int(round(steps * share)))
        tasks = [registration.task_names[p] for p in registration.train_pairs
                 if p[0] == task]
        multilingual[method][task] = [
            adapt_and_evaluate(args, method, mixture, seed, base_dir, extra,
                               tasks, task_steps) for seed in seeds]

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
    summary["runs"] = [{k: v for k, v in r.items() if k != "rows"}
                       for r in multitask[method]]
    results["methods"][method] = summary
  if multilingual:
    results["figure2"] = figure2(multitask, multilingual)
    for method, per_task in multilingual.items():
      results["multilingual_runs"][method] = {
          task: [{k: v for k, v in r.items() if k != "rows"} for r in runs]
          for task, runs in per_task.items()}
  results["wall_seconds"] = round(time.time() - start, 1)

  out = args.output_dir
  plot_heatmaps(results, out)
  plot_bars(results, os.path.join(out, "bars.png"))
  if results["figure2"]:
    plot_figure2(results, os.path.join(out, "figure2.png"))
  write_markdown(os.path.join(out, "results.md"), results)
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, ensure_ascii=False)
  logging.info("Done in %.1f min; results in %s.", results["wall_seconds"] / 60,
               out)
  with open(os.path.join(out, "results.md"), encoding="utf-8") as f:
    print(f.read())
  return results


if __name__ == "__main__":
  main()
