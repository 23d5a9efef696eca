"""Per-device memory of a shipped train step, compiled ahead of time on CPU.

Reads the run's gin files (default `configs/flix_mt5_xl.gin`) and builds what
`python -m flix.train` would: the gin-configured model (size, scan, remat,
FLix strategy, MAX_SEGMENTS), optimizer, trainable patterns, BATCH_SIZE,
TASK_FEATURE_LENGTHS, PACK (the packed batch's segment ids and positions),
NUM_PARTITIONS and NUM_MICROBATCHES. It simulates `--devices` CPU devices,
makes the mesh, state shardings and jitted, state-donating train step exactly
as `trainer.build_run` does, compiles it on abstract inputs
(`jax.ShapeDtypeStruct`s carrying their shardings: nothing is allocated) and
reads per-device memory from `compiled.memory_analysis()`: arguments (state +
batch), output, temp, the donated bytes (aliased between arguments and
output), and peak = arguments + output + temp + code - donated.

The FLix feature vocabulary comes from the training mixture, which needs the
XTREME-UP data; without it the space is built with the gin's FLIX_RANK and
FEATURE_DROPOUT over `--tasks` x `--languages` values (defaults: the 8
XTREME-UP tasks flix registers and 123 languages, the union of the tasks'
documented language lists after flix's code normalisation). LoRA's space is
the gin's own.

    python scripts/aot_memory.py                                 # FLix XL
    python scripts/aot_memory.py --gin_file=configs/lora_mt5_xl.gin
    python scripts/aot_memory.py --devices=64 \\
        --gin_file=configs/flix_mt5_xxl.gin
    python scripts/aot_memory.py --gin_bindings='SCAN_LAYERS = False' \\
        --gin_bindings='NUM_MICROBATCHES = 4' --layers 4

`--replicate_adapter_embed` measures the old rule (adapter dimensions that
match a kernel's `embed` replicated) for a before/after comparison.

The default FLix strategy ('segment') picks each group's formulation when
traced, by backend (`layers.plan`): compiled here, the CPU's ('slots',
'sorted' or 'dense' per group; `--backend cpu`, the default). `--backend tpu`
fixes the accelerator's plan instead ('ragged' for FLix groups), which
compiles but is not measurable here: XLA:CPU expands `jax.lax.ragged_dot`
into a dense masked matmul per run, so the shipped XL run's temp reads
1515 GiB per device (measured), which says nothing about a TPU.

Caveat: this is XLA:CPU's buffer assignment, not XLA:TPU's; fusion and
rematerialisation differ, so temp sizes are indicative (argument and output
sizes, i.e. params + optimizer state + batch, are exact).
"""

import os
import sys

_DEVICES = 32
for _arg in sys.argv:  # --devices=N (before JAX is imported)
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
import dataclasses
import json
import math
import time
import warnings

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from flix import features as features_lib
from flix import gin_utils
from flix import layers
from flix import models
from flix import partitioning
from flix import routing
from flix import train_step

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
  p.add_argument("--gin_file", action="append", default=None)
  p.add_argument("--gin_bindings", action="append", default=[])
  p.add_argument(
      "--tasks", type=int, default=8, help="FLix task values (no data)"
  )
  p.add_argument(
      "--languages", type=int, default=123, help="FLix language values"
  )
  p.add_argument(
      "--layers", type=int, default=0, help="override both stacks' depth"
  )
  p.add_argument(
      "--backend",
      default="cpu",
      help="plan the 'segment' strategy's formulations for this backend "
      "(tpu: 'ragged', which XLA:CPU expands; see the docstring)",
  )
  p.add_argument(
      "--replicate_adapter_embed",
      action="store_true",
      help="replicate adapter dims matching a kernel's 'embed' (old rule)",
  )
  return p.parse_args(argv)


@dataclasses.dataclass
class Setup:
  """What the gin files configure, as the trainer would use it."""

  model: models.FlixModel
  optimizer: object
  patterns: tuple
  batch_size: int
  lengths: dict
  pack: bool
  num_partitions: int
  num_microbatches: int


def _per_group(value, groups):
  return dict(value) if isinstance(value, dict) else {g: value for g in groups}


def _planned_strategy(config, batch: int, length: int, backend: str) -> str:
  """The formulation `layers.plan` picks for every group on `backend`."""
  space = config.feature_space
  ids = jax.ShapeDtypeStruct((batch, length, space.num_groups), jnp.int32)
  shapes = jax.eval_shape(lambda i: routing.route(i, config.max_segments), ids)
  chosen = set(layers.plan(space, shapes, "segment", backend))
  if len(chosen) != 1:
    raise ValueError(
        f"On {backend} the groups get different formulations {chosen}; "
        "bind FLIX_STRATEGY to one, or pass --backend cpu."
    )
  return chosen.pop()


def load_setup(args) -> Setup:
  """The gin-configured model, optimizer and run macros."""
  gin_utils.parse_gin(
      args.gin_file or ["configs/flix_mt5_xl.gin"],
      args.gin_bindings,
      finalize=False,
  )
  space_ref = gin_utils.macro_value("FEATURE_SPACE")
  from_data = (
      isinstance(space_ref, gin.config.ConfigurableReference)
      and space_ref.configurable.name == "feature_space"
  )
  if from_data:  # FLix over the mixture's vocabulary: sizes from the flags
    gin.parse_config("FEATURE_SPACE = None")
  model = gin_utils.call_configured(models.FlixModel)
  config = model.config
  if from_data:
    values = {
        "task": [f"task{i}" for i in range(args.tasks)],
        "language": [f"lang{i}" for i in range(args.languages)],
    }
    config = dataclasses.replace(
        config,
        feature_space=features_lib.FeatureSpace.from_values(
            values,
            ranks=_per_group(gin_utils.macro_value("FLIX_RANK"), values),
            dropout=_per_group(
                gin_utils.macro_value("FEATURE_DROPOUT"), values
            ),
        ),
    )
  if (
      config.feature_space is not None
      and config.flix_strategy == "segment"
      and args.backend != "cpu"  # compiled on CPU: its own plan, per group
  ):
    config = dataclasses.replace(
        config,
        flix_strategy=_planned_strategy(
            config,
            gin_utils.macro_value("BATCH_SIZE"),
            gin_utils.macro_value("TASK_FEATURE_LENGTHS")["inputs"],
            args.backend,
        ),
    )
  if args.layers:
    config = dataclasses.replace(
        config, num_encoder_layers=args.layers, num_decoder_layers=args.layers
    )
  return Setup(
      model=dataclasses.replace(model, config=config),
      optimizer=gin_utils.call_configured(train_step.make_optimizer),
      patterns=train_step.trainable_regexes(
          gin_utils.macro_value("TRAINABLE_PATTERNS")
      ),
      batch_size=gin_utils.macro_value("BATCH_SIZE"),
      lengths=dict(gin_utils.macro_value("TASK_FEATURE_LENGTHS")),
      pack=bool(gin_utils.macro_value("PACK")),
      num_partitions=gin_utils.macro_value("NUM_PARTITIONS"),
      num_microbatches=gin_utils.macro_value("NUM_MICROBATCHES"),
  )


def abstract_batch(setup: Setup, mesh) -> dict:
  """The train batch's ShapeDtypeStructs (packed: segment ids, positions)."""
  b, li, lt = (
      setup.batch_size,
      setup.lengths["inputs"],
      setup.lengths["targets"],
  )
  groups = max(setup.model.num_groups, 1)
  spec = {
      "encoder_input_tokens": ((b, li), jnp.int32),
      "decoder_input_tokens": ((b, lt), jnp.int32),
      "decoder_target_tokens": ((b, lt), jnp.int32),
      "decoder_loss_weights": ((b, lt), jnp.float32),
      "encoder_feature_ids": ((b, li, groups), jnp.int32),
      "decoder_feature_ids": ((b, lt, groups), jnp.int32),
  }
  if setup.pack:
    for side, length in (("encoder", li), ("decoder", lt)):
      spec[f"{side}_segment_ids"] = ((b, length), jnp.int32)
      spec[f"{side}_positions"] = ((b, length), jnp.int32)
  data = partitioning.data_sharding(mesh)
  return {
      k: jax.ShapeDtypeStruct(s, d, sharding=data) for k, (s, d) in spec.items()
  }


def compile_step(setup: Setup, rules):
  """AOT-compiles the train step; returns (compiled, info)."""
  model, optimizer = setup.model, setup.optimizer
  mesh = partitioning.make_mesh(setup.num_partitions)
  partitioning.check_batch_size(setup.batch_size, mesh)
  # The same state shardings and jitted step as trainer.build_run.
  abstract_state, state_sharding = train_step.state_shardings(
      model, optimizer, setup.patterns, mesh, rules
  )
  state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state,
      state_sharding,
  )
  with mesh, nn.logical_axis_rules(rules):
    batch = abstract_batch(setup, mesh)
    rng = jax.ShapeDtypeStruct(
        (2,), jnp.uint32, sharding=partitioning.replicated(mesh)
    )
    step_fn = train_step.jit_train_step(
        model, optimizer, state_sharding, mesh, setup.num_microbatches
    )
    # Wall and CPU seconds (the CPU time does not count waiting for a
    # shared machine's cores).
    wall, cpu = time.perf_counter(), time.process_time()
    lowered = step_fn.lower(state, batch, rng)
    lower_s, lower_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - wall
    compile_cpu_s = time.process_time() - cpu

  def per_device(tree):  # bytes of one device's shards
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )

  info = dict(
      lower_s=lower_s,
      compile_s=compile_s,
      lower_cpu_s=lower_cpu_s,
      compile_cpu_s=compile_cpu_s,
      trainable=train_step.count_params(state.trainable),
      frozen=train_step.count_params(state.frozen),
      trainable_bytes=per_device(state.trainable),
      frozen_bytes=per_device(state.frozen),
      opt_state_bytes=per_device(state.opt_state),
      mesh=dict(mesh.shape),
  )
  return compiled, info


def memory_row(compiled) -> dict:
  m = compiled.memory_analysis()
  row = dict(
      argument=m.argument_size_in_bytes,
      output=m.output_size_in_bytes,
      temp=m.temp_size_in_bytes,
      code=m.generated_code_size_in_bytes,
      alias=m.alias_size_in_bytes,
  )
  row["peak"] = (
      row["argument"] + row["output"] + row["temp"] + row["code"] - row["alias"]
  )
  return row


def _gib(n):
  return f"{n / GIB:.2f}"


def main(argv=None):
  args = parse_args(argv)
  setup = load_setup(args)
  cfg = setup.model.config
  rules = partitioning.standard_logical_axis_rules(
      ((layers.EMBED_AXIS, None),) if args.replicate_adapter_embed else ()
  )
  space = cfg.feature_space
  print(
      f"JAX {jax.__version__}; {jax.device_count()} simulated CPU devices; "
      f"gin {args.gin_file or ['configs/flix_mt5_xl.gin']} "
      f"{args.gin_bindings or ''}",
      flush=True,
  )
  print(
      f"model: {cfg.emb_dim} emb, {cfg.num_heads} heads, {cfg.mlp_dim} mlp, "
      f"{cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers, "
      f"{cfg.dtype}; scan_layers={cfg.scan_layers}, remat_policy="
      f"{cfg.remat_policy}; strategy {cfg.flix_strategy} (planned for "
      f"{args.backend}), max_segments "
      f"{cfg.max_segments}; adapters: "
      + (
          ", ".join(
              f"{g.name} {g.num_values} x r{g.max_rank}" for g in space.groups
          )
          if space is not None
          else "none"
      )
      + f"; adapter embed dims "
      f"{'replicated' if args.replicate_adapter_embed else 'sharded'}",
      flush=True,
  )
  print(
      f"run: batch {setup.batch_size} x {setup.lengths}, pack {setup.pack}, "
      f"num_partitions {setup.num_partitions}, microbatches "
      f"{setup.num_microbatches}, trainable {list(setup.patterns)}",
      flush=True,
  )
  compiled, info = compile_step(setup, rules)
  row = memory_row(compiled)
  print(
      f"mesh {info['mesh']}: lower {info['lower_s']:.0f} s "
      f"({info['lower_cpu_s']:.0f} s CPU), compile {info['compile_s']:.0f} s "
      f"({info['compile_cpu_s']:.0f} s CPU); trainable "
      f"{info['trainable']:,} params, "
      f"frozen {info['frozen']:,}",
      flush=True,
  )
  print(
      f"per device (GiB): trainable {_gib(info['trainable_bytes'])}, "
      f"optimizer state {_gib(info['opt_state_bytes'])}, frozen "
      f"{_gib(info['frozen_bytes'])}"
  )
  print()
  print(
      "| arguments | output | temp | code | donated | peak | of a TPU v4 "
      "core's 32 GiB |"
  )
  print("|---:|---:|---:|---:|---:|---:|---:|")
  print(
      f"| {_gib(row['argument'])} | {_gib(row['output'])} | "
      f"{_gib(row['temp'])} | {_gib(row['code'])} | {_gib(row['alias'])} | "
      f"{_gib(row['peak'])} | {row['peak'] / TPU_V4_HBM:.0%} |"
  )
  print("RESULT " + json.dumps({**row, **info}))


if __name__ == "__main__":
  main()
