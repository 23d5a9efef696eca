"""The FLix train step is the same on a sharded (data=4, model=2) mesh as on 1 device,
with every adapter sharded over 'model' (also their `embed` dimensions), and
with scanned, rematerialised layers.

8 devices are simulated with `--xla_force_host_platform_device_count=8`, which
must be set before JAX is imported; so each run is a subprocess (running
`_CHILD` below) that writes its losses, adapters and frozen params to an .npz
and prints a JSON summary. The 1-device run is the same script without the
flag. Both runs are started at once and waited for together.
"""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO

_TIMEOUT_S = 300

# argv: num_devices num_partitions scan out.npz
_CHILD = r"""
import dataclasses, json, os, sys
num_devices, num_partitions, scan = map(int, sys.argv[1:4])
out_path = sys.argv[4]
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
    f" --xla_force_host_platform_device_count={num_devices}").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from flix import features, layer_layout, models, network, train_step, trainer

assert jax.device_count() == num_devices, jax.devices()
space = features.FeatureSpace.from_values(
    {"task": ["qa", "mt", "sum"], "language": ["sw", "yo", "hi", "bn"]},
    ranks={"task": 2, "language": 3})
# Heads (4 * head_dim 8), mlp (32) and vocab (384) divide by the model axis;
# one layer per stack keeps the compiles short (the init alone takes seconds).
config = network.preset("tiny", num_heads=4, mlp_dim=32, num_encoder_layers=1,
                        num_decoder_layers=1, feature_space=space)
tx = train_step.make_optimizer(1e-2)
model = models.FlixModel(config)
if scan:
  model = models.FlixModel(dataclasses.replace(
      config, scan_layers=True, remat_policy="minimal"))
run = trainer.build_run(model, tx, train_step.ADAPTER_PATTERNS, random_seed=0,
                        num_partitions=num_partitions)
if scan:  # start from the unscanned run's initial params, stacked
  params = jax.jit(models.FlixModel(config).init_params)(jax.random.PRNGKey(0))
  state = train_step.create_train_state(
      model.network_layout(params), tx, train_step.ADAPTER_PATTERNS)
  run.state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, run.state))

rs = np.random.RandomState(0)
batch_size, enc_len, dec_len = 8, 12, 8
enc_lengths = rs.randint(4, enc_len + 1, size=batch_size)
dec_lengths = rs.randint(2, dec_len + 1, size=batch_size)
enc_tokens = rs.randint(1, config.vocab_size, size=(batch_size, enc_len))
enc_tokens = enc_tokens * (np.arange(enc_len)[None] < enc_lengths[:, None])
targets = rs.randint(1, config.vocab_size, size=(batch_size, dec_len))
targets = targets * (np.arange(dec_len)[None] < dec_lengths[:, None])
decoder_inputs = np.concatenate(
    [np.zeros((batch_size, 1), np.int64), targets[:, :-1]], axis=1)
# One (task, language) per example; some examples lack a group (id 0).
example_ids = np.stack([rs.randint(0, 4, size=batch_size),
                        rs.randint(0, 5, size=batch_size)], axis=-1)
example_ids[:2] = [[1, 2], [3, 4]]
batch = {
    "encoder_input_tokens": enc_tokens.astype(np.int32),
    "decoder_input_tokens": decoder_inputs.astype(np.int32),
    "decoder_target_tokens": targets.astype(np.int32),
    "decoder_loss_weights": (targets > 0).astype(np.float32),
    "encoder_feature_ids": np.repeat(example_ids[:, None], enc_len, 1).astype(np.int32),
    "decoder_feature_ids": np.repeat(example_ids[:, None], dec_len, 1).astype(np.int32),
}

def flat(tree):
  return {k: np.asarray(v) for k, v in
          traverse_util.flatten_dict(tree, sep="/").items()}

def spec_of(tree, path):
  return str(traverse_util.flatten_dict(tree, sep="/")[path].sharding.spec)

wi = "encoder/layers_0/mlp/wi_0/"
wo = "decoder/layers_0/mlp/wo/"
specs = {
    "frozen_wi_kernel": spec_of(run.state.frozen,
                                wi.replace("layers_0", "layers") + "kernel"
                                if scan else wi + "kernel"),
    "trainable_wi_lora_a": spec_of(run.state.trainable, wi + "lora_a_task"),
    "trainable_wi_lora_b": spec_of(run.state.trainable, wi + "lora_b_task"),
    "trainable_wo_lora_b": spec_of(run.state.trainable, wo + "lora_b_task"),
}
# The state is donated to the step: copy to the host first.
frozen_before = flat(run.state.frozen)
trainable_before = flat(run.state.trainable)
rng = jax.random.PRNGKey(42)
losses = []
with run.mesh, nn.logical_axis_rules(run.rules):
  for _ in range(2):  # B is 0 at init, so A first moves in step 2.
    run.state, metrics = run.step_fn(
        run.state, trainer.to_device_batch(batch, run.mesh), rng)
    losses.append(float(metrics["loss"]))
specs["trainable_wi_lora_b_after"] = spec_of(run.state.trainable,
                                             wi + "lora_b_task")
frozen_after = flat(run.state.frozen)
changed_frozen = sorted(k for k in frozen_before
                        if not np.array_equal(frozen_before[k], frozen_after[k]))
frozen_after = flat(layer_layout.unstack_layers(run.state.frozen))
trainable_after = flat(run.state.trainable)
out = {f"after/{k}": v for k, v in trainable_after.items()}
out.update({f"before/{k}": v for k, v in trainable_before.items()})
out.update({f"frozen/{k}": v for k, v in frozen_after.items()})
np.savez(out_path, **out)
print("RESULT " + json.dumps({
    "mesh": dict(run.mesh.shape), "losses": losses, "specs": specs,
    "changed_frozen": changed_frozen, "step": int(run.state.step)}))
"""


def _start(num_devices, num_partitions, out_path, scan=False):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
  )
  return subprocess.Popen(
      [
          sys.executable,
          "-c",
          _CHILD,
          str(num_devices),
          str(num_partitions),
          str(int(scan)),
          str(out_path),
      ],
      cwd=str(REPO),
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


def _result(proc):
  try:
    stdout, stderr = proc.communicate(timeout=_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.communicate()
    raise
  assert proc.returncode == 0, stderr[-4000:]
  lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, stdout[-2000:] + stderr[-2000:]
  return json.loads(lines[-1][len("RESULT ") :])


def _check_against_single(tmp_path, name, result, single, tol):
  assert result["mesh"] == {"data": 4, "model": 2}
  specs = result["specs"]
  # Params really are sharded over 'model': the kernel on d_ff; adapters on
  # the kernel's d_ff (A of wo, B of wi) and on their `embed` side (A of wi,
  # B of wo), which T5X's rules would replicate.
  for key in (
      "frozen_wi_kernel",
      "trainable_wi_lora_a",
      "trainable_wi_lora_b",
      "trainable_wo_lora_b",
      "trainable_wi_lora_b_after",
  ):
    assert "model" in specs[key], (key, specs)
  # The step never touches the frozen base model, bit for bit.
  assert result["changed_frozen"] == []
  assert result["step"] == single["step"] == 2
  np.testing.assert_allclose(
      result["losses"], single["losses"], rtol=tol, atol=tol
  )
  assert result["losses"][1] < result["losses"][0]  # It trains.

  with np.load(tmp_path / f"{name}.npz") as a, np.load(
      tmp_path / "single.npz"
  ) as b:
    assert sorted(a.files) == sorted(b.files)
    after = [k for k in a.files if k.startswith("after/")]
    assert any("lora_a_" in k for k in after)
    assert any("lora_b_" in k for k in after)
    for key in a.files:
      if key.startswith(("before/", "frozen/")):
        # Same init on both meshes, so the comparison below means something.
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
      else:
        np.testing.assert_allclose(
            a[key], b[key], atol=tol, rtol=tol, err_msg=key
        )
    moved = [
        k
        for k in after
        if not np.array_equal(a[k], a["before/" + k[len("after/") :]])
    ]
    # Both A and B adapters were updated by the two steps.
    assert any("lora_a_" in k for k in moved)
    assert any("lora_b_" in k for k in moved)


def test_sharded_train_step_matches_single_device(tmp_path):
  # All subprocesses run at once (compilation is mostly single-threaded).
  procs = {
      "sharded": _start(8, 2, tmp_path / "sharded.npz"),
      "scanned": _start(8, 2, tmp_path / "scanned.npz", scan=True),
      "single": _start(1, 1, tmp_path / "single.npz"),
  }
  results = {name: _result(proc) for name, proc in procs.items()}
  single = results["single"]
  assert single["mesh"] == {"data": 1, "model": 1}
  assert single["changed_frozen"] == []
  _check_against_single(tmp_path, "sharded", results["sharded"], single, 1e-5)
  # Scanned layers sum in another order; Adafactor's first steps are nearly
  # sign(g), so rounding shows at 1e-5.
  _check_against_single(tmp_path, "scanned", results["scanned"], single, 1e-4)
