"""flix_tasks.combinations: a task per feature combination, from examples."""

import pytest
import seqio

from flix_tasks import combinations
from flix import featurized
from flix_tasks import span_corruption

EXAMPLES = {
    ("qa", "sw"): {
        "train": [("q1", "a1"), ("q2", "a2")],
        "test": [("q3", "a3")],
    },
    ("qa", "yo"): {"train": [("q4", "a4")], "test": [("q5", "a5")]},
    ("ner", "sw"): {"train": [("n1", "t1")], "test": []},
    ("ner", "yo"): {"train": [], "test": [("n2", "t2"), ("n3", "t3")]},
}


@pytest.fixture(scope="module")
def registration():
  return combinations.register(
      "toy",
      ("task", "language"),
      {
          p: {s: len(v) for s, v in splits.items()}
          for p, splits in EXAMPLES.items()
      },
      lambda pair, split: EXAMPLES[pair][split],
      held_out=[("ner", "yo")],
      suffix="_combinations_test",
  )


def _texts(task_name, split):
  task = seqio.get_mixture_or_task(task_name)
  return [
      (e["inputs_pretokenized"].decode(), e["targets_pretokenized"].decode())
      for e in task.get_dataset(
          None, split, shuffle=False, use_cached=False
      ).as_numpy_iterator()
  ]


def test_one_task_per_combination_with_its_examples(registration):
  assert registration.pairs == tuple(EXAMPLES)
  for pair, splits in EXAMPLES.items():
    name = registration.task_names[pair]
    assert name == f"toy_{pair[0]}_{pair[1]}_combinations_test"
    for split, examples in splits.items():
      if examples:
        assert _texts(name, split) == examples
    # Splits without examples are left out of the task.
    assert set(seqio.get_mixture_or_task(name).splits) == {
        s for s, v in splits.items() if v
    }
    assert featurized.task_features(name).combinations == {
        frozenset({("task", pair[0]), ("language", pair[1])})
    }


def test_mixtures_keep_held_out_pairs_out_of_training(registration):
  assert registration.held_out == (("ner", "yo"),)
  assert registration.train_pairs == (("qa", "sw"), ("qa", "yo"), ("ner", "sw"))
  seen = featurized.seen_pairs(registration.train_mixture)
  assert seen == set(registration.train_pairs)
  every = featurized.seen_pairs(registration.eval_mixture)
  assert every == set(EXAMPLES)
  # Single-task mixtures: each task's training pairs.
  for task, mixture in registration.multilingual_mixtures.items():
    expected = {p for p in registration.train_pairs if p[0] == task}
    assert featurized.seen_pairs(mixture) == expected
  # Rates are train-example counts: every example is sampled equally often.
  rates = {
      t.name: seqio.get_mixture_or_task(registration.train_mixture).get_rate(t)
      for t in seqio.get_mixture_or_task(registration.train_mixture).tasks
  }
  assert rates[registration.task_names[("qa", "sw")]] == 2
  assert registration.features(("qa", "")) == {"task": "qa"}


def test_span_corruption_task_over_any_texts():
  vocabulary = seqio.ByteVocabulary(extra_ids=10)
  texts = [("", "hello world"), ("42", "forty-two")]
  task = span_corruption.register(
      "toy_pretrain_combinations_test",
      lambda: texts,
      vocabulary,
      copies=3,
      prefix_rate=1.0,
  )
  examples = list(
      task.get_dataset(
          None, "train", shuffle=False, use_cached=False
      ).as_numpy_iterator()
  )
  assert len(examples) == len(texts) * 3
  sentinel = span_corruption.sentinel(0, vocabulary.vocab_size)
  # prefix_rate=1: every example hides the end; after a lead, all of it.
  lead = vocabulary.encode("42")
  led = [e for e in examples if list(e["inputs"][: len(lead)]) == lead]
  assert len(led) == 3
  for e in led:
    assert list(e["inputs"]) == lead + [sentinel, 1]
    assert vocabulary.decode(list(e["targets"][1:-2])).strip() == "forty-two"
  with pytest.raises(ValueError, match="extra ids"):
    span_corruption.register("bad", lambda: texts, seqio.ByteVocabulary())
