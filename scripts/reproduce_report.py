"""scripts/reproduce.py's aggregation, tables and plots.

A run's evaluation is a list of rows, one per (combination, metric):

  {"pair": ["cardinal", "en"], "metric": "exact_match", "value": 40.6,
   "examples": 32, "seen_in_training": true}

Per method, the per-seed macro average over supervised (seen) and over
zero-shot combinations, then mean and sample std over seeds; the paired
comparisons difference two methods seed by seed (same seed, same base), per
combination and for the macro averages, before taking mean and spread.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Mapping, Sequence

import numpy as np

METRICS = ("exact_match", "cer")
METRIC_NAMES = {"exact_match": "EM", "cer": "CER"}
SUBSETS = ("supervised", "zero_shot")

Pair = tuple[str, ...]


# ---- Aggregation ----


def stats(values: Sequence[float]) -> dict[str, Any]:
  """Mean, sample std (0 for one value) and the values themselves."""
  values = [float(v) for v in values]
  return {
      "mean": float(np.mean(values)) if values else float("nan"),
      "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
      "per_seed": values,
  }


def cells(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[Pair, str], float]:
  """`{(pair, metric): value}` of one run's rows."""
  return {(tuple(r["pair"]), r["metric"]): r["value"] for r in rows}


def subset_mean(
    rows: Sequence[Mapping[str, Any]], metric: str, subset: str
) -> float:
  """Macro average of `metric` over the run's supervised or zero-shot pairs."""
  values = [
      r["value"]
      for r in rows
      if r["metric"] == metric
      and bool(r["seen_in_training"]) == (subset == "supervised")
  ]
  return float(np.mean(values)) if values else float("nan")


def summarize_method(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Mean and spread over seeds: per subset and metric, and per cell."""
  out = {
      "trainable_params": runs[0]["trainable_params"],
      "seeds": [r["seed"] for r in runs],
      "train_steps": runs[0]["train_steps"],
  }
  for subset in SUBSETS:
    out[subset] = {
        m: stats([subset_mean(r["rows"], m, subset) for r in runs])
        for m in METRICS
    }
  values, seen = collections.defaultdict(list), {}
  for run in runs:
    for row in run["rows"]:
      values[(tuple(row["pair"]), row["metric"])].append(row["value"])
      seen[tuple(row["pair"])] = row["seen_in_training"]
  out["cells"] = [
      {
          "pair": list(pair),
          "metric": metric,
          "seen_in_training": seen[pair],
          **stats(v),
      }
      for (pair, metric), v in sorted(values.items())
  ]
  return out


def paired(
    runs: Sequence[Mapping[str, Any]],
    baseline_runs: Sequence[Mapping[str, Any]],
    pairs: Sequence[Pair],
) -> dict[str, Any]:
  """`runs` minus `baseline_runs`, seed by seed, then mean and spread.

  Returns:
    `{"pairs": [{"pair", "exact_match", "cer"}], "supervised": {metric},
    "zero_shot": {metric}}`, each metric's value a `stats` of the per-seed
    differences (seeds both methods ran).
  """
  baseline = {r["seed"]: r for r in baseline_runs}
  common = [r for r in runs if r["seed"] in baseline]
  out = {"seeds": [r["seed"] for r in common], "pairs": []}
  for pair in pairs:
    entry = {"pair": list(pair)}
    for metric in METRICS:
      entry[metric] = stats(
          [
              cells(r["rows"])[(pair, metric)]
              - cells(baseline[r["seed"]]["rows"])[(pair, metric)]
              for r in common
          ]
      )
    out["pairs"].append(entry)
  for subset in SUBSETS:
    out[subset] = {
        metric: stats(
            [
                subset_mean(r["rows"], metric, subset)
                - subset_mean(baseline[r["seed"]]["rows"], metric, subset)
                for r in common
            ]
        )
        for metric in METRICS
    }
  return out


def figure2(
    multitask: Mapping[str, Sequence[Mapping[str, Any]]],
    single: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
) -> dict[str, Any]:
  """Multitask minus single-task ("multilingual-only") runs, per task.

  On the supervised pairs of each single-task run, paired by seed (the
  difference of per-seed macro averages, then mean and spread); "all"
  averages a seed's per-task differences.
  """
  out = {}
  for method, per_task in single.items():
    by_seed = {r["seed"]: r for r in multitask[method]}
    result, all_diffs = {}, collections.defaultdict(dict)
    for task, runs in per_task.items():
      values = collections.defaultdict(list)
      for run in runs:
        single_cells = cells(run["rows"])
        multi_cells = cells(by_seed[run["seed"]]["rows"])
        pairs = [
            tuple(r["pair"])
            for r in run["rows"]
            if r["metric"] == METRICS[0] and r["seen_in_training"]
        ]
        for metric in METRICS:
          short = METRIC_NAMES[metric].lower()
          one = float(np.mean([single_cells[(p, metric)] for p in pairs]))
          both = float(np.mean([multi_cells[(p, metric)] for p in pairs]))
          values[f"multilingual_{short}"].append(one)
          values[f"multitask_{short}"].append(both)
          values[f"delta_{short}"].append(both - one)
          all_diffs[short].setdefault(run["seed"], []).append(both - one)
      result[task] = {k: stats(v) for k, v in values.items()}
      result[task]["multilingual_train_steps"] = runs[0]["train_steps"]
    result["all"] = {
        f"delta_{short}": stats(
            [float(np.mean(v)) for _, v in sorted(all_diffs[short].items())]
        )
        for short in (METRIC_NAMES[m].lower() for m in METRICS)
    }
    out[method] = result
  return out


# ---- Markdown ----


def fmt(s: Mapping[str, Any], digits: int = 1, sign: bool = False) -> str:
  if s["mean"] != s["mean"]:
    return "n/a"
  mean = f"{s['mean']:+.{digits}f}" if sign else f"{s['mean']:.{digits}f}"
  return f"{mean} ± {s['std']:.{digits}f}"


def pair_name(pair: Sequence[str]) -> str:
  return "(" + ", ".join(v or "-" for v in pair) + ")"


def _verdicts(results: Mapping[str, Any]) -> list[str]:
  """One line per claim, from the numbers (nothing here is hard-coded)."""
  methods, lines = results["methods"], []
  for baseline, comparison in results["paired"].items():
    label = methods[baseline]["label"]
    for subset in SUBSETS:
      em, cer = comparison[subset]["exact_match"], comparison[subset]["cer"]
      if em["mean"] != em["mean"]:
        continue
      lines.append(
          f"- FLix − {label}, {subset.replace('_', '-')} pairs: EM "
          f"{fmt(em, sign=True)}, CER {fmt(cer, sign=True)} (paired over "
          f"seeds {comparison['seeds']})."
      )
  if "flix" in methods and "flix_no_dropout" in methods:
    with_dropout = methods["flix"]["zero_shot"]
    without = methods["flix_no_dropout"]["zero_shot"]
    lines.append(
        "- Feature dropout, zero-shot: EM "
        f"{fmt(with_dropout['exact_match'])} with, "
        f"{fmt(without['exact_match'])} without; CER "
        f"{fmt(with_dropout['cer'])} with, {fmt(without['cer'])} without."
    )
  return lines


def write_markdown(path: str, results: Mapping[str, Any]) -> None:
  """results.md: the tables of `results` (see scripts/reproduce.py)."""
  methods, data = results["methods"], results["data"]
  zero_shot = [tuple(p) for p in data["zero_shot_pairs"]]
  groups = ", ".join(data["groups"])
  lines = [
      f"# FLix vs LoRA: {data['description']}",
      "",
      f"Split: **{results['split']}**, up to {results['eval_examples']} "
      f"examples per ({groups}); seeds {results['seeds']}; mean ± sample "
      "std over seeds of the per-seed macro average over pairs. EM = exact "
      "match (%), CER = character error rate (%, lower is better). "
      "Zero-shot pairs (in the evaluation split, never in training): "
      + (", ".join(pair_name(p) for p in zero_shot) or "none")
      + ".",
      "",
      "| method | trainable params | supervised EM | zero-shot EM | "
      "supervised CER | zero-shot CER |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for m in methods.values():
    lines.append(
        f"| {m['label']} | {m['trainable_params']:,} | "
        f"{fmt(m['supervised']['exact_match'])} | "
        f"{fmt(m['zero_shot']['exact_match'])} | "
        f"{fmt(m['supervised']['cer'])} | {fmt(m['zero_shot']['cer'])} |"
    )
  lines += ["", "## What the numbers say", "", *_verdicts(results)]
  if zero_shot:
    lines += [
        "",
        "## Per zero-shot pair",
        "",
        "| method | "
        + " | ".join(f"{pair_name(p)} EM | CER" for p in zero_shot)
        + " |",
        "|---|" + "---:|---:|" * len(zero_shot),
    ]
    for m in methods.values():
      by_cell = {(tuple(c["pair"]), c["metric"]): c for c in m["cells"]}
      lines.append(
          f"| {m['label']} | "
          + " | ".join(
              f"{fmt(by_cell[(p, 'exact_match')])} | "
              f"{fmt(by_cell[(p, 'cer')])}"
              for p in zero_shot
          )
          + " |"
      )
  for baseline, comparison in results["paired"].items():
    lines += [
        "",
        f"## Paired: FLix − {methods[baseline]['label']}",
        "",
        "Same seed, same base: the difference per seed, then mean ± std "
        "over seeds (EM above 0 and CER below 0: FLix is better).",
        "",
        "| pairs | Δ EM | Δ CER |",
        "|---|---:|---:|",
    ]
    for subset in SUBSETS:
      lines.append(
          f"| all {subset.replace('_', '-')} (macro) | "
          f"{fmt(comparison[subset]['exact_match'], sign=True)} | "
          f"{fmt(comparison[subset]['cer'], sign=True)} |"
      )
    for entry in comparison["pairs"]:
      lines.append(
          f"| {pair_name(entry['pair'])} zero-shot | "
          f"{fmt(entry['exact_match'], sign=True)} | "
          f"{fmt(entry['cer'], sign=True)} |"
      )
  lines += _figure2_lines(results)
  lines += _setup_lines(results)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def _figure2_lines(results: Mapping[str, Any]) -> list[str]:
  methods = results["methods"]
  if not results["figure2"]:
    return ["", "(Figure-2 runs skipped.)"]
  first = results["data"]["groups"][0]
  lines = [
      "",
      f"## Multitask vs single-{first} training (Figure 2)",
      "",
      f"On each {first}'s supervised pairs: a run on that {first} alone "
      f"(all its other feature values, for as many of its examples as the "
      f"multitask run sees: its share of the steps) against the multitask "
      f"run. Delta = multitask − single-{first} (EM below 0 or CER above "
      "0: the multitask mixture hurts).",
      "",
      f"| method | {first} | single EM | multitask EM | Δ EM | single CER "
      "| multitask CER | Δ CER |",
      "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for method, per_task in results["figure2"].items():
    label = methods[method]["label"]
    for task, r in per_task.items():
      if task == "all":
        continue
      lines.append(
          f"| {label} | {task} | {fmt(r['multilingual_em'])} | "
          f"{fmt(r['multitask_em'])} | {fmt(r['delta_em'], sign=True)} | "
          f"{fmt(r['multilingual_cer'])} | {fmt(r['multitask_cer'])} | "
          f"{fmt(r['delta_cer'], sign=True)} |"
      )
    if len(per_task) > 2:
      lines.append(
          f"| {label} | **mean** | | | "
          f"**{fmt(per_task['all']['delta_em'], sign=True)}** | | | "
          f"**{fmt(per_task['all']['delta_cer'], sign=True)}** |"
      )
  return lines


def _setup_lines(results: Mapping[str, Any]) -> list[str]:
  base = results["base"]
  trained = (
      f"trained in {base['train_seconds']:.0f} s"
      if base.get("train_seconds")
      else "trained earlier"
  )
  lines = [
      "",
      "## Setup",
      "",
      f"- Data: {results['data']['details']}",
      f"- Base: {base['num_params'] or 0:,} params, {base['train_steps']} "
      f"steps of span corruption ({', '.join(base['gin_files'])}), "
      f"{trained}"
      + (" (reused from the cache)" if base["cached"] else "")
      + ".",
      f"- Adaptation: {results['train_steps']} steps per multitask run "
      f"(preset `{results['preset']}`; `configs/reproduce/<method>.gin` "
      "and the bindings in results.json).",
      f"- Wall time of this invocation: {results['wall_seconds'] / 60:.1f} "
      f"min; adaptation runs (train + eval, summed, cached ones included): "
      f"{results['runs_seconds'] / 60:.1f} min.",
      "",
      "Plots: `heatmap_<method>_em.png` and `heatmap_<method>_cer.png` "
      "(per pair, mean over seeds; hatched and * = zero-shot), `bars.png`, "
      "`figure2.png`.",
  ]
  samples = [
      (m["label"], s)
      for m in results["methods"].values()
      for s in m["runs"][0]["samples"][:1]
  ]
  if samples:
    lines += [
        "",
        "## Sample predictions (seed "
        f"{results['seeds'][0]}, first example of the first pair)",
        "",
        "| method | input | target | prediction |",
        "|---|---|---|---|",
    ]
    for label, (inputs, target, prediction) in samples:
      lines.append(f"| {label} | {inputs} | {target} | {prediction} |")
  return lines


# ---- Plots ----


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _save(fig, path: str, title: str) -> None:
  """Titles, lays out, writes and closes a figure."""
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  _plt().close(fig)


def plot_heatmaps(results: Mapping[str, Any], output_dir: str) -> list[str]:
  """`heatmap_<method>_{em,cer}.png`: per pair, mean over seeds."""
  from flix import evaluation  # pylint: disable=g-import-not-at-top

  groups = results["data"]["groups"]
  axes = (groups[0], "/".join(groups[1:]) or "all")
  paths = []
  for name, m in results["methods"].items():
    rows = [
        {
            "features": {
                axes[0]: c["pair"][0],
                axes[1]: "/".join(c["pair"][1:]) or "all",
            },
            "metric": c["metric"],
            "value": c["mean"],
            "seen_in_training": c["seen_in_training"],
        }
        for c in m["cells"]
    ]
    for metric in METRICS:
      short = METRIC_NAMES[metric]
      path = os.path.join(output_dir, f"heatmap_{name}_{short.lower()}.png")
      sup, zs = m["supervised"][metric], m["zero_shot"][metric]
      title = (
          f"{m['label']}\n{short} (%), mean of {len(m['seeds'])} seeds: "
          f"supervised {sup['mean']:.1f},\nzero-shot (* hatched) "
          f"{zs['mean']:.1f}"
      )
      if evaluation.plot_heatmap(
          rows, metric, path, title, axes, higher_is_better=metric != "cer"
      ):
        paths.append(path)
  return paths


def _seed_bars(ax, x, values, width: float, **bar_kwargs) -> None:
  """Bars of the seeds' mean with std error bars, each seed as a dot.

  `values`: per bar, a summary with `mean`, `std` and `per_seed`.
  """
  ax.bar(
      x,
      [s["mean"] for s in values],
      width,
      yerr=[s["std"] for s in values],
      capsize=3,
      **bar_kwargs,
  )
  for xi, s in zip(x, values):
    ax.plot([xi] * len(s["per_seed"]), s["per_seed"], "k.", markersize=3)


def plot_bars(results: Mapping[str, Any], path: str) -> None:
  """EM and CER per method, supervised vs zero-shot, seeds as dots."""
  plt = _plt()
  names = list(results["methods"])
  labels = [n.replace("flix_", "flix\n").replace("_", " ") for n in names]
  x = np.arange(len(names))
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
  for ax, metric, title in zip(
      axes,
      METRICS,
      ("exact match (%, higher is better)", "CER (%, lower is better)"),
  ):
    for offset, subset, color in (
        (-0.2, "supervised", "tab:blue"),
        (0.2, "zero_shot", "tab:orange"),
    ):
      values = [results["methods"][n][subset][metric] for n in names]
      _seed_bars(
          ax,
          x + offset,
          values,
          0.4,
          color=color,
          label=subset.replace("_", "-"),
      )
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  _save(
      fig,
      path,
      f"Supervised vs zero-shot pairs ({results['split']} split; bars: mean "
      "over seeds, error bars: std, dots: seeds)",
  )


def plot_figure2(results: Mapping[str, Any], path: str) -> None:
  """Figure 2: multitask − single-task EM and CER per task and method."""
  plt = _plt()
  fig2 = results["figure2"]
  methods = list(fig2)
  tasks = [t for t in next(iter(fig2.values())) if t != "all"]
  if len(tasks) > 1:
    tasks.append("all")
  x = np.arange(len(tasks))
  width = 0.8 / max(len(methods), 1)
  first = results["data"]["groups"][0]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  for ax, key, ylabel in (
      (axes[0], "delta_em", "EM: multitask − single\n(below 0: it hurts)"),
      (axes[1], "delta_cer", "CER: multitask − single\n(above 0: it hurts)"),
  ):
    for i, method in enumerate(methods):
      values = [fig2[method][t][key] for t in tasks]
      offset = (i - (len(methods) - 1) / 2) * width
      _seed_bars(
          ax,
          x + offset,
          values,
          width,
          label=results["methods"][method]["label"],
      )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [t if t != "all" else "mean" for t in tasks])
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  _save(
      fig,
      path,
      f"Figure 2: multitask vs single-{first} training, on each {first}'s "
      "supervised pairs (mean ± std over seeds; dots: seeds)",
  )


def write_all(results: Mapping[str, Any], output_dir: str) -> None:
  """Every plot and results.md (results.json is the caller's)."""
  plot_heatmaps(results, output_dir)
  plot_bars(results, os.path.join(output_dir, "bars.png"))
  if results["figure2"]:
    plot_figure2(results, os.path.join(output_dir, "figure2.png"))
  write_markdown(os.path.join(output_dir, "results.md"), results)
