"""Exports one feature set of a FLix model: merged weights or one PEFT LoRA.

FLix (arXiv 2402.17934) gives an example with features F (at most one value
per group) the update, in every adapted layer with kernel W0 [D, O],

    dW = sum_{(g, v) in F} s_{g,v} A[g, v][:, :r_v] B[g, v][:r_v]     [D, O]

with r_v the value's rank and s_{g,v} = alpha_g / r_v (alpha_g / sqrt(r_v)
with rsLoRA; alpha_g defaults to the group's rank), exactly as
`features.FeatureSpace.scale_table` and `layers.flix_delta` use them. Any
feature set, including a (task, language) pair never seen together in
training, can therefore be served without FLix code, in two exact ways:

  merge_features  W' = W0 + dW in float32: a plain mT5 params tree (T5X names,
                  no adapter leaves), written as a T5X or Hugging Face model.
  peft_adapter    A_cat = [s_1 A_1 | s_2 A_2 | ...] [D, K] and
                  B_cat = [B_1; B_2; ...] [K, O], so A_cat B_cat = dW: one
                  standard PEFT LoRA of rank K = sum of the set's ranks, with
                  lora_alpha = K (PEFT's scaling alpha / r is 1). This is
                  PEFT's `add_weighted_adapter(combination_type="cat")`.

Groups missing from the feature set get their default value (plain LoRA's
always-on adapter), as `FeatureSpace.encode` does; otherwise no adapter.

Command line (the gin files give the network sizes, as for flix.eval):

  python -m flix.export --checkpoint=/tmp/flix_demo/flix \\
      --gin_file=configs/demo_eval.gin --features=task=ordinal,language=fr \\
      --format=peft --output=/tmp/ordinal_fr --base_output=/tmp/base_hf

Exports are per layer (T5X / HF names) whether or not the network scans its
layers: the functions below take params in either layout
(`layer_layout.unstack_layers`).

Dimension key: D d_in, O d_out, V values of a group, R a group's max rank,
K total rank of the feature set in one layer.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import sys
from typing import Any, Mapping, Optional, Sequence

from absl import flags
import numpy as np
from flax import traverse_util
from safetensors import numpy as safetensors_np

from flix import checkpoints
from flix import features as features_lib
from flix import gin_utils
from flix import hf_checkpoint
from flix import layer_layout
from flix import models
from flix import network
from flix import t5x_checkpoint

PyTree = Any
Params = dict[str, Any]
StateDict = dict[str, np.ndarray]

FORMATS = ("peft", "hf", "t5x")
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
EXPORT_INFO_FILE = "flix_export.json"

_ADAPTER_LEAF_RE = re.compile(r"^lora_([ab])_(.+)$")
_T5X_TO_HF_ATTENTION = {"query": "q", "key": "k", "value": "v", "out": "o"}
# (stack, T5X sublayer) -> (HF layer index, HF module).
_HF_SUBLAYERS = {
    ("encoder", "attention"): (0, "SelfAttention"),
    ("encoder", "mlp"): (1, "DenseReluDense"),
    ("decoder", "self_attention"): (0, "SelfAttention"),
    ("decoder", "encoder_decoder_attention"): (1, "EncDecAttention"),
    ("decoder", "mlp"): (2, "DenseReluDense"),
}


# ---- Feature sets ----


def parse_features(text: str) -> dict[str, str]:
  """Parses `task=ordinal,language=fr` into `{'task': 'ordinal', ...}`."""
  out = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    group, sep, value = item.partition("=")
    if not sep or not group.strip() or not value.strip():
      raise ValueError(
          f"Bad feature {item!r} in {text!r}: expected "
          "group=value pairs, e.g. task=ordinal,language=fr."
      )
    if group.strip() in out:
      raise ValueError(
          f"Feature group {group.strip()!r} given twice in " f"{text!r}."
      )
    out[group.strip()] = value.strip()
  return out


def resolve_features(
    feature_space: features_lib.FeatureSpace,
    features: Mapping[str, Optional[str]],
) -> list[tuple[features_lib.FeatureGroup, str]]:
  """The (group, value) pairs whose adapters a feature set applies.

  Args:
    feature_space: the model's feature space.
    features: `{group: value}`; a missing group (or a None / empty value)
      gets the group's default, usually none.

  Returns:
    (group, value) pairs in the space's group order.

  Raises:
    ValueError: for a group the space does not have, or a value its group
      does not know; the message lists the known groups or values.
  """
  unknown = [g for g in features if g not in feature_space.group_names]
  if unknown:
    raise ValueError(
        f"Unknown feature group {unknown[0]!r}; the model's groups are: "
        f"{', '.join(feature_space.group_names)}."
    )
  pairs = []
  for group in feature_space.groups:
    value = features.get(group.name)
    if value is None or value == "":
      value = group.default
    if value is None:
      continue
    if value not in group.values:
      raise ValueError(
          f"Unknown {group.name} value {value!r}: the model has no adapter "
          f"for it. Known {group.name} values: {', '.join(group.values)}."
      )
    pairs.append((group, value))
  return pairs


# ---- Adapter arithmetic ----


def _adapted_layers(
    flat: Mapping[tuple[str, ...], Any],
    feature_space: features_lib.FeatureSpace,
) -> dict[tuple[str, ...], set[str]]:
  """Layer path -> names of the groups with adapters there."""
  layers = collections.defaultdict(set)
  for path in flat:
    match = _ADAPTER_LEAF_RE.match(path[-1])
    if match:
      group = match.group(2)
      if group not in feature_space.group_names:
        raise ValueError(
            f"{'/'.join(path)} is an adapter of group {group!r}, which the "
            f"feature space (groups {feature_space.group_names}) does not "
            "have: params and feature space are from different models."
        )
      layers[path[:-1]].add(group)
  return dict(layers)


def _feature_factors(
    flat,
    layer: tuple[str, ...],
    group,
    value: str,
    feature_space: features_lib.FeatureSpace,
):
  """(s * A[:, :r] [D, r], B[:r] [r, O]) of one feature in one layer, f32."""
  index, rank = group.index(value), group.rank_of(value)
  scale = feature_space.scale(group, rank)
  a = np.asarray(flat[layer + (f"lora_a_{group.name}",)], np.float32)
  b = np.asarray(flat[layer + (f"lora_b_{group.name}",)], np.float32)
  expected = (group.num_values, group.max_rank)
  if (
      a.ndim != 3
      or b.ndim != 3
      or (a.shape[0], a.shape[2]) != expected
      or b.shape[:2] != expected
  ):
    raise ValueError(
        f"{'/'.join(layer)}: adapters of group {group.name!r} have shapes "
        f"{a.shape} / {b.shape}; the feature space expects [V, D, R] / "
        f"[V, R, O] with (V, R) = {expected}."
    )
  return np.float32(scale) * a[index, :, :rank], b[index, :rank, :]


def _layer_factors(
    params: PyTree,
    feature_space: features_lib.FeatureSpace,
    features: Mapping[str, Optional[str]],
):
  """Flat params and, per adapted layer, the set's (s A, B) factor pairs."""
  pairs = resolve_features(feature_space, features)
  flat = traverse_util.flatten_dict(layer_layout.unstack_layers(params))
  factors = {}
  for layer, groups in _adapted_layers(flat, feature_space).items():
    if layer + ("kernel",) not in flat:
      raise ValueError(f"{'/'.join(layer)} has adapters but no kernel.")
    factors[layer] = [
        _feature_factors(flat, layer, group, value, feature_space)
        for group, value in pairs
        if group.name in groups
    ]
  return flat, factors


def base_params(params: PyTree) -> Params:
  """The params without adapter leaves (the frozen base model)."""
  return traverse_util.unflatten_dict(
      {
          path: np.asarray(value)
          for path, value in traverse_util.flatten_dict(
              layer_layout.unstack_layers(params)
          ).items()
          if not _ADAPTER_LEAF_RE.match(path[-1])
      }
  )


def merge_features(
    params: PyTree,
    feature_space: features_lib.FeatureSpace,
    features: Mapping[str, Optional[str]],
) -> Params:
  """Folds a feature set's adapters into the kernels: a plain base model.

  W' = W0 + sum_{(g, v)} s_{g,v} A[g, v][:, :r_v] @ B[g, v][:r_v], computed in
  float32 and cast back to the kernel's dtype, for every adapted layer.

  Args:
    params: a FLix params tree (`kernel` with `lora_a_<g>` [V, D, R] and
      `lora_b_<g>` [V, R, O] beside it), numpy or jax arrays.
    feature_space: the space the adapters were trained with.
    features: `{group: value}`, e.g. `{'task': 'ordinal', 'language': 'fr'}`.

  Returns:
    Nested numpy params with the same names, without any `lora_*` leaf.

  Raises:
    ValueError: for an unknown group or value (listing the known ones), or
      adapters that do not fit the feature space.
  """
  flat, factors = _layer_factors(params, feature_space, features)
  merged = {}
  for path, value in flat.items():
    if _ADAPTER_LEAF_RE.match(path[-1]):
      continue
    value = np.asarray(value)
    if path[-1] == "kernel" and factors.get(path[:-1]):
      delta = sum(a @ b for a, b in factors[path[:-1]])
      value = (value.astype(np.float32) + delta).astype(value.dtype)
    merged[path] = value
  return traverse_util.unflatten_dict(merged)


# ---- PEFT LoRA ----


def hf_module_path(layer: Sequence[str]) -> str:
  """HF MT5 module of a T5X dense layer.

  `('encoder', 'layers_3', 'attention', 'query')` ->
  `'encoder.block.3.layer.0.SelfAttention.q'`; `decoder/logits_dense` ->
  `'lm_head'`.
  """
  layer = tuple(layer)
  if layer == ("decoder", "logits_dense"):
    return "lm_head"
  match = re.fullmatch(r"layers_(\d+)", layer[1]) if len(layer) == 4 else None
  sublayer = _HF_SUBLAYERS.get((layer[0], layer[2])) if match else None
  if sublayer is None:
    raise ValueError(f"No HF MT5 module for the T5X layer {'/'.join(layer)}.")
  index, module = sublayer
  name = (
      layer[3]
      if module == "DenseReluDense"
      else (_T5X_TO_HF_ATTENTION.get(layer[3]))
  )
  if name is None:
    raise ValueError(f"No HF MT5 module for the T5X layer {'/'.join(layer)}.")
  return f"{layer[0]}.block.{match.group(1)}.layer.{index}.{module}.{name}"


def peft_adapter(
    params: PyTree,
    feature_space: features_lib.FeatureSpace,
    features: Mapping[str, Optional[str]],
    base_model_name_or_path: str = "",
) -> tuple[StateDict, dict[str, Any]]:
  """A feature set as one standard PEFT LoRA for HF MT5.

  Per adapted layer, A_cat = concat_rank(s_{g,v} A[g, v][:, :r_v]) and
  B_cat = concat_rank(B[g, v][:r_v]) over the set's features, so
  A_cat B_cat equals the FLix update exactly. PEFT's scaling
  lora_alpha / r is 1 in every layer (`alpha_pattern` follows `rank_pattern`
  where layers' total ranks differ).

  Args:
    params: FLix params tree (see `merge_features`).
    feature_space: the space the adapters were trained with.
    features: `{group: value}`.
    base_model_name_or_path: the HF base model, written to the config.

  Returns:
    (state dict: `base_model.model.<module>.lora_A.weight` [K, D] and
    `...lora_B.weight` [O, K] float32 numpy arrays, adapter_config dict).

  Raises:
    ValueError: for an unknown group or value, or a set with no adapter.
  """
  _, factors = _layer_factors(params, feature_space, features)
  state_dict: StateDict = {}
  ranks: dict[str, int] = {}
  for layer, pairs in sorted(factors.items()):
    if not pairs:
      continue
    module = hf_module_path(layer)
    a_cat = np.concatenate([a for a, _ in pairs], axis=1)  # [D, K]
    b_cat = np.concatenate([b for _, b in pairs], axis=0)  # [K, O]
    prefix = f"base_model.model.{module}"
    state_dict[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_cat.T)
    state_dict[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_cat.T)
    ranks[module] = a_cat.shape[1]
  if not ranks:
    raise ValueError(
        f"The feature set {dict(features)} selects no adapter: "
        "there is nothing to export as a LoRA."
    )
  rank = collections.Counter(ranks.values()).most_common(1)[0][0]
  # PEFT matches pattern keys as regexes against the end of module names.
  pattern = {re.escape(m): r for m, r in sorted(ranks.items()) if r != rank}
  config = {
      "peft_type": "LORA",
      "task_type": "SEQ_2_SEQ_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": rank,
      "lora_alpha": rank,
      "rank_pattern": pattern,
      "alpha_pattern": dict(pattern),
      "target_modules": _target_modules(params, sorted(ranks)),
      "lora_dropout": 0.0,
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "revision": None,
  }
  return state_dict, config


def _target_modules(params: PyTree, modules: Sequence[str]) -> list[str]:
  """Short names (q, wi_0, ...) when they pick exactly `modules`, else paths."""
  names = sorted({m.rsplit(".", 1)[-1] for m in modules})
  every = set()
  for path in traverse_util.flatten_dict(layer_layout.unstack_layers(params)):
    if path[-1] == "kernel":
      try:
        every.add(hf_module_path(path[:-1]))
      except ValueError:
        continue
  picked = {m for m in every if m.rsplit(".", 1)[-1] in names}
  return names if picked == set(modules) else sorted(modules)


def write_peft_adapter(
    directory: str,
    params: PyTree,
    feature_space: features_lib.FeatureSpace,
    features: Mapping[str, Optional[str]],
    base_model_name_or_path: str = "",
) -> dict[str, Any]:
  """Writes `adapter_model.safetensors` + `adapter_config.json`.

  `peft.PeftModel.from_pretrained(hf_mt5, directory)` loads the result. The
  feature set is recorded in the safetensors metadata (`flix_features`).

  Returns:
    The adapter config.
  """
  state_dict, config = peft_adapter(
      params, feature_space, features, base_model_name_or_path
  )
  os.makedirs(directory, exist_ok=True)
  metadata = {
      "format": "pt",
      "flix_features": json.dumps(
          {g.name: v for g, v in resolve_features(feature_space, features)}
      ),
  }
  safetensors_np.save_file(
      state_dict, os.path.join(directory, PEFT_WEIGHTS_FILE), metadata=metadata
  )
  with open(os.path.join(directory, PEFT_CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  return config


# ---- Whole-model export ----


def hf_dims(config: network.T5Config) -> dict[str, Any]:
  """`hf_checkpoint` network dims of a `network.T5Config`."""
  return {
      "vocab_size": config.vocab_size,
      "emb_dim": config.emb_dim,
      "num_heads": config.num_heads,
      "head_dim": config.head_dim,
      "mlp_dim": config.mlp_dim,
      "num_encoder_layers": config.num_encoder_layers,
      "num_decoder_layers": config.num_decoder_layers,
      "mlp_activations": tuple(config.mlp_activations),
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
  }


def write_hf_model(
    directory: str, params: PyTree, config: network.T5Config
) -> None:
  """Writes adapter-free params as an HF MT5 `model.safetensors` + config."""
  hf_checkpoint.write_hf_checkpoint(
      hf_checkpoint.t5x_to_hf(params),
      hf_checkpoint.hf_config_from_t5_config(
          hf_dims(config), dropout_rate=config.dropout_rate
      ),
      directory,
  )


def _check_output(directory: str, overwrite: bool) -> None:
  if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
    raise FileExistsError(
        f"Output directory {directory} is not empty; pass "
        "--overwrite to replace its files."
    )


def export(
    *,
    model: models.FlixModel,
    checkpoint: str,
    features: Mapping[str, str],
    output_format: str,
    output: str,
    base_model_name_or_path: Optional[str] = None,
    base_output: Optional[str] = None,
    overwrite: bool = False,
) -> str:
  """Exports a flix checkpoint's feature set; returns the output directory.

  Args:
    model: a `models.FlixModel` with the training run's network sizes (its
      feature space is replaced by the checkpoint's).
    checkpoint: a flix MODEL_DIR, its checkpoints/ dir or a step dir.
    features: `{group: value}` to export.
    output_format: 'peft' (LoRA adapter), 'hf' (merged HF MT5) or 't5x'
      (merged legacy T5X checkpoint).
    output: output directory.
    base_model_name_or_path: peft: the HF base model named in the adapter
      config; default `base_output`, else the run's initial checkpoint.
    base_output: peft: also write the frozen base as an HF model here.
    overwrite: replace files in a non-empty `output`.
  """
  if output_format not in FORMATS:
    raise ValueError(
        f"Unknown format {output_format!r}; use one of "
        f"{', '.join(FORMATS)}."
    )
  _check_output(output, overwrite)
  if output_format == "peft" and base_output:
    _check_output(base_output, overwrite)
  # Check the feature set against the saved vocabulary before the (slow)
  # model load, so a typo fails at once.
  with open(
      os.path.join(
          checkpoints.resolve_step_dir(checkpoint), "meta", "metadata"
      ),
      encoding="utf-8",
  ) as f:
    saved_space = json.load(f).get("feature_space")
  if saved_space is None and features:
    raise ValueError(
        f"Checkpoint {checkpoint} has no FLix adapters, so "
        f"features {dict(features)} cannot be applied."
    )
  space = features_lib.FeatureSpace.from_dict(saved_space or {"groups": []})
  resolve_features(space, features)
  model, params, meta = checkpoints.load_for_inference(model, checkpoint)
  if output_format == "peft":
    if base_output:
      write_hf_model(base_output, base_params(params), model.config)
    base_model_name_or_path = (
        base_model_name_or_path
        or base_output
        or (meta.get("base", {}).get("initial_checkpoint") or "")
    )
    write_peft_adapter(output, params, space, features, base_model_name_or_path)
  else:
    merged = merge_features(params, space, features)
    if output_format == "hf":
      write_hf_model(output, merged, model.config)
    else:
      t5x_checkpoint.write_t5x_checkpoint(
          merged, output, step=int(meta.get("step") or 0), overwrite=True
      )
  info = {
      "checkpoint": os.path.abspath(checkpoint),
      "step": meta.get("step"),
      "format": output_format,
      "features": {g.name: v for g, v in resolve_features(space, features)},
      "feature_space": space.to_dict(),
  }
  with open(os.path.join(output, EXPORT_INFO_FILE), "w") as f:
    json.dump(info, f, indent=2, ensure_ascii=False)
  return output


# ---- Command line ----


def _define_flags() -> None:
  gin_utils.define_flags()
  flags.DEFINE_string(
      "checkpoint", None, "flix MODEL_DIR or step directory.", required=True
  )
  flags.DEFINE_string("features", "", "Feature set: group=value,...")
  flags.DEFINE_enum("format", "peft", list(FORMATS), "What to write.")
  flags.DEFINE_string("output", None, "Output directory.", required=True)
  flags.DEFINE_string(
      "base_model_name_or_path",
      None,
      "peft: HF base model named in adapter_config.json.",
  )
  flags.DEFINE_string(
      "base_output",
      None,
      "peft: also write the frozen base as an HF model here.",
  )
  flags.DEFINE_bool("overwrite", False, "Replace files in a non-empty output.")


def load_model(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str],
    search_paths: Sequence[str] = (".",),
) -> models.FlixModel:
  """The gin-configured `models.FlixModel` of a run's model (+ peft) gins.

  The config is not finalized: run gins (runs/eval.gin, runs/finetune.gin)
  leave macros such as CHECKPOINT_PATH or MODEL_DIR REQUIRED, which export
  does not use. FEATURE_SPACE is bound to None: the checkpoint's saved
  vocabulary replaces it (and a training gin's would need the mixture).
  """
  if not gin_files:
    raise ValueError(
        "Give the training run's model gin with --gin_file "
        "(e.g. configs/demo_eval.gin) so the sizes are known."
    )
  gin_utils.parse_gin(
      gin_files,
      list(gin_bindings) + ["FEATURE_SPACE = None"],
      search_paths,
      finalize=False,
  )
  return gin_utils.call_configured(models.FlixModel)


def main(argv: Sequence[str]) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  f = flags.FLAGS
  try:
    model = load_model(f.gin_file, f.gin_bindings, f.gin_search_paths)
    out = export(
        model=model,
        checkpoint=f.checkpoint,
        features=parse_features(f.features),
        output_format=f.format,
        output=f.output,
        base_model_name_or_path=f.base_model_name_or_path,
        base_output=f.base_output,
        overwrite=f.overwrite,
    )
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"flix.export: error: {e}")
  logging.info("Wrote the %s export of %s to %s.", f.format, f.features, out)


if __name__ == "__main__":
  _define_flags()
  gin_utils.run(main)
