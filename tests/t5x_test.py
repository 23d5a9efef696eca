"""flix as a T5X plug-in (`flix.t5x_model`, `flix.t5x_driver`).

In process: the T5X model class computes what `flix.models` computes (loss,
logits, feature dropout, decoding with per-example features), freezes the
base through its optimizer. Through the command line, as a user runs it:
`python -m t5x.train` on the headline config (`configs/flix_mt5_xl.gin`) at
tiny size on an XTREME-UP-format fixture with seqio's test SentencePiece
model, from a T5X checkpoint of the base, killed and resumed; then
`t5x.eval`, `t5x.infer` and `flix.infer` on that run.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from conftest import _seqio_test_spm
from conftest import XTREME_UP_FILES
from conftest import write_xtreme_up
from flax import traverse_util

pytest.importorskip(
    "t5x",
    reason="T5X is not installed: `pip install -e '.[t5x]'` plus T5X from "
    "source (README, 'Running under T5X'); .ci/run installs it.",
)

# pylint: disable=g-import-not-at-top,g-bad-import-order
from flix import checkpoints
from flix import feature_converter
from flix import features
from flix import layers
from flix import models
from flix import network
from flix import t5x_checkpoint
from flix import t5x_model
from flix import train_step

# pylint: enable=g-import-not-at-top,g-bad-import-order

SPACE = features.FeatureSpace.from_values(
    {"task": ["ner", "qa"], "language": ["sw", "yo", "zu"]},
    ranks={"task": 2, "language": 3},
    dropout={"task": 0.5, "language": 0.5},
)
VOCABULARY = None  # Byte-level examples below: ids are given directly.


def _models():
  flix = models.FlixModel(network.preset("tiny", feature_space=SPACE))
  import seqio  # pylint: disable=g-import-not-at-top

  t5x = t5x_model.FlixEncoderDecoderModel(
      flix,
      seqio.ByteVocabulary(),
      optimizer=train_step.make_optimizer(1e-2, "adamw"),
  )
  return flix, t5x


def _params(flix):
  """Initial params with random (non-zero) adapters, so features matter."""
  params = flix.init_params(jax.random.PRNGKey(0))
  flat = traverse_util.flatten_dict(params, sep="/")
  for i, (name, value) in enumerate(sorted(flat.items())):
    if name.split("/")[-1].startswith("lora_b_"):
      flat[name] = 0.3 * jax.random.normal(jax.random.PRNGKey(i), value.shape)
  return traverse_util.unflatten_dict(flat, sep="/")


def _batch(flix):
  examples = [
      {"inputs": "hello sw", "targets": "jambo", "features": f}
      for f in (
          {"task": "ner", "language": "sw"},
          {"task": "qa", "language": "yo"},
          {"task": "qa"},
          {"language": "zu"},
      )
  ]
  import seqio  # pylint: disable=g-import-not-at-top

  return feature_converter.encode_examples(
      examples,
      flix.feature_space,
      {"inputs": 12, "targets": 8},
      vocabulary=seqio.ByteVocabulary(),
  )


def test_loss_and_logits_match_flix_model():
  flix, t5x = _models()
  params, batch = _params(flix), _batch(flix)
  np.testing.assert_allclose(
      jax.jit(t5x._compute_logits)(params, batch),
      jax.jit(flix.compute_logits)(params, batch),
      atol=1e-6,
  )
  t5x_loss, metrics = jax.jit(t5x.loss_fn)(params, batch, None)
  flix_loss, _ = jax.jit(flix.loss_fn)(params, batch)
  np.testing.assert_allclose(t5x_loss, flix_loss, atol=1e-6)
  assert "accuracy" in metrics and "loss" in metrics  # T5X's metrics.
  # Training: the dropout rng T5X passes also draws flix's feature dropout.
  rng = jax.random.PRNGKey(3)
  dropout_rng, feature_rng = jax.random.split(rng)
  trained, _ = jax.jit(t5x.loss_fn)(params, batch, rng)
  expected, _ = jax.jit(flix.loss_fn)(params, batch, dropout_rng, feature_rng)
  np.testing.assert_allclose(trained, expected, atol=1e-6)
  assert abs(float(trained) - float(flix_loss)) > 1e-4  # features dropped


def test_base_is_neither_differentiated_nor_in_optimizer_state():
  flix, t5x = _models()
  params, batch = _params(flix), _batch(flix)
  grads = jax.jit(jax.grad(lambda p: t5x.loss_fn(p, batch, None)[0]))(params)
  flat = traverse_util.flatten_dict(grads, sep="/")
  adapter = {n for n in flat if layers.ADAPTER_LEAF_RE.match(n.split("/")[-1])}
  assert adapter and len(adapter) < len(flat)
  for name, grad in flat.items():
    if name in adapter:
      continue
    assert not np.any(np.asarray(grad)), name  # stop_gradient: exact zeros
  assert any(np.any(np.asarray(flat[n])) for n in adapter)

  optimizer = t5x.optimizer_def
  state = optimizer.init_state(params)
  slots = {
      "/".join(str(getattr(k, "key", k)) for k in path)
      for path, _ in jax.tree_util.tree_flatten_with_path(state.param_states)[0]
  }
  param_slots = [s for s in slots if not s.endswith("count")]
  assert param_slots and all("/lora_" in s for s in param_slots), slots
  new_params, new_state = optimizer.apply_gradient(None, params, state, grads)
  new_flat = traverse_util.flatten_dict(new_params, sep="/")
  old_flat = traverse_util.flatten_dict(params, sep="/")
  for name in old_flat:
    same = np.array_equal(new_flat[name], old_flat[name])
    assert same == (name not in adapter), name
  assert int(new_state.step) == 1


@pytest.mark.parametrize(
    "decode_kwargs,flix_kwargs",
    [
        ({"method": "greedy"}, {"method": "greedy"}),
        (
            {"method": "beam", "beam_size": 3},
            {"method": "beam", "beam_size": 3},
        ),
    ],
    ids=["greedy", "beam"],
)
def test_t5x_decoding_uses_each_examples_features(decode_kwargs, flix_kwargs):
  flix, _ = _models()
  import seqio  # pylint: disable=g-import-not-at-top

  t5x = t5x_model.FlixEncoderDecoderModel(
      flix, seqio.ByteVocabulary(), decode_kwargs=decode_kwargs
  )
  params, batch = _params(flix), _batch(flix)
  decodes, aux = jax.jit(t5x.predict_batch_with_aux)(params, batch)
  tokens, _ = flix.predict_batch(params, batch, 8, **flix_kwargs)
  # T5X sorts decodes worst to best, flix best first.
  np.testing.assert_array_equal(decodes, np.asarray(tokens)[:, 0])
  assert aux["scores"].shape == (4,)  # (scores: T5X's length-normalised)
  # Same input, different features: different continuations.
  assert len({tuple(row) for row in np.asarray(decodes)}) > 1


def test_params_axes_name_every_param():
  flix, t5x = _models()
  variables = t5x.get_initial_variables(jax.random.PRNGKey(0), {})
  from flax.linen import partitioning as flax_partitioning  # pylint: disable=g-import-not-at-top

  axes = traverse_util.flatten_dict(
      flax_partitioning.get_axis_names(variables["params_axes"]), sep="/"
  )
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  assert set(axes) == set(params)
  for name, spec in axes.items():
    assert len(spec) == params[name].ndim, name
    if name.endswith("lora_a_task"):
      assert spec[0] == layers.VALUES_AXIS and spec[2] == layers.RANK_AXIS


def test_scanned_network_keeps_t5x_state_per_layer():
  """With scanned layers T5X's params (hence its checkpoints and restores)
  stay in the public per-layer layout; loss, gradients and decodes equal
  the unscanned model's for the same params."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  import seqio  # pylint: disable=g-import-not-at-top

  flix, t5x = _models()
  scanned_flix = dataclasses.replace(
      flix,
      config=dataclasses.replace(
          flix.config, scan_layers=True, remat_policy="minimal"
      ),
  )
  scanned = t5x_model.FlixEncoderDecoderModel(
      scanned_flix,
      seqio.ByteVocabulary(),
      optimizer=train_step.make_optimizer(1e-2, "adamw"),
      decode_kwargs={"method": "beam", "beam_size": 2},
  )
  variables = scanned.get_initial_variables(jax.random.PRNGKey(0), {})
  unscanned = t5x.get_initial_variables(jax.random.PRNGKey(0), {})
  names = set(traverse_util.flatten_dict(variables["params"], sep="/"))
  assert names == set(traverse_util.flatten_dict(unscanned["params"], sep="/"))
  assert "encoder/layers_1/attention/query/kernel" in names
  from flax.linen import partitioning as flax_partitioning  # pylint: disable=g-import-not-at-top

  axes = flax_partitioning.get_axis_names(variables["params_axes"])
  assert "layers" not in jax.tree.leaves(axes)

  params, batch = _params(flix), _batch(flix)
  loss = lambda model: jax.jit(
      jax.value_and_grad(lambda p: model.loss_fn(p, batch, None)[0])
  )(params)
  (scanned_loss, scanned_grads), (loss_, grads) = loss(scanned), loss(t5x)
  np.testing.assert_allclose(scanned_loss, loss_, rtol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
      scanned_grads,
      grads,
  )
  state = scanned.optimizer_def.init_state(params)
  new_params, _ = scanned.optimizer_def.apply_gradient(
      None, params, state, scanned_grads
  )
  assert jax.tree.structure(new_params) == jax.tree.structure(params)
  # Decoding with the stacked cache (cache_offset=1) = flix's unscanned.
  decodes, _ = jax.jit(scanned.predict_batch_with_aux)(params, batch)
  tokens, _ = flix.predict_batch(params, batch, 8, method="beam", beam_size=2)
  np.testing.assert_array_equal(decodes, np.asarray(tokens)[:, 0])


def test_decode_kwargs_errors():
  with pytest.raises(ValueError, match="Unknown decoding method"):
    t5x_model.decode_fn_of({"method": "nucleus"})
  with pytest.raises(ValueError, match="do not apply"):
    t5x_model.decode_fn_of({"method": "greedy", "beam_size": 2})


# ---- Through the command line ----

_ENV = dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL="3",
    JAX_PLATFORMS="cpu",
    # Two devices, so T5X's partitioner splits the model axis in two.
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=2",
)
LENGTHS = "{'inputs': 32, 'targets': 12}"


def _command(module, *args):
  return [sys.executable, "-m", module, *args]


def _run(module, *args, env=_ENV):
  result = subprocess.run(
      _command(module, *args),
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=1200,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stderr + result.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """`t5x.train` of the headline config at tiny size: killed once, resumed."""
  root = tmp_path_factory.mktemp("t5x_run")
  data = write_xtreme_up(root / "xtreme_up")
  base = str(root / "base" / "checkpoint_1000000")
  base_params = jax.tree.map(
      np.asarray,
      models.FlixModel(network.preset("tiny")).init_params(
          jax.random.PRNGKey(7)
      ),
  )
  # The public mT5 checkpoints' format (legacy T5X), at step 1,000,000.
  t5x_checkpoint.write_t5x_checkpoint(base_params, base, step=1_000_000)
  model_dir = root / "run"
  data_flags = [
      f'--gin.XTREME_UP_DIR="{data}"',
      f'--gin.SPM_PATH="{_seqio_test_spm()}"',
      "--gin_file=configs/data/xtreme_up_zero_shot.gin",
      "--gin.XTREME_UP_HOLDOUT=[('ner', 'yo')]",
      f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
  ]
  args = [
      "--gin_file=configs/flix_mt5_xl.gin",
      "--gin_file=configs/models/tiny.gin",
      *data_flags,
      f'--gin.MODEL_DIR="{model_dir}"',
      f'--gin.INITIAL_CHECKPOINT_PATH="{base}"',
      "--gin.TRAIN_STEPS=4",
      "--gin.BATCH_SIZE=4",
      "--gin.NUM_PARTITIONS=2",
      "--gin.CHECKPOINT_PERIOD=2",
      "--gin.EVAL_PERIOD=2",
      "--gin.EVAL_BATCH_SIZE=4",
  ]
  # Killed while evaluating after its step-2 checkpoint (decoding compiles
  # for a while, so the kill lands there).
  log_path = root / "killed.log"
  with open(log_path, "w") as log:
    process = subprocess.Popen(
        _command("t5x.train", *args),
        cwd=REPO,
        env=_ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
  deadline = time.time() + 1200
  while time.time() < deadline and process.poll() is None:
    if (model_dir / "checkpoint_2").is_dir() and (
        "Running inference evaluation" in log_path.read_text()
    ):
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.2)
  assert process.wait(timeout=60) == -signal.SIGKILL, log_path.read_text()[
      -4000:
  ]
  killed_steps = sorted(p.name for p in model_dir.glob("checkpoint_*"))
  # Resumed without the in-training evaluation (t5x.eval is tested below).
  resumed = _run("t5x.train", *args, "--gin.EVAL_PERIOD=0")
  return {
      "root": root,
      "model_dir": model_dir,
      "base": base,
      "base_params": base_params,
      "data_flags": data_flags,
      "killed_steps": killed_steps,
      "resumed_log": resumed,
  }


def test_train_resumes_after_a_kill(run):
  # T5X restored the base only: the run counts from step 0 (not 1,000,000).
  assert run["killed_steps"] == ["checkpoint_0", "checkpoint_2"]
  assert "Starting main loop over steps 2-4" in run["resumed_log"]
  assert (run["model_dir"] / "checkpoint_4").is_dir()


def test_base_bit_identical_and_only_adapters_changed(run):
  trained = traverse_util.flatten_dict(
      t5x_checkpoint.read_t5x_checkpoint(
          str(run["model_dir"] / "checkpoint_4")
      ),
      sep="/",
  )
  base = traverse_util.flatten_dict(run["base_params"], sep="/")
  adapters = {n for n in trained if n not in base}
  assert adapters and all(
      layers.ADAPTER_LEAF_RE.match(n.split("/")[-1]) for n in adapters
  )
  for name, value in base.items():
    np.testing.assert_array_equal(trained[name], value, err_msg=name)
  assert any(
      np.any(trained[n]) for n in adapters if "/lora_b_" in n
  ), "adapters did not train"
  # The optimizer state holds the adapters' slots only.
  info = (run["model_dir"] / "model-info.txt").read_text()
  slots = [l for l in info.splitlines() if "param_states/" in l]
  assert slots and all("lora_" in l for l in slots if "/count" not in l), slots[
      :3
  ]


def test_run_info_saved_for_flix_tools(run):
  meta = checkpoints.read_meta(str(run["model_dir"]))
  groups = {g["name"]: g["values"] for g in meta["feature_space"]["groups"]}
  assert groups["task"] == sorted(
      [
          "asr",
          "autocomplete",
          "ner",
          "qa_cross_lang",
          "qa_in_lang",
          "semantic_parsing",
          "translation",
          "transliteration",
      ]
  )
  assert groups["language"] == ["hi", "sw", "yo"]
  assert meta["data"]["mixture_or_task_name"] == (
      "xtreme_up_multitask_zeroshot_mt5"
  )
  assert meta["step"] == 4
  assert meta["model_config"]["emb_dim"] == 16


@pytest.fixture(scope="module")
def evaluated(run):
  """`t5x.eval`, `t5x.infer`, `flix.infer` and `flix.export` on the run,
  concurrently."""
  root, model_dir = run["root"], run["model_dir"]
  common = [
      "--gin_file=configs/models/tiny.gin",
      *run["data_flags"],
      f'--gin.CHECKPOINT_PATH="{model_dir}"',
      "--gin.NUM_PARTITIONS=1",
      "--gin.BATCH_SIZE=4",
  ]
  # The held-out (unseen) pair.
  unseen = ['--gin.xtreme_up.mixture.name="xtreme_up_ner_yo_mt5"']
  commands = {
      "t5x_eval": _command(
          "t5x.eval",
          "--gin_file=configs/flix_mt5_xl_eval.gin",
          *common,
          f'--gin.EVAL_OUTPUT_DIR="{root / "eval"}"',
      ),
      "t5x_infer": _command(
          "t5x.infer",
          "--gin_file=configs/flix_mt5_xl_infer.gin",
          *common,
          *unseen,
          f'--gin.INFER_OUTPUT_DIR="{root / "t5x_infer"}"',
      ),
      "flix_infer": _command(
          "flix.infer",
          "--gin_file=configs/flix_mt5_xl_infer.gin",
          *common,
          *unseen,
          f'--gin.INFER_OUTPUT_DIR="{root / "flix_infer"}"',
      ),
      "flix_export": _command(
          "flix.export",
          f"--checkpoint={model_dir}",
          "--gin_file=configs/models/tiny.gin",
          "--features=task=ner,language=yo",
          "--format=peft",
          f"--output={root / 'peft_ner_yo'}",
      ),
  }
  env = dict(_ENV, XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))
  processes = {
      name: subprocess.Popen(
          command,
          cwd=REPO,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for name, command in commands.items()
  }
  logs = {name: p.communicate(timeout=1200)[0] for name, p in processes.items()}
  for name, process in processes.items():
    assert process.returncode == 0, f"{name}:\n{logs[name][-4000:]}"
  return root


def test_t5x_eval_writes_per_pair_metrics_with_zero_shot_flag(evaluated):
  rows = json.loads(
      (
          evaluated / "eval" / "inference_eval" / "results-test-4.json"
      ).read_text()
  )
  by_pair = {
      (r["features"].get("task"), r["features"].get("language")): r
      for r in rows
  }
  assert by_pair[("ner", "yo")]["seen_in_training"] is False
  assert by_pair[("ner", "sw")]["seen_in_training"] is True
  assert by_pair[("ner", "yo")]["metric"] == "span_f1"
  tasks = {task for task, _ in by_pair}
  assert len(tasks) == 8  # every XTREME-UP task folder
  assert (
      "ZERO-SHOT"
      in (
          evaluated / "eval" / "inference_eval" / "results-test-4.txt"
      ).read_text()
  )


def test_t5x_infer_predicts_unseen_pair_like_flix_infer(evaluated):
  t5x_lines = [
      json.loads(l)
      for l in next((evaluated / "t5x_infer").glob("*-predict.jsonl-*-of-*"))
      .read_text()
      .splitlines()
  ]
  flix_lines = [
      json.loads(l)
      for l in (
          evaluated
          / "flix_infer"
          / "xtreme_up_ner_yo_mt5-test-predictions.jsonl"
      )
      .read_text()
      .splitlines()
  ]
  assert len(t5x_lines) == len(flix_lines) == 2
  assert {l["features"]["language"] for l in flix_lines} == {"yo"}
  by_input = {l["inputs"]: l["prediction"] for l in flix_lines}
  for line in t5x_lines:
    text = line["inputs"]["inputs_pretokenized"]
    assert line["prediction"] == by_input[text]


def test_flix_export_reads_the_t5x_run(evaluated):
  """The unseen pair as one PEFT LoRA adapter, from T5X's checkpoint."""
  config = json.loads(
      (evaluated / "peft_ner_yo" / "adapter_config.json").read_text()
  )
  assert config["peft_type"] == "LORA" and config["r"] > 0
  assert (evaluated / "peft_ner_yo" / "adapter_model.safetensors").is_file()


# ---- Growing the run with a new language under t5x.train (flix.grow) ----


@pytest.fixture(scope="module")
def grown(run):
  """`t5x.train` with GROW_FROM = the run, trained on the new language's
  data only (Zulu semantic parsing; XTREME-UP data that adds Zulu NER too,
  held out: a new language with an old task), evaluated in training on old
  and new pairs."""
  root = run["root"]
  data = write_xtreme_up(
      root / "xtreme_up_zu",
      {
          **XTREME_UP_FILES,
          "ner": ("sw", "yo", "zu"),
          "semantic_parsing": ("sw", "yo", "zu"),
      },
  )
  common = [
      "--gin_file=configs/flix_mt5_xl.gin",
      "--gin_file=configs/models/tiny.gin",
      f'--gin.XTREME_UP_DIR="{data}"',
      f'--gin.SPM_PATH="{_seqio_test_spm()}"',
      "--gin_file=configs/data/xtreme_up_zero_shot.gin",
      "--gin.XTREME_UP_HOLDOUT=[('ner', 'yo'), ('ner', 'zu')]",
      '--gin.xtreme_up.mixture.name="xtreme_up_semantic_parsing_zu_mt5"',
      f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
      f'--gin.GROW_FROM="{run["model_dir"]}"',
      "--gin.TRAIN_STEPS=4",
      "--gin.BATCH_SIZE=4",
      "--gin.NUM_PARTITIONS=2",
      "--gin.EVAL_BATCH_SIZE=4",
  ]
  model_dir = root / "grown"
  log = _run(
      "t5x.train",
      *common,
      f'--gin.MODEL_DIR="{model_dir}"',
      f'--gin.INITIAL_CHECKPOINT_PATH="{run["base"]}"',
      "--gin.CHECKPOINT_PERIOD=4",
      "--gin.EVAL_PERIOD=4",
      "--gin.LEARNING_RATE=0.05",
  )
  # On another base: refused before T5X restores or writes anything.
  other_base = root / "other_base" / "checkpoint_1"
  t5x_checkpoint.write_t5x_checkpoint(run["base_params"], str(other_base))
  other_dir = root / "grown_other_base"
  refused = subprocess.run(
      _command(
          "t5x.train",
          *common,
          f'--gin.MODEL_DIR="{other_dir}"',
          f'--gin.INITIAL_CHECKPOINT_PATH="{other_base}"',
      ),
      cwd=REPO,
      env=_ENV,
      capture_output=True,
      text=True,
      timeout=1200,
  )
  return {
      "model_dir": model_dir,
      "log": log,
      "refused": refused,
      "refused_dir": other_dir,
  }


def test_t5x_grow_trains_only_the_new_language(run, grown):
  original = traverse_util.flatten_dict(
      t5x_checkpoint.read_t5x_checkpoint(
          str(run["model_dir"] / "checkpoint_4")
      ),
      sep="/",
  )
  after = traverse_util.flatten_dict(
      t5x_checkpoint.read_t5x_checkpoint(
          str(grown["model_dir"] / "checkpoint_4")
      ),
      sep="/",
  )
  meta = checkpoints.read_meta(str(grown["model_dir"]))
  groups = {g["name"]: g["values"] for g in meta["feature_space"]["groups"]}
  assert groups["language"] == ["hi", "sw", "yo", "zu"]  # Old ids kept.
  assert meta["grown_from"]["checkpoint"] == str(run["model_dir"])
  assert meta["base"]["initial_checkpoint"] == run["base"]
  for name, value in traverse_util.flatten_dict(
      run["base_params"], sep="/"
  ).items():
    np.testing.assert_array_equal(after[name], value, err_msg=name)
  new_rows = []
  for name, old in original.items():
    if not layers.ADAPTER_LEAF_RE.match(name.split("/")[-1]):
      continue
    grown_leaf = after[name]
    old_part = grown_leaf[tuple(slice(0, s) for s in old.shape)]
    # Bit-identical: the same bits, not only equal values.
    np.testing.assert_array_equal(
        old_part.view(np.uint32), old.view(np.uint32), err_msg=name
    )
    if "/lora_b_language" in name:
      new_rows.append(grown_leaf[old.shape[0] :])
  assert new_rows and any(np.any(r) for r in new_rows), "Zulu did not train"


def test_t5x_grow_evaluates_old_and_new_pairs(grown):
  rows = json.loads(
      (
          grown["model_dir"] / "inference_eval" / "results-validation-4.json"
      ).read_text()
  )
  seen = {
      (r["features"].get("task"), r["features"].get("language")): r[
          "seen_in_training"
      ]
      for r in rows
  }
  assert seen[("ner", "zu")] is False  # New language, old task: zero-shot.
  assert seen[("ner", "yo")] is False
  assert seen[("semantic_parsing", "zu")] is True  # Grown on it.
  assert seen[("ner", "sw")] is True  # The original trained it.


def test_t5x_grow_on_another_base_is_an_error(grown):
  assert grown["refused"].returncode != 0
  message = grown["refused"].stderr
  assert (
      "GROW_FROM" in message and "base.initial_checkpoint" in message
  ), message[-3000:]
  assert not list(grown["refused_dir"].glob("checkpoint_*"))
