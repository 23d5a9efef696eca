"""Train batches are deterministic, so a resumed run continues exactly."""

import itertools

import numpy as np

from flix import input_pipeline
from flix import featurized
import flix_tasks.numbers  # pylint: disable=unused-import

LENGTHS = {"inputs": 24, "targets": 48}


def test_skipping_batches_resumes_at_the_same_data_position():
  space = featurized.feature_space("numbers_multitask", ranks=2)
  fresh = list(
      itertools.islice(
          input_pipeline.train_batches(
              "numbers_multitask", LENGTHS, 4, space, seed=3
          ),
          5,
      )
  )
  resumed = list(
      itertools.islice(
          input_pipeline.train_batches(
              "numbers_multitask", LENGTHS, 4, space, seed=3, skip_batches=3
          ),
          2,
      )
  )
  for a, b in zip(fresh[3:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(
      fresh[0]["encoder_input_tokens"], fresh[1]["encoder_input_tokens"]
  )


def test_training_on_in_memory_sources_logs_no_uncached_warning(caplog):
  next(input_pipeline.train_batches("numbers_multitask", LENGTHS, 4, None))
  assert not [
      r for r in caplog.records if "uncached FunctionDataset" in r.getMessage()
  ]
