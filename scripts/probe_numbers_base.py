"""Does a numbers base read digits? Decodes "<digits> <X0>" with the base.

    python scripts/probe_numbers_base.py BASE_DIR [--split=validation]

A base of scripts/reproduce.py (`--data=numbers`) pre-trained on digit-led
spellings answers "994 <X0>" with a spelling in some language and mode of
its choosing. This counts how often that spelling is exactly how some
(task, language) pair spells the number (numbers of `--split`, never seen in
pre-training), per number format (cardinals and ordinals, years, currency),
and prints a few answers. It measures the skill adaptation builds on
(docs/reproduce/RUN.md); language and mode are adaptation's job.
"""

from __future__ import annotations

import argparse
import collections
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top

from flix import checkpoints  # pylint: disable=g-import-not-at-top
from flix import evaluation
from flix import models
from flix import t5_config
from flix import vocabularies
from flix_tasks import numbers
from flix_tasks import sentencepiece_trainer
from flix_tasks import span_corruption

_SENTINEL = re.compile(r"<extra_id_\d+>")


def spellings(
    split: str, size: int, max_number: int
) -> dict[str, dict[tuple[str, str], str]]:
  """`{digits: {(task, language): spelling}}` over every working pair."""
  out = collections.defaultdict(dict)
  for task, language in numbers.working_pairs():
    for inputs, target in numbers.examples(
        task, language, split, size, max_number
    ):
      out[numbers.digits_of(inputs)][(task, language)] = target
  return out


def number_format(digits: str) -> str:
  if "." in digits:
    return "currency"
  return "year" if len(digits) == 4 else "cardinal/ordinal"


def main(argv=None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("base_dir", help="A base run (or one checkpoint step).")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--numbers_per_pair", type=int, default=60)
  parser.add_argument("--max_number", type=int, default=1000)
  parser.add_argument(
      "--vocabulary",
      help="SentencePiece .model, for a base that recorded none.",
  )
  parser.add_argument("--samples", type=int, default=8)
  args = parser.parse_args(argv)

  _, meta = checkpoints.read_flix_checkpoint(args.base_dir)
  model = models.FlixModel(t5_config.T5Config(**meta["model_config"]))
  model, params, _ = checkpoints.load_for_inference(model, args.base_dir)
  if args.vocabulary:
    vocabulary = vocabularies.vocabulary_from_config(
        args.vocabulary, sentencepiece_trainer.EXTRA_IDS
    )
  else:
    vocabulary = vocabularies.vocabulary_for_checkpoint(
        args.base_dir, None, model.config.vocab_size
    )
  sentinel = span_corruption.sentinel(0, vocabulary.vocab_size)
  table = spellings(args.split, args.numbers_per_pair, args.max_number)
  digits = sorted(table)
  examples = [
      {"inputs": np.array([*vocabulary.encode(d), sentinel, 1], np.int32)}
      for d in digits
  ]
  answers = [
      _SENTINEL.sub("", answer).strip()
      for answer in evaluation.predict_examples(
          model, params, examples, vocabulary, 16, 48, batch_size=64
      )
  ]
  right, total = collections.Counter(), collections.Counter()
  for d, answer in zip(digits, answers):
    total[number_format(d)] += 1
    right[number_format(d)] += answer in table[d].values()
  shares = {k: 100.0 * right[k] / total[k] for k in total}
  shares["all"] = 100.0 * sum(right.values()) / sum(total.values())
  print(
      f"{args.base_dir}: '<digits> <X0>' spelled exactly as some pair does "
      f"({args.split} numbers):"
  )
  for kind in sorted(total):
    print(
        f"  {kind:<17} {right[kind]:4d} / {total[kind]:4d} = {shares[kind]:.1f}%"
    )
  print(f"  {'all':<17} {shares['all']:.1f}%")
  for d, answer in list(zip(digits, answers))[: args.samples]:
    mark = "ok" if answer in table[d].values() else "  "
    print(f"  {mark} {d} -> {answer}")
  return shares


if __name__ == "__main__":
  main()
