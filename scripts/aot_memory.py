"""Per-device memory of the mT5-XL FLix train step on a 4 x 8 mesh, without TPUs.

Simulates 32 CPU devices, builds the train state and batch as abstract
`jax.ShapeDtypeStruct`s carrying their shardings (nothing is allocated), and
compiles the train step ahead of time (`jit(...).lower(...).compile()`) exactly
as `trainer.build_run` jits it: the same logical axis rules, the state
shardings the state-creating jit gives, data-parallel batch, donated state.
`compiled.memory_analysis()` then tells the per-device argument, output,
temp and generated-code sizes, compared with a TPU v4 device's 32 GiB HBM.

Compiling all 24 + 24 layers on CPU takes a while; `--layers 2,4,8` compiles
shallower stacks and extrapolates linearly to `--target_layers` through the
two deepest (with three or more depths it first prints how well the two
shallowest predict the deepest).

    python scripts/aot_memory.py [--layers 2,4,8 --target_layers 24
        --batch 32 --inputs 512 --targets 128 --devices=32 --model 8]

Caveat: this is XLA:CPU's buffer assignment, not XLA:TPU's; fusion and
rematerialisation differ, so temp sizes are indicative (argument/output sizes,
i.e. params + optimizer state + batch, are exact).
"""

import os
import sys

_DEVICES = 32
for _arg in sys.argv:  # --devices N (before JAX is imported)
  if _arg.startswith("--devices="):
    _DEVICES = int(_arg.split("=", 1)[1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={_DEVICES}"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import math
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp

from flix import features as features_lib
from flix import models
from flix import network
from flix import partitioning
from flix import train_step as train_step_lib
from flix import trainer

warnings.filterwarnings("ignore", message=".*mesh.*context manager.*")
GIB = 2**30
TPU_V4_HBM = 32 * GIB


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
      "--devices",
      type=int,
      default=32,
      help="simulated CPU devices (use --devices=N)",
  )
  p.add_argument("--model", type=int, default=8, help="'model' mesh axis")
  p.add_argument("--preset", default="mt5_xl")
  p.add_argument(
      "--layers",
      default="2,4,8",
      help="comma-separated encoder(=decoder) depths to compile",
  )
  p.add_argument(
      "--target_layers",
      type=int,
      default=24,
      help="depth to extrapolate to (if not compiled)",
  )
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--inputs", type=int, default=512)
  p.add_argument("--targets", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--mode", default="flix", choices=("flix", "lora", "full"))
  p.add_argument("--tasks", type=int, default=8)
  p.add_argument("--task_rank", type=int, default=8)
  p.add_argument("--languages", type=int, default=100)
  p.add_argument("--language_rank", type=int, default=4)
  p.add_argument("--lora_rank", type=int, default=16)
  p.add_argument("--strategy", default="segment")
  p.add_argument("--num_microbatches", type=int, default=1)
  p.add_argument("--optimizer", default="adafactor")
  return p.parse_args(argv)


def feature_space(args):
  if args.mode == "full":
    return None, train_step_lib.ALL_PATTERNS
  if args.mode == "lora":
    return (
        features_lib.FeatureSpace.lora(rank=args.lora_rank),
        train_step_lib.ADAPTER_PATTERNS,
    )
  return (
      features_lib.FeatureSpace.from_values(
          {
              "task": [f"task{i}" for i in range(args.tasks)],
              "language": [f"lang{i}" for i in range(args.languages)],
          },
          ranks={"task": args.task_rank, "language": args.language_rank},
      ),
      train_step_lib.ADAPTER_PATTERNS,
  )


def _with_sharding(abstract, sharding):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract,
      sharding,
  )


def compile_step(args, layers):
  """AOT-compiles the train step at depth `layers`; returns (compiled, info)."""
  space, patterns = feature_space(args)
  config = network.preset(
      args.preset,
      num_encoder_layers=layers,
      num_decoder_layers=layers,
      dtype=args.dtype,
      feature_space=space,
      flix_strategy=args.strategy,
  )
  model = models.FlixModel(config)
  optimizer = train_step_lib.make_optimizer(1e-3, name=args.optimizer)
  mesh = partitioning.make_mesh(args.model)
  rules = partitioning.standard_logical_axis_rules()
  # The same state shardings and jitted step as trainer.build_run.
  abstract_state, state_sharding = train_step.state_shardings(
      model, optimizer, patterns, mesh, rules
  )
  with mesh, nn.logical_axis_rules(rules):
    state = _with_sharding(abstract_state, state_sharding)

    data = partitioning.data_sharding(mesh)
    b, li, lt = args.batch, args.inputs, args.targets
    groups = max(space.num_groups if space is not None else 0, 1)
    spec = {
        "encoder_input_tokens": ((b, li), jnp.int32),
        "decoder_input_tokens": ((b, lt), jnp.int32),
        "decoder_target_tokens": ((b, lt), jnp.int32),
        "decoder_loss_weights": ((b, lt), jnp.float32),
        "encoder_feature_ids": ((b, li, groups), jnp.int32),
        "decoder_feature_ids": ((b, lt, groups), jnp.int32),
    }
    batch = {
        k: jax.ShapeDtypeStruct(s, d, sharding=data)
        for k, (s, d) in spec.items()
    }
    replicated = partitioning.replicated(mesh)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)

    step_fn = train_step.jit_train_step(
        model, optimizer, state_sharding, mesh, args.num_microbatches
    )
    start = time.perf_counter()
    lowered = step_fn.lower(state, batch, rng)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s

  def nbytes(tree):
    return sum(
        x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
    )

  def per_device(tree):  # bytes of one device's shards
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )

  info = dict(
      layers=layers,
      lower_s=lower_s,
      compile_s=compile_s,
      trainable=train_step_lib.count_params(state.trainable),
      frozen=train_step_lib.count_params(state.frozen),
      opt_state_bytes=nbytes(state.opt_state),
      state_bytes_per_device=per_device(state),
      mesh=dict(mesh.shape),
  )
  return compiled, info


def memory_row(compiled):
  m = compiled.memory_analysis()
  row = dict(
      argument=m.argument_size_in_bytes,
      output=m.output_size_in_bytes,
      temp=m.temp_size_in_bytes,
      code=m.generated_code_size_in_bytes,
      alias=m.alias_size_in_bytes,
  )
  row["sum"] = row["argument"] + row["output"] + row["temp"] + row["code"]
  row["sum_minus_alias"] = row["sum"] - row["alias"]
  return row


def _gib(n):
  return f"{n / GIB:.3f}"


def main(argv=None):
  args = parse_args(argv)
  depths = [int(x) for x in args.layers.split(",") if x]
  print(
      f"JAX {jax.__version__}; {jax.device_count()} simulated CPU devices; "
      f"{args.preset} ({args.dtype} activations, float32 params), mode "
      f"{args.mode}; batch {args.batch} x (inputs {args.inputs}, targets "
      f"{args.targets}); {args.optimizer}; strategy {args.strategy}; "
      "state shardings of train_step.state_shardings",
      flush=True,
  )
  if args.mode == "flix":
    print(
        f"FLix: task {args.tasks} values rank {args.task_rank}, language "
        f"{args.languages} values rank {args.language_rank}",
        flush=True,
    )
  rows = []
  for layers in depths:
    compiled, info = compile_step(args, layers)
    row = memory_row(compiled)
    row.update(info)
    rows.append(row)
    print(
        f"  compiled {layers}+{layers} layers on mesh {info['mesh']}: "
        f"lower {info['lower_s']:.1f}s, compile {info['compile_s']:.1f}s; "
        f"trainable {info['trainable']:,}, frozen {info['frozen']:,}; "
        f"state per device {_gib(info['state_bytes_per_device'])} GiB",
        flush=True,
    )
    del compiled

  keys = (
      "argument",
      "output",
      "temp",
      "code",
      "alias",
      "sum",
      "sum_minus_alias",
  )

  def linear(lo, hi, layers):  # through two compiled depths
    slope = {k: (hi[k] - lo[k]) / (hi["layers"] - lo["layers"]) for k in keys}
    return {k: hi[k] + slope[k] * (layers - hi["layers"]) for k in keys}

  rows.sort(key=lambda r: r["layers"])
  table = [(f"{r['layers']}+{r['layers']} (compiled)", r) for r in rows]
  if len(rows) >= 3:  # is memory linear in depth? predict the deepest
    guess = linear(rows[0], rows[1], rows[-1]["layers"])
    print(
        f"  linearity check: {rows[-1]['layers']}+{rows[-1]['layers']} "
        f"predicted from {rows[0]['layers']} and {rows[1]['layers']} "
        f"layers: sum-alias {_gib(guess['sum_minus_alias'])} GiB, compiled "
        f"{_gib(rows[-1]['sum_minus_alias'])} GiB",
        flush=True,
    )
  if args.target_layers not in depths and len(rows) >= 2:
    est = linear(rows[-2], rows[-1], args.target_layers)
    table.append(
        (
            f"{args.target_layers}+{args.target_layers} (extrapolated "
            f"from {rows[-2]['layers']}, {rows[-1]['layers']})",
            est,
        )
    )

  print()
  print(
      "Per-device memory (GiB) from compiled.memory_analysis(); TPU v4 "
      f"device HBM = {TPU_V4_HBM / GIB:.0f} GiB"
  )
  print()
  print(
      "| layers | argument | output | temp | generated code | "
      "sum | alias (donated) | sum - alias | sum-alias / 32 GiB |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for name, r in table:
    print(
        f"| {name} | {_gib(r['argument'])} | {_gib(r['output'])} | "
        f"{_gib(r['temp'])} | {_gib(r['code'])} | {_gib(r['sum'])} | "
        f"{_gib(r['alias'])} | {_gib(r['sum_minus_alias'])} | "
        f"{r['sum_minus_alias'] / TPU_V4_HBM:.1%} |"
    )
  print()
  print("bytes:", {name: {k: int(r[k]) for k in keys} for name, r in table})


if __name__ == "__main__":
  main()
