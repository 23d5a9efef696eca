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

import difflib
import inspect
import logging
import os
import re
import sys
import tokenize
from typing import Any, Callable, Sequence

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
    "t5x_driver.base_checkpoint",
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
  except tokenize.TokenError as e:  # An unclosed bracket, at the file end.
    raise ValueError(
        f"Gin configuration error: {e.args[0]} (line {e.args[1][0]}) in one "
        f"of {list(gin_files)}: a bracket or quote is not closed."
    ) from e
  except (
      ValueError,
      KeyError,
      IOError,
      SyntaxError,
      NameError,
      TypeError,
  ) as e:
    raise ValueError(f"Gin configuration error: {_gin_message(e)}") from e
  finally:
    logging.getLogger().removeFilter(quiet)
  check_macro_bindings(gin_bindings, gin_files, search_paths)
  if finalize:
    try:
      _finalize_skipping_t5x_references()
    except ValueError as e:
      raise ValueError(f"Gin configuration error: {_gin_message(e)}") from e


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


_REQUIRED_RE = re.compile(r"(\w+)/macro\.value set to `%gin\.REQUIRED`")
_UNBOUND_MACRO_RE = re.compile(
    r"No bindings specified for '([\w.]+)/gin\.macro'"
)
_NO_PARAMETER_RE = re.compile(
    r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'"
)


def _suggest(name: str, known) -> str:
  close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  return f"; did you mean {close[0]}?" if close else "."


def _macros() -> set[str]:
  """Names of the macros bound in the parsed config."""
  return set(re.findall(r"^([A-Za-z_]\w*) = ", gin.config_str(), re.M))


def _parameters(selector: str) -> list[str]:
  try:
    fn = gin.get_configurable(selector)
    return list(inspect.signature(getattr(fn, "__wrapped__", fn)).parameters)
  except Exception:  # pylint: disable=broad-except
    return []


def _gin_message(error: Exception) -> str:
  """Gin's error as one line: the problem, a suggestion, where it is."""
  if isinstance(error, SyntaxError):
    token = re.search(r"Failed to parse token '(.*)'", str(error))
    problem = (
        f"cannot parse the value {token.group(1)} (strings need quotes: "
        "--gin.NAME=\"'text'\")"
        if token
        else error.msg
    )
    where = f"{error.filename}:{error.lineno}" if error.filename else "binding"
    return f"{problem} ({where}: {(error.text or '').strip()})"
  text = str(error.args[0] if isinstance(error, KeyError) else error)
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  first = lines[0] if lines else type(error).__name__
  required = _REQUIRED_RE.search(first)
  if required:
    name = required.group(1)
    return (
        f"{name} is required (set to %gin.REQUIRED and never bound): bind it"
        f' with --gin.{name}=VALUE (strings quoted: --gin.{name}=\\"...\\")'
        " or in a gin file."
    )
  unbound = _UNBOUND_MACRO_RE.search(first)
  if unbound:
    name = unbound.group(1)
    suggestion = _suggest(name, _macros())
    return f"unknown macro %{name}: no binding defines it{suggestion}"
  no_parameter = _NO_PARAMETER_RE.search(first)
  if no_parameter:
    first = first.rstrip(".") + _suggest(
        no_parameter.group(2), _parameters(no_parameter.group(1))
    )
  # Gin names the place on the next lines: 'In file "x", line 3' or 'In
  # bindings string line 2', then the offending line itself.
  where = [l for l in lines[1:3] if not l.startswith("In call to")]
  return first + (f" ({': '.join(where)})" if where else "")


def config_files(
    gin_files: Sequence[str], search_paths: Sequence[str] = (".",)
) -> list[str]:
  """The gin files and every file they include, as found on disk.

  Includes are resolved as gin resolves them: as given, then under each
  search path and the repository root.
  """
  found: list[str] = []

  def locate(name: str) -> str | None:
    for prefix in ("", *search_paths, REPO_ROOT):
      path = os.path.join(prefix, name) if prefix else name
      if os.path.isfile(path):
        return os.path.abspath(path)
    return None

  def visit(name: str) -> None:
    path = locate(name)
    if path is None or path in found:
      return
    found.append(path)
    with open(path, encoding="utf-8") as f:
      for line in f:
        include = re.match(r"\s*include\s+['\"](.+)['\"]", line)
        if include:
          visit(include.group(1))

  for name in gin_files:
    visit(name)
  return found


def referenced_macros(paths: Sequence[str]) -> set[str]:
  """Names of the macros the gin files reference (`%NAME`), in any section:
  a macro only T5X's driver reads is still used."""
  names = set()
  for path in paths:
    with open(path, encoding="utf-8") as f:
      names.update(re.findall(r"%([A-Za-z_]\w*)", f.read()))
  return names


def check_macro_bindings(
    gin_bindings: Sequence[str],
    gin_files: Sequence[str] = (),
    search_paths: Sequence[str] = (".",),
) -> None:
  """A command-line macro binding that nothing uses is likely a misspelling:
  an error when a used macro has a close name, else a warning. Used: bound
  in the parsed config or referenced by a gin file (`referenced_macros`)."""
  used = set(re.findall(r"%([A-Za-z_]\w*)", gin.config_str()))
  used |= referenced_macros(config_files(gin_files, search_paths))
  for binding in gin_bindings:
    match = re.match(r"\s*([A-Za-z_]\w*)\s*=", binding)
    if not match or match.group(1) in used:
      continue
    name = match.group(1)
    close = difflib.get_close_matches(name, list(used), n=1, cutoff=0.75)
    if close:
      raise ValueError(
          f"Gin configuration error: unknown macro {name} (bound by "
          f"{binding.strip()!r}): no configurable uses it; did you mean "
          f"{close[0]}?"
      )
    logging.warning(
        "The macro %s is bound (%r) but no configurable uses it.",
        name,
        binding.strip(),
    )


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


def call_configured(fn: Callable, **kwargs: Any):
  """Calls `fn` with its gin bindings (and `kwargs`); a REQUIRED macro left
  unset is named."""
  try:
    return gin.get_configurable(fn)(**kwargs)
  except ValueError as e:
    if "REQUIRED" in str(e):
      raise ValueError(f"Gin configuration error: {_gin_message(e)}") from e
    raise


def macro_value(name: str):
  """The value bound to a gin macro (raises gin's error if unbound)."""
  return gin.query_parameter(f"{name}/macro.value")


# Errors of bad input (files, flags, gin, checkpoints, data) that entry points
# report as one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def one_line(error: BaseException) -> str:
  """The error's message on one line, without gin's 'In call to
  configurable' notes."""
  text = str(error.args[0] if isinstance(error, KeyError) else error)
  lines = [l.strip() for l in text.splitlines()]
  return " ".join(l for l in lines if l and not l.startswith("In call to"))


def report_errors(main: Callable, entry: str) -> Callable:
  """Wraps `main` so a `USER_ERRORS` exits with `<entry>: error: <message>`
  (status 1); FLIX_TRACEBACK=1 shows the traceback instead."""

  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if os.environ.get("FLIX_TRACEBACK"):
        raise
      sys.exit(f"{entry}: error: {one_line(e)}")

  return wrapped


def run(main: Callable) -> None:
  """absl.app.run with the --gin.NAME rewriting parser; bad input exits with
  one line naming the entry point (`flix.train: error: ...`)."""
  from absl import app  # pylint: disable=g-import-not-at-top

  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  entry = spec.name if spec else os.path.basename(sys.argv[0])
  app.run(
      report_errors(main, entry),
      flags_parser=lambda argv: flags_parser(argv or sys.argv),
  )
