"""Growing a trained FLix run with a new language (flix.grow, GROW_FROM).

A tiny demo run on the numbers mixture (12 languages) is grown with Dutch
through the CLI (`configs/demo_grow.gin`), on the byte-level numbers tasks
(the demo's own are SentencePiece: a tiny model trains and decodes faster on
bytes, and the tests below compare against byte-level references); the
checks compare the two
checkpoints: old adapters and base bit-identical, every old feature set's
prediction unchanged, the new language's loss below its zero state, the new
language with an old task exported as a PEFT adapter that `peft` loads with
flix's logits, and grow runs that would change the original are errors.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import conftest
from flix import checkpoints
from flix import evaluation
from flix import feature_converter
from flix import features as features_lib
from flix import featurized
from flix import grow
from flix import input_pipeline
from flix import models
from flix import network
from flix import trainer
from flix import train_step
from flix import vocabularies
from flix_tasks import numbers

TINY = [
    "--gin_file=configs/models/tiny.gin",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 48}",
    "--gin.BATCH_SIZE=8",
    "--gin.LOG_PERIOD=10",
    "--gin.network.preset.vocab_size=384",  # Bytes, not the demo's pieces.
    "--gin.flix.trainer.train.evaluate_fn=None",
]
LENGTHS = {"inputs": 24, "targets": 48}
NEW = numbers.GROW_LANGUAGE


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _bits(array):
  return np.asarray(array, np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A FLix run (random tiny base) and the run grown from it with Dutch."""
  root = tmp_path_factory.mktemp("grow")
  original, grown = str(root / "original"), str(root / "grown")
  conftest.run_module(
      "flix.train",
      "--gin_file=configs/demo.gin",
      *TINY,
      "--gin.MIXTURE_OR_TASK_NAME='numbers_multitask'",
      "--gin.EVAL_MIXTURE='numbers_multitask_eval'",
      f'--gin.MODEL_DIR="{original}"',
      "--gin.TRAIN_STEPS=10",
  )
  log = conftest.run_module(
      "flix.train",
      "--gin_file=configs/demo_grow.gin",
      *TINY,
      "--gin.MIXTURE_OR_TASK_NAME='numbers_multitask_nl'",
      "--gin.EVAL_MIXTURE='numbers_multitask_eval_with_nl'",
      f'--gin.MODEL_DIR="{grown}"',
      f'--gin.GROW_FROM="{original}"',
      "--gin.TRAIN_STEPS=40",
  )
  return {"root": root, "original": original, "grown": grown, "log": log}


@functools.lru_cache(maxsize=4)
def _load(path):
  model = models.FlixModel(network.preset("tiny"))
  return checkpoints.load_for_inference(model, path)


def test_grown_vocabulary_appends_the_new_language(runs):
  old = checkpoints.saved_feature_space(runs["original"])
  new = checkpoints.saved_feature_space(runs["grown"])
  assert new.group_names == old.group_names
  assert new.group("task").values == old.group("task").values
  assert new.group("language").values == old.group("language").values + (NEW,)
  # Feature dropout is on for the new values' training (demo.gin's 0.2).
  np.testing.assert_allclose(new.dropout_rates(), [0.2, 0.2])
  meta = checkpoints.read_meta(runs["grown"])
  assert meta[grow.META_KEY]["checkpoint"] == runs["original"]
  assert grow.training_mixtures(meta) == [
      "numbers_multitask_nl",
      "numbers_multitask",
  ]
  assert "Growing" in runs["log"] and "new values {'language': ('nl',)}" in (
      runs["log"]
  )


def test_old_adapters_and_base_are_bit_identical(runs):
  old_model, old_params, old_meta = _load(runs["original"])
  new_model, new_params, new_meta = _load(runs["grown"])
  assert new_meta["base"] == old_meta["base"]
  old_flat, new_flat = _flat(old_params), _flat(new_params)
  assert old_flat.keys() == new_flat.keys()
  trained_new_rows = 0
  for name, old in old_flat.items():
    new = new_flat[name]
    if "/lora_" not in name:
      np.testing.assert_array_equal(_bits(new), _bits(old), err_msg=name)
      continue
    # [V, D, R] / [V, R, O]: old values' rows unchanged, bit for bit.
    old_rows = new[tuple(slice(0, s) for s in old.shape)]
    np.testing.assert_array_equal(_bits(old_rows), _bits(old), err_msg=name)
    if name.endswith("_task"):
      assert new.shape == old.shape
    else:
      assert new.shape[0] == old.shape[0] + 1
      trained_new_rows += bool(np.abs(new[old.shape[0] :]).max() > 0)
  # Every adapted layer's Dutch B left zero: the new adapters trained.
  lora_b = [n for n in new_flat if n.endswith("lora_b_language")]
  assert trained_new_rows == 2 * len(lora_b)


def _pair_examples(task_names, per_task, split="validation"):
  examples = []
  for name in task_names:
    for example in input_pipeline.task_examples(
        name, split, LENGTHS, max_examples=per_task
    ):
      examples.append(
          {
              "inputs": example["inputs"],
              "targets": example["targets"],
              "features": {
                  "task": evaluation.text_of(example["feature_task"]),
                  "language": evaluation.text_of(example["feature_language"]),
              },
          }
      )
  return examples


def test_every_old_feature_set_predicts_as_before(runs):
  """Every old feature set: each (task, language) pair of the eval mixture,
  held-out ones included, each task alone, each language alone, none."""
  examples, sets = [], set()
  for example in _pair_examples(
      numbers.DEFAULT.task_names.values(), per_task=1
  ):
    features = example["features"]
    for subset in (
        features,
        {"task": features["task"]},
        {"language": features["language"]},
        {},
    ):
      if tuple(sorted(subset.items())) not in sets:
        sets.add(tuple(sorted(subset.items())))
        examples.append({"inputs": example["inputs"], "features": subset})
  vocabulary = vocabularies.vocabulary_for_checkpoint(runs["original"])
  predictions, logits = [], []
  for path in (runs["original"], runs["grown"]):
    model, params, _ = _load(path)
    predictions.append(
        evaluation.predict_examples(
            model,
            params,
            examples,
            vocabulary,
            LENGTHS["inputs"],
            LENGTHS["targets"],
            batch_size=len(examples),
        )
    )
    batch = feature_converter.encode_examples(
        _pair_examples(numbers.DEFAULT.task_names.values(), per_task=1),
        model.feature_space,
        LENGTHS,
    )
    logits.append(np.asarray(jax.jit(model.compute_logits)(params, batch)))
  pairs, tasks, languages = (
      len(numbers.DEFAULT.pairs),
      len(numbers.TASKS),
      len(numbers.DEFAULT_LANGUAGES),
  )
  assert len(examples) == pairs + tasks + languages + 1
  assert predictions[1] == predictions[0]
  # The grown layers may sum their adapters in another order (the strategy
  # is chosen per group size): equal up to float32 rounding.
  np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=1e-5)


def _loss(path, task_names):
  model, params, _ = _load(path)
  batch = feature_converter.encode_examples(
      _pair_examples(task_names, per_task=16), model.feature_space, LENGTHS
  )
  return float(jax.jit(model.loss_fn)(params, batch)[0])


def test_new_language_improves_over_its_zero_state(runs):
  # The original run has no Dutch adapter: 'nl' is unknown there (only the
  # task adapter applies), which is the grown run's zero state.
  trained = [
      numbers.GROWN.task_names[p]
      for p in numbers.GROWN.pairs
      if p not in numbers.GROW_HELD_OUT
  ]
  before, after = _loss(runs["original"], trained), _loss(
      runs["grown"], trained
  )
  assert after < 0.9 * before, (before, after)
  # The held-out pair (a new language with an old task) gains too: its
  # task adapter is old, its language adapter new.
  held_out = [numbers.GROWN.task_names[p] for p in numbers.GROW_HELD_OUT]
  assert _loss(runs["grown"], held_out) < _loss(runs["original"], held_out)


def test_evaluation_flags_old_and_new_pairs_seen(runs):
  names = [
      numbers.DEFAULT.task_names[("cardinal", "en")],
      numbers.DEFAULT.task_names[("ordinal", "fr")],  # held out originally
      numbers.GROWN.task_names[("year", NEW)],
      numbers.GROWN.task_names[("ordinal", NEW)],  # held out in growth
  ]
  featurized.add_mixture("grow_test_eval", names)
  result = evaluation.evaluate_checkpoint(
      model=models.FlixModel(network.preset("tiny")),
      checkpoint_path=runs["grown"],
      mixture_or_task_name="grow_test_eval",
      task_feature_lengths=LENGTHS,
      output_dir=str(runs["root"] / "eval"),
      split="validation",
      max_examples_per_task=2,
  )
  seen = {
      (row["features"]["task"], row["features"]["language"]): row[
          "seen_in_training"
      ]
      for row in result["rows"]
  }
  assert seen == {
      ("cardinal", "en"): True,
      ("ordinal", "fr"): False,
      ("year", NEW): True,
      ("ordinal", NEW): False,
  }


def test_new_language_with_old_task_exports_as_peft(runs, tmp_path):
  peft = pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from flix import adapter_export  # pylint: disable=g-import-not-at-top

  features = {"task": "ordinal", "language": NEW}
  adapter, base = str(tmp_path / "peft"), str(tmp_path / "base")
  adapter_export.export(
      model=models.FlixModel(network.preset("tiny")),
      checkpoint=runs["grown"],
      features=features,
      output_format="peft",
      output=adapter,
      base_output=base,
  )
  hf = transformers.MT5ForConditionalGeneration.from_pretrained(base)
  peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()

  model, params, _ = _load(runs["grown"])
  examples = _pair_examples(
      [numbers.GROWN.task_names[("ordinal", NEW)]], per_task=4
  )
  batch = feature_converter.encode_examples(
      examples, model.feature_space, LENGTHS
  )
  expected = np.asarray(jax.jit(model.compute_logits)(params, batch))
  with torch.no_grad():
    got = (
        peft_model(
            input_ids=torch.tensor(batch["encoder_input_tokens"]).long(),
            attention_mask=torch.tensor(batch["encoder_input_tokens"] > 0),
            decoder_input_ids=torch.tensor(
                batch["decoder_input_tokens"]
            ).long(),
        )
        .logits.float()
        .numpy()
    )
  mask = batch["decoder_target_tokens"] > 0
  np.testing.assert_allclose(got[mask], expected[mask], atol=1e-4)
  # Not the model without Dutch: the new adapter is in the export.
  examples_without = [
      {**ex, "features": {"task": "ordinal"}} for ex in examples
  ]
  without = np.asarray(
      jax.jit(model.compute_logits)(
          params,
          feature_converter.encode_examples(
              examples_without, model.feature_space, LENGTHS
          ),
      )
  )
  assert np.abs(without[mask] - expected[mask]).max() > 1e-3


def _train_kwargs(runs, model_dir, **overrides):
  kwargs = dict(
      model=models.FlixModel(
          network.preset(
              "tiny",
              feature_space=featurized.feature_space(
                  "numbers_multitask_nl",
                  ranks=4,
                  dropout=0.2,
                  grow_from=runs["original"],
              ),
          )
      ),
      model_dir=model_dir,
      mixture_or_task_name="numbers_multitask_nl",
      task_feature_lengths=LENGTHS,
      train_steps=1,
      batch_size=8,
      optimizer=train_step.make_optimizer(1e-3, "adamw"),
      grow_from=runs["original"],
  )
  kwargs.update(overrides)
  return kwargs


def test_grow_run_that_changes_an_old_id_is_an_error(runs, tmp_path):
  # The mixture's own sorted vocabulary (not extended from GROW_FROM) puts
  # 'nl' before 'pl', 'ru' and 'tr'.
  sorted_space = featurized.feature_space(
      "numbers_multitask_with_nl", ranks=4, dropout=0.2
  )
  model_dir = str(tmp_path / "bad")
  with pytest.raises(grow.GrowMismatchError) as error:
    trainer.train(
        **_train_kwargs(
            runs,
            model_dir,
            model=models.FlixModel(
                network.preset("tiny", feature_space=sorted_space)
            ),
        )
    )
  message = str(error.value)
  assert "feature_space.language.values" in message
  assert "'pl' had id 10, now 11" in message and "'tr' had id 12" in message
  assert not os.path.exists(model_dir)


def test_grow_run_on_another_base_is_an_error(runs, tmp_path):
  model_dir = str(tmp_path / "bad")
  with pytest.raises(grow.GrowMismatchError, match="base.initial_checkpoint"):
    trainer.train(
        **_train_kwargs(
            runs, model_dir, initial_checkpoint_path=runs["original"]
        )
    )
  with pytest.raises(grow.GrowMismatchError, match="base.init_seed"):
    trainer.train(**_train_kwargs(runs, model_dir, random_seed=1))
  with pytest.raises(grow.GrowMismatchError, match="model_config.emb_dim"):
    kwargs = _train_kwargs(runs, model_dir)
    space = kwargs["model"].feature_space
    kwargs["model"] = models.FlixModel(
        network.preset("tiny", feature_space=space, emb_dim=32)
    )
    trainer.train(**kwargs)
  assert not os.path.exists(model_dir)


def test_grow_run_without_new_values_or_into_its_source_is_an_error(
    runs, tmp_path
):
  kwargs = _train_kwargs(runs, str(tmp_path / "bad"))
  kwargs["model"] = models.FlixModel(
      network.preset(
          "tiny",
          feature_space=featurized.feature_space(
              "numbers_multitask", ranks=4, grow_from=runs["original"]
          ),
      )
  )
  with pytest.raises(grow.GrowMismatchError, match="nothing to grow"):
    trainer.train(**kwargs)
  with pytest.raises(ValueError, match="another MODEL_DIR"):
    trainer.train(**_train_kwargs(runs, runs["original"]))
  with pytest.raises(FileNotFoundError, match="GROW_FROM"):
    grow.Growth.load(str(tmp_path / "missing"))


def test_t5x_driver_grows_only_from_a_t5x_base(runs):
  """t5x.train's grow checks (tests/t5x_test.py grows a T5X run): the
  original's random base cannot be restored by T5X; without GROW_FROM the
  base is INITIAL_CHECKPOINT_PATH as given."""
  pytest.importorskip("t5x")
  from flix import t5x_driver  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="base was randomly initialized"):
    t5x_driver.base_checkpoint(None, grow_from=runs["original"])
  with pytest.raises(ValueError, match="another MODEL_DIR"):
    t5x_driver.base_checkpoint(
        None, grow_from=runs["original"], model_dir=runs["original"]
    )
  assert t5x_driver.base_checkpoint("/base/checkpoint_7") == (
      "/base/checkpoint_7"
  )


@pytest.mark.parametrize(
    "optimizer",
    [
        optax.adamw(0.1, weight_decay=0.5),
        train_step.make_optimizer(0.1, "adafactor", weight_decay=0.5),
        train_step.make_optimizer(0.1, "sgd", clip_norm=1e-3),
    ],
    ids=["adamw", "adafactor", "sgd_clipped"],
)
def test_freeze_rows_keeps_old_rows_bit_identical(optimizer):
  rng = np.random.default_rng(0)
  params = {
      "layer": {
          "lora_a_language": rng.normal(size=(5, 6, 3)).astype(np.float32),
          "lora_b_language": rng.normal(size=(5, 3, 4)).astype(np.float32),
          "lora_a_task": rng.normal(size=(2, 6, 3)).astype(np.float32),
          "lora_b_domain": rng.normal(size=(2, 3, 4)).astype(np.float32),
      }
  }
  params["layer"]["lora_a_language"][0, 0, 0] = -0.0  # + 0.0 would flip it
  tx = grow.freeze_rows(optimizer, {"language": 3, "task": 2})
  state, new = tx.init(params), jax.tree.map(jnp.asarray, params)
  for _ in range(3):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), new
    )
    updates, state = tx.update(grads, state, new)
    new = optax.apply_updates(new, updates)
  old, new = params["layer"], jax.tree.map(np.asarray, new["layer"])
  for name, frozen in (
      ("lora_a_language", 3),
      ("lora_b_language", 3),
      ("lora_a_task", 2),
  ):
    np.testing.assert_array_equal(
        _bits(new[name][:frozen]), _bits(old[name][:frozen]), err_msg=name
    )
    assert (new[name][frozen:] != old[name][frozen:]).all(), name
  assert (new["lora_b_domain"] != old["lora_b_domain"]).all()
  assert (
      grow.trained_param_count(params, {"language": 3, "task": 2})
      == 2 * 18 + 2 * 12 + 0 + 24
  )


def test_a_new_value_of_higher_rank_pads_the_old_rows_with_zeros(
    runs, tmp_path
):
  """A Dutch rank of 6 over the saved rank 4: the arrays grow to R = 6; old
  rows keep their 4 columns bit for bit and the padding is zero."""
  space = featurized.feature_space(
      "numbers_multitask_nl",
      ranks=4,
      dropout=0.2,
      value_ranks={"language": {NEW: 6}},
      grow_from=runs["original"],
  )
  assert space.group("language").rank_of(NEW) == 6
  model_dir = str(tmp_path / "rank6")
  trainer.train(
      **_train_kwargs(
          runs,
          model_dir,
          model=models.FlixModel(network.preset("tiny", feature_space=space)),
          checkpoint_period=1,
      )
  )
  old, _ = checkpoints.read_flix_checkpoint(runs["original"])
  new, meta = checkpoints.read_flix_checkpoint(model_dir)
  assert meta["feature_space"] == space.to_dict()
  old, new = _flat(old), _flat(new)
  for name in [n for n in old if n.endswith("lora_a_language")]:
    assert old[name].shape[2] == 4 and new[name].shape[2] == 6
    np.testing.assert_array_equal(
        _bits(new[name][:-1, :, :4]), _bits(old[name]), err_msg=name
    )
    assert not new[name][:-1, :, 4:].any()
  for name in [n for n in old if n.endswith("lora_b_language")]:
    np.testing.assert_array_equal(
        _bits(new[name][:-1, :4]), _bits(old[name]), err_msg=name
    )
    assert not new[name][:-1, 4:].any()
    assert new[name][-1].any()  # Dutch trained (one step)


def test_traced_start_reads_the_original_at_run_time(runs):
  """Under jit (T5X's initialization) `Growth.start` fetches the original's
  adapters by host callback: the same bits as the eager path, and no
  constant of their size in the compiled program."""
  growth = grow.Growth.load(runs["original"])
  space = featurized.feature_space(
      "numbers_multitask_nl", ranks=4, grow_from=runs["original"]
  )
  params = models.FlixModel(
      network.preset("tiny", feature_space=space)
  ).init_params(jax.random.PRNGKey(3))
  eager = _flat(growth.start(params))
  traced = jax.jit(growth.start)
  for name, value in _flat(traced(params)).items():
    np.testing.assert_array_equal(_bits(value), _bits(eager[name]), name)
  saved = sum(a.nbytes for a in growth.saved_adapters.values())
  program = traced.lower(params).as_text()
  assert "callback" in program
  assert len(program) < saved, (len(program), saved)
