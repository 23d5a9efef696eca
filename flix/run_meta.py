"""Does a restart train the same thing as the run whose checkpoints it finds?

Every checkpoint saves the run's meta (`checkpoints.run_meta`): the feature
space, the network config, the trainable patterns and the base reference.
`differences(saved, current)` lists what a new configuration changes in
what is trained: another feature vocabulary or ranks, another model size,
another trainable set, another base, another token vocabulary. Settings that only change how it is
computed or regularised (dtype, dropout, the adapter strategy, layer
scanning, rematerialisation) may change on a restart.

`check_resumable` makes any difference an error naming it: resuming would
silently mix two runs' adapters. A mode that extends a run on purpose (e.g.
with new feature values) filters `differences` for the changes it allows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

# Network config fields that say how the network is computed, not which
# parameters it has or what they mean.
COMPUTATION_FIELDS = frozenset(
    {
        "dtype",
        "dropout_rate",
        "float32_attention_logits",
        "one_hot_embedding",
        "flix_strategy",
        "max_segments",
        "scan_layers",
        "remat_policy",
    }
)
# Feature group fields that are training hyperparameters.
FEATURE_HYPERPARAMETERS = frozenset({"dropout"})
# What identifies a recorded vocabulary (`flix.vocabularies.record`); its
# file paths may change.
VOCABULARY_FIELDS = ("type", "sha256", "extra_ids", "size")


class ResumeMismatchError(ValueError):
  """MODEL_DIR holds checkpoints of a run that trained something else."""


@dataclasses.dataclass(frozen=True)
class Difference:
  """One change between the saved run and this configuration.

  Attributes:
    path: what changed, e.g. `feature_space.language.values` or
      `model_config.emb_dim`.
    saved: the saved run's value.
    now: this configuration's value.
  """

  path: str
  saved: Any
  now: Any

  def __str__(self) -> str:
    if isinstance(self.saved, list) and isinstance(self.now, list):
      added = [v for v in self.now if v not in self.saved]
      removed = [v for v in self.saved if v not in self.now]
      if added or removed:
        parts = [f"added {_short(added)}"] if added else []
        parts += [f"removed {_short(removed)}"] if removed else []
        return f"{self.path}: {', '.join(parts)}"
    return f"{self.path}: saved {_short(self.saved)}, now {_short(self.now)}"


def _short(value: Any, limit: int = 120) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _groups(space: Optional[Mapping[str, Any]]) -> dict[str, Mapping]:
  return {g["name"]: g for g in (space or {}).get("groups", [])}


def feature_space_differences(
    saved: Optional[Mapping[str, Any]], now: Optional[Mapping[str, Any]]
) -> list[Difference]:
  """Changes between two `FeatureSpace.to_dict()`s (None: no adapters)."""
  if (saved is None) != (now is None):
    return [Difference("feature_space", saved, now)]
  if saved is None:
    return []
  out = []
  if bool(saved.get("rslora")) != bool(now.get("rslora")):
    out.append(
        Difference("feature_space.rslora", saved.get("rslora"), now["rslora"])
    )
  saved_groups, now_groups = _groups(saved), _groups(now)
  if list(saved_groups) != list(now_groups):
    out.append(
        Difference("feature_space.groups", list(saved_groups), list(now_groups))
    )
  for name in [g for g in saved_groups if g in now_groups]:
    old, new = saved_groups[name], now_groups[name]
    for key in sorted(set(old) | set(new)):
      if key not in FEATURE_HYPERPARAMETERS and old.get(key) != new.get(key):
        out.append(
            Difference(
                f"feature_space.{name}.{key}", old.get(key), new.get(key)
            )
        )
  return out


def differences(
    saved: Mapping[str, Any], current: Mapping[str, Any]
) -> list[Difference]:
  """What `current` (this run's meta) changes in what `saved` trained."""
  out = feature_space_differences(
      saved.get("feature_space"), current.get("feature_space")
  )
  old_config, new_config = saved.get("model_config", {}), current.get(
      "model_config", {}
  )
  for key in sorted(set(old_config) | set(new_config)):
    if key in COMPUTATION_FIELDS:
      continue
    if old_config.get(key) != new_config.get(key):
      out.append(
          Difference(
              f"model_config.{key}", old_config.get(key), new_config.get(key)
          )
      )
  if list(saved.get("trainable_patterns", [])) != list(
      current.get("trainable_patterns", [])
  ):
    out.append(
        Difference(
            "trainable_patterns",
            list(saved.get("trainable_patterns", [])),
            list(current.get("trainable_patterns", [])),
        )
    )
  old_vocabulary, new_vocabulary = saved.get("vocabulary"), current.get(
      "vocabulary"
  )
  if old_vocabulary and new_vocabulary:  # Older runs lack the record.
    for key in VOCABULARY_FIELDS:
      if old_vocabulary.get(key) != new_vocabulary.get(key):
        out.append(
            Difference(
                f"vocabulary.{key}",
                old_vocabulary.get(key),
                new_vocabulary.get(key),
            )
        )
  old_base, new_base = saved.get("base", {}), current.get("base", {})
  if old_base.get("initial_checkpoint") != new_base.get("initial_checkpoint"):
    out.append(
        Difference(
            "base.initial_checkpoint",
            old_base.get("initial_checkpoint"),
            new_base.get("initial_checkpoint"),
        )
    )
  elif not new_base.get("initial_checkpoint") and old_base.get(
      "init_seed"
  ) != new_base.get("init_seed"):
    # A randomly initialised base is defined by its seed.
    out.append(
        Difference(
            "base.init_seed", old_base.get("init_seed"), new_base["init_seed"]
        )
    )
  return out


def check_resumable(
    saved: Mapping[str, Any], current: Mapping[str, Any], where: str
) -> None:
  """Raises `ResumeMismatchError` naming every difference, if any."""
  found = differences(saved, current)
  if found:
    raise ResumeMismatchError(
        f"{where} holds checkpoints of a run that trained something else; "
        "resuming would mix the two. "
        + "; ".join(str(d) for d in found)
        + ". Give this run a new MODEL_DIR, or restore the saved run's "
        "configuration."
    )
