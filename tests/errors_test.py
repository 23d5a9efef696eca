"""The catalogue of bad inputs (docs/errors.md): each case's exact message.

`CASES` maps a catalogue id to a function that feeds the bad input to the
code that reads it and returns (what was raised or warned, the expected
message). docs/errors.md lists every case, plus the cases pinned beside
their module (trainer_test, checkpoints_test, ...); a test keeps the two in
step. The entry points turn these errors into one line,
`flix.<entry>: error: <message>` (two of them checked end to end here).
"""

import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import gin
import numpy as np
import pytest
import seqio

from flix import adapter_export
from flix import checkpoints
from flix import export
from flix import feature_converter
from flix import featurized
from flix import features
from flix import gin_utils
from flix import inference
from flix import jsonl_records
from flix import t5_config
from flix import train_step
from flix import trainer
from flix_tasks import jsonl

REPO = pathlib.Path(__file__).resolve().parents[1]
GOOD = b'{"inputs": "a", "targets": "b", "features": {"task": "qa"}}\n'
SPACE = features.FeatureSpace.from_values(
    {"task": ["qa", "ner"], "language": ["sw", "yo"]}
)


def _jsonl(tmp_path, data: bytes) -> str:
  path = tmp_path / "data.jsonl"
  path.write_bytes(data)
  return str(path)


def _read(tmp_path, data: bytes):
  return list(jsonl_records.read_records(_jsonl(tmp_path, data)))


def _error(fn, *args, **kwargs) -> str:
  with pytest.raises((ValueError, OSError)) as error:
    fn(*args, **kwargs)
  return str(error.value)


def _line2(tmp_path, line: bytes) -> tuple[str, str]:
  return (
      _error(_read, tmp_path, GOOD + line + b"\n"),
      f"{tmp_path}/data.jsonl:2",
  )


# ---- JSONL ----


def jsonl_invalid_json(tmp_path):
  got, where = _line2(tmp_path, b'{"inputs": "a", "targets": ')
  return got, f"{where}: invalid JSON (Expecting value)."


def jsonl_not_an_object(tmp_path):
  got, where = _line2(tmp_path, b'["a", "b"]')
  return got, f"{where}: expected a JSON object, got list."


def jsonl_missing_inputs(tmp_path):
  got, where = _line2(tmp_path, b'{"targets": "b"}')
  return got, f"{where}: missing 'inputs'."


def jsonl_missing_targets(tmp_path):
  got, where = _line2(tmp_path, b'{"inputs": "a"}')
  return got, f"{where}: missing 'targets'."


def jsonl_non_string_value(tmp_path):
  got, where = _line2(tmp_path, b'{"inputs": 12, "targets": "b"}')
  return got, f"{where}: 'inputs' must be a string, got int."


def jsonl_features_not_an_object(tmp_path):
  got, where = _line2(
      tmp_path, b'{"inputs": "a", "targets": "b", "features": "qa"}'
  )
  return got, f"{where}: 'features' must be an object of strings, got str."


def jsonl_feature_value_is_a_list(tmp_path):
  got, where = _line2(
      tmp_path,
      b'{"inputs": "a", "targets": "b", "features": {"task": ["qa", "ner"]}}',
  )
  return (
      got,
      f'{where}: feature \'task\' must be a string, got list ["qa", "ner"].',
  )


def jsonl_feature_group_name(tmp_path):
  got, where = _line2(
      tmp_path, b'{"inputs": "a", "targets": "b", "features": {"my task": "x"}}'
  )
  return got, (
      f"{where}: feature group name 'my task' must be alphanumeric "
      "(underscores allowed)."
  )


def jsonl_invalid_utf8(tmp_path):
  got, where = _line2(tmp_path, b'{"inputs": "caf\xe9", "targets": "b"}')
  return got, f"{where}: not valid UTF-8 (byte 15: invalid continuation byte)."


def jsonl_empty_file(tmp_path):
  path = _jsonl(tmp_path, b"\n  \n")
  got = _error(jsonl.register_jsonl_task, "errors_empty", path)
  return got, f"{path}: no examples (the file is empty or blank)."


def jsonl_glob_matches_no_file(tmp_path):
  pattern = f"{tmp_path}/train-*.jsonl"
  got = _error(jsonl.register_jsonl_task, "errors_glob", pattern)
  return got, (
      f"No file matches '{pattern}' (the train files of JSONL task "
      "'errors_glob')."
  )


def jsonl_utf8_bom_is_read(tmp_path):
  [record] = _read(tmp_path, b"\xef\xbb\xbf" + GOOD)
  return record, jsonl_records.Record("a", "b", {"task": "qa"})


def jsonl_crlf_line_ends_are_read(tmp_path):
  records = _read(tmp_path, GOOD.replace(b"\n", b"\r\n") * 2)
  return records, [jsonl_records.Record("a", "b", {"task": "qa"})] * 2


def infer_input_file_missing(tmp_path):
  path = f"{tmp_path}/inputs.jsonl"
  got = _error(inference.read_featurized_inputs, path)
  return got, f"INPUT_FILE {path} does not exist."


def infer_input_without_inputs(tmp_path):
  path = _jsonl(tmp_path, b'{"features": {"task": "qa"}}\n')
  got = _error(inference.read_featurized_inputs, path)
  return got, f"{path}:1: missing 'inputs'."


# ---- Features ----


def _warnings(caplog, fn):
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    result = fn()
  return result, [r.getMessage() for r in caplog.records]


def feature_unknown_group_at_train(tmp_path):
  path = _jsonl(tmp_path, GOOD)
  jsonl.register_jsonl_task("errors_groups", path)
  got = _error(featurized.feature_space, "errors_groups", groups=["script"])
  return got, (
      "'errors_groups' has no feature group(s) ['script']; its groups are "
      "['task']."
  )


def feature_no_groups_at_train(tmp_path):
  path = _jsonl(tmp_path, b'{"inputs": "a", "targets": "b"}\n')
  jsonl.register_jsonl_task("errors_no_groups", path)
  got = _error(featurized.feature_space, "errors_no_groups")
  return got, "'errors_no_groups' has no feature groups."


def _unknown_value_warning(value):
  return (
      f"Unknown language value '{value}': its adapter does not exist, so "
      "only the known features apply (known values: sw, yo)."
  )


def feature_unknown_value_at_train(tmp_path, caplog):
  path = _jsonl(
      tmp_path,
      b'{"inputs": "a", "targets": "b", "features": {"language": "xh"}}\n',
  )
  jsonl.register_jsonl_task("errors_unknown_value", path)
  unknown, warnings = _warnings(
      caplog,
      lambda: featurized.check_feature_values("errors_unknown_value", SPACE),
  )
  assert unknown == {"language": ("xh",)}
  return warnings, [_unknown_value_warning("xh")]


def feature_unknown_value_at_eval_and_infer(tmp_path, caplog):
  examples = [{"inputs": "a", "features": {"task": "qa", "language": "zu"}}] * 3
  batch, warnings = _warnings(
      caplog,
      lambda: feature_converter.encode_examples(
          examples, SPACE, {"inputs": 4, "targets": 4}, seqio.ByteVocabulary()
      ),
  )
  # Only the known feature applies: task qa (id 1), no language (0).
  np.testing.assert_array_equal(
      batch["encoder_feature_ids"][:, 0], [[1, 0]] * 3
  )
  return warnings, [_unknown_value_warning("zu")]  # Once, not per example.


def feature_unknown_value_at_export(tmp_path):
  got = _error(SPACE.resolve, {"task": "qa", "language": "xh"}, strict=True)
  return got, (
      "Unknown language value 'xh': the model has no adapter for it. Known "
      "language values: sw, yo."
  )


def feature_unknown_group_at_export(tmp_path):
  got = _error(SPACE.resolve, {"script": "Latn"}, strict=True)
  return got, (
      "Unknown feature group 'script'; the model's groups are: task, "
      "language."
  )


def feature_set_syntax_at_export(tmp_path):
  got = _error(export.parse_features, "task=qa,language")
  return got, (
      "Bad feature 'language' in 'task=qa,language': expected group=value "
      "pairs, e.g. task=ordinal,language=fr."
  )


# ---- gin ----


def _gin_error(bindings, files=("configs/demo.gin",)):
  gin.clear_config()
  try:
    return _error(
        gin_utils.parse_gin,
        [str(REPO / f) for f in files],
        ['MODEL_DIR = "/tmp/unused"'] + list(bindings),
    )
  finally:
    gin.clear_config()


def gin_misspelt_parameter(tmp_path):
  got = _gin_error(["trainer.train.evalute_fn = None"])
  return got, (
      "Gin configuration error: Configurable 'trainer.train' doesn't have a "
      "parameter named 'evalute_fn'; did you mean evaluate_fn? (In bindings "
      "string line 2: trainer.train.evalute_fn = None)"
  )


def gin_unknown_configurable(tmp_path):
  got = _gin_error(["trainr.train.train_steps = 5"])
  return got, (
      "Gin configuration error: No configurable matching 'trainr.train'. (In "
      "bindings string line 2: trainr.train.train_steps = 5)"
  )


def gin_misspelt_macro_binding(tmp_path):
  got = _gin_error(["TRAIN_STEP = 5"])
  return got, (
      "Gin configuration error: unknown macro TRAIN_STEP (bound by "
      "'TRAIN_STEP = 5'): no configurable uses it; did you mean TRAIN_STEPS?"
  )


def gin_unknown_macro_reference(tmp_path):
  got = _gin_error(["trainer.train.eval_period = %EVAL_PERIODS"])
  return got, (
      "Gin configuration error: unknown macro %EVAL_PERIODS: no binding "
      "defines it; did you mean EVAL_PERIOD?"
  )


def gin_missing_required_macro(tmp_path):
  gin.clear_config()
  try:
    got = _error(gin_utils.parse_gin, [str(REPO / "configs/demo.gin")], [])
  finally:
    gin.clear_config()
  return got, (
      "Gin configuration error: MODEL_DIR is required (set to %gin.REQUIRED "
      "and never bound): bind it with --gin.MODEL_DIR=VALUE (strings quoted: "
      '--gin.MODEL_DIR=\\"...\\") or in a gin file.'
  )


def gin_unquoted_string(tmp_path):
  got = _gin_error(["MIXTURE_OR_TASK_NAME = numbers_multitask"])
  return got, (
      "Gin configuration error: cannot parse the value numbers_multitask "
      "(strings need quotes: --gin.NAME=\"'text'\") (binding: "
      "MIXTURE_OR_TASK_NAME = numbers_multitask)"
  )


def gin_wrong_value_type(tmp_path):
  got = _error(
      trainer.train,
      model=None,
      model_dir=str(tmp_path / "run"),
      mixture_or_task_name="unused",
      task_feature_lengths={"inputs": 8, "targets": 8},
      train_steps="10k",
      batch_size=8,
      optimizer=None,
  )
  assert not os.path.exists(tmp_path / "run")
  return got, (
      "trainer.train: train_steps must be an integer >= 1, got '10k' (str)."
  )


def gin_file_missing(tmp_path):
  got = _gin_error([], files=("configs/demo.gin", "configs/nope.gin"))
  return got, (
      "Gin configuration error: Unable to open file: "
      f"{REPO}/configs/nope.gin. Searched config paths: ['']."
  )


def gin_syntax_error(tmp_path):
  path = tmp_path / "bad.gin"
  path.write_text("from flix import trainer\ntrainer.train.train_steps = = 3\n")
  gin.clear_config()
  try:
    got = _error(gin_utils.parse_gin, [str(path)], [])
  finally:
    gin.clear_config()
  return got, (
      "Gin configuration error: Unable to parse value. "
      f"({path}:2: trainer.train.train_steps = = 3)"
  )


def unknown_network_preset(tmp_path):
  got = _error(t5_config.preset, "mt5_tiny")
  return got, (
      "Unknown network preset 'mt5_tiny'; presets: "
      f"{', '.join(sorted(t5_config.PRESETS))}."
  )


# ---- Checkpoints (more beside the module: checkpoints_test.py) ----


def checkpoint_path_missing(tmp_path):
  got = _error(checkpoints.load_any_params, f"{tmp_path}/base")
  return got, (
      f"INITIAL_CHECKPOINT_PATH {tmp_path}/base does not exist. Give a T5X "
      "checkpoint directory (…/checkpoint_1000000, with its `checkpoint` "
      "file), a Hugging Face mT5 directory (config.json + "
      "model.safetensors) or a flix MODEL_DIR."
  )


def checkpoint_for_eval_missing(tmp_path):
  got = _error(checkpoints.read_meta, str(tmp_path))
  return got, (
      f"No flix checkpoint at {tmp_path}: expected a step directory with "
      "params/ and meta/, or a MODEL_DIR whose checkpoints/ holds some."
  )


def export_empty_feature_set(tmp_path):
  checkpointer = checkpoints.Checkpointer(str(tmp_path / "run"))
  params = {"w": np.zeros((2,), np.float32)}
  meta = {"feature_space": SPACE.to_dict(), "base": {}}
  checkpointer.save(1, params, {"mu": params}, meta, force=True)
  checkpointer.close()
  got = _error(
      adapter_export.export,
      model=None,
      checkpoint=str(tmp_path / "run"),
      features={},
      output_format="peft",
      output=str(tmp_path / "out"),
  )
  return got, (
      "The feature set {} selects no adapter, so there is no LoRA to write: "
      "give --features=group=value,... (groups: task, language), or "
      "--format=hf for the base alone."
  )


# ---- Training configuration ----


def mixture_unknown(tmp_path):
  got = _error(featurized.feature_space, "numbers_multitsk")
  return got, "No task or mixture named 'numbers_multitsk' is registered."


def optimizer_unknown(tmp_path):
  got = _error(train_step.make_optimizer, 1e-3, "adam")
  return got, "Unknown optimizer 'adam'; use adafactor, adamw, sgd."


def trainable_set_unknown(tmp_path):
  got = _error(train_step.trainable_regexes, "adapter")
  return got, (
      "Unknown trainable set 'adapter': use 'adapters' or 'all', or a list "
      "of regexes."
  )


# ---- Command line ----


def export_over_existing_output(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "adapter_model.safetensors").write_bytes(b"")
  got = _error(
      adapter_export.export,
      model=None,
      checkpoint=str(tmp_path / "run"),
      features={"task": "qa"},
      output_format="peft",
      output=str(tmp_path / "out"),
  )
  return got, (
      f"Output directory {tmp_path}/out is not empty; pass --overwrite to "
      "replace its files."
  )


# ---- Data ----


def targets_longer_than_feature_lengths(tmp_path):
  rows = [
      {"inputs": "a" * n, "targets": "b" * (n + 3), "features": {"task": "t"}}
      for n in range(10)
  ]
  path = _jsonl(tmp_path, "\n".join(map(json.dumps, rows)).encode())
  jsonl.register_jsonl_task("errors_lengths", path)
  lengths = {"inputs": 8, "targets": 8}
  with featurized.count_truncation() as counter:
    dataset = seqio.get_mixture_or_task("errors_lengths").get_dataset(
        lengths, split="train", shuffle=False, num_epochs=1
    )
  assert len(list(dataset.as_numpy_iterator())) == 10
  # Naive: with EOS, a text of more than L - 1 bytes is cut.
  inputs = sum(len(r["inputs"]) > 7 for r in rows)
  targets = sum(len(r["targets"]) > 7 for r in rows)
  got = featurized.describe_truncations(
      [("errors_lengths", counter)], lengths, "training examples read"
  )
  return got, (
      f"Of 10 training examples read, {inputs} had inputs longer than "
      "TASK_FEATURE_LENGTHS['inputs'] = 8 tokens (errors_lengths "
      f"{inputs}) and {targets} had targets longer than "
      "TASK_FEATURE_LENGTHS['targets'] = 8 tokens (errors_lengths "
      f"{targets}); they are truncated (raise TASK_FEATURE_LENGTHS to keep "
      "them)."
  )


CASES = {
    "jsonl-invalid-json": jsonl_invalid_json,
    "jsonl-not-an-object": jsonl_not_an_object,
    "jsonl-missing-inputs": jsonl_missing_inputs,
    "jsonl-missing-targets": jsonl_missing_targets,
    "jsonl-non-string-value": jsonl_non_string_value,
    "jsonl-features-not-an-object": jsonl_features_not_an_object,
    "jsonl-feature-value-is-a-list": jsonl_feature_value_is_a_list,
    "jsonl-feature-group-name": jsonl_feature_group_name,
    "jsonl-invalid-utf8": jsonl_invalid_utf8,
    "jsonl-empty-file": jsonl_empty_file,
    "jsonl-glob-matches-no-file": jsonl_glob_matches_no_file,
    "jsonl-utf8-bom": jsonl_utf8_bom_is_read,
    "jsonl-crlf": jsonl_crlf_line_ends_are_read,
    "infer-input-file-missing": infer_input_file_missing,
    "infer-input-without-inputs": infer_input_without_inputs,
    "feature-unknown-group-train": feature_unknown_group_at_train,
    "feature-no-groups-train": feature_no_groups_at_train,
    "feature-unknown-value-train": feature_unknown_value_at_train,
    "feature-unknown-value-eval-infer": feature_unknown_value_at_eval_and_infer,
    "feature-unknown-value-export": feature_unknown_value_at_export,
    "feature-unknown-group-export": feature_unknown_group_at_export,
    "feature-set-syntax-export": feature_set_syntax_at_export,
    "gin-misspelt-parameter": gin_misspelt_parameter,
    "gin-unknown-configurable": gin_unknown_configurable,
    "gin-misspelt-macro-binding": gin_misspelt_macro_binding,
    "gin-unknown-macro-reference": gin_unknown_macro_reference,
    "gin-missing-required-macro": gin_missing_required_macro,
    "gin-unquoted-string": gin_unquoted_string,
    "gin-wrong-value-type": gin_wrong_value_type,
    "gin-file-missing": gin_file_missing,
    "gin-syntax-error": gin_syntax_error,
    "network-preset-unknown": unknown_network_preset,
    "checkpoint-path-missing": checkpoint_path_missing,
    "checkpoint-for-eval-missing": checkpoint_for_eval_missing,
    "export-over-existing-output": export_over_existing_output,
    "export-empty-feature-set": export_empty_feature_set,
    "mixture-unknown": mixture_unknown,
    "optimizer-unknown": optimizer_unknown,
    "trainable-set-unknown": trainable_set_unknown,
    "targets-longer-than-feature-lengths": targets_longer_than_feature_lengths,
}


@pytest.mark.parametrize("case", list(CASES))
def test_catalogue(case, tmp_path, caplog):
  fn = CASES[case]
  if "caplog" in fn.__code__.co_varnames[: fn.__code__.co_argcount]:
    got, expected = fn(tmp_path, caplog)
  else:
    got, expected = fn(tmp_path)
  assert got == expected
  if isinstance(got, str):
    assert "\n" not in got  # One line.


# ---- The catalogue in docs/errors.md ----


def _doc_rows():
  text = (REPO / "docs" / "errors.md").read_text()
  rows = []
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("| `") and len(cells) == 5:
      rows.append((cells[0].strip("`"), cells[4]))
  return rows


def test_docs_list_every_case_and_every_listed_test_exists():
  rows = _doc_rows()
  ids = [case for case, _ in rows]
  assert len(ids) == len(set(ids))
  assert len(ids) >= 30
  assert {c for c, test in rows if test == "errors_test"} == set(CASES)
  for case, test in rows:
    if test == "errors_test":
      continue
    module, _, name = test.partition("::")
    source = (REPO / "tests" / f"{module}.py").read_text()
    assert re.search(rf"^def {name}\(", source, re.M), (case, test)


# ---- Entry points: one line, no traceback ----


def test_report_errors_turns_known_errors_into_one_line(monkeypatch):
  def main(argv):
    del argv
    raise ValueError(
        "MODEL_DIR is bad\n  In call to configurable 'train' (<function>)"
    )

  monkeypatch.delenv("FLIX_TRACEBACK", raising=False)
  with pytest.raises(SystemExit) as exit_:
    gin_utils.report_errors(main, "flix.test")([])
  assert exit_.value.code == "flix.test: error: MODEL_DIR is bad"
  monkeypatch.setenv("FLIX_TRACEBACK", "1")
  with pytest.raises(ValueError):
    gin_utils.report_errors(main, "flix.test")([])


def _entry_point(module, *args):
  return subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=REPO,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=600,
  )


def test_train_reports_a_gin_error_in_one_line(tmp_path):
  result = _entry_point(
      "flix.train",
      "--gin_file=configs/demo.gin",
      f'--gin.MODEL_DIR="{tmp_path}/run"',
      "--gin.trainer.train.evalute_fn=None",
  )
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "flix.train: error: Gin configuration error: Configurable "
      "'trainer.train' doesn't have a parameter named 'evalute_fn'; did you "
      "mean evaluate_fn? (In bindings string line 2: trainer.train.evalute_fn"
      " = None)"
  )
  assert not os.path.exists(tmp_path / "run")


def test_export_reports_an_existing_output_in_one_line(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "README").write_text("mine")
  result = _entry_point(
      "flix.export",
      f"--checkpoint={tmp_path}/run",
      "--gin_file=configs/demo_eval.gin",
      "--features=task=ordinal",
      f"--output={tmp_path}/out",
  )
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"flix.export: error: Output directory {tmp_path}/out is not empty; "
      "pass --overwrite to replace its files."
  )
  assert (tmp_path / "out" / "README").read_text() == "mine"
