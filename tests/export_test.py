"""Tests for flix.export: merged weights and PEFT adapters of feature sets."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from safetensors import numpy as safetensors_np

from flix import checkpoints
from flix import adapter_export
from flix import export as export_cli
from flix import features as features_lib
from flix import hf_checkpoint
from flix import models
from flix import network
from flix import t5x_checkpoint
from flix import train_step

REPO = pathlib.Path(__file__).resolve().parents[1]

# Two groups with different ranks and alphas, and a per-value rank override,
# so scales differ per feature and padded rank columns must be masked.
SPACE = features_lib.FeatureSpace.from_values(
    {"task": ["cardinal", "ordinal", "year"], "language": ["de", "en", "fr"]},
    ranks={"task": 4, "language": 2},
    alphas={"task": 8.0},
    value_ranks={"language": {"fr": 3}},
)
FEATURE_SETS = (
    {"task": "ordinal", "language": "fr"},  # a pair never trained together
    {"task": "cardinal", "language": "en"},
    {"task": "year"},
    {"language": "de"},
)


def _random_params(model, seed=0):
  """Random params of `model`: a random base and non-zero A and B.

  The adapters are random in the padded rank columns too, which the FLix
  layers mask. (`jax.eval_shape` gives the tree without a slow init.)
  """
  rng = np.random.default_rng(seed)
  shapes = t5x_checkpoint.flatten_params(
      jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  )
  params = {}
  for name, shape in ((k, v.shape) for k, v in shapes.items()):
    if name.endswith("/scale"):  # layer norms
      value = 1.0 + rng.normal(0.0, 0.1, shape)
    elif "/lora_" in name:
      value = rng.normal(0.0, 0.15, shape)
    elif name.endswith("/embedding"):
      value = rng.normal(0.0, 1.0, shape)
    else:  # kernels [D, O] and relative position tables
      value = rng.normal(0.0, shape[0] ** -0.5, shape)
    params[name] = value.astype(np.float32)
  return t5x_checkpoint.unflatten_params(params)


@pytest.fixture(scope="module")
def flix_model():
  model = models.FlixModel(network.preset("tiny", feature_space=SPACE))
  return model, _random_params(model)


def _batch(space, features, batch=2, enc_len=12, dec_len=7):
  rng = np.random.default_rng(1)
  enc = rng.integers(2, 384, (batch, enc_len)).astype(np.int32)
  enc[1, 9:] = 0  # padding
  targets = rng.integers(2, 384, (batch, dec_len)).astype(np.int32)
  targets[1, 5:] = 0
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], 1)
  out = {
      "encoder_input_tokens": enc,
      "decoder_input_tokens": dec_in,
      "decoder_target_tokens": targets,
  }
  if space is not None:
    ids = space.encode(features)
    out["encoder_feature_ids"] = np.broadcast_to(
        ids, (batch, enc_len, len(ids))
    ).copy()
    out["decoder_feature_ids"] = np.broadcast_to(
        ids, (batch, dec_len, len(ids))
    ).copy()
  return out


def _logits(model, params, batch):
  logits = np.asarray(jax.jit(model.compute_logits)(params, batch))
  return logits[batch["decoder_target_tokens"] > 0]  # real positions only


def test_merged_model_equals_flix_model(flix_model):
  model, params = flix_model
  base_model = models.FlixModel(network.preset("tiny"))
  base = jax.jit(base_model.compute_logits)
  flix = jax.jit(model.compute_logits)
  for features in FEATURE_SETS:
    merged = adapter_export.merge_features(params, SPACE, features)
    assert not [
        k for k in t5x_checkpoint.flatten_params(merged) if "lora_" in k
    ]
    batch = _batch(SPACE, features)
    mask = batch["decoder_target_tokens"] > 0
    expected = np.asarray(flix(params, batch))[mask]
    got = np.asarray(base(merged, _batch(None, features)))[mask]
    np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=str(features))
  # The adapters matter: merging no feature gives other logits.
  plain = np.asarray(
      base(adapter_export.base_params(params), _batch(None, {}))
  )[mask]
  assert np.abs(plain - expected).max() > 1e-2


def test_merge_math_and_dtype(flix_model):
  _, params = flix_model
  merged = adapter_export.merge_features(
      params, SPACE, {"task": "year", "language": "fr"}
  )
  layer = params["decoder"]["layers_1"]["encoder_decoder_attention"]["value"]
  task, lang = SPACE.group("task"), SPACE.group("language")
  expected = (
      layer["kernel"]
      + 8.0 / 4 * layer["lora_a_task"][2] @ layer["lora_b_task"][2]
      + 2.0
      / 3
      * layer["lora_a_language"][2][:, :3]
      @ layer["lora_b_language"][2][:3]
  )
  assert task.rank_of("year") == 4 and lang.rank_of("fr") == 3
  got = merged["decoder"]["layers_1"]["encoder_decoder_attention"]["value"]
  assert set(got) == {"kernel"}
  assert got["kernel"].dtype == np.float32
  np.testing.assert_allclose(got["kernel"], expected, rtol=1e-5, atol=1e-6)
  # Non-adapted leaves are unchanged.
  np.testing.assert_array_equal(
      merged["token_embedder"]["embedding"],
      params["token_embedder"]["embedding"],
  )


def test_unknown_features_list_known_values(flix_model):
  _, params = flix_model
  with pytest.raises(ValueError, match="Known language values: de, en, fr"):
    adapter_export.merge_features(params, SPACE, {"language": "klingon"})
  with pytest.raises(
      ValueError, match="Known task values: cardinal, " "ordinal, year"
  ):
    adapter_export.peft_adapter(params, SPACE, {"task": "poetry"})
  with pytest.raises(ValueError, match="groups are: task, language"):
    adapter_export.merge_features(params, SPACE, {"domain": "news"})
  with pytest.raises(ValueError, match="selects no adapter"):
    adapter_export.peft_adapter(params, SPACE, {})
  assert export_cli.parse_features(" task=ordinal, language=fr ") == {
      "task": "ordinal",
      "language": "fr",
  }
  with pytest.raises(ValueError, match="group=value"):
    export_cli.parse_features("task:ordinal")


def test_peft_adapter_is_the_concatenated_update(flix_model):
  _, params = flix_model
  features = {"task": "ordinal", "language": "fr"}
  state_dict, config = adapter_export.peft_adapter(
      params, SPACE, features, "base"
  )
  merged = t5x_checkpoint.flatten_params(
      adapter_export.merge_features(params, SPACE, features)
  )
  base = t5x_checkpoint.flatten_params(params)
  hf_keys = set(hf_checkpoint.t5x_to_hf(adapter_export.base_params(params)))
  # 2 encoder layers x 7 + 2 decoder layers x 11 adapted modules.
  assert len(state_dict) == 2 * (2 * 7 + 2 * 11)
  rank = 4 + 3
  for path in merged:
    if path.endswith("/kernel") and f"{path[:-7]}/lora_a_task" in base:
      module = hf_checkpoint.hf_module_path(path.split("/")[:-1])
      assert f"{module}.weight" in hf_keys
      lora_a = state_dict[f"base_model.model.{module}.lora_A.weight"]
      lora_b = state_dict[f"base_model.model.{module}.lora_B.weight"]
      d_in, d_out = base[path].shape
      assert lora_a.shape == (rank, d_in) and lora_b.shape == (d_out, rank)
      np.testing.assert_allclose(
          lora_a.T @ lora_b.T, merged[path] - base[path], atol=1e-5
      )
  assert config["r"] == config["lora_alpha"] == rank
  assert config["rank_pattern"] == config["alpha_pattern"] == {}
  assert config["target_modules"] == ["k", "o", "q", "v", "wi_0", "wi_1", "wo"]
  assert config["peft_type"] == "LORA"
  assert config["task_type"] == "SEQ_2_SEQ_LM"
  assert config["base_model_name_or_path"] == "base"


def test_peft_rank_pattern_and_target_paths(flix_model):
  _, params = flix_model
  # A layer without the language group gets a smaller total rank.
  params = jax.tree.map(lambda x: x, params)
  del params["encoder"]["layers_0"]["mlp"]["wo"]["lora_a_language"]
  del params["encoder"]["layers_0"]["mlp"]["wo"]["lora_b_language"]
  _, config = adapter_export.peft_adapter(
      params, SPACE, {"task": "ordinal", "language": "en"}
  )
  key = r"encoder\.block\.0\.layer\.1\.DenseReluDense\.wo"
  assert config["r"] == 6
  assert config["rank_pattern"] == {key: 4}
  assert config["alpha_pattern"] == {key: 4}
  # Adapters in the encoder only: short names would also pick decoder
  # modules, so full module paths are listed.
  enc_space = network.preset(
      "tiny",
      feature_space=SPACE,
      adapter_stacks=("encoder",),
      adapter_targets=("query", "value"),
  )
  enc_params = _random_params(models.FlixModel(enc_space))
  _, config = adapter_export.peft_adapter(enc_params, SPACE, {"task": "year"})
  assert config["target_modules"] == [
      f"encoder.block.{i}.layer.0.SelfAttention.{n}"
      for i in (0, 1)
      for n in ("q", "v")
  ]


def test_write_peft_adapter_files(flix_model, tmp_path):
  _, params = flix_model
  adapter_export.write_peft_adapter(
      str(tmp_path),
      params,
      SPACE,
      {"task": "ordinal", "language": "de"},
      "hf_base",
  )
  config = json.load(open(tmp_path / adapter_export.PEFT_CONFIG_FILE))
  assert config["r"] == 6 and config["base_model_name_or_path"] == "hf_base"
  state_dict = safetensors_np.load_file(
      str(tmp_path / adapter_export.PEFT_WEIGHTS_FILE)
  )
  key = "base_model.model.decoder.block.1.layer.1.EncDecAttention.q"
  assert state_dict[f"{key}.lora_A.weight"].shape == (6, 16)
  assert state_dict[f"{key}.lora_B.weight"].shape == (16, 6)


# ---- Command line on a real checkpoint ----


@pytest.fixture(scope="module")
def checkpoint(flix_model, tmp_path_factory):
  """A flix run directory in the trainer's format, with random adapters.

  Saved with `checkpoints.Checkpointer` and the meta `trainer.build_run`
  writes, on a base given as a T5X checkpoint (`flix_model`'s base); the
  data pipeline and train steps are skipped to keep this fast.
  """
  model, params = flix_model
  root = tmp_path_factory.mktemp("export")
  trainable, frozen = train_step.split_params(
      params, train_step.ADAPTER_PATTERNS
  )
  base_dir = t5x_checkpoint.write_t5x_checkpoint(
      frozen, str(root / "checkpoint_0")
  )
  meta = {
      "feature_space": SPACE.to_dict(),
      "model_config": model.config.to_dict(),
      "base": {"initial_checkpoint": base_dir, "init_seed": 0},
      "trainable_patterns": list(train_step.ADAPTER_PATTERNS),
      "data": {
          "mixture_or_task_name": "numbers_multitask",
          "batches_consumed": 2,
      },
      "step": 2,
  }
  checkpointer = checkpoints.Checkpointer(str(root / "run"))
  checkpointer.save(
      2, trainable, optax.adam(1e-3).init(trainable), meta, force=True
  )
  checkpointer.close()
  return str(root / "run"), str(root / "jax_cache")


def _export_cli(checkpoint, *args):
  model_dir, jax_cache = checkpoint
  # A shared compilation cache: the model init compiles once, not per call.
  env = dict(
      os.environ,
      TF_CPP_MIN_LOG_LEVEL="3",
      JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=jax_cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  return subprocess.run(
      [
          sys.executable,
          "-m",
          "flix.export",
          "--gin_file=configs/models/tiny.gin",
          "--gin_file=configs/peft/lora.gin",
          f"--checkpoint={model_dir}",
          *args,
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )


def test_cli_exports_peft_hf_t5x(flix_model, checkpoint, tmp_path):
  features = {"task": "ordinal", "language": "fr"}
  for fmt in ("peft", "hf", "t5x"):
    extra = [f"--base_output={tmp_path / 'base'}"] if fmt == "peft" else []
    result = _export_cli(
        checkpoint,
        "--features=task=ordinal,language=fr",
        f"--format={fmt}",
        f"--output={tmp_path / fmt}",
        *extra,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.load(open(tmp_path / fmt / adapter_export.EXPORT_INFO_FILE))
    assert info["features"] == features and info["step"] == 2

  # Both merged exports hold the merged params, which give the FLix logits.
  model, params = flix_model
  merged = t5x_checkpoint.flatten_params(
      adapter_export.merge_features(params, SPACE, features)
  )
  from_t5x = t5x_checkpoint.flatten_params(
      t5x_checkpoint.read_t5x_checkpoint(str(tmp_path / "t5x"))
  )
  from_hf = t5x_checkpoint.flatten_params(
      hf_checkpoint.hf_to_t5x(
          hf_checkpoint.read_hf_checkpoint(str(tmp_path / "hf"))
      )
  )
  assert from_t5x.keys() == from_hf.keys() == merged.keys()
  for key, value in merged.items():
    np.testing.assert_array_equal(from_t5x[key], value, err_msg=key)
    np.testing.assert_array_equal(from_hf[key], value, err_msg=key)
  assert t5x_checkpoint.read_t5x_step(str(tmp_path / "t5x")) == 2
  hf_config = hf_checkpoint.read_hf_config(str(tmp_path / "hf"))
  assert (hf_config["d_model"], hf_config["d_ff"]) == (16, 32)

  # The adapter: PEFT's update is the merged minus the base kernel.
  config = json.load(open(tmp_path / "peft" / adapter_export.PEFT_CONFIG_FILE))
  assert config["r"] == 4 + 3
  assert config["base_model_name_or_path"] == str(tmp_path / "base")
  state_dict = safetensors_np.load_file(
      str(tmp_path / "peft" / adapter_export.PEFT_WEIGHTS_FILE)
  )
  module = "base_model.model.encoder.block.1.layer.1.DenseReluDense.wi_0"
  path = "encoder/layers_1/mlp/wi_0/kernel"
  base = t5x_checkpoint.flatten_params(
      hf_checkpoint.hf_to_t5x(
          hf_checkpoint.read_hf_checkpoint(str(tmp_path / "base"))
      )
  )
  np.testing.assert_array_equal(
      base[path], t5x_checkpoint.flatten_params(params)[path]
  )
  np.testing.assert_allclose(
      state_dict[f"{module}.lora_A.weight"].T
      @ state_dict[f"{module}.lora_B.weight"].T,
      merged[path] - base[path],
      atol=1e-5,
  )


def test_load_model_ignores_unused_required_macros(tmp_path):
  gin = pytest.importorskip("gin")
  run_gin = tmp_path / "run.gin"
  run_gin.write_text(
      "include 'configs/models/base.gin'\n"
      "include 'configs/models/tiny.gin'\n"
      "MODEL_DIR = %gin.REQUIRED\n"
      "FEATURE_SPACE = 'not a feature space'\n"
  )
  try:
    model = export_cli.load_model(
        [str(run_gin)], ["network.preset.mlp_dim = 24"]
    )
  finally:
    gin.clear_config()
  assert model.config.mlp_dim == 24 and model.config.emb_dim == 16
  assert model.feature_space is None  # the checkpoint's space replaces it
  with pytest.raises(ValueError, match="--gin_file"):
    export_cli.load_model([], [])


def test_cli_unknown_value_is_an_error(checkpoint, tmp_path):
  result = _export_cli(
      checkpoint,
      "--features=task=ordinal,language=klingon",
      "--format=hf",
      f"--output={tmp_path / 'out'}",
  )
  assert result.returncode != 0
  assert "Unknown language value 'klingon'" in result.stderr
  assert "Known language values: de, en, fr" in result.stderr
  assert not (tmp_path / "out").exists()
