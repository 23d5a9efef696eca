"""Every shipped gin file resolves its operative configuration, under both
drivers: flix's (`python -m flix.train|eval|infer`) and T5X's
(`python -m t5x.train|eval|infer`), at tiny size with fixture data.

Resolving evaluates every argument of the driver's entry point and of every
configurable those arguments reach (called or not, e.g. T5X's
`@trainer.Trainer`), then, for training configs, builds the (abstract) train
state and one real batch and traces the loss on them. Every macro a config
defines must be evaluated by at least one driver: an unreferenced macro (like
a registration nothing calls) fails.
"""

import dataclasses
import json
import pathlib
import sys

import gin
import jax
import pytest
from conftest import REPO
from conftest import run_python
from conftest import _seqio_test_spm
from conftest import write_xtreme_up

from flix import checkpoints
from flix import features
from flix import gin_utils
from flix import models
from flix import network

CONFIG_DIR = REPO / "configs"
TINY = "configs/models/tiny.gin"

# (name, gin files, kind, batch). Fragments are resolved with the files they
# are meant to be combined with; `test_every_config_is_resolved` keeps this
# list complete. Compositions whose data is their parent's (ablations, the
# reproduction's variants) build the state but not another batch.
XL = "configs/flix_mt5_xl.gin"
CASES = [
    ("demo", ["configs/demo.gin"], "train", True),
    ("demo_base", ["configs/demo_base.gin"], "train", True),
    ("demo_grow", ["configs/demo_grow.gin"], "train", True),
    ("byo_jsonl", ["configs/byo_jsonl.gin"], "train", True),
    ("flix_mt5_xl", [XL], "train", True),
    ("lora_mt5_xl", ["configs/lora_mt5_xl.gin"], "train", False),
    ("flix_mt5_xxl", ["configs/flix_mt5_xxl.gin"], "train", False),
    (
        "xtreme_up_zero_shot",
        [XL, "configs/data/xtreme_up_zero_shot.gin"],
        "train",
        False,
    ),
    *[
        (
            f"ablation_{p.stem}",
            [XL, f"configs/ablations/{p.name}"],
            "train",
            False,
        )
        for p in sorted((CONFIG_DIR / "ablations").glob("*.gin"))
    ],
    *[
        (
            f"reproduce_{p.stem}",
            [f"configs/reproduce/{p.name}"],
            "train",
            p.stem in ("base", "flix"),
        )
        for p in sorted((CONFIG_DIR / "reproduce").glob("*.gin"))
        if p.stem not in ("common", "model", "smoke", "gpu")
    ],
    *[  # The presets, appended to every stage by scripts/reproduce.py.
        (
            f"reproduce_{preset}",
            ["configs/reproduce/flix.gin", f"configs/reproduce/{preset}.gin"],
            "train",
            False,
        )
        for preset in ("smoke", "gpu")
    ],
    ("demo_eval", ["configs/demo_eval.gin"], "eval", False),
    ("flix_mt5_xl_eval", ["configs/flix_mt5_xl_eval.gin"], "eval", True),
    ("demo_infer", ["configs/demo_infer.gin"], "infer", False),
    ("flix_mt5_xl_infer", ["configs/flix_mt5_xl_infer.gin"], "infer", False),
]
SIZES = sorted(
    p.name for p in (CONFIG_DIR / "models").glob("*.gin") if p.stem != "base"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Fixture data and a trained-run stand-in (its meta and a step dir)."""
  root = tmp_path_factory.mktemp("gin_configs")
  jsonl = root / "train.jsonl"
  jsonl.write_text(
      "".join(
          json.dumps(
              {"inputs": f"in {i}", "targets": f"out {i}", "features": f}
          )
          + "\n"
          for i, f in enumerate([{"task": "a", "language": "x"}, {"task": "b"}])
      )
  )
  run = root / "run"
  (run / "checkpoint_1").mkdir(parents=True)
  space = features.FeatureSpace.from_values({"task": ["a", "b"]})
  checkpoints.write_run_info(
      str(run),
      checkpoints.run_meta(
          models.FlixModel(network.preset("tiny", feature_space=space)),
          "adapters",
          None,
          0,
          "numbers_multitask",
      ),
  )
  return {
      "xtreme_up": write_xtreme_up(root / "xtreme_up"),
      "jsonl": str(jsonl),
      "run": str(run),
      "out": str(root / "out"),
  }


def _closure(files) -> set[str]:
  """The gin files and everything they include (repository-relative)."""
  return {
      str(pathlib.Path(p).relative_to(REPO))
      for p in gin_utils.config_files(files, [str(REPO)])
  }


def _bindings(name: str, files, kind: str, data) -> list[str]:
  """The REQUIRED and size macros a test run binds (macros only the tests
  bind are not held to being used)."""
  bindings = [
      "BATCH_SIZE = 2",
      "NUM_PARTITIONS = 1",
      "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 16}",
      f"XTREME_UP_DIR = '{data['xtreme_up']}'",
      f"SPM_PATH = '{_seqio_test_spm()}'",
      "XTREME_UP_HOLDOUT = [('ner', 'yo')]",
      f"TRAIN_FILES = '{data['jsonl']}'",
  ]
  if "configs/data/xtreme_up.gin" in _closure(files):
    # Two of the fixture's task folders: seqio builds one pipeline per task.
    bindings.append("xtreme_up.mixture.tasks = ['ner', 'asr']")
  if name == "demo_grow":  # Grows the stand-in run (task values a, b).
    bindings.append(f"GROW_FROM = '{data['run']}'")
  if name == "demo_infer":  # Its INPUT_FILE is flix's only; T5X's needs a task.
    bindings.append("MIXTURE_OR_TASK_NAME = 'numbers_ordinal_fr_demo'")
  if kind == "train":
    bindings += [f"MODEL_DIR = '{data['out']}'", "TRAIN_STEPS = 2"]
  else:
    bindings += [
        f"CHECKPOINT_PATH = '{data['run']}'",
        f"EVAL_OUTPUT_DIR = '{data['out']}'",
        f"INFER_OUTPUT_DIR = '{data['out']}'",
    ]
  # Only what the files use: binding a macro nothing uses is an error when
  # it looks like a misspelt one (gin_utils.check_macro_bindings).
  used = gin_utils.referenced_macros(gin_utils.config_files(files, [str(REPO)]))
  return [b for b in bindings if "." in b.split("=")[0] or b.split()[0] in used]


def _file_macros(files) -> set[str]:
  """The macros the gin files (not the test's bindings) define."""
  gin.clear_config()
  gin_utils.parse_gin(files, [], finalize=False)
  macros = {
      scope for scope, selector in gin.config._CONFIG if selector == "gin.macro"
  }
  gin.clear_config()
  return macros


def _resolve(entry) -> tuple[dict, set[str]]:
  """Evaluates `entry`'s arguments and every configurable they reach.

  Returns:
    (the entry's evaluated arguments, names of the macros evaluated).
  """
  macros, seen = set(), set()

  def walk(scoped_selector: str):
    if scoped_selector in seen:
      return
    seen.add(scoped_selector)
    scopes, _, selector = scoped_selector.rpartition("/")
    with gin.config_scope(scopes or None):
      gin.get_bindings(selector)  # Evaluates (calls) what the args name.
      raw = gin.get_bindings(selector, resolve_references=False)
    for value in _flatten(raw):
      if isinstance(value, gin.config.ConfigurableReference):
        if value.configurable.wrapped is gin.config._retrieve_constant:  # pylint: disable=protected-access
          continue
        if value.configurable.wrapped is gin.config.macro:
          macros.add(value.scoped_selector.split("/")[0])
        walk(value.scoped_selector)

  selector = gin.config._INVERSE_REGISTRY[entry].selector
  walk(selector)
  return gin.get_bindings(selector), macros


def _flatten(value):
  if isinstance(value, dict):
    for v in value.values():
      yield from _flatten(v)
  elif isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
    for v in value:
      yield from _flatten(v)
  else:
    yield value


# ---- flix's driver ----


def _flix_resolve(name, files, kind, batch, data):
  """Parses as `python -m flix.*` does and resolves its entry point."""
  from flix import evaluation  # pylint: disable=g-import-not-at-top
  from flix import inference  # pylint: disable=g-import-not-at-top
  from flix import input_pipeline  # pylint: disable=g-import-not-at-top
  from flix import partitioning  # pylint: disable=g-import-not-at-top
  from flix import train_step  # pylint: disable=g-import-not-at-top
  from flix import trainer  # pylint: disable=g-import-not-at-top

  entry = {
      "train": trainer.train,
      "eval": evaluation.evaluate_checkpoint,
      "infer": inference.write_predictions,
  }[kind]
  gin.clear_config()
  gin_utils.parse_gin(files + [TINY], _bindings(name, files, kind, data))
  try:
    kwargs, macros = _resolve(entry)
    model = kwargs["model"]
    if kind != "train":
      jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
      return macros
    mesh = partitioning.make_mesh(kwargs["num_partitions"])
    abstract, _ = train_step.state_shardings(
        model,
        kwargs["optimizer"],
        kwargs["trainable_patterns"],
        mesh,
        partitioning.standard_logical_axis_rules(),
    )
    if not batch:
      return macros
    batch = next(
        input_pipeline.train_batches(
            kwargs["mixture_or_task_name"],
            kwargs["task_feature_lengths"],
            kwargs["batch_size"],
            model.feature_space,
            pack=kwargs["pack"],
            shuffle=False,  # No shuffle buffer to fill: one batch is enough.
        )
    )
    loss, _ = jax.eval_shape(model.loss_fn, abstract.params, batch)
    assert loss.shape == ()
    return macros
  finally:
    gin.clear_config()


# ---- T5X's driver ----


def _t5x_entry_points():
  """T5X's entry points as `__main__.train|evaluate|infer`, what the run
  files bind (`import __main__ as train_script`), as under `python -m
  t5x.train`. Set for the rest of the process: once gin has registered
  `train_script.train`, every later parse binds it, T5X's or flix's."""
  pytest.importorskip("t5x")
  from t5x import eval as t5x_eval  # pylint: disable=g-import-not-at-top
  from t5x import infer as t5x_infer  # pylint: disable=g-import-not-at-top
  from t5x import train as t5x_train  # pylint: disable=g-import-not-at-top

  main = sys.modules["__main__"]
  main.train, main.evaluate, main.infer = (
      t5x_train.train,
      t5x_eval.evaluate,
      t5x_infer.infer,
  )
  return main


def _t5x_resolve(name, files, kind, batch, data):
  """Parses as `python -m t5x.*` does (gin's own parser, nothing skipped)
  and resolves T5X's entry point."""
  main = _t5x_entry_points()
  from t5x import gin_utils as t5x_gin_utils  # pylint: disable=g-import-not-at-top
  from t5x import utils as t5x_utils  # pylint: disable=g-import-not-at-top

  entry = {"train": main.train, "eval": main.evaluate, "infer": main.infer}[
      kind
  ]
  gin.clear_config()
  t5x_gin_utils.parse_gin_flags(
      [str(REPO)], files + [TINY], _bindings(name, files, kind, data)
  )
  try:
    kwargs, macros = _resolve(entry)
    model = kwargs["model"]
    cfg = kwargs["train_dataset_cfg" if kind == "train" else "dataset_cfg"]
    if batch:
      dataset = t5x_utils.get_dataset(
          dataclasses.replace(cfg, shuffle=False),  # One batch is enough.
          0,
          1,
          model.FEATURE_CONVERTER_CLS,
      )
      shapes = {k: v.shape for k, v in dataset.element_spec.items()}
    else:  # The model's inputs, as T5X's evaluator computes them.
      converter = model.FEATURE_CONVERTER_CLS(pack=cfg.pack)
      lengths = converter.get_model_feature_lengths(cfg.task_feature_lengths)
      shapes = {
          k: (cfg.batch_size, length)
          + (
              (model.flix_model.num_groups,)
              if k.endswith("_ids") and "feature" in k
              else ()
          )
          for k, length in lengths.items()
      }
    state = t5x_utils.TrainStateInitializer(
        model.optimizer_def if kind == "train" else None,
        model.get_initial_variables,
        shapes,
        kwargs["partitioner"],
    )
    assert state.train_state_axes is not None
    if kind == "train" and batch:
      loss, _ = jax.eval_shape(
          model.loss_fn,
          state.global_train_state_shape.params,
          next(iter(dataset.as_numpy_iterator())),
          jax.random.PRNGKey(0),
      )
      assert loss.shape == ()
    return macros
  finally:
    gin.clear_config()


@pytest.mark.parametrize(
    "name,files,kind,batch", CASES, ids=[case[0] for case in CASES]
)
def test_config_resolves_under_both_drivers(name, files, kind, batch, data):
  defined = _file_macros(files + [TINY])
  evaluated = _flix_resolve(name, files, kind, batch, data)
  if name == "demo_grow":
    # The demo's base is flix's (tests/t5x_test.py grows a T5X-based run).
    with pytest.raises(ValueError, match="base from a T5X checkpoint"):
      _t5x_resolve(name, files, kind, batch, data)
    evaluated.add("MODEL")  # T5X's model, used by T5X's section only.
  else:
    evaluated |= _t5x_resolve(name, files, kind, batch, data)
  unused = defined - evaluated
  assert not unused, f"macros nothing evaluates: {sorted(unused)}"


def test_every_config_is_resolved():
  """Each shipped .gin file is a case, included by one, or a size file."""
  covered = _closure([f for _, files, _, _ in CASES for f in files])
  shipped = {str(p.relative_to(REPO)) for p in CONFIG_DIR.rglob("*.gin")} - {
      f"configs/models/{s}" for s in SIZES
  }
  assert shipped <= covered, sorted(shipped - covered)


@pytest.mark.parametrize("size", SIZES)
def test_size_gin_changes_the_size_and_nothing_else(size):
  """`--gin_file=configs/models/<size>` after an experiment file binds only
  `network.preset.name` (both drivers read the same bindings)."""

  def bindings(files):
    gin.clear_config()
    gin_utils.parse_gin(files, ["XTREME_UP_DIR = '/x'"], finalize=False)
    config = {
        key: repr(value)
        for key, value in gin.config._CONFIG.items()  # pylint: disable=protected-access
    }
    gin.clear_config()
    return config

  before = bindings([XL])
  after = bindings([XL, f"configs/models/{size}"])
  changed = {
      key
      for key in before.keys() | after.keys()
      if before.get(key) != after.get(key)
  }
  assert changed <= {("", "flix.network.preset")}
  assert after[("", "flix.network.preset")].count("'name'") == 1
  name = size[: -len(".gin")]
  gin_utils.parse_gin([XL, f"configs/models/{size}"], [], finalize=False)
  try:
    config = gin.query_parameter("network.preset.name")
  finally:
    gin.clear_config()
  assert config == name
  # The size exists and builds (abstractly: no allocation at mT5-XXL).
  shapes = jax.eval_shape(
      models.FlixModel(network.preset(name)).init_params, jax.random.PRNGKey(0)
  )
  assert shapes["token_embedder"]["embedding"].shape[0] >= 384


def test_configs_parse_without_t5x():
  """With t5x unimportable (pip-only installs) every shipped config still
  parses under flix's driver, the T5X sections being skipped, and every entry
  of `T5X_ONLY_SELECTORS` is bound by some shipped config."""
  script = f"""
import sys
sys.modules['t5x'] = None  # t5x and everything under it fail to import
import gin
from flix import gin_utils
cases = {json.dumps([[f, k] for _, f, k, _ in CASES])}
bindings = [
    "MODEL_DIR = '/x'", "TRAIN_STEPS = 1", "CHECKPOINT_PATH = '/x'",
    "EVAL_OUTPUT_DIR = '/x'", "INFER_OUTPUT_DIR = '/x'",
    "XTREME_UP_DIR = '/x'", "XTREME_UP_HOLDOUT = []", "TRAIN_FILES = '/x'",
    "GROW_FROM = None",
    "TASK_FEATURE_LENGTHS = {{'inputs': 8, 'targets': 8}}"]
for files, kind in cases:
  gin.clear_config()
  used = gin_utils.referenced_macros(gin_utils.config_files(files))
  gin_utils.parse_gin(
      files + [{TINY!r}], [b for b in bindings if b.split()[0] in used])
assert 't5x.models' not in sys.modules and 'flix.t5x_model' not in sys.modules
print('parsed', len(cases))
"""
  output = run_python("-c", script)
  assert f"parsed {len(CASES)}" in output.splitlines()[-1]
  text = "\n".join(p.read_text() for p in CONFIG_DIR.rglob("*.gin"))
  for selector in gin_utils.T5X_ONLY_SELECTORS:
    assert selector in text, f"{selector} is listed but bound nowhere"


def test_missing_required_macro_names_it():
  gin.clear_config()
  try:
    with pytest.raises(ValueError, match="MODEL_DIR"):
      gin_utils.parse_gin([str(CONFIG_DIR / "demo.gin")], [])
  finally:
    gin.clear_config()


@pytest.mark.parametrize(
    "binding",
    [
        "trainer.train.no_such_parameter = 3",
        "utils.DatasetConfig.no_such_parameter = 3",
        "trainer.trian.log_period = 3",
    ],
)
def test_misspelt_binding_is_an_error_under_both_drivers(binding):
  files = [str(CONFIG_DIR / "demo.gin")]
  bindings = ["MODEL_DIR = '/x'", binding]
  if not binding.startswith("utils."):  # T5X's own selectors: T5X checks.
    gin.clear_config()
    try:
      with pytest.raises(ValueError, match="no_such_parameter|trian"):
        gin_utils.parse_gin(files, bindings)
    finally:
      gin.clear_config()
  _t5x_entry_points()
  from t5x import gin_utils as t5x_gin_utils  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  try:
    with pytest.raises(Exception, match="no_such_parameter|trian"):
      t5x_gin_utils.parse_gin_flags([str(REPO)], files, bindings)
  finally:
    gin.clear_config()


def test_gin_flag_rewriting():
  assert gin_utils.rewrite_gin_args(
      ["prog", '--gin.MODEL_DIR="/x"', "--gin_file=a.gin"]
  ) == ["prog", '--gin_bindings=MODEL_DIR = "/x"', "--gin_file=a.gin"]
