"""T5X-style flags for the entry points: --gin_file, --gin.NAME=VALUE, ...

`--gin.NAME=VALUE` arguments are rewritten to `--gin_bindings=NAME = VALUE`
before absl parses the flags, as T5X does; values are gin literals, so strings
need quotes (`--gin.MODEL_DIR=\\"/tmp/run\\"`).
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


class _DropMessages(logging.Filter):

  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.prefix)


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
  # Includes are written relative to configs/ ('models/tiny.gin'); search it
  # first so gin logs no misses. Files that exist as given are used as is.
  for path in [CONFIG_DIR] + list(search_paths) + [REPO_ROOT]:
    gin.add_config_file_search_path(path)
  gin_files = [
      os.path.abspath(f) if os.path.exists(f) else f for f in gin_files
  ]
  # gin logs an error for every search-path miss of an include; they are
  # expected, so hide them (a real miss still raises below).
  quiet = _DropMessages("Path not found:")
  logging.getLogger().addFilter(quiet)
  try:
    gin.parse_config_files_and_bindings(
        list(gin_files),
        list(gin_bindings),
        finalize_config=False,
        skip_unknown=False,
    )
  except (ValueError, KeyError, IOError, SyntaxError) as e:
    raise ValueError(
        f"Gin configuration error: {e}\n  gin files: {list(gin_files)}\n  "
        f"bindings: {list(gin_bindings)}\nA macro set to %gin.REQUIRED must "
        'be bound, e.g. --gin.MODEL_DIR=\\"/tmp/run\\".'
    ) from e
  finally:
    logging.getLogger().removeFilter(quiet)
  if finalize:
    gin.finalize()


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
