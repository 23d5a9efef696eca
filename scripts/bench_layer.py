"""Times one adapted dense layer, forward + backward, side by side.

Rows: the frozen base layer; the fastest plain LoRA of rank 2r we know; FLix
with two groups of rank r (two active features per token) and 10 or 200 values
per group, for every strategy. Gradients are taken w.r.t. the inputs and the
adapters only (the base kernel is frozen), as in training. Prints medians and
ratios to LoRA; all rows are timed interleaved in one run (shared, noisy
machines: only ratios mean anything).

    python scripts/bench_layer.py [--tokens_per_row 128 --rows 32 --rank 8]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from flix import features as features_lib
from flix import layers


def _timed(fn, args, reps):
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def build_cases(
    rows, length, d_in, d_out, rank, strategies, inventories, packed_segments
):
  """Returns {name: (jitted fwd+bwd fn, args)}."""
  key = jax.random.PRNGKey(0)
  kx, kw, ka, kb, ki = jax.random.split(key, 5)
  x = jax.random.normal(kx, (rows, length, d_in), jnp.float32)
  w0 = jax.random.normal(kw, (d_in, d_out), jnp.float32) / np.sqrt(d_in)
  cotangent = jnp.ones((rows, length, d_out), jnp.float32)
  cases = {}

  # The frozen kernel and the cotangent are arguments, not closed-over
  # constants: XLA would otherwise constant-fold the input gradient away.
  def base(x, w0, cotangent):
    return jnp.vdot(jnp.einsum("bld,do->blo", x, w0), cotangent)

  cases["base (frozen)"] = (jax.jit(jax.grad(base)), (x, w0, cotangent))

  lora_a = jax.random.normal(ka, (d_in, 2 * rank)) * 0.02
  lora_b = jax.random.normal(kb, (2 * rank, d_out)) * 0.02

  def lora(x, a, b, w0, cotangent):
    x2 = x.reshape(-1, d_in)  # 2-D matmuls: the fastest formulation we found
    y = x2 @ w0 + ((x2 @ a) * 0.5) @ b
    return jnp.vdot(y.reshape(rows, length, d_out), cotangent)

  cases[f"LoRA r={2 * rank}"] = (
      jax.jit(jax.grad(lora, argnums=(0, 1, 2))),
      (x, lora_a, lora_b, w0, cotangent),
  )

  for num_values in inventories:
    space = features_lib.FeatureSpace(
        groups=(
            features_lib.FeatureGroup(
                "task", tuple(map(str, range(num_values))), rank=rank
            ),
            features_lib.FeatureGroup(
                "language", tuple(map(str, range(num_values))), rank=rank
            ),
        )
    )
    adapters = []
    for g in range(2):
      ka, kb = jax.random.split(jax.random.fold_in(ka, g))
      adapters.append(
          (
              jax.random.normal(ka, (num_values, d_in, rank)) * 0.02,
              jax.random.normal(kb, (num_values, rank, d_out)) * 0.02,
          )
      )
    example_ids = jax.random.randint(
        ki, (rows, packed_segments, 2), 1, num_values + 1
    )
    ids = jnp.repeat(example_ids, length // packed_segments, axis=1)
    for strategy in strategies:
      if strategy == "dense" and num_values * rank > 4096:
        continue

      def flix(x, adapters, w0, cotangent, ids, space=space, strategy=strategy):
        y = jnp.einsum("bld,do->blo", x, w0) + layers.flix_delta(
            space,
            x,
            ids,
            adapters,
            strategy=strategy,
            max_segments=packed_segments,
        )
        return jnp.vdot(y, cotangent)

      cases[f"FLix 2x r={rank} V={num_values} {strategy}"] = (
          jax.jit(jax.grad(flix, argnums=(0, 1))),
          (x, adapters, w0, cotangent, ids),
      )
  return cases


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=32)
  parser.add_argument("--tokens_per_row", type=int, default=128)
  parser.add_argument("--d_in", type=int, default=512)
  parser.add_argument("--d_out", type=int, default=1024)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--inventories", default="10,200")
  parser.add_argument("--strategies", default="segment,gather,dense")
  parser.add_argument(
      "--packed_segments",
      type=int,
      default=1,
      help="examples per row (runs of equal feature ids)",
  )
  args = parser.parse_args()

  cases = build_cases(
      args.rows,
      args.tokens_per_row,
      args.d_in,
      args.d_out,
      args.rank,
      args.strategies.split(","),
      [int(v) for v in args.inventories.split(",")],
      args.packed_segments,
  )
  for fn, fn_args in cases.values():
    jax.block_until_ready(fn(*fn_args))  # compile everything first
  samples = {name: [] for name in cases}
  for _ in range(args.reps):  # interleave rows so machine noise hits all alike
    for name, (fn, fn_args) in cases.items():
      samples[name].extend(_timed(fn, fn_args, 1))
  medians = {name: float(np.median(t)) * 1e3 for name, t in samples.items()}
  lora_name = f"LoRA r={2 * args.rank}"
  print(
      f"# {jax.devices()[0].platform}, {args.rows}x{args.tokens_per_row} "
      f"tokens, d_in {args.d_in}, d_out {args.d_out}, fwd+bwd, "
      f"{args.packed_segments} example(s)/row, median of {args.reps}"
  )
  print(f"| {'case':<34} | {'ms':>8} | {'x LoRA':>7} |")
  print(f"|{'-' * 36}|{'-' * 10}|{'-' * 9}|")
  for name, ms in medians.items():
    print(f"| {name:<34} | {ms:8.2f} | {ms / medians[lora_name]:7.3f} |")


if __name__ == "__main__":
  main()
