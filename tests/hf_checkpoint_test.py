"""Tests for flix.hf_checkpoint (HF mT5 weights <-> T5X params tree)."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

import conftest
from safetensors import numpy as safetensors_np

from flix import hf_checkpoint
from flix import t5x_checkpoint

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TINY_CKPT = os.path.join(
    _REPO, os.pardir, "shared", "testdata", "t5x_t5_1_1_tiny", "checkpoint_3"
)

# Tiny mT5 dims: V=64, d=16, H=4, k=4 (H*k=16), f=24, B=8 buckets.
_DIMS = dict(
    vocab_size=64,
    d_model=16,
    d_kv=4,
    d_ff=24,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)


def _expected_t5x_shapes(v, d, hk, f, h, b, num_enc, num_dec, untied=True):
  return conftest.t5x_shapes(v, d, hk, f, h, b, num_enc, num_dec, untied)


# ------------------------------------------------------------------------------
# Fixtures: a tiny random transformers mT5.
# ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
  pytest.importorskip("torch")
  return pytest.importorskip("transformers")


def _tiny_model(transformers, tie_word_embeddings=False, seed=0):
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  config = transformers.MT5Config(
      tie_word_embeddings=tie_word_embeddings, **_DIMS
  )
  model = transformers.MT5ForConditionalGeneration(config)
  if not tie_word_embeddings:
    # Like the released mT5 weights: an lm_head separate from the embedding.
    # (transformers >= 5 forces MT5Config.tie_word_embeddings=True, so untie
    # by hand; distinct values are then saved and loaded untied.)
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn(_DIMS["vocab_size"], _DIMS["d_model"])
    )
  model.eval()
  return model


@pytest.fixture(scope="module")
def saved_model(transformers, tmp_path_factory):
  model = _tiny_model(transformers)
  directory = str(tmp_path_factory.mktemp("hf_mt5"))
  model.save_pretrained(directory)
  return model, directory


def _torch_state_dict(model):
  return {
      k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()
  }


# ------------------------------------------------------------------------------
# With transformers.
# ------------------------------------------------------------------------------


def test_hf_to_t5x_names_and_shapes(saved_model):
  model, directory = saved_model
  state_dict = hf_checkpoint.read_hf_checkpoint(directory)
  assert all(v.dtype == np.float32 for v in state_dict.values())
  tree = hf_checkpoint.hf_to_t5x(state_dict)
  flat = t5x_checkpoint.flatten_params(tree)
  expected = _expected_t5x_shapes(
      v=64, d=16, hk=16, f=24, h=4, b=8, num_enc=2, num_dec=2
  )
  assert {k: v.shape for k, v in flat.items()} == expected

  torch_sd = _torch_state_dict(model)
  np.testing.assert_array_equal(
      flat["token_embedder/embedding"], torch_sd["shared.weight"]
  )
  np.testing.assert_array_equal(
      flat["encoder/layers_1/attention/query/kernel"],
      torch_sd["encoder.block.1.layer.0.SelfAttention.q.weight"].T,
  )
  np.testing.assert_array_equal(
      flat["decoder/layers_0/encoder_decoder_attention/out/kernel"],
      torch_sd["decoder.block.0.layer.1.EncDecAttention.o.weight"].T,
  )
  np.testing.assert_array_equal(
      flat["decoder/layers_1/mlp/wi_1/kernel"],
      torch_sd["decoder.block.1.layer.2.DenseReluDense.wi_1.weight"].T,
  )
  np.testing.assert_array_equal(
      flat["decoder/relpos_bias/rel_embedding"],
      torch_sd[
          "decoder.block.0.layer.0.SelfAttention.relative_attention_bias."
          "weight"
      ].T,
  )
  np.testing.assert_array_equal(
      flat["decoder/logits_dense/kernel"], torch_sd["lm_head.weight"].T
  )


def test_t5x_to_hf_inverts_hf_to_t5x(saved_model):
  _, directory = saved_model
  state_dict = hf_checkpoint.read_hf_checkpoint(directory)
  back = hf_checkpoint.t5x_to_hf(hf_checkpoint.hf_to_t5x(state_dict))
  assert back.keys() == state_dict.keys()
  for key, value in state_dict.items():
    assert back[key].flags.c_contiguous, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_config_dims(saved_model):
  _, directory = saved_model
  dims = hf_checkpoint.t5_config_from_hf(
      hf_checkpoint.read_hf_config(directory),
      hf_checkpoint.read_hf_weight_names(directory),
  )
  assert dims == {
      "vocab_size": 64,
      "emb_dim": 16,
      "num_heads": 4,
      "head_dim": 4,
      "mlp_dim": 24,
      "num_encoder_layers": 2,
      "num_decoder_layers": 2,
      "mlp_activations": ("gelu", "linear"),
      "relative_attention_num_buckets": 8,
      "relative_attention_max_distance": 16,
      "logits_via_embedding": False,
      "scale_decoder_outputs": False,
  }


@pytest.mark.parametrize("config_kind", ["dims", "hf"])
def test_write_hf_checkpoint_loads_in_transformers(
    saved_model, transformers, tmp_path, config_kind
):
  import torch  # pylint: disable=g-import-not-at-top

  model, directory = saved_model
  hf_config = hf_checkpoint.read_hf_config(directory)
  tree = hf_checkpoint.hf_to_t5x(hf_checkpoint.read_hf_checkpoint(directory))
  if config_kind == "dims":
    config = hf_checkpoint.t5_config_from_hf(
        hf_config, hf_checkpoint.read_hf_weight_names(directory)
    )
  else:
    config = hf_config
  out = str(tmp_path / "export")
  hf_checkpoint.write_hf_checkpoint(hf_checkpoint.t5x_to_hf(tree), config, out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]

  loaded = transformers.MT5ForConditionalGeneration.from_pretrained(out)
  loaded.eval()
  original_sd = _torch_state_dict(model)
  loaded_sd = _torch_state_dict(loaded)
  assert loaded_sd.keys() == original_sd.keys()
  for key, value in original_sd.items():
    np.testing.assert_array_equal(loaded_sd[key], value, err_msg=key)
  # lm_head stays untied from the embedding.
  assert not np.array_equal(
      loaded_sd["lm_head.weight"], loaded_sd["shared.weight"]
  )

  inputs = torch.tensor([[5, 9, 3, 1]])
  decoder_inputs = torch.tensor([[0, 7, 2]])
  with torch.no_grad():
    want = model(input_ids=inputs, decoder_input_ids=decoder_inputs).logits
    got = loaded(input_ids=inputs, decoder_input_ids=decoder_inputs).logits
  np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_pytorch_bin_with_tied_embedding_copies(saved_model, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top

  model, directory = saved_model
  torch.save(model.state_dict(), str(tmp_path / "pytorch_model.bin"))
  from_bin = hf_checkpoint.read_hf_checkpoint(str(tmp_path))
  # A raw state_dict has the tied embed_tokens copies; they are accepted.
  assert "encoder.embed_tokens.weight" in from_bin
  tree = hf_checkpoint.hf_to_t5x(from_bin)
  reference = hf_checkpoint.hf_to_t5x(
      hf_checkpoint.read_hf_checkpoint(directory)
  )
  a = t5x_checkpoint.flatten_params(tree)
  b = t5x_checkpoint.flatten_params(reference)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)

  bad = dict(from_bin)
  bad["decoder.embed_tokens.weight"] = bad["decoder.embed_tokens.weight"] + 1
  with pytest.raises(ValueError, match="differs from shared.weight"):
    hf_checkpoint.hf_to_t5x(bad)


def test_sharded_safetensors(saved_model, tmp_path):
  _, directory = saved_model
  state_dict = hf_checkpoint.read_hf_checkpoint(directory)
  keys = sorted(state_dict)
  shards = {
      "model-00001-of-00002.safetensors": keys[:20],
      "model-00002-of-00002.safetensors": keys[20:],
  }
  weight_map = {}
  for name, shard_keys in shards.items():
    safetensors_np.save_file(
        {k: state_dict[k] for k in shard_keys},
        str(tmp_path / name),
        metadata={"format": "pt"},
    )
    weight_map.update({k: name for k in shard_keys})
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map})
  )
  sharded = hf_checkpoint.read_hf_checkpoint(str(tmp_path))
  assert sharded.keys() == state_dict.keys()
  for k in keys:
    np.testing.assert_array_equal(sharded[k], state_dict[k])


def test_tied_model(transformers, tmp_path):
  """T5 v1.0-style tied lm_head: no decoder/logits_dense in the T5X tree."""
  model = _tiny_model(transformers, tie_word_embeddings=True)
  model.save_pretrained(str(tmp_path))
  state_dict = hf_checkpoint.read_hf_checkpoint(str(tmp_path))
  assert "lm_head.weight" not in state_dict
  tree = hf_checkpoint.hf_to_t5x(state_dict)
  assert "logits_dense" not in tree["decoder"]
  with pytest.raises(ValueError, match="lm_head.weight"):
    hf_checkpoint.hf_to_t5x(state_dict, tie_word_embeddings=False)
  back = hf_checkpoint.t5x_to_hf(tree)
  assert back.keys() == state_dict.keys()


# ------------------------------------------------------------------------------
# Without transformers.
# ------------------------------------------------------------------------------


def test_real_t5x_checkpoint_round_trips_through_hf_names():
  if not os.path.isfile(os.path.join(_TINY_CKPT, "checkpoint")):
    pytest.skip(
        "The tiny T5X test checkpoint (../shared/testdata) is not at"
        f" {os.path.normpath(_TINY_CKPT)}."
    )
  tree = t5x_checkpoint.read_t5x_checkpoint(_TINY_CKPT)
  state_dict = hf_checkpoint.t5x_to_hf(tree)
  assert len(state_dict) == len(t5x_checkpoint.flatten_params(tree))
  assert state_dict["shared.weight"].shape == (32128, 4)
  assert state_dict["lm_head.weight"].shape == (32128, 4)
  relpos = state_dict[
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
  ]
  np.testing.assert_array_equal(
      relpos, tree["encoder"]["relpos_bias"]["rel_embedding"].T
  )
  again = t5x_checkpoint.flatten_params(hf_checkpoint.hf_to_t5x(state_dict))
  flat = t5x_checkpoint.flatten_params(tree)
  assert again.keys() == flat.keys()
  for k in flat:
    np.testing.assert_array_equal(again[k], flat[k])


def _synthetic_state_dict():
  shapes = _expected_t5x_shapes(
      v=64, d=16, hk=16, f=24, h=4, b=8, num_enc=3, num_dec=1
  )
  rng = np.random.default_rng(0)
  flat = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  tree = t5x_checkpoint.unflatten_params(flat)
  return hf_checkpoint.t5x_to_hf(tree)


def test_layer_counts_are_detected():
  state_dict = _synthetic_state_dict()
  tree = hf_checkpoint.hf_to_t5x(state_dict)
  assert sorted(k for k in tree["encoder"] if k.startswith("layers_")) == [
      "layers_0",
      "layers_1",
      "layers_2",
  ]
  assert [k for k in tree["decoder"] if k.startswith("layers_")] == ["layers_0"]


def test_missing_and_unexpected_keys():
  state_dict = _synthetic_state_dict()
  del state_dict["encoder.block.1.layer.0.SelfAttention.k.weight"]
  state_dict["encoder.block.0.layer.0.adapter.weight"] = np.zeros(3)
  with pytest.raises(ValueError) as e:
    hf_checkpoint.hf_to_t5x(state_dict)
  message = str(e.value)
  assert "Missing keys: encoder.block.1.layer.0.SelfAttention.k.weight" in (
      message
  )
  assert "Unexpected keys: encoder.block.0.layer.0.adapter.weight" in message


def test_t5x_to_hf_rejects_extra_paths():
  tree = hf_checkpoint.hf_to_t5x(_synthetic_state_dict())
  tree["encoder"]["layers_0"]["attention"]["query"]["lora_a"] = np.zeros(3)
  with pytest.raises(ValueError, match="lora_a"):
    hf_checkpoint.t5x_to_hf(tree)


def test_bfloat16_safetensors_read_as_float32(tmp_path):
  state_dict = _synthetic_state_dict()
  safetensors_np.save_file(
      {k: v.astype(ml_dtypes.bfloat16) for k, v in state_dict.items()},
      str(tmp_path / "model.safetensors"),
      metadata={"format": "pt"},
  )
  read = hf_checkpoint.read_hf_checkpoint(str(tmp_path))
  for k, v in state_dict.items():
    assert read[k].dtype == np.float32
    np.testing.assert_array_equal(
        read[k], v.astype(ml_dtypes.bfloat16).astype(np.float32)
    )


def test_missing_directory():
  with pytest.raises(FileNotFoundError, match="No Hugging Face"):
    hf_checkpoint.read_hf_checkpoint("/nonexistent/mt5-small")
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_checkpoint.read_hf_config("/nonexistent/mt5-small")


def test_hf_config_round_trip():
  dims = {
      "vocab_size": 250112,
      "emb_dim": 512,
      "num_heads": 6,
      "head_dim": 64,
      "mlp_dim": 1024,
      "num_encoder_layers": 8,
      "num_decoder_layers": 8,
      "mlp_activations": ("gelu", "linear"),
      "relative_attention_num_buckets": 32,
      "relative_attention_max_distance": 128,
      "logits_via_embedding": False,
      "scale_decoder_outputs": False,
  }
  untied = {"shared.weight", "lm_head.weight"}
  hf_config = hf_checkpoint.hf_config_from_t5_config(dims)
  assert hf_config["feed_forward_proj"] == "gated-gelu"
  assert hf_config["tie_word_embeddings"] is False
  assert hf_config["model_type"] == "mt5"
  assert hf_checkpoint.t5_config_from_hf(hf_config, untied) == dims
  assert hf_checkpoint.t5_config_from_hf(
      {**hf_config, "feed_forward_proj": "relu", "num_decoder_layers": None},
      untied,
  ) == {**dims, "mlp_activations": ("relu",)}
  # Tied forms: transformers' MT5 does not rescale, only its T5 can.
  for rescaled in (False, True):
    tied = {**dims, "logits_via_embedding": True}
    tied["scale_decoder_outputs"] = rescaled
    hf_config = hf_checkpoint.hf_config_from_t5_config(tied)
    assert hf_config["model_type"] == ("t5" if rescaled else "mt5")
    assert hf_checkpoint.t5_config_from_hf(hf_config, {"shared.weight"}) == (
        tied
    )


def test_logits_form_follows_transformers_config_rules(transformers):
  """Rescaled exactly when transformers' configs say so (its T5 only)."""
  for model_type, extra in (
      ("mt5", {}),
      ("mt5", {"tie_word_embeddings": False}),
      ("t5", {}),
      ("t5", {"tie_word_embeddings": False}),
      ("t5", {"tie_word_embeddings": True, "scale_decoder_outputs": False}),
      ("t5", {"tie_word_embeddings": False, "scale_decoder_outputs": True}),
  ):
    config = {"model_type": model_type, **extra}
    form = hf_checkpoint.logits_form(config, {"shared.weight"})
    loaded = transformers.AutoConfig.for_model(model_type, **extra)
    assert form["scale_decoder_outputs"] == bool(
        getattr(loaded, "scale_decoder_outputs", False)
    ), config
  with pytest.raises(ValueError, match="model_type 'umt5' is not supported"):
    hf_checkpoint.logits_form({"model_type": "umt5"}, ())
