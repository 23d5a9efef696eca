"""Orbax train checkpoints, adapter-only by construction, and base loading.

A run's checkpoint `MODEL_DIR/checkpoints/<step>/` holds three items:

  params     the trainable params only (FLix/LoRA: the adapters, kilobytes to
             megabytes; full fine-tuning: everything)
  opt_state  their optimizer state
  meta       JSON: feature vocabulary, network config, the base reference
             (`initial_checkpoint` path or `init_seed`), trainable patterns,
             data position (batches consumed), step, the token vocabulary
             (`flix.vocabularies`)

Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a crash mid-save leaves the previous checkpoint as the latest.
The frozen base is not saved again: it is rebuilt from the base reference.

`load_any_params` reads base weights from any of: a legacy T5X checkpoint
(public mT5), a Hugging Face mT5 directory, or a flix Orbax checkpoint (whose
own base is loaded recursively and its trained params merged in).

All of them, flix's own included, hold the per-layer layout
(`encoder/layers_0/...`); a network with scanned layers gets its params
stacked by `layer_layout.to_layout` here, after reading.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from flix import features as features_lib
from flix import layer_layout
from flix import layers

PyTree = Any


def checkpoint_dir(model_dir: str) -> str:
  return os.path.join(os.path.abspath(model_dir), "checkpoints")


class Checkpointer:
  """Periodic, atomic Orbax checkpoints of (params, opt_state, meta)."""

  def __init__(self, model_dir: str, keep: Optional[int] = 3):
    self.directory = checkpoint_dir(model_dir)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("params", "opt_state", "meta"),
    )

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(
      self,
      step: int,
      params: PyTree,
      opt_state: PyTree,
      meta: Mapping[str, Any],
      force: bool = False,
  ) -> bool:
    saved = self.manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(dict(meta)),
        ),
        force=force,
    )
    return saved

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(
      self, step: int, abstract_params: PyTree, abstract_opt_state: PyTree
  ):
    """Restores (params, opt_state, meta) onto the given abstract targets."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return restored["params"], restored["opt_state"], restored["meta"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def resolve_step_dir(path: str) -> str:
  """Accepts a MODEL_DIR, its checkpoints/ dir, or one step's dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "params")):
    return path
  for candidate in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(candidate):
      steps = [int(d) for d in os.listdir(candidate) if d.isdigit()]
      if steps:
        return os.path.join(candidate, str(max(steps)))
  raise FileNotFoundError(
      f"No flix checkpoint at {path}: expected a step directory with "
      "params/ and meta/, or a MODEL_DIR whose checkpoints/ holds some."
  )


def read_meta(path: str) -> dict[str, Any]:
  """The meta dict (feature vocabulary, config, base, data position) of a
  flix checkpoint: a MODEL_DIR, its checkpoints/ dir or a step dir."""
  # Orbax's JsonSave writes the item as <step>/meta/metadata.
  with open(
      os.path.join(resolve_step_dir(path), "meta", "metadata"), encoding="utf-8"
  ) as f:
    return json.load(f)


def read_flix_checkpoint(path: str):
  """Reads (trained params as numpy, meta dict) of a flix checkpoint."""
  step_dir = resolve_step_dir(path)
  checkpointer = ocp.StandardCheckpointer()
  params = checkpointer.restore(os.path.join(step_dir, "params"))
  checkpointer.close()
  return jax.tree.map(np.asarray, params), read_meta(step_dir)


def _is_t5x_legacy(path: str) -> bool:
  ckpt = path if os.path.isfile(path) else os.path.join(path, "checkpoint")
  return os.path.isfile(ckpt) and not os.path.isdir(
      os.path.join(path, "params")
  )


def _is_hf(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and any(
      f.endswith((".safetensors", ".bin")) for f in os.listdir(path)
  )


def load_any_params(path: str) -> PyTree:
  """All params stored under `path`, as a nested numpy dict (T5X names)."""
  if path.startswith("gs://"):
    from flix import t5x_checkpoint  # pylint: disable=g-import-not-at-top

    return t5x_checkpoint.read_t5x_checkpoint(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"INITIAL_CHECKPOINT_PATH {path} does not exist. Give a T5X "
        "checkpoint directory (…/checkpoint_1000000), a Hugging Face mT5 "
        "directory (config.json + model.safetensors) or a flix MODEL_DIR."
    )
  if _is_hf(path):
    from flix import hf_checkpoint  # pylint: disable=g-import-not-at-top

    return hf_checkpoint.hf_to_t5x(hf_checkpoint.read_hf_checkpoint(path))
  if _is_t5x_legacy(path):
    from flix import t5x_checkpoint  # pylint: disable=g-import-not-at-top

    return t5x_checkpoint.read_t5x_checkpoint(path)
  params, meta = read_flix_checkpoint(path)
  base = meta.get("base", {})
  if base.get("initial_checkpoint"):
    merged = traverse_util.flatten_dict(
        load_any_params(base["initial_checkpoint"]), sep="/"
    )
    merged.update(traverse_util.flatten_dict(params, sep="/"))
    return traverse_util.unflatten_dict(merged, sep="/")
  if base.get("init_seed") is not None:
    logging.info(
        "Checkpoint %s was trained on a randomly initialised base "
        "(seed %s).",
        path,
        base["init_seed"],
    )
  return params


def restore_base_params(
    target: PyTree,
    path: str,
    fresh_patterns: tuple[str, ...] = (),
    config: Optional[Any] = None,
) -> PyTree:
  """Fills every param of `target` from the checkpoint at `path`.

  Params matching `fresh_patterns` (the adapters) keep their initial values.
  Every other param must be found with the same shape, and every base param
  of the checkpoint must be used: a missing, unused or mis-shaped one is an
  error naming it and the shapes (no silent random init).

  Args:
    target: nested dict of initial arrays (defines names and shapes), per
      layer or stacked (`layer_layout`).
    path: checkpoint location, see `load_any_params`.
    fresh_patterns: regexes of params that start fresh (matched against the
      per-layer names).
    config: the network's `T5Config`; a Hugging Face checkpoint's config must
      then match it (activations, position buckets, logits form, sizes).

  Returns:
    nested dict like `target`, in its layout.
  """
  if config is not None and os.path.isdir(path) and _is_hf(path):
    from flix import hf_checkpoint  # pylint: disable=g-import-not-at-top

    hf_checkpoint.check_network_config(path, config)
  stacked = layer_layout.is_stacked(target)
  target = layer_layout.unstack_layers(target)
  loaded = traverse_util.flatten_dict(load_any_params(path), sep="/")
  fresh = [re.compile(p) for p in fresh_patterns]
  out, missing, wrong = {}, [], []
  for name, value in traverse_util.flatten_dict(target, sep="/").items():
    if any(r.fullmatch(name) for r in fresh):
      out[name] = value
    elif name not in loaded:
      missing.append(name)
    elif tuple(loaded[name].shape) != tuple(value.shape):
      wrong.append(
          f"{name}: checkpoint {tuple(loaded[name].shape)} vs model "
          f"{tuple(value.shape)}"
      )
    else:
      out[name] = np.asarray(loaded[name], dtype=value.dtype)
  target_names = set(traverse_util.flatten_dict(target, sep="/"))
  unused = [
      f"{name} {tuple(value.shape)}"
      for name, value in sorted(loaded.items())
      if name not in target_names
      and not layers.ADAPTER_LEAF_RE.match(name.rsplit("/", 1)[-1])
  ]
  if missing or wrong or unused:
    raise ValueError(
        f"Base checkpoint {path} does not fit the model: "
        f"{len(missing)} params missing ({', '.join(missing[:5])}"
        f"{', ...' if len(missing) > 5 else ''}); {len(wrong)} with another "
        f"shape ({'; '.join(wrong[:5])}); {len(unused)} the model does not "
        f"have ({', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''})"
        ". Check the model gin (sizes, logits_via_embedding) against the "
        "checkpoint."
    )
  return layer_layout.to_layout(
      traverse_util.unflatten_dict(out, sep="/"), stacked
  )


def load_for_inference(model, path: str):
  """A trained model and its full params from a flix checkpoint.

  The feature vocabulary saved with the checkpoint replaces the model's, so
  feature names map to the adapters they were trained as. The frozen base is
  rebuilt from the checkpoint's base reference (a path, or the init seed).

  Args:
    model: a `models.FlixModel` with the right network sizes.
    path: a MODEL_DIR, its checkpoints/ dir, or one step's dir.

  Returns:
    (model, params as a nested numpy dict in the network's layout, meta dict)
  """
  trained, meta = read_flix_checkpoint(path)
  space = meta.get("feature_space")
  config = dataclasses.replace(
      model.config,
      feature_space=features_lib.FeatureSpace.from_dict(space)
      if space
      else None,
  )
  model = dataclasses.replace(model, config=config)
  base = meta.get("base", {})
  rng = jax.random.PRNGKey(int(base.get("init_seed") or 0))
  if base.get("initial_checkpoint"):
    # Every base value comes from the checkpoint and every adapter from the
    # run: shapes suffice, nothing needs initialising.
    params = restore_base_params(
        layer_layout.unstack_layers(jax.eval_shape(model.init_params, rng)),
        base["initial_checkpoint"],
        fresh_patterns=(layers.ADAPTER_PATH_PATTERN,),
        config=model.config,
    )
  else:
    params = layer_layout.unstack_layers(
        jax.tree.map(np.asarray, model.init_params(rng))
    )
  # Trained params are stored per layer: merge them per layer.
  flat = traverse_util.flatten_dict(params, sep="/")
  for name, value in traverse_util.flatten_dict(trained, sep="/").items():
    if name not in flat or flat[name].shape != value.shape:
      raise ValueError(
          f"Checkpoint {path} holds {name} {value.shape}, which "
          "the model does not have with that shape; check the "
          "model gin against the training run's config.gin."
      )
    flat[name] = value
  missing = [n for n, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(
        f"Checkpoint {path} lacks trained params {missing[:5]}; "
        "it does not belong to this model config."
    )
  params = model.network_layout(traverse_util.unflatten_dict(flat, sep="/"))
  return model, params, meta
