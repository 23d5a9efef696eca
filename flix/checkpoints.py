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
complete, so a crash mid-save leaves the previous checkpoint as the latest;
`flix.checkpoint_integrity` checksums every step just before that commit,
and a restart or a reader takes the newest step that is intact. The frozen
base is not saved again: it is rebuilt from the base reference.

A run trained by T5X's driver (`python -m t5x.train`, see `flix.t5x_driver`)
has T5X's checkpoints `MODEL_DIR/checkpoint_<step>/` (all params) and the
same meta, minus the data position, in `MODEL_DIR/flix_run.json`; every
reader here takes either layout, so flix.eval, flix.infer and flix.export
read T5X-trained runs.

`load_any_params` reads base weights from any of: a legacy T5X checkpoint
(public mT5), a Hugging Face mT5 directory, or a flix Orbax checkpoint (whose
own base is loaded recursively and its trained params merged in).

All of them, flix's own included, hold the per-layer layout
(`encoder/layers_0/...`); a network with scanned layers gets its params
stacked by `layer_layout.to_layout` here, after reading.
"""

from __future__ import annotations

import copy
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

from flix import checkpoint_integrity
from flix import features as features_lib
from flix import layer_layout
from flix import layers
from flix import run_meta as run_meta_lib

PyTree = Any


RUN_INFO_FILE = "flix_run.json"
_T5X_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")


def run_meta(
    model,
    trainable_patterns,
    initial_checkpoint_path: Optional[str],
    random_seed: Optional[int],
    mixture_or_task_name: Optional[str] = None,
) -> dict[str, Any]:
  """A run's meta: feature vocabulary, network config, base reference,
  trainable patterns (and the training mixture, if given)."""
  from flix import train_step  # pylint: disable=g-import-not-at-top

  space = model.feature_space
  meta = {
      "feature_space": space.to_dict() if space is not None else None,
      "model_config": model.config.to_dict(),
      "base": {
          "initial_checkpoint": initial_checkpoint_path,
          "init_seed": random_seed,
      },
      "trainable_patterns": list(
          train_step.trainable_regexes(trainable_patterns)
      ),
  }
  if mixture_or_task_name is not None:
    meta["data"] = {
        "mixture_or_task_name": mixture_or_task_name,
        "seed": random_seed,
    }
  return meta


def write_run_info(model_dir: str, meta: Mapping[str, Any]) -> str:
  """Writes a T5X-trained run's meta to MODEL_DIR/flix_run.json.

  A restart that trains something else is an error
  (`flix.run_meta.check_resumable`).
  """
  path = os.path.join(model_dir, RUN_INFO_FILE)
  if tf_gfile().exists(path):
    with tf_gfile().GFile(path) as f:
      saved = json.load(f)
    run_meta_lib.check_resumable(saved, meta, path)
  tf_gfile().makedirs(model_dir)
  with tf_gfile().GFile(path, "w") as f:
    f.write(json.dumps(dict(meta), indent=1, ensure_ascii=False))
  return path


def tf_gfile():
  """`tf.io.gfile` (local and gs:// paths), imported when first needed."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.io.gfile


def _t5x_steps(directory: str) -> dict[int, str]:
  """`{step: dir}` of the `checkpoint_<step>` directories in `directory`."""
  if not os.path.isdir(directory):
    return {}
  steps = {}
  for name in os.listdir(directory):
    match = _T5X_STEP_DIR.match(name)
    if match and os.path.isdir(os.path.join(directory, name)):
      steps[int(match.group(1))] = os.path.join(directory, name)
  return steps


def t5x_step_dir(path: str) -> str:
  """A T5X run's step directory: `path` itself if it is one, else the latest
  `checkpoint_<step>` in the MODEL_DIR `path`."""
  path = os.path.abspath(path)
  if _T5X_STEP_DIR.match(os.path.basename(path)):
    return path
  steps = _t5x_steps(path)
  if not steps:
    raise FileNotFoundError(
        f"No T5X checkpoint at {path}: expected a checkpoint_<step> "
        "directory or a MODEL_DIR holding some."
    )
  return steps[max(steps)]


def _t5x_run_dir(path: str) -> Optional[str]:
  """The MODEL_DIR of a T5X-trained run at `path` (MODEL_DIR or step dir)."""
  path = os.path.abspath(path)
  for candidate in (path, os.path.dirname(path)):
    if os.path.isfile(os.path.join(candidate, RUN_INFO_FILE)):
      return candidate
  return None


def saved_feature_space(path: str) -> Optional[features_lib.FeatureSpace]:
  """The feature vocabulary a run (either driver's) was trained with."""
  space = read_meta(path).get("feature_space")
  return features_lib.FeatureSpace.from_dict(space) if space else None


def checkpoint_dir(model_dir: str) -> str:
  return os.path.join(os.path.abspath(model_dir), "checkpoints")


class Checkpointer:
  """Periodic, atomic, checksummed Orbax checkpoints of (params, opt_state,
  meta)."""

  def __init__(self, model_dir: str, keep: Optional[int] = 3):
    self.directory = checkpoint_dir(model_dir)
    self._saving: Optional[int] = None
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            # Removes the temporary directories of saves a kill interrupted.
            cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(
                post_finalization_callback=self._record_checksums
            ),
        ),
        item_names=("params", "opt_state", "meta"),
    )

  def _record_checksums(self) -> None:
    """Runs in Orbax's save thread after the items are written, before the
    commit (rename): the manifest is committed with them."""
    if jax.process_index() != 0 or self._saving is None:
      return
    step_dir = checkpoint_integrity.pending_step_dir(
        self.directory, self._saving
    )
    if step_dir is not None:
      checkpoint_integrity.write_manifest(step_dir, self._saving)

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
    self.manager.wait_until_finished()
    self._saving = step
    saved = self.manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            # A deep copy: Orbax writes the JSON in its save thread, while
            # the loop goes on updating the meta's nested dicts (the data
            # position) for later steps.
            meta=ocp.args.JsonSave(copy.deepcopy(dict(meta))),
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
    try:
      restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
              params=ocp.args.StandardRestore(abstract_params),
              opt_state=ocp.args.StandardRestore(abstract_opt_state),
              meta=ocp.args.JsonRestore(),
          ),
      )
    except Exception as e:  # pylint: disable=broad-except
      # Orbax/TensorStore errors are long and many-typed; name the step.
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise ValueError(
          f"Checkpoint step {step} in {self.directory} cannot be restored "
          f"({type(e).__name__}: {first_line[:300]}); move it out of "
          f"{self.directory} to resume from an earlier step."
      ) from e
    return restored["params"], restored["opt_state"], restored["meta"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def resolve_step_dir(path: str) -> str:
  """The intact step directory of a MODEL_DIR, its checkpoints/ dir, or one
  step's dir (which must be intact); newer damaged steps are skipped with a
  warning naming the damage."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "params")):
    problem = checkpoint_integrity.verify(path)
    if problem:
      raise ValueError(f"Checkpoint {path} is damaged: {problem}.")
    return path
  for candidate in (os.path.join(path, "checkpoints"), path):
    step, damaged = checkpoint_integrity.latest_intact_step(candidate)
    for bad in damaged:
      logging.warning("Skipping damaged checkpoint %s.", bad)
    if step is not None:
      return os.path.join(candidate, str(step))
    if damaged:
      raise ValueError(
          f"No intact checkpoint in {candidate}: "
          + "; ".join(str(d) for d in damaged)
          + "."
      )
  raise FileNotFoundError(
      f"No flix checkpoint at {path}: expected a step directory with "
      "params/ and meta/, or a MODEL_DIR whose checkpoints/ holds some."
  )


def read_step_meta(step_dir: str) -> dict[str, Any]:
  """The meta dict of one step directory (not verified again)."""
  # Orbax's JsonSave writes the item as <step>/meta/metadata.
  meta_path = os.path.join(step_dir, "meta", "metadata")
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(
        f"Checkpoint file {meta_path} is missing: it holds the run's feature "
        "vocabulary and config, without which the adapters cannot be used."
    )
  with open(meta_path, encoding="utf-8") as f:
    return json.load(f)


def read_meta(path: str) -> dict[str, Any]:
  """The meta dict (feature vocabulary, config, base, data position) of a
  run: a MODEL_DIR, its checkpoints/ dir or a step dir, of either driver."""
  run_dir = _t5x_run_dir(path)
  if run_dir is not None:
    with open(os.path.join(run_dir, RUN_INFO_FILE), encoding="utf-8") as f:
      meta = json.load(f)
    meta["step"] = int(
        _T5X_STEP_DIR.match(os.path.basename(t5x_step_dir(path))).group(1)
    )
    return meta
  return read_step_meta(resolve_step_dir(path))


def _read_t5x(path: str) -> PyTree:
  """A T5X checkpoint's params per layer (a scanned model's stacked
  `<stack>/layers/...` leaves are split, `layer_layout.unstack_layers`)."""
  from flix import t5x_checkpoint  # pylint: disable=g-import-not-at-top

  return layer_layout.unstack_layers(t5x_checkpoint.read_t5x_checkpoint(path))


def read_flix_checkpoint(path: str):
  """Reads (trained params as numpy, meta dict) of a run of either driver
  (T5X's checkpoints hold every param, flix's the trained ones)."""
  if _t5x_run_dir(path) is not None:
    return _read_t5x(t5x_step_dir(path)), read_meta(path)
  step_dir = resolve_step_dir(path)
  checkpointer = ocp.StandardCheckpointer()
  params = checkpointer.restore(os.path.join(step_dir, "params"))
  checkpointer.close()
  return jax.tree.map(np.asarray, params), read_meta(step_dir)


def read_train_state(path: str):
  """(trained params, optimizer state, meta) of a flix checkpoint as numpy
  trees, e.g. to compare two runs."""
  step_dir = resolve_step_dir(path)
  checkpointer = ocp.StandardCheckpointer()
  trees = [
      jax.tree.map(np.asarray, checkpointer.restore(os.path.join(step_dir, i)))
      for i in ("params", "opt_state")
  ]
  checkpointer.close()
  return trees[0], trees[1], read_step_meta(step_dir)


def _is_t5x_step(path: str) -> bool:
  """A legacy T5X checkpoint (msgpack `checkpoint` file) or a T5X Orbax one
  (`state/`), not a flix step directory."""
  if os.path.isfile(path):
    return True
  if os.path.isdir(os.path.join(path, "params")):
    return False
  return os.path.isfile(os.path.join(path, "checkpoint")) or os.path.isdir(
      os.path.join(path, "state")
  )


def is_t5x_checkpoint(path: str) -> bool:
  """Whether `path` is one T5X checkpoint step directory (what T5X's
  `RestoreCheckpointConfig(mode='specific')` restores); remote paths are
  judged by their name (`checkpoint_<step>`)."""
  if "://" in path:
    return bool(_T5X_STEP_DIR.match(os.path.basename(path.rstrip("/"))))
  return os.path.isdir(path) and _is_t5x_step(path)


def _is_hf(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def _looks_like_t5x(path: str) -> bool:
  """A directory of T5X zarr leaves (`target.encoder...`) without its
  `checkpoint` msgpack file."""
  return os.path.isdir(path) and any(
      name.startswith(("target.", "state.")) for name in os.listdir(path)
  )


def _is_flix(path: str) -> bool:
  return any(
      os.path.isdir(os.path.join(path, *parts))
      for parts in (("params",), ("checkpoints",))
  ) or bool(checkpoint_integrity.step_dirs(path))


_FORMATS = (
    "a T5X checkpoint directory (…/checkpoint_1000000, with its `checkpoint` "
    "file), a Hugging Face mT5 directory (config.json + model.safetensors) "
    "or a flix MODEL_DIR"
)


def load_any_params(path: str) -> PyTree:
  """All params stored under `path`, as a nested numpy dict (T5X names)."""
  if path.startswith("gs://"):
    return _read_t5x(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"INITIAL_CHECKPOINT_PATH {path} does not exist. Give {_FORMATS}."
    )
  if _is_hf(path):
    from flix import hf_checkpoint  # pylint: disable=g-import-not-at-top

    if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
      raise FileNotFoundError(
          f"{path} has a Hugging Face config.json but no weights "
          "(model.safetensors, pytorch_model.bin or their .index.json "
          "shards)."
      )
    return hf_checkpoint.hf_to_t5x(hf_checkpoint.read_hf_checkpoint(path))
  if _is_t5x_step(path):
    return _read_t5x(path)
  if _looks_like_t5x(path):
    raise FileNotFoundError(
        f"{path} holds T5X parameter folders but no `checkpoint` file (the "
        "msgpack index T5X writes last); the checkpoint is incomplete."
    )
  if not _is_flix(path):
    raise ValueError(
        f"{path} is not a checkpoint flix can read: give {_FORMATS}."
    )
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
  # Merged per layer (the layout every checkpoint holds), then converted.
  shapes = traverse_util.flatten_dict(
      layer_layout.unstack_layers(jax.eval_shape(model.init_params, rng)),
      sep="/",
  )
  trained_flat = traverse_util.flatten_dict(
      layer_layout.unstack_layers(trained), sep="/"
  )
  if set(shapes) <= set(trained_flat):
    # T5X's checkpoints and full fine-tuning hold every param.
    flat = dict(shapes)
  elif base.get("initial_checkpoint"):
    # Every base value comes from the checkpoint and every adapter from the
    # run: shapes suffice, nothing needs initialising.
    flat = traverse_util.flatten_dict(
        restore_base_params(
            traverse_util.unflatten_dict(shapes, sep="/"),
            base["initial_checkpoint"],
            fresh_patterns=(layers.ADAPTER_PATH_PATTERN,),
            config=model.config,
        ),
        sep="/",
    )
  else:
    flat = traverse_util.flatten_dict(
        layer_layout.unstack_layers(
            jax.tree.map(np.asarray, model.init_params(rng))
        ),
        sep="/",
    )
  for name, value in trained_flat.items():
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
