"""flix's network against `transformers`' MT5, and PEFT loading our adapter_export.

A tiny randomly initialised `MT5ForConditionalGeneration` is saved, imported
with `flix.hf_checkpoint`, and run by both implementations on inputs long
enough (140 tokens) to use every relative-position bucket, including the log
bucket edges at distances 16, 32 and 64 and the clip past 128. Then a FLix
feature set exported with `flix.adapter_export.write_peft_adapter` is loaded with
`peft.PeftModel.from_pretrained` and must give flix's logits. Last, the
three forms of the output projection (released mT5 untied, transformers 5's
tied MT5, T5 v1.0 tied and rescaled) at odd sizes import with transformers'
logits and export back to them.
"""

import json
import os

import jax
import numpy as np
import pytest

from flix import adapter_export
from flix import features as features_lib
from flix import hf_checkpoint
from flix import models
from flix import network
from flix import t5_layers
from flix import t5x_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_HF_DIMS = dict(
    vocab_size=128,
    d_model=32,
    d_kv=8,
    num_heads=4,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    dropout_rate=0.0,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
)
_SPACE = features_lib.FeatureSpace.from_values(
    {"task": ["ordinal", "cardinal"], "language": ["en", "fr", "sw"]},
    ranks={"task": 4, "language": 2},
    alphas={"task": 16.0},
    value_ranks={"language": {"sw": 3}},
)
_ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random mT5 with an untied lm_head, saved with save_pretrained."""
  torch.manual_seed(0)
  model = transformers.MT5ForConditionalGeneration(
      transformers.MT5Config(**_HF_DIMS)
  )
  with torch.no_grad():
    # transformers >= 5 forces MT5Config.tie_word_embeddings=True: untie by
    # hand, as in the released mT5 weights.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(128, 32))
    # Large position biases, so one bucket off anywhere shows in the outputs.
    for name, param in model.named_parameters():
      if "relative_attention_bias" in name:
        param.normal_(0.0, 2.0)
  directory = str(tmp_path_factory.mktemp("hf_mt5"))
  model.save_pretrained(directory)
  return directory


def _load_hf(directory):
  model = transformers.MT5ForConditionalGeneration.from_pretrained(directory)
  return model.eval()


@pytest.fixture(scope="module")
def imported(hf_dir):
  """(network config, params) of the HF model, through flix's converter."""
  dims = hf_checkpoint.t5_config_from_hf(
      hf_checkpoint.read_hf_config(hf_dir),
      hf_checkpoint.read_hf_weight_names(hf_dir),
  )
  config = network.T5Config(**dims, dropout_rate=0.0)
  params = hf_checkpoint.hf_to_t5x(hf_checkpoint.read_hf_checkpoint(hf_dir))
  return config, params


def _batch(num_groups=0, features=None):
  """3 rows of 140 input / 90 target tokens; rows 1 and 2 padded."""
  rng = np.random.default_rng(0)
  enc = rng.integers(2, 128, (3, 140)).astype(np.int32)
  enc[1, 100:] = 0
  enc[2, 70:] = 0
  targets = rng.integers(2, 128, (3, 90)).astype(np.int32)
  targets[1, 60:] = 0
  targets[2, 33:] = 0
  dec_in = np.concatenate([np.zeros((3, 1), np.int32), targets[:, :-1]], 1)
  batch = {
      "encoder_input_tokens": enc,
      "decoder_input_tokens": dec_in,
      "decoder_target_tokens": targets,
  }
  if num_groups:
    ids = _SPACE.encode(features)
    batch["encoder_feature_ids"] = np.broadcast_to(ids, (3, 140, num_groups))
    batch["decoder_feature_ids"] = np.broadcast_to(ids, (3, 90, num_groups))
  return batch


def _hf_logits(model, batch):
  with torch.no_grad():
    out = model(
        input_ids=torch.tensor(batch["encoder_input_tokens"], dtype=torch.long),
        attention_mask=torch.tensor(batch["encoder_input_tokens"] > 0),
        decoder_input_ids=torch.tensor(
            batch["decoder_input_tokens"], dtype=torch.long
        ),
        decoder_attention_mask=torch.tensor(batch["decoder_target_tokens"] > 0),
    )
  return out.logits.float().numpy()


def test_relative_position_buckets_match_transformers():
  from transformers.models.mt5 import modeling_mt5  # pylint: disable=g-import-not-at-top

  bucket_fn = modeling_mt5.MT5Attention._relative_position_bucket  # pylint: disable=protected-access
  relative = np.arange(-300, 301)[None, :]
  for bidirectional in (True, False):
    for num_buckets, max_distance in (
        (32, 128),
        (8, 16),
        (4, 8),
        (9, 21),
        (33, 129),
    ):
      expected = bucket_fn(
          torch.tensor(relative),
          bidirectional=bidirectional,
          num_buckets=num_buckets,
          max_distance=max_distance,
      ).numpy()
      got = t5_layers.relative_position_bucket(
          relative, bidirectional, num_buckets, max_distance
      )
      np.testing.assert_array_equal(
          got,
          expected,
          err_msg=f"{bidirectional=} {num_buckets=} {max_distance=}",
      )


def _flix_logits(config, params, batch):
  return np.asarray(
      jax.jit(
          lambda p, b: network.Transformer(config).apply(
              {"params": p},
              b["encoder_input_tokens"],
              b["decoder_input_tokens"],
              b["decoder_target_tokens"],
              enable_dropout=False,
          )
      )(params, batch)
  )


def test_encoder_and_logits_match_transformers(hf_dir, imported):
  config, params = imported
  module = network.Transformer(config)
  batch = _batch()
  enc, targets = batch["encoder_input_tokens"], batch["decoder_target_tokens"]
  encoded = jax.jit(
      lambda p, t: module.apply(
          {"params": p},
          t,
          enable_dropout=False,
          method=network.Transformer.encode,
      )
  )(params, enc)
  logits = _flix_logits(config, params, batch)

  hf_model = _load_hf(hf_dir)
  with torch.no_grad():
    hf_encoded = hf_model.get_encoder()(
        input_ids=torch.tensor(enc, dtype=torch.long),
        attention_mask=torch.tensor(enc > 0),
    ).last_hidden_state.numpy()
  hf_logits = _hf_logits(hf_model, batch)
  # Padded positions are masked differently (and unused): compare real ones.
  enc_diff = np.abs(np.asarray(encoded) - hf_encoded)[enc > 0].max()
  logit_diff = np.abs(np.asarray(logits) - hf_logits)[targets > 0].max()
  assert enc_diff < _ATOL, enc_diff
  assert logit_diff < _ATOL, logit_diff
  assert np.abs(hf_logits).max() > 1.0  # not trivially small


@pytest.fixture(scope="module")
def flix(imported):
  """A FLix model on the imported base, with random non-zero adapters."""
  config, base = imported
  model = models.FlixModel(
      network.T5Config(**{**config.__dict__, "feature_space": _SPACE})
  )
  params = t5x_checkpoint.flatten_params(
      jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  )
  rng = np.random.default_rng(1)
  # Their updates are of the kernels' size: much larger ones make float32
  # rounding grow past the tolerance (flix's own merged and unmerged forms
  # then differ by ~1e-3 too).
  for name, value in params.items():
    params[name] = (
        rng.normal(0.0, 0.05, value.shape).astype(np.float32)
        if "/lora_" in name
        else t5x_checkpoint.flatten_params(base)[name]
    )
  return model, t5x_checkpoint.unflatten_params(params)


def test_peft_adapter_gives_flix_logits(hf_dir, flix, tmp_path):
  peft = pytest.importorskip("peft")
  model, params = flix
  flix_logits = jax.jit(model.compute_logits)
  base_logits = _hf_logits(_load_hf(hf_dir), _batch())

  for i, features in enumerate(
      ({"task": "cardinal", "language": "sw"}, {"language": "fr"})
  ):
    directory = str(tmp_path / f"adapter_{i}")
    adapter_export.write_peft_adapter(
        directory, params, _SPACE, features, hf_dir
    )
    peft_model = peft.PeftModel.from_pretrained(_load_hf(hf_dir), directory)
    peft_model.eval()
    batch = _batch(_SPACE.num_groups, features)
    mask = batch["decoder_target_tokens"] > 0
    expected = np.asarray(flix_logits(params, batch))[mask]
    got = _hf_logits(peft_model, batch)[mask]
    np.testing.assert_allclose(got, expected, atol=_ATOL, err_msg=str(features))
    # The adapters were loaded (not PEFT's zero-initialised B).
    assert np.abs(base_logits[mask] - expected).max() > 1e-2


def test_peft_rank_pattern_and_module_paths_load(
    hf_dir, imported, flix, tmp_path
):
  """Layers of different total rank, adapters in some modules only."""
  peft = pytest.importorskip("peft")
  config, _ = imported
  _, params = flix
  # No adapters in the decoder; no language adapter in one encoder layer.
  params = t5x_checkpoint.unflatten_params(
      {
          name: value
          for name, value in t5x_checkpoint.flatten_params(params).items()
          if not (name.startswith("decoder/") and "/lora_" in name)
          and not name.startswith("encoder/layers_1/mlp/wo/lora_a_language")
          and not name.startswith("encoder/layers_1/mlp/wo/lora_b_language")
      }
  )
  features = {"task": "ordinal", "language": "sw"}
  directory = str(tmp_path / "adapter")
  adapter_config = adapter_export.write_peft_adapter(
      directory, params, _SPACE, features, hf_dir
  )
  assert adapter_config["r"] == 4 + 3
  assert list(adapter_config["rank_pattern"].values()) == [4]
  assert all(m.startswith("encoder.") for m in adapter_config["target_modules"])

  merged_dir = str(tmp_path / "merged")
  adapter_export.write_hf_model(
      merged_dir,
      adapter_export.merge_features(params, _SPACE, features),
      config,
  )
  batch = _batch()
  mask = batch["decoder_target_tokens"] > 0
  expected = _hf_logits(_load_hf(merged_dir), batch)[mask]
  peft_model = peft.PeftModel.from_pretrained(_load_hf(hf_dir), directory)
  got = _hf_logits(peft_model.eval(), batch)[mask]
  np.testing.assert_allclose(got, expected, atol=_ATOL)
  lora_b = dict(peft_model.named_parameters())[
      "base_model.model.encoder.block.1.layer.1.DenseReluDense.wo.lora_B."
      "default.weight"
  ]
  assert tuple(lora_b.shape) == (32, 4)


# ------------------------------------------------------------------------------
# The three forms of an HF checkpoint's output projection, at odd sizes.
# ------------------------------------------------------------------------------

# heads x head_dim = 21 != d_model 30; odd buckets and max distance.
_ODD_DIMS = dict(
    vocab_size=101,
    d_model=30,
    d_kv=7,
    num_heads=3,
    d_ff=37,
    num_layers=2,
    num_decoder_layers=1,
    dropout_rate=0.0,
    relative_attention_num_buckets=9,
    relative_attention_max_distance=21,
)
_FORMS = {
    # The released google/mt5-* form: an lm_head of its own, config untied.
    "released_mt5": ("mt5", "gated-gelu", False),
    # What transformers 5 writes for an MT5: tied, no lm_head.weight.
    "transformers5_mt5": ("mt5", "gated-gelu", True),
    # T5 v1.0: tied and rescaled (config.scale_decoder_outputs).
    "t5_v1_0": ("t5", "relu", True),
    # The same, with a config from before transformers 5 (no such key).
    "t5_v1_0_old_config": ("t5", "relu", True),
}


def _odd_batch():
  """2 rows of 45 input / 30 target tokens (past the max distance 21)."""
  rng = np.random.default_rng(3)
  enc = rng.integers(2, 101, (2, 45)).astype(np.int32)
  enc[1, 33:] = 0
  targets = rng.integers(2, 101, (2, 30)).astype(np.int32)
  targets[1, 25:] = 0
  dec_in = np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]], 1)
  return {
      "encoder_input_tokens": enc,
      "decoder_input_tokens": dec_in,
      "decoder_target_tokens": targets,
  }


def _save_form(form, directory):
  model_type, proj, tied = _FORMS[form]
  torch.manual_seed(7)
  classes = {
      "mt5": (transformers.MT5Config, transformers.MT5ForConditionalGeneration),
      "t5": (transformers.T5Config, transformers.T5ForConditionalGeneration),
  }
  config_cls, model_cls = classes[model_type]
  model = model_cls(config_cls(feed_forward_proj=proj, **_ODD_DIMS))
  with torch.no_grad():
    if not tied:
      model.lm_head.weight = torch.nn.Parameter(torch.randn(101, 30))
    for name, param in model.named_parameters():
      if "relative_attention_bias" in name:
        param.normal_(0.0, 2.0)
  model.save_pretrained(directory)
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  if form == "released_mt5":
    config["tie_word_embeddings"] = False
  if form == "t5_v1_0_old_config":
    del config["scale_decoder_outputs"]
  with open(path, "w") as f:
    json.dump(config, f)


@pytest.mark.parametrize("form", sorted(_FORMS))
def test_hf_forms_import_with_transformers_logits(form, tmp_path):
  directory = str(tmp_path / form)
  _save_form(form, directory)
  dims = hf_checkpoint.t5_config_from_hf(
      hf_checkpoint.read_hf_config(directory),
      hf_checkpoint.read_hf_weight_names(directory),
  )
  _, _, tied = _FORMS[form]
  assert dims["logits_via_embedding"] == tied
  assert dims["scale_decoder_outputs"] == form.startswith("t5_v1_0")
  config = network.T5Config(**dims, dropout_rate=0.0)
  params = hf_checkpoint.hf_to_t5x(hf_checkpoint.read_hf_checkpoint(directory))
  hf_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(directory)
  batch = _odd_batch()
  mask = batch["decoder_target_tokens"] > 0
  want = _hf_logits(hf_model.eval(), batch)[mask]
  got = _flix_logits(config, params, batch)[mask]
  diff = np.abs(got - want).max()
  print(f"{form}: max |logit diff| vs transformers {diff:.2e}")
  assert diff < _ATOL, diff
  assert np.abs(want).max() > 1.0
  # The other rescale choice is far off: the test can tell them apart.
  flipped = network.T5Config(
      **{**dims, "scale_decoder_outputs": not dims["scale_decoder_outputs"]},
      dropout_rate=0.0,
  )
  assert np.abs(_flix_logits(flipped, params, batch)[mask] - want).max() > 0.1

  # Written back (as flix.export does), transformers computes the same.
  out = str(tmp_path / "export")
  hf_checkpoint.write_hf_checkpoint(
      hf_checkpoint.t5x_to_hf(params),
      hf_checkpoint.hf_config_from_t5_config(dims),
      out,
  )
  again = transformers.AutoModelForSeq2SeqLM.from_pretrained(out)
  np.testing.assert_allclose(
      _hf_logits(again.eval(), batch)[mask], want, atol=1e-6
  )


def test_checkpoint_and_network_disagreements_are_named(tmp_path):
  from flix import checkpoints  # pylint: disable=g-import-not-at-top

  def target(config):
    return jax.eval_shape(
        models.FlixModel(config).init_params, jax.random.PRNGKey(0)
    )

  tied_dir, untied_dir = str(tmp_path / "tied"), str(tmp_path / "untied")
  _save_form("transformers5_mt5", tied_dir)
  _save_form("released_mt5", untied_dir)
  dims = hf_checkpoint.t5_config_from_hf(
      hf_checkpoint.read_hf_config(tied_dir),
      hf_checkpoint.read_hf_weight_names(tied_dir),
  )
  untied = network.T5Config(**{**dims, "logits_via_embedding": False})
  with pytest.raises(
      ValueError, match="logits_via_embedding: checkpoint True vs network False"
  ):
    checkpoints.restore_base_params(target(untied), tied_dir, config=untied)
  with pytest.raises(
      ValueError, match="missing \\(decoder/logits_dense/kernel"
  ):
    checkpoints.restore_base_params(target(untied), tied_dir)
  tied = network.T5Config(**dims)
  with pytest.raises(
      ValueError,
      match="1 the model does not have \\(decoder/logits_dense/kernel "
      "\\(30, 101\\)\\)",
  ):
    checkpoints.restore_base_params(target(tied), untied_dir)
  wider = network.T5Config(**{**dims, "mlp_dim": 38})
  with pytest.raises(ValueError, match="mlp_dim: checkpoint 37 vs network 38"):
    checkpoints.restore_base_params(target(wider), tied_dir, config=wider)
  with pytest.raises(
      ValueError,
      match="encoder/layers_0/mlp/wi_0/kernel: checkpoint \\(30, 37\\) vs "
      "model \\(30, 38\\)",
  ):
    checkpoints.restore_base_params(target(wider), tied_dir)
  # The matching network loads.
  loaded = checkpoints.restore_base_params(target(tied), tied_dir, config=tied)
  assert "logits_dense" not in loaded["decoder"]
