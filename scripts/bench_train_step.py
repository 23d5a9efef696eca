"""Times the whole train step: full fine-tuning vs LoRA (rank 2r) vs FLix.

All train the same mT5-shaped network (gated-GELU MLP, relative attention,
untied logits) through `trainer.build_run` and its jitted step:

  full        every parameter trainable (no adapters)
  lora        the library's LoRA: `FeatureSpace.lora(rank=2r)` through the
              FLix layers (one always-on adapter per adapted dense layer)
  lora_hand   the same parameters, the adapted layers' forward replaced
              (flax method interception) by hand-written 2-D matmuls
              x W0 + ((x A) s) B that ignore feature ids
  flix        two feature groups of rank r (e.g. 10 tasks x 50 languages),
              both active on every example: as many active adapter columns
              per token as LoRA

FLix's ratios are to the faster LoRA. `--packed_segments N` packs N examples
per row (each with its own random task and language, consecutive examples
differing; segment ids and positions as T5X packing makes them), with
`max_segments = N`; every case trains on the same packed batches.

Setups (`--setup`; any flag given explicitly overrides):
  tiny              emb 128, 4 heads x 32, mlp 256, 2+2 layers, vocab 384,
                    batch 16 x (64+64), 10 tasks x 50 languages, r 4
  mt5-small-width   emb 512, 8 heads x 64, mlp 1024, 2+2 layers, vocab 1024,
                    batch 32 x (128+128), 8 tasks x 100 languages (an
                    XTREME-UP-sized inventory), r 4

Rows are timed interleaved (shared, noisy machines: only ratios mean much);
each repetition times `--steps` steps, the median per-step time gives steps/s.
The 1-minute load average is printed before and after. Memory is XLA's own
accounting of the compiled step (per device): `compiled.memory_analysis()`
argument, output and temp sizes; the donated train state makes outputs alias
arguments, so the real peak is about `args + outputs + temp - alias`.

    python scripts/bench_train_step.py [--setup mt5-small-width]
        [--packed_segments 16] [--reps 5 --steps 3]
"""

from __future__ import annotations

import argparse
import contextlib
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
from flix import layers
from flix import models
from flix import network
from flix import train_step as train_step_lib
from flix import trainer

SETUPS = {
    "tiny": dict(
        emb=128,
        heads=4,
        head_dim=32,
        mlp=256,
        layers=2,
        vocab=384,
        batch=16,
        inputs=64,
        targets=64,
        rank=4,
        tasks=10,
        languages=50,
    ),
    "mt5-small-width": dict(
        emb=512,
        heads=8,
        head_dim=64,
        mlp=1024,
        layers=2,
        vocab=1024,
        batch=32,
        inputs=128,
        targets=128,
        rank=4,
        tasks=8,
        languages=100,
    ),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--setup", default="tiny", choices=sorted(SETUPS))
  p.add_argument("--preset", default="tiny", help="network preset")
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
  p.add_argument(
      "--packed_segments",
      type=int,
      default=1,
      help="examples packed per row (and max_segments)",
  )
  p.add_argument("--optimizer", default="adafactor")
  p.add_argument("--num_partitions", type=int, default=1)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--steps", type=int, default=3, help="timed steps per rep")
  p.add_argument("--cases", default="full,lora,lora_hand,flix")
  setup = p.parse_known_args(argv)[0].setup
  p.set_defaults(**SETUPS[setup])
  args = p.parse_args(argv)
  for length in (args.inputs, args.targets):
    if length % args.packed_segments:
      p.error("--inputs and --targets must be multiples of --packed_segments")
  return args


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
  lora_space = features_lib.FeatureSpace.lora(rank=2 * r)
  all_cases = {
      "full": ("full fine-tuning", None, train_step_lib.ALL_PATTERNS),
      "lora": (
          f"LoRA r={2 * r} library",
          lora_space,
          train_step_lib.ADAPTER_PATTERNS,
      ),
      "lora_hand": (
          f"LoRA r={2 * r} hand-written",
          lora_space,
          train_step_lib.ADAPTER_PATTERNS,
      ),
      "flix": (
          f"FLix 2x r={r} ({args.tasks}x{args.languages})",
          flix_space,
          train_step_lib.ADAPTER_PATTERNS,
      ),
  }
  return {k: all_cases[k] for k in args.cases.split(",")}


def example_ids(space, rows, segments, rs):
  """int [rows, segments, G]: one value per group per example; consecutive
  examples of a row differ (LoRA: its one value, id 1, everywhere)."""
  ids = np.zeros((rows, segments, space.num_groups), np.int32)
  for r in range(rows):
    for s in range(segments):
      while True:
        ids[r, s] = [rs.randint(1, g.num_values + 1) for g in space.groups]
        if s == 0 or max(g.num_values for g in space.groups) == 1:
          break
        if (ids[r, s] != ids[r, s - 1]).any():
          break
  return ids


def make_batch(args, space, rs):
  """A batch of `packed_segments` equal-length examples per row."""
  b, li, lt, n = args.batch, args.inputs, args.targets, args.packed_segments
  targets = rs.randint(1, args.vocab, size=(b, lt)).astype(np.int32)
  # Each example's decoder inputs start with BOS 0.
  shifted = np.concatenate(
      [np.zeros((b, n, 1), np.int32), targets.reshape(b, n, -1)[..., :-1]], -1
  )
  batch = {
      "encoder_input_tokens": rs.randint(1, args.vocab, size=(b, li)).astype(
          np.int32
      ),
      "decoder_input_tokens": shifted.reshape(b, lt),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": np.ones((b, lt), np.float32),
  }
  if n > 1:
    for side, length in (("encoder", li), ("decoder", lt)):
      segment = np.repeat(np.arange(1, n + 1, dtype=np.int32), length // n)
      batch[f"{side}_segment_ids"] = np.tile(segment, (b, 1))
      position = np.tile(np.arange(length // n, dtype=np.int32), n)
      batch[f"{side}_positions"] = np.tile(position, (b, 1))
  if space is not None:
    ids = example_ids(space, b, n, rs)
    batch["encoder_feature_ids"] = np.repeat(ids, li // n, axis=1)
    batch["decoder_feature_ids"] = np.repeat(ids, lt // n, axis=1)
  return batch


def hand_written_lora(next_fun, args, kwargs, context):
  """Flax interceptor: adapted `FlixDense` layers of a LoRA space compute
  x W0 + ((x A) s) B with 2-D matmuls, ignoring feature ids."""
  module = context.module
  if (
      not isinstance(module, layers.FlixDense)
      or context.method_name != "__call__"
      or module.feature_space is None
      or module.is_initializing()
  ):
    return next_fun(*args, **kwargs)
  inputs = args[0]
  params = nn.unbox(module.variables["params"])
  (group,) = module.feature_space.groups
  scale = float(module.feature_space.scale_table(group)[1])
  kernel = params["kernel"].astype(module.dtype)
  a = params[f"lora_a_{group.name}"][0].astype(module.dtype)
  b = params[f"lora_b_{group.name}"][0].astype(module.dtype)
  features = layers._canonical_tuple(module.features)
  num_in = len(layers._canonical_tuple(module.axis))
  batch_shape = inputs.shape[:-num_in]
  x = inputs.reshape(-1, kernel.shape[0]).astype(module.dtype)
  y = x @ kernel + ((x @ a) * scale) @ b
  return y.reshape(batch_shape + features)


def _mib(n):
  return f"{n / 2**20:.2f}"


def main(argv=None):
  args = parse_args(argv)
  load_before = os.getloadavg()[0]
  print(
      f"JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform}"
      f" device(s); setup {args.setup}: model emb={args.emb} heads="
      f"{args.heads}x{args.head_dim} mlp={args.mlp} layers={args.layers}+"
      f"{args.layers} vocab={args.vocab} {args.dtype}; batch {args.batch} x "
      f"({args.inputs}+{args.targets}) tokens, {args.packed_segments} "
      f"example(s)/row; {args.optimizer}; FLix strategy {args.strategy}",
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
        max_segments=args.packed_segments,
    )
    model = models.FlixModel(config)
    start = time.perf_counter()
    run = trainer.build_run(
        model, optimizer, patterns, num_partitions=args.num_partitions
    )
    batch = trainer.to_device_batch(make_batch(args, space, rs), run.mesh)
    rng = jax.random.PRNGKey(0)
    interceptor = hand_written_lora if key == "lora_hand" else None
    with run.mesh, nn.logical_axis_rules(run.rules):
      with (
          nn.intercept_methods(interceptor)
          if interceptor
          else contextlib.nullcontext()
      ):
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
  loras = [runs[k] for k in ("lora", "lora_hand") if k in runs]
  if "flix" in runs and loras:
    best = max(loras, key=lambda r: r["steps_per_s"])
    ratio = runs["flix"]["steps_per_s"] / best["steps_per_s"]
    print(
        f"FLix / LoRA steps/s: {ratio:.3f} against the faster LoRA "
        f"({best['label']}; FLix step takes {1 / ratio:.2f}x its time)"
    )
  if len(loras) == 2:
    ratio = runs["lora"]["steps_per_s"] / runs["lora_hand"]["steps_per_s"]
    print(f"LoRA library / hand-written steps/s: {ratio:.3f}")
  if "flix" in runs and "full" in runs:
    ratio = runs["flix"]["steps_per_s"] / runs["full"]["steps_per_s"]
    print(f"FLix / full fine-tuning steps/s: {ratio:.3f}")
  spreads = {
      r["label"]: f"{min(r['times']) * 1e3:.1f}-"
      f"{max(r['times']) * 1e3:.1f} ms"
      for r in runs.values()
  }
  print(f"Per-rep range ({args.reps} reps x {args.steps} steps): {spreads}")
  print(
      f"1-minute load average: {load_before:.1f} before, "
      f"{os.getloadavg()[0]:.1f} after"
  )


if __name__ == "__main__":
  main()
