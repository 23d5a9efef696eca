"""Entry point: `python -m flix.export --checkpoint=... --features=... ...`.

Writes one feature set of a flix run (any combination, seen in training or
not) as a PEFT LoRA adapter, or merged into the base as an HF or T5X model
(`flix.adapter_export`). The gin files give the network sizes, as for
flix.eval:

  python -m flix.export --checkpoint=/tmp/flix_demo/flix \\
      --gin_file=configs/demo_eval.gin --features=task=ordinal,language=fr \\
      --format=peft --output=/tmp/ordinal_fr --base_output=/tmp/base_hf
"""

from __future__ import annotations

import logging
from typing import Sequence

from absl import flags

from flix import adapter_export
from flix import gin_utils
from flix import models


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
          f"Feature group {group.strip()!r} given twice in {text!r}."
      )
    out[group.strip()] = value.strip()
  return out


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
  # The model definition first, so a size file alone (tiny.gin) is enough.
  gin_utils.parse_gin(
      [gin_utils.MODEL_GIN] + list(gin_files),
      list(gin_bindings) + ["FEATURE_SPACE = None"],
      search_paths,
      finalize=False,
  )
  return gin_utils.call_configured(models.FlixModel)


def _define_flags() -> None:
  gin_utils.define_flags()
  flags.DEFINE_string(
      "checkpoint", None, "flix MODEL_DIR or step directory.", required=True
  )
  flags.DEFINE_string("features", "", "Feature set: group=value,...")
  flags.DEFINE_enum(
      "format", "peft", list(adapter_export.FORMATS), "What to write."
  )
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
  flags.DEFINE_string(
      "vocabulary",
      None,
      "'bytes' or a SentencePiece .model path, for checkpoints that record "
      "none (default: the recorded one).",
  )


def main(argv: Sequence[str]) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  f = flags.FLAGS
  out = adapter_export.export(
      model=load_model(f.gin_file, f.gin_bindings, f.gin_search_paths),
      checkpoint=f.checkpoint,
      features=parse_features(f.features),
      output_format=f.format,
      output=f.output,
      base_model_name_or_path=f.base_model_name_or_path,
      base_output=f.base_output,
      overwrite=f.overwrite,
      vocabulary=f.vocabulary,
  )
  logging.info("Wrote the %s export of %s to %s.", f.format, f.features, out)


if __name__ == "__main__":
  _define_flags()
  gin_utils.run(main)
