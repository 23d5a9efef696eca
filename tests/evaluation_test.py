"""flix.evaluation.evaluate_tasks: per-task decoding, metrics, examples cache."""

import jax
import pytest

from flix import evaluation
from flix import features
from flix import input_pipeline
from flix import models
from flix import network
from flix_tasks import numbers  # Registers the numbers tasks.

TASKS = ("numbers_cardinal_en", "numbers_ordinal_fr")
LENGTHS = {"inputs": 16, "targets": 8}  # Short: most targets are truncated.


@pytest.fixture(scope="module")
def model_and_params():
  space = features.FeatureSpace.from_values(
      {"task": ["cardinal", "ordinal"], "language": ["en", "fr"]}
  )
  model = models.FlixModel(network.preset("tiny", feature_space=space))
  return model, model.init_params(jax.random.PRNGKey(0))


def test_examples_cache_builds_each_task_once_and_changes_nothing(
    model_and_params, monkeypatch, caplog
):
  model, params = model_and_params
  built = []
  task_examples = input_pipeline.task_examples
  monkeypatch.setattr(
      input_pipeline,
      "task_examples",
      lambda name, *a, **k: built.append(name) or task_examples(name, *a, **k),
  )
  evaluate = lambda cache: evaluation.evaluate_tasks(
      model,
      params,
      TASKS,
      "validation",
      LENGTHS,
      batch_size=4,
      max_examples_per_task=3,
      examples_cache=cache,
  )
  reference = evaluate(None)
  assert built == list(TASKS)
  assert "longer than TASK_FEATURE_LENGTHS['targets']" in caplog.text
  cache = {}
  first = evaluate(cache)
  caplog.clear()
  second = evaluate(cache)
  assert built == list(TASKS) * 2  # The second cached call built nothing.
  assert reference == first == second
  rows, records = reference
  assert {r["task"] for r in records} == set(TASKS)
  assert {r["examples"] for r in rows} == {3}
  expected = numbers.DEFAULT.examples(("ordinal", "fr"), "validation")[0]
  assert (records[3]["inputs"], records[3]["target"]) == expected
  # Truncation is reported when examples are built, not again from the cache.
  assert "longer than" not in caplog.text
