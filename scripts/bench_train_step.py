"""Times the whole train step: full fine-tuning vs LoRA (rank 2r) vs FLix.

All three train the same small mT5-shaped network (gated-GELU MLP, relative
attention, untied logits) through `trainer.build_run` and its jitted step:

  full   every parameter trainable (no adapters)
  LoRA   one always-on adapter of rank 2r on every adapted dense layer
  FLix   two feature groups of rank r (e.g. 10 tasks x 50 languages), both
         active on every example: the same number of active adapter columns
         per token as LoRA

Rows are timed interleaved (shared, noisy machines: only ratios mean much);
each repetition times `--steps` steps, the median per-step time gives steps/s.
Memory is XLA's own accounting of the compiled step (per device):
`compiled.memory_analysis()` argument, output and temp sizes; the donated
train state makes outputs alias arguments, so the real peak is about
`args + outputs + temp - alias`.

    python scripts/bench_train_step.py [--rank 4 --tasks 10 --languages 50
        --batch 16 --inputs 64 --targets 64 --reps 5 --steps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", message=".*mesh.*context manager.*")

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from flix import features as features_lib
from flix import models
from flix import network
from flix import train_step as train_step_lib
from flix import trainer


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--emb", type=int, default=128)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=32)
  p.add_argument("--mlp", type=int, default=256)
  p.add_argument(
      "--layers", type=int, default=2, help="encoder and decoder layers each"
  )
  p.add_argument("--vocab", type=int, default=384)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--dropout", type=float, default=0.0)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--inputs", type=int, default=64)
  p.add_argument("--targets", type=int, default=64)
  p.add_argument(
      "--rank", type=int, default=4, help="r: FLix group rank; LoRA gets 2r"
  )
  p.add_argument("--tasks", type=int, default=10)
  p.add_argument("--languages", type=int, default=50)
  p.add_argument(
      "--strategy",
      default="segment",
      help="FLix strategy (LoRA uses the same layer code)",
  )
  p.add_argument("--optimizer", default="adafactor")
  p.add_argument("--num_partitions", type=int, default=1)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--steps", type=int, default=3, help="timed steps per rep")
  p.add_argument("--cases", default="full,lora,flix")
  return p.parse_args(argv)


def make_cases(args):
  """{name: (feature space or None, trainable patterns)}."""
  r = args.rank
  flix_space = features_lib.FeatureSpace.from_values(
      {
          "task": [f"t{i}" for i in range(args.tasks)],
          "language": [f"l{i}" for i in range(args.languages)],
      },
      ranks={"task": r, "language": r},
  )
  all_cases = {
      "full": ("full fine-tuning", None, train_step_lib.ALL_PATTERNS),
      "lora": (
          f"LoRA r={2 * r}",
          features_lib.FeatureSpace.lora(rank=2 * r),
          train_step_lib.ADAPTER_PATTERNS,
      ),
      "flix": (
          f"FLix 2x r={r} ({args.tasks}x{args.languages})",
          flix_space,
          train_step_lib.ADAPTER_PATTERNS,
      ),
  }
  return {k: all_cases[k] for k in args.cases.split(",")}


def make_batch(args, space, rs):
  b, li, lt = args.batch, args.inputs, args.targets
  targets = rs.randint(1, args.vocab, size=(b, lt)).astype(np.int32)
  batch = {
      "encoder_input_tokens": rs.randint(1, args.vocab, size=(b, li)).astype(
          np.int32
      ),
      "decoder_input_tokens": np.concatenate(
          [np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1
      ),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": np.ones((b, lt), np.float32),
  }
  if space is not None:
    # One value per group per example (LoRA: its one value, id 1).
    ids = np.stack(
        [rs.randint(1, g.num_values + 1, size=b) for g in space.groups], axis=-1
    ).astype(np.int32)
    batch["encoder_feature_ids"] = np.repeat(ids[:, None], li, axis=1)
    batch["decoder_feature_ids"] = np.repeat(ids[:, None], lt, axis=1)
  return batch


def _mib(n):
  return f"{n / 2**20:.2f}"


def main(argv=None):
  args = parse_args(argv)
  print(
      f"JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform}"
      f" device(s); model emb={args.emb} heads={args.heads}x{args.head_dim}"
      f" mlp={args.mlp} layers={args.layers}+{args.layers} "
      f"vocab={args.vocab} {args.dtype}; batch {args.batch} x "
      f"({args.inputs}+{args.targets}) tokens; {args.optimizer}; FLix "
      f"strategy {args.strategy}",
      flush=True,
  )
  rs = np.random.RandomState(0)
  optimizer = train_step_lib.make_optimizer(1e-3, name=args.optimizer)
  runs = {}
  for key, (label, space, patterns) in make_cases(args).items():
    config = network.preset(
        args.preset,
        vocab_size=args.vocab,
        emb_dim=args.emb,
        num_heads=args.heads,
        head_dim=args.head_dim,
        mlp_dim=args.mlp,
        num_encoder_layers=args.layers,
        num_decoder_layers=args.layers,
        dtype=args.dtype,
        dropout_rate=args.dropout,
        feature_space=space,
        flix_strategy=args.strategy,
    )
    model = models.FlixModel(config)
    start = time.perf_counter()
    run = trainer.build_run(
        model, optimizer, patterns, num_partitions=args.num_partitions
    )
    batch = trainer.to_device_batch(make_batch(args, space, rs), run.mesh)
    rng = jax.random.PRNGKey(0)
    with run.mesh, nn.logical_axis_rules(run.rules):
      compiled = run.step_fn.lower(run.state, batch, rng).compile()
      mem = compiled.memory_analysis()
      run.state, metrics = compiled(run.state, batch, rng)  # warm-up
      jax.block_until_ready(metrics)
    trainable = train_step_lib.count_params(run.state.trainable)
    total = trainable + train_step_lib.count_params(run.state.frozen)
    print(
        f"  built {label}: {time.perf_counter() - start:.1f}s, "
        f"loss {float(metrics['loss']):.3f}",
        flush=True,
    )
    runs[key] = dict(
        label=label,
        run=run,
        compiled=compiled,
        batch=batch,
        rng=rng,
        mem=mem,
        trainable=trainable,
        total=total,
        times=[],
    )

  for _ in range(args.reps):  # interleaved
    for r in runs.values():
      run = r["run"]
      with run.mesh, nn.logical_axis_rules(run.rules):
        start = time.perf_counter()
        for _ in range(args.steps):
          run.state, metrics = r["compiled"](run.state, r["batch"], r["rng"])
        jax.block_until_ready((run.state, metrics))
      r["times"].append((time.perf_counter() - start) / args.steps)

  print()
  print(
      "| setup | trainable params | step ms (median) | steps/s | "
      "args MiB | outputs MiB | temp MiB | alias MiB | "
      "args+outputs+temp bytes | minus alias bytes |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in runs.values():
    median = statistics.median(r["times"])
    m = r["mem"]
    arg, out = m.argument_size_in_bytes, m.output_size_in_bytes
    temp, alias = m.temp_size_in_bytes, m.alias_size_in_bytes
    r["steps_per_s"] = 1.0 / median
    print(
        f"| {r['label']} | {r['trainable']:,} of {r['total']:,} | "
        f"{median * 1e3:.1f} | {1.0 / median:.2f} | {_mib(arg)} | "
        f"{_mib(out)} | {_mib(temp)} | {_mib(alias)} | "
        f"{arg + out + temp:,} | {arg + out + temp - alias:,} |"
    )
  print()
  if "flix" in runs and "lora" in runs:
    ratio = runs["flix"]["steps_per_s"] / runs["lora"]["steps_per_s"]
    print(
        f"FLix / LoRA steps/s: {ratio:.3f} "
        f"(FLix step takes {1 / ratio:.2f}x LoRA's)"
    )
  if "flix" in runs and "full" in runs:
    ratio = runs["flix"]["steps_per_s"] / runs["full"]["steps_per_s"]
    print(f"FLix / full fine-tuning steps/s: {ratio:.3f}")
  spreads = {
      r["label"]: f"{min(r['times']) * 1e3:.1f}-"
      f"{max(r['times']) * 1e3:.1f} ms"
      for r in runs.values()
  }
  print(f"Per-rep range ({args.reps} reps x {args.steps} steps): {spreads}")


if __name__ == "__main__":
  main()
