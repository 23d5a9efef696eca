"""Times one adapted dense layer, forward + backward, side by side.

Rows: the frozen base layer; plain LoRA of rank 2r twice, hand-written (2-D
matmuls, the fastest formulation we found) and the library's
(`FeatureSpace.lora` through `flix_delta`); FLix with two groups of rank r
(two active features per token) and 10 or 200 values per group (or A tasks
x B languages, `--inventories 8x100`), for each
requested strategy ("segment", the default, prints the formulation it chose
per group). Each call returns the layer's output and the gradients w.r.t. the
inputs and the adapters (the base kernel is frozen), as in training. Ratios
are to the faster LoRA. All rows are timed interleaved in one run (shared,
noisy machines: only ratios mean anything); the load average is printed.

    python scripts/bench_layer.py [--packed_segments 16 --rows 32
        --tokens_per_row 128 --rank 8 --strategies segment,slots,sorted]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from flix import features as features_lib
from flix import layers

# XLA:CPU lowers ragged_dot to one dense masked matmul per group: skip sizes
# whose masked operand would exceed this many elements.
_MAX_RAGGED_CPU_ELEMENTS = 2**28


def forward_backward(fn, argnums):
  """jit of args -> (fn(args), grads of <fn(args), cotangent> at argnums).

  The cotangent is the last argument; the output is returned so that XLA
  cannot drop the forward pass.
  """

  def run(*args):
    *inputs, cotangent = args

    def partial_fn(*diff):
      full = list(inputs)
      for i, value in zip(argnums, diff):
        full[i] = value
      return fn(*full)

    y, vjp = jax.vjp(partial_fn, *(inputs[i] for i in argnums))
    return y, vjp(cotangent)

  return jax.jit(run)


def packed_ids(key, rows, length, segments, num_values):
  """int [rows, length, groups]: `segments` equal runs per row, random ids
  (group g's in [1, num_values[g]])."""
  example_ids = jax.random.randint(
      key, (rows, segments, len(num_values)), 1, jnp.array(num_values) + 1
  )
  return jnp.repeat(example_ids, length // segments, axis=1)


def build_cases(
    rows, length, d_in, d_out, rank, strategies, inventories, packed_segments
):
  """Returns {name: (jitted fwd+bwd fn, args)} and {name: chosen plan}."""
  key = jax.random.PRNGKey(0)
  kx, kw, ka, kb, ki, kc = jax.random.split(key, 6)
  x = jax.random.normal(kx, (rows, length, d_in), jnp.float32)
  w0 = jax.random.normal(kw, (d_in, d_out), jnp.float32) / np.sqrt(d_in)
  cotangent = jax.random.normal(kc, (rows, length, d_out), jnp.float32)
  cases, plans = {}, {}

  # The frozen kernel is an argument, not a closed-over constant.
  def base(x, w0):
    return jnp.einsum("bld,do->blo", x, w0)

  cases["base (frozen)"] = (forward_backward(base, (0,)), (x, w0, cotangent))

  lora_a = jax.random.normal(ka, (d_in, 2 * rank)) * 0.02
  lora_b = jax.random.normal(kb, (2 * rank, d_out)) * 0.02

  def lora(x, a, b, w0):
    x2 = x.reshape(-1, d_in)  # 2-D matmuls: the fastest formulation we found
    y = x2 @ w0 + ((x2 @ a) * 0.5) @ b
    return y.reshape(rows, length, d_out)

  cases[f"LoRA r={2 * rank} hand-written"] = (
      forward_backward(lora, (0, 1, 2)),
      (x, lora_a, lora_b, w0, cotangent),
  )

  def flix(space, strategy):
    def fn(x, adapters, w0, ids):
      return base(x, w0) + layers.flix_delta(
          space,
          x,
          ids,
          adapters,
          strategy=strategy,
          max_segments=packed_segments,
      )

    return forward_backward(fn, (0, 1))

  lora_space = features_lib.FeatureSpace.lora(rank=2 * rank)
  lora_ids = jnp.ones((rows, length, 1), jnp.int32)
  cases[f"LoRA r={2 * rank} library"] = (
      flix(lora_space, "segment"),
      (x, [(lora_a[None], lora_b[None])], w0, lora_ids, cotangent),
  )

  for inventory in inventories:
    sizes = [int(v) for v in inventory.split("x")]
    sizes = sizes * (2 // len(sizes))  # "10": both groups 10 values
    space = features_lib.FeatureSpace(
        groups=tuple(
            features_lib.FeatureGroup(
                name, tuple(map(str, range(v))), rank=rank
            )
            for name, v in zip(("task", "language"), sizes)
        )
    )
    adapters = []
    for g, num_values in enumerate(sizes):
      ka, kb = jax.random.split(jax.random.fold_in(ka, g))
      adapters.append(
          (
              jax.random.normal(ka, (num_values, d_in, rank)) * 0.02,
              jax.random.normal(kb, (num_values, rank, d_out)) * 0.02,
          )
      )
    ids = packed_ids(ki, rows, length, packed_segments, sizes)
    for strategy in strategies:
      groups_per_row = rows * min(packed_segments, length)
      if (
          strategy == "ragged"
          and jax.default_backend() == "cpu"
          and groups_per_row * rows * length * d_in > _MAX_RAGGED_CPU_ELEMENTS
      ):
        print(f"# skipped ragged at V={inventory}: dense rewrite on CPU")
        continue
      name = f"FLix 2x r={rank} V={inventory} {strategy}"
      cases[name] = (
          flix(space, strategy),
          (x, adapters, w0, ids, cotangent),
      )
      routing = layers.route(ids, strategy, packed_segments)
      plans[name] = "+".join(layers.plan(space, routing, strategy))
  return cases, plans


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=32)
  parser.add_argument("--tokens_per_row", type=int, default=128)
  parser.add_argument("--d_in", type=int, default=512)
  parser.add_argument("--d_out", type=int, default=1024)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument(
      "--inventories",
      default="10,200",
      help="values per group, or TASKSxLANGUAGES (e.g. 8x100)",
  )
  parser.add_argument(
      "--strategies",
      default="segment",
      help=f"comma-separated, of {layers.STRATEGIES}",
  )
  parser.add_argument(
      "--packed_segments",
      type=int,
      default=1,
      help="examples per row (runs of equal feature ids); max_segments",
  )
  args = parser.parse_args()
  if args.tokens_per_row % args.packed_segments:
    parser.error("--tokens_per_row must be a multiple of --packed_segments")

  load_before = os.getloadavg()[0]
  cases, plans = build_cases(
      args.rows,
      args.tokens_per_row,
      args.d_in,
      args.d_out,
      args.rank,
      args.strategies.split(","),
      args.inventories.split(","),
      args.packed_segments,
  )
  for fn, fn_args in cases.values():
    jax.block_until_ready(fn(*fn_args))  # compile everything first
  samples = {name: [] for name in cases}
  for _ in range(args.reps):  # interleave rows so machine noise hits all alike
    for name, (fn, fn_args) in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*fn_args))
      samples[name].append(time.perf_counter() - start)
  medians = {name: float(np.median(t)) * 1e3 for name, t in samples.items()}
  lora_ms = min(ms for name, ms in medians.items() if name.startswith("LoRA"))
  print(
      f"# {jax.devices()[0].platform}, {args.rows}x{args.tokens_per_row} "
      f"tokens, d_in {args.d_in}, d_out {args.d_out}, fwd+bwd, "
      f"{args.packed_segments} example(s)/row, median of {args.reps}; "
      f"1-min load average {load_before:.1f} before, "
      f"{os.getloadavg()[0]:.1f} after"
  )
  print(f"| {'case':<38} | {'ms':>8} | {'x LoRA':>7} | formulation |")
  print(f"|{'-' * 40}|{'-' * 10}|{'-' * 9}|---|")
  for name, ms in medians.items():
    print(
        f"| {name:<38} | {ms:8.2f} | {ms / lora_ms:7.3f} | "
        f"{plans.get(name, '')} |"
    )


if __name__ == "__main__":
  main()
