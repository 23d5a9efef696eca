"""T5X-style flags for the entry points: --gin_file, --gin.NAME=VALUE, ...

`--gin.NAME=VALUE` arguments are rewritten to `--gin_bindings=NAME = VALUE`
before absl parses the flags, as T5X does; values are gin literals, so strings
need quotes (`--gin.MODEL_DIR=\\"/tmp/run\\"`).

One set of gin files serves two drivers: flix's (`python -m flix.train`) and
T5X's (`python -m t5x.train`). Model, peft, ablation and data gins bind flix
configurables only; the run files (`configs/runs/*.gin`) bind both drivers'
entry points. flix parses with `skip_unknown=T5X_ONLY_SELECTORS`: bindings
of exactly these T5X selectors (and imports that fail without t5x) are
skipped, every other unknown selector or parameter is still an error.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

import gin
from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
# The flix model's definition (size files bind only the preset name).
MODEL_GIN = os.path.join(CONFIG_DIR, "models", "base.gin")

# The selectors the run files bind for T5X's driver only (the thin driver
# layer; tests/gin_configs_test.py pins that every shipped config parses
# without t5x and that each entry is used). flix's driver skips them.
T5X_ONLY_SELECTORS = (
    # T5X's entry points (`import __main__ as train_script`, ...).
    "train_script.train",
    "eval_script.evaluate",
    "infer_script.infer",
    # T5X configurables.
    "partitioning.PjitPartitioner",
    "partitioning.standard_logical_axis_rules",
    "trainer.Trainer",
    "utils.CheckpointConfig",
    "utils.DatasetConfig",
    "utils.RestoreCheckpointConfig",
    "utils.SaveCheckpointConfig",
    # flix's T5X plug-in (imports t5x).
    "t5x_model.FlixEncoderDecoderModel",
    "t5x_driver.FeaturizedResultsLogger",
    "t5x_driver.checkpoint_to_restore",
    "t5x_driver.fresh_params_assignment_map",
    "t5x_driver.summarize_run",
    "t5x_driver.task_vocabulary",
)


class _DropMessages(logging.Filter):

  def __init__(self, prefixes: tuple[str, ...]):
    super().__init__()
    self.prefixes = prefixes

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.prefixes)


def define_flags() -> None:
  """The flags shared by flix.train, flix.eval and flix.infer."""
  flags.DEFINE_multi_string("gin_file", [], "Gin files, applied in order.")
  flags.DEFINE_multi_string("gin_bindings", [], "Individual gin bindings.")
  flags.DEFINE_list(
      "gin_search_paths",
      ["."],
      "Directories searched for gin files and includes.",
  )
  flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory.")
  flags.DEFINE_bool(
      "multiprocess",
      False,
      "Call jax.distributed.initialize() (TPU VM pod slices).",
  )


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """`--gin.NAME=VALUE` -> `--gin_bindings=NAME = VALUE`."""
  out = []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      name, value = arg[len("--gin.") :].split("=", 1)
      out.append(f"--gin_bindings={name} = {value}")
    else:
      out.append(arg)
  return out


def flags_parser(argv: Sequence[str]) -> list[str]:
  return flags.FLAGS(rewrite_gin_args(argv), known_only=False)


def parse_gin(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str],
    search_paths: Sequence[str] = (".",),
    finalize: bool = True,
) -> None:
  """Parses gin files and bindings; errors say which file or macro is wrong.

  With `finalize`, unbound REQUIRED macros are an error now (entry points);
  without, only what is actually called must be bound (flix.export).
  """
  # Includes are written relative to the repository root
  # ('configs/models/tiny.gin'), as T5X's driver finds them from there; the
  # root is searched too, so flix's driver works from any directory.
  for path in list(search_paths) + [REPO_ROOT]:
    if path not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
      gin.add_config_file_search_path(path)
  gin_files = [
      os.path.abspath(f) if os.path.exists(f) else f for f in gin_files
  ]
  # gin logs a search-path miss of an include, and every import it skips
  # (T5X's modules without t5x); both are expected, so hide them. A file
  # that is not found, or a binding of a module whose import failed, still
  # raises below.
  quiet = _DropMessages(("Path not found:", "Skipping import of unknown"))
  logging.getLogger().addFilter(quiet)
  try:
    gin.parse_config_files_and_bindings(
        list(gin_files),
        list(gin_bindings),
        finalize_config=False,
        skip_unknown=list(T5X_ONLY_SELECTORS),
    )
  except (ValueError, KeyError, IOError, SyntaxError, NameError) as e:
    raise ValueError(
        f"Gin configuration error: {e}\n  gin files: {list(gin_files)}\n  "
        f"bindings: {list(gin_bindings)}\nA macro set to %gin.REQUIRED must "
        'be bound, e.g. --gin.MODEL_DIR=\\"/tmp/run\\".'
    ) from e
  finally:
    logging.getLogger().removeFilter(quiet)
  if finalize:
    _finalize_skipping_t5x_references()


def _finalize_skipping_t5x_references() -> None:
  """`gin.finalize()` (REQUIRED macros, macro references) without gin's
  unknown-reference check: the only unknown references left after parsing
  are the skipped T5X_ONLY_SELECTORS (any other is an error while parsing)."""
  hooks = gin.config._FINALIZE_HOOKS  # pylint: disable=protected-access
  saved = list(hooks)
  hooks[:] = [
      h for h in saved if h is not gin.config.find_unknown_references_hook
  ]
  try:
    gin.finalize()
  finally:
    hooks[:] = saved


def setup(argv: Sequence[str]) -> None:
  """Common start of every entry point (after absl parsed the flags)."""
  del argv
  logging.getLogger().setLevel(logging.INFO)
  if flags.FLAGS.multiprocess:
    import jax  # pylint: disable=g-import-not-at-top

    jax.distributed.initialize()
  if flags.FLAGS.tfds_data_dir:
    import seqio  # pylint: disable=g-import-not-at-top

    seqio.set_tfds_data_dir_override(flags.FLAGS.tfds_data_dir)
  parse_gin(
      flags.FLAGS.gin_file,
      flags.FLAGS.gin_bindings,
      flags.FLAGS.gin_search_paths,
  )


def call_configured(fn: Callable):
  """Calls `fn` with its gin bindings; a REQUIRED macro left unset is named."""
  try:
    return gin.get_configurable(fn)()
  except ValueError as e:
    if "gin.REQUIRED" in str(e) or "REQUIRED" in str(e):
      raise ValueError(
          f"{e}\nBind it with --gin.NAME=VALUE or in a gin " "file."
      ) from e
    raise


def macro_value(name: str):
  """The value bound to a gin macro (raises gin's error if unbound)."""
  return gin.query_parameter(f"{name}/macro.value")


def write_operative_config(output_dir: str) -> None:
  """Writes the parsed gin config to `output_dir/config.gin`, as T5X does."""
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "config.gin"), "w") as f:
    f.write(gin.config_str())


def run(main: Callable) -> None:
  """absl.app.run with the --gin.NAME rewriting parser."""
  from absl import app  # pylint: disable=g-import-not-at-top

  app.run(main, flags_parser=lambda argv: flags_parser(argv or sys.argv))
