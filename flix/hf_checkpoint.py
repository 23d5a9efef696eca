"""Converts Hugging Face mT5 / T5 v1.1 weights to and from the T5X tree.

HF PyTorch checkpoints (`google/mt5-*`, `google/t5-v1_1-*`) store
`nn.Linear.weight` as [out, in]; T5X kernels are [in, out], so every dense
weight is transposed. The name mapping (d = emb_dim, H = num_heads, k =
head_dim, f = mlp_dim, V = vocab_size, B = relative attention buckets):

  T5X path                                         HF key (op)
  token_embedder/embedding (V, d)                  shared.weight
  encoder/relpos_bias/rel_embedding (H, B)         encoder.block.0.layer.0.
                                                     SelfAttention.relative_
                                                     attention_bias.weight (T)
  encoder/layers_i/pre_attention_layer_norm/scale  encoder.block.i.layer.0.
                                                     layer_norm.weight
  encoder/layers_i/attention/{query,key,value,out}/kernel
                                                   encoder.block.i.layer.0.
                                                     SelfAttention.{q,k,v,o}.
                                                     weight (T)
  encoder/layers_i/pre_mlp_layer_norm/scale        encoder.block.i.layer.1.
                                                     layer_norm.weight
  encoder/layers_i/mlp/{wi_0,wi_1,wo}/kernel       encoder.block.i.layer.1.
                                                     DenseReluDense.{...}.
                                                     weight (T)
  encoder/encoder_norm/scale                       encoder.final_layer_norm.
                                                     weight
  decoder/...: the same with self_attention (layer.0), encoder_decoder_
  attention (layer.1, `EncDecAttention`), mlp (layer.2), decoder_norm, and
  decoder/logits_dense/kernel (d, V)               lm_head.weight (V, d) (T)

Joined q/k/v/o layouts are heads-major in both, so no head permutation is
needed. Non-gated MLPs (T5 v1.0) use `wi` on both sides.

`encoder.embed_tokens.weight` / `decoder.embed_tokens.weight` are tied copies
of `shared.weight`; `save_pretrained` omits them (checked with transformers
5.24), so `t5x_to_hf` does not emit them and `hf_to_t5x` accepts them when
they equal `shared.weight`.

The output projection comes in three forms; the checkpoint decides which
(`logits_form`, checked against transformers 5.24's logits):

  form                     checkpoint                    flix network
  released mT5, T5 v1.1    lm_head.weight present        untied
  transformers-5 MT5       no lm_head.weight (MT5Config  tied, not rescaled
                           forces tie_word_embeddings)
  T5 v1.0 (model_type t5)  no lm_head.weight             tied, rescaled

Tied means no `decoder/logits_dense` in the T5X tree (T5X's
`logits_via_embedding=True`). Rescaled means the decoder output times
d**-0.5 before the projection (`T5Config.scale_decoder_outputs`): MT5's
forward never does it; T5's does when `config.scale_decoder_outputs` is true,
or, for configs without that key, when `tie_word_embeddings` is not false.
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
from flax import traverse_util
import safetensors
from safetensors import numpy as safetensors_np

PyTree = Any
Params = dict[str, Any]
StateDict = dict[str, np.ndarray]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PYTORCH_FILE = "pytorch_model.bin"
PYTORCH_INDEX_FILE = "pytorch_model.bin.index.json"
CONFIG_FILE = "config.json"

# Keys HF itself ignores when loading (stale in some old T5 checkpoints).
_IGNORED_HF_KEYS = frozenset(
    {"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
)
_TIED_EMBEDDING_KEYS = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
)
_ATTENTION_NAMES = (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))

# HF `feed_forward_proj` activation name -> T5X activation name. HF maps
# 'gated-gelu' to gelu_new (tanh approximation) = T5X's 'gelu'.
_HF_TO_T5X_ACTIVATION = {
    "gelu": "gelu",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
_T5X_TO_HF_PROJ = {
    ("gelu", "linear"): "gated-gelu",
    ("relu", "linear"): "gated-relu",
    ("silu", "linear"): "gated-silu",
    ("relu",): "relu",
    ("gelu",): "gelu",
}


# ------------------------------------------------------------------------------
# Name mapping.
# ------------------------------------------------------------------------------


def _mapping(
    num_encoder_layers: int,
    num_decoder_layers: int,
    gated: bool,
    with_lm_head: bool,
) -> Iterator[tuple[tuple[str, ...], str, bool]]:
  """Yields (T5X path, HF key, transpose) for every parameter."""
  mlp = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
  yield ("token_embedder", "embedding"), "shared.weight", False
  for stack, n, norm in (
      ("encoder", num_encoder_layers, "encoder_norm"),
      ("decoder", num_decoder_layers, "decoder_norm"),
  ):
    yield (
        (stack, "relpos_bias", "rel_embedding"),
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias."
        "weight",
        True,
    )
    for i in range(n):
      block = f"{stack}.block.{i}.layer"
      layer = f"layers_{i}"
      if stack == "encoder":
        sublayers = (
            ("pre_attention_layer_norm", "attention", "SelfAttention"),
            ("pre_mlp_layer_norm", None, None),
        )
      else:
        sublayers = (
            (
                "pre_self_attention_layer_norm",
                "self_attention",
                "SelfAttention",
            ),
            (
                "pre_cross_attention_layer_norm",
                "encoder_decoder_attention",
                "EncDecAttention",
            ),
            ("pre_mlp_layer_norm", None, None),
        )
      for j, (norm_name, t5x_attn, hf_attn) in enumerate(sublayers):
        yield (
            (stack, layer, norm_name, "scale"),
            f"{block}.{j}.layer_norm.weight",
            False,
        )
        if t5x_attn is None:
          for name in mlp:
            yield (
                (stack, layer, "mlp", name, "kernel"),
                f"{block}.{j}.DenseReluDense.{name}.weight",
                True,
            )
        else:
          for t5x_name, hf_name in _ATTENTION_NAMES:
            yield (
                (stack, layer, t5x_attn, t5x_name, "kernel"),
                f"{block}.{j}.{hf_attn}.{hf_name}.weight",
                True,
            )
    yield (stack, norm, "scale"), f"{stack}.final_layer_norm.weight", False
  if with_lm_head:
    yield ("decoder", "logits_dense", "kernel"), "lm_head.weight", True


def hf_module_path(layer: Sequence[str]) -> str:
  """The HF MT5 module of a T5X dense layer, from the one name mapping.

  `('encoder', 'layers_3', 'attention', 'query')` ->
  `'encoder.block.3.layer.0.SelfAttention.q'`; `decoder/logits_dense` ->
  `'lm_head'`.
  """
  layer = tuple(layer)
  match = re.fullmatch(r"layers_(\d+)", layer[1]) if len(layer) > 1 else None
  num_layers = int(match.group(1)) + 1 if match else 0
  path = layer + ("kernel",)
  for gated in (True, False):
    for t5x_path, hf_key, _ in _mapping(num_layers, num_layers, gated, True):
      if t5x_path == path:
        return hf_key[: -len(".weight")]
  raise ValueError(f"No HF MT5 module for the T5X layer {'/'.join(layer)}.")


def _num_layers(keys: Any, pattern: str) -> int:
  """1 + the largest layer index matched by `pattern` (group 1), else 0."""
  indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  return max(indices) + 1 if indices else 0


def _format_keys(keys: list[str], limit: int = 5) -> str:
  shown = ", ".join(sorted(keys)[:limit])
  return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def hf_to_t5x(
    state_dict: Mapping[str, Any], tie_word_embeddings: Optional[bool] = None
) -> Params:
  """Converts an HF (m)T5 PyTorch-layout state dict to the T5X params tree.

  Args:
    state_dict: HF key -> array (numpy or anything `np.asarray` accepts).
      Linear weights are [out, in]; the relpos tables [B, H].
    tie_word_embeddings: whether the output projection is the embedding.
      None infers it (tied iff `lm_head.weight` is absent); False (mT5, T5
      v1.1) requires `lm_head.weight`; True drops it (it must then equal
      `shared.weight`).

  Returns:
    Nested T5X tree of numpy arrays (e.g. `encoder/layers_0/attention/query/
    kernel` of shape [d, H*k]); `decoder/logits_dense/kernel` [d, V] is
    present iff the embeddings are untied.

  Raises:
    ValueError: listing a few missing and unexpected keys, or if the tied
      embedding copies differ from `shared.weight`.
  """
  keys = set(state_dict)
  num_enc = _num_layers(keys, r"encoder\.block\.(\d+)\.")
  num_dec = _num_layers(keys, r"decoder\.block\.(\d+)\.")
  gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in keys
  if tie_word_embeddings is None:
    tie_word_embeddings = "lm_head.weight" not in keys
  mapping = list(_mapping(num_enc, num_dec, gated, not tie_word_embeddings))

  missing = [hf_key for _, hf_key, _ in mapping if hf_key not in keys]
  optional = set(_IGNORED_HF_KEYS) | set(_TIED_EMBEDDING_KEYS)
  if tie_word_embeddings:
    optional.add("lm_head.weight")
  known = {hf_key for _, hf_key, _ in mapping} | optional
  unexpected = [k for k in keys if k not in known]
  if missing or unexpected or not num_enc or not num_dec:
    raise ValueError(
        "State dict is not an HF (m)T5 encoder-decoder checkpoint "
        f"({num_enc} encoder / {num_dec} decoder blocks found, "
        f"{'gated' if gated else 'non-gated'} MLP). Missing keys: "
        f"{_format_keys(missing) or 'none'}. Unexpected keys: "
        f"{_format_keys(unexpected) or 'none'}."
    )

  shared = np.asarray(state_dict["shared.weight"])
  tied_copies = _TIED_EMBEDDING_KEYS + (
      ("lm_head.weight",) if tie_word_embeddings else ()
  )
  for key in tied_copies:
    if key in keys and not np.array_equal(np.asarray(state_dict[key]), shared):
      raise ValueError(f"{key} differs from shared.weight; T5X ties them.")

  flat = {}
  for path, hf_key, transpose in mapping:
    value = np.asarray(state_dict[hf_key])
    flat[path] = np.ascontiguousarray(value.T) if transpose else value
  return traverse_util.unflatten_dict(flat)


def t5x_to_hf(tree: Mapping[str, Any]) -> StateDict:
  """Converts a T5X (m)T5 params tree to HF PyTorch-layout arrays.

  The inverse of `hf_to_t5x`; emits the keys `save_pretrained` writes:
  `shared.weight` but no `{encoder,decoder}.embed_tokens.weight` copies, and
  `lm_head.weight` iff the tree has `decoder/logits_dense/kernel`.

  Args:
    tree: nested T5X params (numpy or jax arrays); extra entries (e.g. LoRA
      adapters) are not allowed: merge them first.

  Returns:
    HF key -> C-contiguous numpy array, Linear weights as [out, in].

  Raises:
    ValueError: naming missing or unexpected T5X paths.
  """
  flat = {}

  def _walk(node: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
    for key, value in node.items():
      if isinstance(value, Mapping):
        _walk(value, prefix + (key,))
      else:
        flat[prefix + (key,)] = value

  _walk(tree, ())
  encoder_paths = [p[1] for p in flat if p[0] == "encoder"]
  decoder_paths = [p[1] for p in flat if p[0] == "decoder"]
  num_enc = _num_layers(encoder_paths, r"layers_(\d+)$")
  num_dec = _num_layers(decoder_paths, r"layers_(\d+)$")
  gated = ("encoder", "layers_0", "mlp", "wi_0", "kernel") in flat
  with_lm_head = ("decoder", "logits_dense", "kernel") in flat
  mapping = list(_mapping(num_enc, num_dec, gated, with_lm_head))

  missing = ["/".join(p) for p, _, _ in mapping if p not in flat]
  unexpected = ["/".join(p) for p in set(flat) - {p for p, _, _ in mapping}]
  if missing or unexpected:
    raise ValueError(
        "Tree is not a T5X (m)T5 params tree. Missing paths: "
        f"{_format_keys(missing) or 'none'}. Unexpected paths: "
        f"{_format_keys(unexpected) or 'none'}."
    )
  state_dict = {}
  for path, hf_key, transpose in mapping:
    value = np.asarray(flat[path])
    state_dict[hf_key] = np.ascontiguousarray(value.T if transpose else value)
  return state_dict


# ------------------------------------------------------------------------------
# Reading HF checkpoints.
# ------------------------------------------------------------------------------


def _to_float32(array: np.ndarray) -> np.ndarray:
  if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16":
    return array.astype(np.float32, copy=False)
  return array


def _read_safetensors(path: str) -> StateDict:
  return {k: _to_float32(v) for k, v in safetensors_np.load_file(path).items()}


def _read_pytorch_bin(path: str) -> StateDict:
  """Reads a `torch.save`d state dict (needs torch; weights only)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"Reading {path!r} needs PyTorch, which is not installed. Install the "
        "CPU build (e.g. `pip install torch==2.13.0`) or convert the "
        "checkpoint to safetensors."
    ) from e
  loaded = torch.load(path, map_location="cpu", weights_only=True)
  state_dict = {}
  for key, value in loaded.items():
    if value.is_floating_point():
      value = value.to(torch.float32)
    state_dict[key] = value.detach().numpy()
  return state_dict


def _read_index(directory: str, index_file: str, reader: Any) -> StateDict:
  with open(os.path.join(directory, index_file)) as f:
    weight_map = json.load(f)["weight_map"]
  state_dict = {}
  for shard in sorted(set(weight_map.values())):
    state_dict.update(reader(os.path.join(directory, shard)))
  return state_dict


def read_hf_checkpoint(directory: str) -> StateDict:
  """Reads HF PyTorch-layout weights as float32 numpy arrays.

  Looks, in order, for `model.safetensors`, `model.safetensors.index.json`
  (sharded safetensors), `pytorch_model.bin`, `pytorch_model.bin.index.json`.
  A path to a single `.safetensors` / `.bin` file is accepted too.

  Args:
    directory: a `save_pretrained` / hub snapshot directory.

  Returns:
    HF key -> numpy array; floating-point weights (bf16/fp16 too) as float32.

  Raises:
    FileNotFoundError: if no supported weights file is found.
    ImportError: for `.bin` files when torch is not installed.
  """
  directory = os.fspath(directory)
  if os.path.isfile(directory):
    if directory.endswith(".safetensors"):
      return _read_safetensors(directory)
    return _read_pytorch_bin(directory)
  candidates = (
      (SAFETENSORS_FILE, _read_safetensors),
      (
          SAFETENSORS_INDEX_FILE,
          lambda p: _read_index(
              directory, SAFETENSORS_INDEX_FILE, _read_safetensors
          ),
      ),
      (PYTORCH_FILE, _read_pytorch_bin),
      (
          PYTORCH_INDEX_FILE,
          lambda p: _read_index(
              directory, PYTORCH_INDEX_FILE, _read_pytorch_bin
          ),
      ),
  )
  for name, reader in candidates:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return reader(path)
  found = sorted(os.listdir(directory)) if os.path.isdir(directory) else None
  raise FileNotFoundError(
      f"No Hugging Face PyTorch weights in {directory!r} "
      + (
          f"(it contains {found[:10]})"
          if found is not None
          else "(no such directory)"
      )
      + f"; expected one of {[name for name, _ in candidates]}. Flax "
      "(flax_model.msgpack) and TF (tf_model.h5) weights are not supported."
  )


def read_hf_weight_names(directory: str) -> set[str]:
  """The keys of an HF checkpoint, reading no tensor for safetensors."""
  directory = os.fspath(directory)
  for index_file in (SAFETENSORS_INDEX_FILE, PYTORCH_INDEX_FILE):
    path = os.path.join(directory, index_file)
    if os.path.isfile(path):
      with open(path) as f:
        return set(json.load(f)["weight_map"])
  path = os.path.join(directory, SAFETENSORS_FILE)
  if os.path.isfile(path):
    with safetensors.safe_open(path, framework="np") as f:
      return set(f.keys())
  return set(read_hf_checkpoint(directory))


def read_hf_config(directory: str) -> dict[str, Any]:
  """Returns the parsed `config.json` of an HF model directory."""
  path = os.path.join(os.fspath(directory), CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No {CONFIG_FILE} in {directory!r}: expected an "
        "HF model directory written by save_pretrained."
    )
  with open(path) as f:
    return json.load(f)


def _mlp_activations(config: Mapping[str, Any]) -> tuple[str, ...]:
  proj = config.get("feed_forward_proj", "relu")
  parts = proj.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise ValueError(f"Unsupported feed_forward_proj {proj!r}.")
  activation = _HF_TO_T5X_ACTIVATION.get(parts[-1])
  if activation is None:
    raise ValueError(
        f"Unsupported activation {parts[-1]!r} in "
        f"feed_forward_proj {proj!r}; supported: "
        f"{sorted(_HF_TO_T5X_ACTIVATION)}."
    )
  return (activation, "linear") if len(parts) == 2 else (activation,)


SUPPORTED_MODEL_TYPES = ("mt5", "t5")


def logits_form(
    config: Mapping[str, Any], weight_names: Iterable[str]
) -> dict[str, bool]:
  """How an HF checkpoint computes its logits (see the module docstring).

  Args:
    config: HF config dict (`read_hf_config`).
    weight_names: the checkpoint's keys (`read_hf_weight_names`).

  Returns:
    `{'logits_via_embedding': tied, 'scale_decoder_outputs': rescaled}`.

  Raises:
    ValueError: for a model type other than mt5 and t5.
  """
  model_type = config.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
        f"HF config model_type {model_type!r} is not supported: flix "
        f"imports {' and '.join(SUPPORTED_MODEL_TYPES)} checkpoints (umT5, "
        "for one, has a position bias per layer)."
    )
  if model_type == "mt5":
    rescaled = False
  elif "scale_decoder_outputs" in config:
    rescaled = bool(config["scale_decoder_outputs"])
  else:  # Configs from before transformers 5 say it with the tie flag.
    rescaled = config.get("tie_word_embeddings") is not False
  return {
      "logits_via_embedding": "lm_head.weight" not in set(weight_names),
      "scale_decoder_outputs": rescaled,
  }


def t5_config_from_hf(
    config: Mapping[str, Any], weight_names: Iterable[str]
) -> dict[str, Any]:
  """Maps an HF (m)T5 checkpoint to our network config fields.

  Args:
    config: HF config dict (`read_hf_config`).
    weight_names: the checkpoint's keys (`read_hf_weight_names`); they decide
      tied vs untied (transformers 5 writes `tie_word_embeddings: true` for
      every MT5, untied or not).

  Returns:
    `{'vocab_size', 'emb_dim', 'num_heads', 'head_dim', 'mlp_dim',
    'num_encoder_layers', 'num_decoder_layers', 'mlp_activations',
    'relative_attention_num_buckets', 'relative_attention_max_distance',
    'logits_via_embedding', 'scale_decoder_outputs'}`, `T5Config` keyword
    arguments; `mlp_activations` is `('gelu', 'linear')` for 'gated-gelu'
    (HF's gelu_new equals T5X's tanh-approximate gelu). Note HF's non-gated
    'gelu' is the exact erf GELU, which maps to T5X 'gelu' only
    approximately.
  """
  num_layers = int(config.get("num_layers", 8))
  num_decoder_layers = config.get("num_decoder_layers")
  return {
      "vocab_size": int(config["vocab_size"]),
      "emb_dim": int(config["d_model"]),
      "num_heads": int(config["num_heads"]),
      "head_dim": int(config["d_kv"]),
      "mlp_dim": int(config["d_ff"]),
      "num_encoder_layers": num_layers,
      "num_decoder_layers": int(
          num_decoder_layers if num_decoder_layers is not None else num_layers
      ),
      "mlp_activations": _mlp_activations(config),
      "relative_attention_num_buckets": int(
          config.get("relative_attention_num_buckets", 32)
      ),
      "relative_attention_max_distance": int(
          config.get("relative_attention_max_distance", 128)
      ),
      **logits_form(config, weight_names),
  }


def check_network_config(directory: str, network_config: Any) -> None:
  """Raises unless `network_config` computes the HF checkpoint's model.

  Args:
    directory: an HF model directory.
    network_config: a `t5_config.T5Config`.

  Raises:
    ValueError: naming every field on which checkpoint and network differ.
  """
  expected = t5_config_from_hf(
      read_hf_config(directory), read_hf_weight_names(directory)
  )
  actual = {name: getattr(network_config, name) for name in expected}
  actual["scale_decoder_outputs"] = network_config.rescales_logits
  actual["mlp_activations"] = tuple(actual["mlp_activations"])
  differences = [
      f"{name}: checkpoint {expected[name]!r} vs network {actual[name]!r}"
      for name in expected
      if expected[name] != actual[name]
  ]
  if differences:
    raise ValueError(
        f"The Hugging Face checkpoint {directory} is not the configured "
        f"network: {'; '.join(differences)}. Set these in the model gin "
        "(e.g. --gin.network.preset.emb_dim=512)."
    )


def hf_config_from_t5_config(
    dims: Mapping[str, Any], **overrides: Any
) -> dict[str, Any]:
  """Builds an HF `MT5Config`-style dict from our network dims.

  The inverse of `t5_config_from_hf`: model_type 'mt5', or 't5' with
  `scale_decoder_outputs` when the logits are rescaled (only transformers'
  T5 rescales); `tie_word_embeddings` from `logits_via_embedding`; mT5
  defaults for everything else (pad 0, eos 1, decoder start 0, eps 1e-6).

  Args:
    dims: output of `t5_config_from_hf` (or the same keys).
    **overrides: extra/overriding HF config entries.

  Returns:
    A JSON-serialisable HF config dict.
  """
  activations = tuple(dims.get("mlp_activations", ("gelu", "linear")))
  if activations not in _T5X_TO_HF_PROJ:
    raise ValueError(
        f"No HF feed_forward_proj for mlp_activations "
        f"{activations}; supported: {sorted(_T5X_TO_HF_PROJ)}."
    )
  tied = bool(dims.get("logits_via_embedding", False))
  rescaled = dims.get("scale_decoder_outputs")
  rescaled = tied if rescaled is None else bool(rescaled)
  # Only transformers' T5 rescales; MT5 is the mT5 default.
  model_type = "t5" if rescaled else "mt5"
  config = {
      "architectures": [f"{model_type.upper()}ForConditionalGeneration"],
      "model_type": model_type,
      "vocab_size": int(dims["vocab_size"]),
      "d_model": int(dims["emb_dim"]),
      "d_kv": int(dims["head_dim"]),
      "d_ff": int(dims["mlp_dim"]),
      "num_heads": int(dims["num_heads"]),
      "num_layers": int(dims["num_encoder_layers"]),
      "num_decoder_layers": int(dims["num_decoder_layers"]),
      "relative_attention_num_buckets": int(
          dims.get("relative_attention_num_buckets", 32)
      ),
      "relative_attention_max_distance": int(
          dims.get("relative_attention_max_distance", 128)
      ),
      "feed_forward_proj": _T5X_TO_HF_PROJ[activations],
      "dropout_rate": 0.1,
      "layer_norm_epsilon": 1e-6,
      "initializer_factor": 1.0,
      "is_encoder_decoder": True,
      "tie_word_embeddings": tied,
      "use_cache": True,
      "pad_token_id": 0,
      "eos_token_id": 1,
      "decoder_start_token_id": 0,
      "tokenizer_class": "T5Tokenizer",
  }
  if rescaled:
    config["scale_decoder_outputs"] = True
  config.update(overrides)
  return config


def write_hf_checkpoint(
    state_dict: Mapping[str, Any], config: Mapping[str, Any], directory: str
) -> None:
  """Writes `model.safetensors` + `config.json` for `from_pretrained`.

  Args:
    state_dict: HF key -> array (e.g. from `t5x_to_hf`). Tied embedding
      copies (`{encoder,decoder}.embed_tokens.weight`) are dropped, as
      `save_pretrained` does.
    config: either an HF config dict (has 'd_model'), or our network dims
      (has 'emb_dim', see `t5_config_from_hf`), converted with
      `hf_config_from_t5_config`. `tie_word_embeddings` is set from whether
      `lm_head.weight` is present when the config does not say.
    directory: output directory (created if needed; files are overwritten).

  Raises:
    ValueError: if `shared.weight` is missing or disagrees with the config.
  """
  if "emb_dim" in config:
    hf_config = hf_config_from_t5_config(config)
  else:
    hf_config = dict(config)
    hf_config.setdefault("model_type", "mt5")
    hf_config.setdefault("architectures", ["MT5ForConditionalGeneration"])
  hf_config.setdefault(
      "tie_word_embeddings", "lm_head.weight" not in state_dict
  )
  if "shared.weight" not in state_dict:
    raise ValueError("state_dict has no shared.weight.")
  expected = (hf_config["vocab_size"], hf_config["d_model"])
  if tuple(np.shape(state_dict["shared.weight"])) != expected:
    raise ValueError(
        f"shared.weight has shape "
        f"{np.shape(state_dict['shared.weight'])}, config says "
        f"(vocab_size, d_model) = {expected}."
    )
  tensors = collections.OrderedDict(
      (k, np.ascontiguousarray(np.asarray(v)))
      for k, v in state_dict.items()
      if k not in _TIED_EMBEDDING_KEYS
  )
  os.makedirs(directory, exist_ok=True)
  safetensors_np.save_file(
      tensors,
      os.path.join(directory, SAFETENSORS_FILE),
      metadata={"format": "pt"},
  )
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
    f.write("\n")
