"""A feature set of a FLix model as merged weights or as one PEFT LoRA.

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
always-on adapter), by `FeatureSpace.resolve`; otherwise no adapter. The
command line is `python -m flix.export` (flix/export.py).

Exports are per layer (T5X / HF names) whether or not the network scans its
layers: the functions below take params in either layout
(`layer_layout.unstack_layers`).

Dimension key: D d_in, O d_out, V values of a group, R a group's max rank,
K total rank of the feature set in one layer.
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from flax import traverse_util
from safetensors import numpy as safetensors_np

from flix import checkpoints
from flix import features as features_lib
from flix import hf_checkpoint
from flix import layer_layout
from flix import layers
from flix import models
from flix import t5x_checkpoint

PyTree = Any
Params = dict[str, Any]
StateDict = dict[str, np.ndarray]

FORMATS = ("peft", "hf", "t5x")
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
EXPORT_INFO_FILE = "flix_export.json"

# ---- Adapter arithmetic ----


def _adapted_layers(
    flat: Mapping[tuple[str, ...], Any],
    feature_space: features_lib.FeatureSpace,
) -> dict[tuple[str, ...], set[str]]:
  """Layer path -> names of the groups with adapters there."""
  groups_by_layer = collections.defaultdict(set)
  for path in flat:
    match = layers.ADAPTER_LEAF_RE.match(path[-1])
    if match:
      group = match.group(2)
      if group not in feature_space.group_names:
        raise ValueError(
            f"{'/'.join(path)} is an adapter of group {group!r}, which the "
            f"feature space (groups {feature_space.group_names}) does not "
            "have: params and feature space are from different models."
        )
      groups_by_layer[path[:-1]].add(group)
  return dict(groups_by_layer)


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
  a_name, b_name = layers.adapter_leaf_names(group.name)
  a = np.asarray(flat[layer + (a_name,)], np.float32)
  b = np.asarray(flat[layer + (b_name,)], np.float32)
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
  pairs = feature_space.resolve(features, strict=True)
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
          if not layers.ADAPTER_LEAF_RE.match(path[-1])
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
    if layers.ADAPTER_LEAF_RE.match(path[-1]):
      continue
    value = np.asarray(value)
    if path[-1] == "kernel" and factors.get(path[:-1]):
      delta = sum(a @ b for a, b in factors[path[:-1]])
      value = (value.astype(np.float32) + delta).astype(value.dtype)
    merged[path] = value
  return traverse_util.unflatten_dict(merged)


# ---- PEFT LoRA ----


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
    module = hf_checkpoint.hf_module_path(layer)
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
        every.add(hf_checkpoint.hf_module_path(path[:-1]))
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
          {g.name: v for g, v in feature_space.resolve(features, strict=True)}
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


def write_hf_model(directory: str, params: PyTree, config) -> None:
  """Writes adapter-free params as an HF MT5 `model.safetensors` + config.

  Args:
    directory: output directory.
    params: a plain mT5 params tree (T5X names, no adapters).
    config: its `t5_config.T5Config`.
  """
  hf_checkpoint.write_hf_checkpoint(
      hf_checkpoint.t5x_to_hf(params),
      hf_checkpoint.hf_config_from_t5_config(
          config.to_dict(), dropout_rate=config.dropout_rate
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
    vocabulary: Any = None,
) -> str:
  """Exports a flix checkpoint's feature set; returns the output directory.

  A SentencePiece vocabulary (the checkpoint's, `flix.vocabularies`) is
  written beside the weights as `spiece.model`.

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
    vocabulary: a vocabulary named by the caller ('bytes', a SentencePiece
      .model path); it must agree with the recorded one.
  """
  from flix import vocabularies  # pylint: disable=g-import-not-at-top

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
  saved_space = checkpoints.read_meta(checkpoint).get("feature_space")
  if saved_space is None and features:
    raise ValueError(
        f"Checkpoint {checkpoint} has no FLix adapters, so "
        f"features {dict(features)} cannot be applied."
    )
  space = features_lib.FeatureSpace.from_dict(saved_space or {"groups": []})
  if not space.resolve(features, strict=True) and output_format == "peft":
    raise ValueError(
        f"The feature set {dict(features)} selects no adapter, so there is no"
        " LoRA to write: give --features=group=value,... (groups: "
        f"{', '.join(space.group_names)}), or --format=hf for the base alone."
    )
  vocabulary = vocabularies.vocabulary_for_checkpoint(
      checkpoint,
      vocabulary,
      embedding_rows=model.config.vocab_size,
      required=False,
  )
  model, params, meta = checkpoints.load_for_inference(model, checkpoint)
  if output_format == "peft":
    if base_output:
      write_hf_model(base_output, base_params(params), model.config)
      vocabularies.write_sentencepiece(vocabulary, base_output)
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
  vocabularies.write_sentencepiece(vocabulary, output)
  info = {
      "checkpoint": os.path.abspath(checkpoint),
      "step": meta.get("step"),
      "format": output_format,
      "features": {g.name: v for g, v in space.resolve(features, strict=True)},
      "feature_space": space.to_dict(),
      "vocabulary": vocabularies.describe(vocabulary) if vocabulary else None,
  }
  with open(os.path.join(output, EXPORT_INFO_FILE), "w") as f:
    json.dump(info, f, indent=2, ensure_ascii=False)
  return output
