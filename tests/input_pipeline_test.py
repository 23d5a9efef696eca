"""Train batches are deterministic, so a resumed run continues exactly."""

import itertools

import numpy as np

from flix import input_pipeline
from flix_tasks import featurized
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


def test_examples_to_batch_encodes_features_and_warns_on_unknown(caplog):
  space = featurized.feature_space("numbers_multitask", ranks=2)
  batch = input_pipeline.examples_to_batch(
      [[5, 6, 1], [7, 1]],
      [[8, 1], []],
      [
          {"task": "ordinal", "language": "fr"},
          {"task": "cardinal", "language": "tlh"},
      ],
      space,
      4,
      3,
      batch_size=3,
  )
  ordinal, fr = space.encode({"task": "ordinal", "language": "fr"})
  np.testing.assert_array_equal(
      batch["encoder_feature_ids"][0, :3], [[ordinal, fr]] * 3
  )
  assert batch["encoder_feature_ids"][0, 3].tolist() == [0, 0]  # padding
  assert batch["decoder_feature_ids"][1, 0, 1] == 0  # unknown language
  assert batch["decoder_feature_ids"][1, 0, 0] > 0  # known task still applies
  assert "tlh" in caplog.text
  np.testing.assert_array_equal(batch["decoder_input_tokens"][0], [0, 8, 1])
  assert batch["encoder_input_tokens"].shape == (3, 4)
