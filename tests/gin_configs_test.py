"""Every shipped .gin file parses, with its REQUIRED macros bound to dummies."""

import pathlib
import re

import gin
import pytest

from flix import gin_utils

CONFIGS = sorted(p for p in (pathlib.Path(gin_utils.CONFIG_DIR)).rglob("*.gin"))
DUMMIES = [
    "MODEL_DIR = '/tmp/dummy'",
    "MIXTURE_OR_TASK_NAME = 'numbers_multitask'",
    "TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 8}",
    "TRAIN_STEPS = 1",
    "CHECKPOINT_PATH = '/tmp/dummy'",
    "EVAL_OUTPUT_DIR = '/tmp/dummy'",
    "INFER_OUTPUT_DIR = '/tmp/dummy'",
    "XTREME_UP_DIR = '/tmp/dummy'",
    "TRAIN_FILES = '/tmp/dummy.jsonl'",
]


# Fragments are parsed with the files they are meant to be combined with.
COMPANIONS = {
    "models": ["peft/lora.gin"],
    "peft": ["models/tiny.gin"],
    "runs": ["models/tiny.gin", "peft/flix.gin"],
    "ablations": ["demo.gin"],
    "reproduce": ["peft/lora.gin"],
}


def _files_for(path):
  relative = path.relative_to(gin_utils.CONFIG_DIR)
  companions = (
      COMPANIONS.get(relative.parts[0], []) if len(relative.parts) > 1 else []
  )
  config_dir = pathlib.Path(gin_utils.CONFIG_DIR)
  if relative.parts[0] == "ablations":
    return [str(config_dir / c) for c in companions] + [str(path)]
  return [str(path)] + [str(config_dir / c) for c in companions]


@pytest.mark.parametrize(
    "path", CONFIGS, ids=lambda p: str(p.relative_to(gin_utils.CONFIG_DIR))
)
def test_config_parses(path):
  gin.clear_config()
  try:
    # Bind only the dummies the files use: a binding nothing uses is an
    # error when it looks like a misspelt macro (gin_utils).
    gin_utils.parse_gin(_files_for(path), [], finalize=False)
    used = set(re.findall(r"%(\w+)", gin.config_str()))
    gin.clear_config()
    gin_utils.parse_gin(
        _files_for(path), [d for d in DUMMIES if d.split(" =")[0] in used]
    )
  finally:
    gin.clear_config()


def test_configs_exist():
  names = {str(p.relative_to(gin_utils.CONFIG_DIR)) for p in CONFIGS}
  for expected in (
      "demo.gin",
      "flix_mt5_xl.gin",
      "lora_mt5_xl.gin",
      "runs/finetune.gin",
      "runs/eval.gin",
      "runs/infer.gin",
      "models/mt5_xl.gin",
      "models/byt5_small.gin",
      "peft/flix.gin",
      "peft/lora.gin",
      "peft/full.gin",
  ):
    assert expected in names


def test_missing_required_macro_names_it():
  gin.clear_config()
  try:
    with pytest.raises(ValueError, match="MODEL_DIR"):
      gin_utils.parse_gin(
          [str(pathlib.Path(gin_utils.CONFIG_DIR) / "demo.gin")], []
      )
  finally:
    gin.clear_config()


def test_wrong_binding_says_what():
  gin.clear_config()
  try:
    with pytest.raises(ValueError, match="no_such_parameter"):
      gin_utils.parse_gin(
          [str(pathlib.Path(gin_utils.CONFIG_DIR) / "demo.gin")],
          DUMMIES + ["trainer.train.no_such_parameter = 3"],
      )
  finally:
    gin.clear_config()


def test_gin_flag_rewriting():
  assert gin_utils.rewrite_gin_args(
      ["prog", '--gin.MODEL_DIR="/x"', "--gin_file=a.gin"]
  ) == ["prog", '--gin_bindings=MODEL_DIR = "/x"', "--gin_file=a.gin"]
