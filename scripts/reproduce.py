"""Does FLix beat LoRA? The paper's claims (arXiv 2402.17934), in miniature.

Claims tested, with small models trained from scratch:
  1. On a multitask multilingual mixture FLix beats LoRA (supervised pairs),
     also LoRA with as many trainable parameters as FLix.
  2. FLix generalises to (task, language) pairs never seen in training
     (zero-shot), and feature dropout helps it do so.
  3. Going from a single-task (multilingual-only) mixture to the multitask
     one hurts LoRA, while FLix holds (Figure 2).

    python scripts/reproduce.py                 # numbers, CPU budget
    python scripts/reproduce.py --preset=gpu    # bigger base, one GPU
    python scripts/reproduce.py --data=jsonl --train_files=train.jsonl \\
        --validation_files=dev.jsonl --test_files=test.jsonl \\
        [--pretrain_files=texts.txt]           # any featurized JSONL
    python scripts/reproduce.py --smoke --output_dir=/tmp/smoke  # seconds

Data (--data):
  numbers  the multilingual numbers mixture (`flix_tasks.numbers`): numbers
           below --max_number spelled by num2words, 4 held-out (task,
           language) pairs; the base pre-trains on the spellings of every
           pair, most led by their digits (`flix_tasks.numbers_pretrain`).
  jsonl    featurized JSONL (`{"inputs", "targets", "features"}`, see
           `flix_tasks.jsonl`): one task per feature combination; held-out
           pairs are the combinations of the evaluation splits that the
           train split lacks; the base pre-trains on the train targets (and
           the lines of --pretrain_files).
Either way a SentencePiece vocabulary is trained on the train split
(`flix_tasks.sentencepiece_trainer`).

Stages (gin configs under configs/reproduce/, run in this process through
`flix.trainer.train`; --preset appends its gin file to every stage):
  1. base.gin: a small T5 v1.1 trained from scratch by span corruption
     (`flix_tasks.span_corruption`); cached under --cache_dir, keyed by its
     configuration and data.
  2. Adaptation of the base on the multitask mixture with each method
     (`METHODS`: LoRA at FLix's active rank and at FLix's parameter count,
     FLix, FLix without feature dropout, single-group FLix, full
     fine-tuning), and of LoRA and FLix on single-task mixtures (Figure 2,
     each with its task's share of the steps: as many of its examples as
     the multitask run sees). Every run is cached too: a finished run is
     reloaded, an interrupted one resumes.
  3. Greedy decoding of --split (test by default; tune on validation) per
     combination (`flix.evaluation.evaluate_tasks`): exact match and CER,
     supervised and zero-shot apart, per seed; mean and spread over seeds
     and paired differences (`reproduce_report`).
  4. --output_dir: results.json, results.md, heatmap_<method>_{em,cer}.png,
     bars.png, figure2.png.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
for path in (REPO, SCRIPTS):
  if path not in sys.path:
    sys.path.insert(0, path)

import gin  # pylint: disable=g-import-not-at-top

import reproduce_data  # pylint: disable=g-import-not-at-top
import reproduce_report as report  # pylint: disable=g-import-not-at-top

CONFIG_DIR = os.path.join(REPO, "configs", "reproduce")

# Budgets: base pre-training steps, adaptation steps per multitask run,
# evaluation examples per pair, and the gin file appended to every stage.
# Chosen on the validation split (docs/reproduce/RUN.md).
PRESETS = {
    # ~45 min on 2 quiet CPU cores.
    "cpu": {"gin": None, "base_steps": 1000, "steps": 600, "eval": 32},
    # A 25M-parameter base, batches of 128, for one H100-class GPU: sized
    # from FLOPs for ~8 min, NOT run (configs/reproduce/gpu.gin).
    "gpu": {"gin": "gpu.gin", "base_steps": 2000, "steps": 300, "eval": 100},
    # The pipeline end to end on a tiny model (tests/reproduce_test.py).
    "smoke": {"gin": "smoke.gin", "base_steps": 2, "steps": 4, "eval": 2},
}
# The numbers data: numbers below 1000; every pre-training text led by its
# digits.
NUMBERS = {"max_number": 1000, "pretrain_size": 1000, "digits_rate": 1.0}
SMOKE_NUMBERS = {
    "languages": "en,de,fr",
    "tasks": "cardinal,ordinal,year",
    "train_size": 50,
    "pretrain_size": 20,
}
RANK = 4  # FLix's rank per feature group (configs/reproduce/flix.gin).


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


def macro(name: str, default: Any = None) -> Any:
  try:
    return gin.query_parameter(f"%{name}")
  except (ValueError, KeyError):
    return default


def train_configured(files: Sequence[str], bindings: Sequence[str]):
  """Parses `files` + `bindings` and runs the gin-configured trainer.train."""
  from flix import trainer  # pylint: disable=g-import-not-at-top

  parse(files, bindings)
  return gin.get_configurable(trainer.train)()


# ---- Methods ----


@dataclasses.dataclass(frozen=True)
class Method:
  gin_file: str
  bindings: tuple[str, ...]
  label: str


def methods_for(registration) -> dict[str, Method]:
  """The compared methods, in table order, sized from the feature groups.

  LoRA at FLix's active rank (one rank-`RANK` adapter per group is active
  per example) and at FLix's trainable-parameter count (FLix holds one
  adapter per feature value: LoRA with the sum of their ranks has exactly as
  many parameters); single-group FLix at the same active rank.
  """
  from flix import featurized  # pylint: disable=g-import-not-at-top

  groups = registration.groups
  values = featurized.feature_values(registration.train_mixture)
  active = RANK * len(groups)
  total = RANK * sum(len(values[g]) for g in groups)
  flix_rank = f"FLIX_RANK = {RANK}"
  methods = {
      "lora": Method(
          "lora.gin",
          (f"LORA_RANK = {active}",),
          f"LoRA (r={active} = FLix's active rank)",
      ),
      "lora_params": Method(
          "lora.gin",
          (f"LORA_RANK = {total}",),
          f"LoRA (r={total} = FLix's parameters)",
      ),
      "flix": Method(
          "flix.gin",
          (flix_rank,),
          f"FLix {'+'.join(groups)} (r={RANK} each, feature dropout)",
      ),
      "flix_no_dropout": Method(
          "flix.gin",
          (flix_rank, "FEATURE_DROPOUT = 0.0"),
          "FLix, no feature dropout",
      ),
  }
  if len(groups) > 1:
    for group in groups:
      methods[f"flix_{group}_only"] = Method(
          "flix.gin",
          (f"FEATURE_GROUPS = ('{group}',)", f"FLIX_RANK = {active}"),
          f"FLix {group}-only (r={active})",
      )
  methods["full"] = Method("full.gin", (), "Full fine-tuning")
  return methods


# ---- Stages ----


def base_config(
    args,
    data: reproduce_data.Data,
    files: Sequence[str],
    bindings: Sequence[str],
) -> tuple[list[str], list[str], str]:
  """The base run's gin files, bindings and (cached) model directory."""
  files = ["configs/reproduce/base.gin", *files]
  bindings = [
      *bindings,
      f"MIXTURE_OR_TASK_NAME = '{data.pretrain_task}'",
      f"TRAIN_STEPS = {args.base_steps}",
      *args.base_binding,
  ]
  key = _key(_config_text(files), bindings, data.key, args.vocab_size)
  return files, bindings, os.path.join(args.cache_dir, f"base-{key}")


def base_stage(
    args, data: reproduce_data.Data, files: Sequence[str], bindings
) -> dict:
  """Trains (or reuses) the base model; returns its info (`model_dir`...)."""
  from flix import checkpoints  # pylint: disable=g-import-not-at-top
  from flix import train_step  # pylint: disable=g-import-not-at-top

  files, bindings, model_dir = base_config(args, data, files, bindings)
  start = time.time()
  parse(files, bindings + [f"MODEL_DIR = '{model_dir}'"])
  latest = (
      checkpoints.Checkpointer(model_dir, keep=1).latest_step()
      if os.path.isdir(model_dir)
      else None
  )
  cached = latest == args.base_steps
  if cached:
    logging.info("Reusing the cached base %s.", model_dir)
  else:
    logging.info("Pre-training the base (%d steps).", args.base_steps)
    run = train_configured(files, bindings + [f"MODEL_DIR = '{model_dir}'"])
    with open(os.path.join(model_dir, "num_params.json"), "w") as f:
      json.dump(
          {
              "num_params": train_step.count_params(run.params),
              "train_seconds": round(time.time() - start, 1),
          },
          f,
      )
    del run
  with open(os.path.join(model_dir, "num_params.json")) as f:
    saved = json.load(f)
  return {
      "model_dir": model_dir,
      "train_steps": args.base_steps,
      "cached": cached,
      "seconds": round(time.time() - start, 1),
      "gin_files": files,
      "bindings": bindings,
      **saved,
  }


def adapt_and_evaluate(
    args,
    data: reproduce_data.Data,
    method: Method,
    name: str,
    mixture: str,
    seed: int,
    files: Sequence[str],
    bindings: Sequence[str],
    eval_pairs: Sequence[tuple[str, ...]],
    train_steps: int,
    examples_cache: dict,
) -> dict:
  """Trains one (method, mixture, seed) run (or reloads it) and evaluates."""
  from flix import evaluation  # pylint: disable=g-import-not-at-top
  from flix import train_step  # pylint: disable=g-import-not-at-top
  from flix import featurized  # pylint: disable=g-import-not-at-top

  files = [f"configs/reproduce/{method.gin_file}", *files]
  bindings = [
      *bindings,
      f"MIXTURE_OR_TASK_NAME = '{mixture}'",
      f"RANDOM_SEED = {seed}",
      f"TRAIN_STEPS = {train_steps}",
      *method.bindings,
      *args.binding,
  ]
  key = _key(_config_text(files), bindings, data.key)
  model_dir = os.path.join(
      args.cache_dir, "runs", mixture, name, f"seed{seed}-{key}"
  )
  result_path = os.path.join(
      model_dir, f"rows-{args.split}-{args.eval_examples}.json"
  )
  if os.path.exists(result_path):
    logging.info("Reusing %s.", result_path)
    with open(result_path) as f:
      return json.load(f)
  start = time.time()
  run = train_configured(files, bindings + [f"MODEL_DIR = '{model_dir}'"])
  train_seconds = time.time() - start
  lengths = macro("TASK_FEATURE_LENGTHS")
  start = time.time()
  registration = data.registration
  rows, records = evaluation.evaluate_tasks(
      run.model,
      run.params,
      [registration.task_names[p] for p in eval_pairs],
      args.split,
      lengths,
      batch_size=macro("EVAL_BATCH_SIZE", 64),
      max_examples_per_task=args.eval_examples,
      examples_cache=examples_cache,
  )
  eval_seconds = time.time() - start
  pair_of = {n: p for p, n in registration.task_names.items()}
  seen = featurized.feature_combinations(mixture)
  samples = collections.defaultdict(list)
  for record in records:
    samples[record["task"]].append(
        [record["inputs"], record["target"], record["prediction"]]
    )
  out = {
      "method": name,
      "mixture": mixture,
      "seed": seed,
      "train_steps": train_steps,
      "trainable_params": train_step.count_params(run.state.trainable),
      "model_dir": model_dir,
      "gin_files": files,
      "bindings": bindings,
      "train_seconds": round(train_seconds, 1),
      "eval_seconds": round(eval_seconds, 1),
      "rows": [
          {
              "pair": list(pair_of[r["task_name"]]),
              "metric": r["metric"],
              "value": r["value"],
              "examples": r["examples"],
              "seen_in_training": frozenset(r["features"].items()) in seen,
          }
          for r in rows
      ],
      "samples": [
          s for p in eval_pairs for s in samples[registration.task_names[p]][:2]
      ],
  }
  logging.info(
      "%s / %s / seed %d: %d trainable params, train %.0fs, eval %.0fs.",
      mixture,
      name,
      seed,
      out["trainable_params"],
      train_seconds,
      eval_seconds,
  )
  with open(result_path, "w") as f:
    json.dump(out, f, indent=1, ensure_ascii=False)
  del run
  return out


# ---- Main ----


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  add = parser.add_argument
  add("--data", default="numbers", choices=("numbers", "jsonl"))
  add("--preset", default="cpu", choices=sorted(PRESETS))
  add("--smoke", action="store_true", help="= --preset=smoke, tiny data.")
  add("--output_dir", default=os.path.join(REPO, "docs", "reproduce"))
  add(
      "--cache_dir",
      default=os.path.join(os.path.expanduser("~"), ".cache", "flix_reproduce"),
      help="Vocabulary, base and run directories (reused).",
  )
  add(
      "--jax_cache_dir",
      help="JAX compilation cache (default: <cache_dir>/jax_cache).",
  )
  add("--seeds", default="0,1,2", help="Comma-separated adaptation seeds.")
  add("--methods", default="", help="Subset of the methods (default: all).")
  add(
      "--split",
      default="test",
      choices=("validation", "test"),
      help="Evaluation split: tune on validation only.",
  )
  add("--eval_examples", type=int, help="Per pair (default: the preset's).")
  add("--base_steps", type=int, help="Pre-training steps (the preset's).")
  add("--steps", type=int, help="Multitask adaptation steps (the preset's).")
  add(
      "--figure2_tasks",
      default="auto",
      help="Values of the first feature group with single-task runs "
      "(comma-separated; 'auto': the one with the most training pairs; "
      "'all'; 'none').",
  )
  add("--binding", action="append", default=[], help="For every adaptation.")
  add("--base_binding", action="append", default=[], help="For the base.")
  add(
      "--vocabulary",
      default="sentencepiece",
      choices=("sentencepiece", "bytes"),
  )
  add("--vocab_size", type=int, default=1000, help="SentencePiece pieces.")
  add(
      "--prefix_rate",
      type=float,
      default=0.5,
      help="Share of pre-training examples that hide the end of a text (all "
      "of its spelling after digits).",
  )
  add(
      "--pretrain_copies",
      type=int,
      default=4,
      help="Span corruptions of each pre-training text.",
  )
  add("--max_length", type=int, default=512, help="Longest feature length.")
  numbers_flags = parser.add_argument_group("--data=numbers")
  add = numbers_flags.add_argument
  add("--max_number", type=int, default=NUMBERS["max_number"])
  add("--languages", help="num2words languages (default: numbers'.)")
  add("--tasks", help="Numbers tasks (default: all).")
  add("--train_size", type=int, help="Training examples per pair.")
  add("--pretrain_size", type=int, help="Pre-training numbers per pair.")
  add("--digits_rate", type=float, default=NUMBERS["digits_rate"])
  jsonl_flags = parser.add_argument_group("--data=jsonl")
  add = jsonl_flags.add_argument
  add("--train_files", help="Glob(s), comma-separated.")
  add("--validation_files")
  add("--test_files")
  add("--pretrain_files", help="Extra pre-training text, one per line.")
  args = parser.parse_args(argv)
  if args.smoke:
    args.preset = "smoke"
  preset = PRESETS[args.preset]
  for name, value in (
      ("base_steps", preset["base_steps"]),
      ("steps", preset["steps"]),
      ("eval_examples", preset["eval"]),
  ):
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.data == "numbers" and args.preset == "smoke":
    for name, value in SMOKE_NUMBERS.items():
      if getattr(args, name) is None:
        setattr(args, name, value)
  if args.pretrain_size is None:
    args.pretrain_size = NUMBERS["pretrain_size"]
  return args


def _figure2_tasks(args, registration) -> list[str]:
  tasks = list(registration.multilingual_mixtures)
  if args.figure2_tasks == "none":
    return []
  if args.figure2_tasks == "all":
    return tasks
  if args.figure2_tasks == "auto":
    count = collections.Counter(p[0] for p in registration.train_pairs)
    return [max(tasks, key=lambda t: (count[t], -tasks.index(t)))]
  chosen = args.figure2_tasks.split(",")
  unknown = [t for t in chosen if t not in tasks]
  if unknown:
    raise ValueError(f"--figure2_tasks {unknown}: not among {tasks}.")
  return chosen


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

  # Runs of one method share their compiled programs (seeds, Figure 2).
  jax.config.update(
      "jax_compilation_cache_dir",
      args.jax_cache_dir or os.path.join(args.cache_dir, "jax_cache"),
  )
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

  data = (
      reproduce_data.numbers_data(args)
      if args.data == "numbers"
      else reproduce_data.jsonl_data(args)
  )
  registration = data.registration
  base_lengths, lengths = reproduce_data.feature_lengths(data, args.max_length)
  preset_gin = PRESETS[args.preset]["gin"]
  files = [f"configs/reproduce/{preset_gin}"] if preset_gin else []
  vocab = f"network.preset.vocab_size = {data.vocabulary.vocab_size}"
  base = base_stage(
      args, data, files, [vocab, f"TASK_FEATURE_LENGTHS = {base_lengths}"]
  )
  bindings = [
      vocab,
      f"TASK_FEATURE_LENGTHS = {lengths}",
      f"INITIAL_CHECKPOINT_PATH = '{base['model_dir']}'",
  ]

  methods = methods_for(registration)
  chosen = [m for m in args.methods.split(",") if m] or list(methods)
  unknown = [m for m in chosen if m not in methods]
  if unknown:
    raise ValueError(f"Unknown methods {unknown}; methods: {list(methods)}.")
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  eval_pairs = [
      p for p in registration.pairs if registration.num_examples[p][args.split]
  ]
  examples_cache = {}
  run = lambda name, mixture, seed, pairs, steps: adapt_and_evaluate(
      args,
      data,
      methods[name],
      name,
      mixture,
      seed,
      files,
      bindings,
      pairs,
      steps,
      examples_cache,
  )
  multitask = {
      name: [
          run(name, registration.train_mixture, seed, eval_pairs, args.steps)
          for seed in seeds
      ]
      for name in chosen
  }

  single = {}
  train_counts = {
      p: registration.num_examples[p]["train"] for p in registration.train_pairs
  }
  for name in [m for m in ("lora", "flix") if m in chosen]:
    for task in _figure2_tasks(args, registration):
      pairs = [p for p in registration.train_pairs if p[0] == task]
      share = sum(train_counts[p] for p in pairs) / sum(train_counts.values())
      steps = max(1, int(round(args.steps * share)))
      mixture = registration.multilingual_mixtures[task]
      single.setdefault(name, {})[task] = [
          run(name, mixture, seed, pairs, steps) for seed in seeds
      ]

  results = {
      "data": {
          "name": args.data,
          "description": data.description,
          "details": data.details,
          "groups": list(registration.groups),
          "pairs": [list(p) for p in eval_pairs],
          "zero_shot_pairs": [
              list(p) for p in eval_pairs if p in registration.held_out
          ],
      },
      "preset": args.preset,
      "split": args.split,
      "eval_examples": args.eval_examples,
      "seeds": seeds,
      "train_steps": args.steps,
      "feature_lengths": {"base": base_lengths, "adaptation": lengths},
      "base": base,
      "methods": {},
      "paired": {},
      "figure2": report.figure2(multitask, single) if single else {},
      "single_task_runs": {
          name: {
              task: [
                  {k: v for k, v in r.items() if k not in ("rows", "samples")}
                  for r in runs
              ]
              for task, runs in per_task.items()
          }
          for name, per_task in single.items()
      },
  }
  for name in chosen:
    summary = report.summarize_method(multitask[name])
    summary["label"] = methods[name].label
    summary["gin_file"] = f"configs/reproduce/{methods[name].gin_file}"
    summary["bindings"] = list(methods[name].bindings)
    summary["runs"] = [
        {k: v for k, v in r.items() if k != "rows"} for r in multitask[name]
    ]
    results["methods"][name] = summary
  if "flix" in chosen:
    held = [p for p in eval_pairs if p in registration.held_out]
    for baseline in ("lora", "lora_params"):
      if baseline in chosen:
        results["paired"][baseline] = report.paired(
            multitask["flix"], multitask[baseline], held
        )
  every_run = [r for runs in multitask.values() for r in runs] + [
      r
      for per_task in single.values()
      for runs in per_task.values()
      for r in runs
  ]
  results["runs_seconds"] = round(
      sum(r["train_seconds"] + r["eval_seconds"] for r in every_run), 1
  )
  results["wall_seconds"] = round(time.time() - start, 1)

  os.makedirs(args.output_dir, exist_ok=True)
  report.write_all(results, args.output_dir)
  with open(
      os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8"
  ) as f:
    json.dump(results, f, indent=1, ensure_ascii=False)
  logging.info(
      "Done in %.1f min; results in %s.",
      results["wall_seconds"] / 60,
      args.output_dir,
  )
  with open(os.path.join(args.output_dir, "results.md"), encoding="utf-8") as f:
    print(f.read())
  return results


if __name__ == "__main__":
  main()
