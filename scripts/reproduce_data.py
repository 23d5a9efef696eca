"""scripts/reproduce.py's data: the numbers mixture or any featurized JSONL.

Either way: one SeqIO task per feature combination (`flix_tasks.combinations`)
with held-out combinations, a SentencePiece vocabulary trained on the train
split (`flix_tasks.sentencepiece_trainer`), and a span-corruption task over
the texts the base pre-trains on (`flix_tasks.span_corruption`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Any, Sequence

PACKED_LENGTH = 64  # Pre-training rows, several texts each (base.gin packs).


@dataclasses.dataclass
class Data:
  """A study's data: registered tasks, vocabulary, pre-training task."""

  registration: Any  # flix_tasks.combinations.Registration
  vocabulary: Any  # seqio.Vocabulary
  pretrain_task: str
  pretrain_texts: Sequence[tuple[str, str]]
  key: Any  # what identifies the data, for cache keys
  description: str
  details: str


def _vocabulary(args, texts: Sequence[str]):
  import seqio  # pylint: disable=g-import-not-at-top
  from flix_tasks import sentencepiece_trainer  # pylint: disable=g-import-not-at-top

  if args.vocabulary == "bytes":
    return seqio.ByteVocabulary(extra_ids=125)
  return sentencepiece_trainer.sentencepiece_vocabulary(
      texts, args.cache_dir, args.vocab_size
  )


def numbers_data(args) -> Data:
  """The multilingual numbers mixture, pre-training and vocabulary."""
  from flix_tasks import numbers  # pylint: disable=g-import-not-at-top
  from flix_tasks import numbers_pretrain  # pylint: disable=g-import-not-at-top
  from flix_tasks import numbers_vocabulary  # pylint: disable=g-import-not-at-top

  languages = (
      tuple(args.languages.split(","))
      if args.languages
      else numbers.DEFAULT_LANGUAGES
  )
  tasks = tuple(args.tasks.split(",")) if args.tasks else numbers.TASKS
  train_size = args.train_size or numbers.DEFAULT_TRAIN_SIZE
  pairs = numbers.working_pairs(tasks, languages)
  vocabulary = _vocabulary(
      args,
      numbers_vocabulary.training_texts(
          pairs, max(train_size, args.pretrain_size), args.max_number
      ),
  )
  registration = numbers.register_numbers(
      languages=languages,
      tasks=tasks,
      suffix="_reproduce",
      train_size=train_size,
      max_number=args.max_number,
      vocabulary=vocabulary,
  )
  texts = numbers_pretrain.spelled_texts(
      pairs, args.pretrain_size, args.max_number, args.digits_rate
  )
  name = "numbers_pretrain_reproduce"
  numbers_pretrain.register_pretrain(
      name,
      languages,
      tasks,
      args.pretrain_size,
      args.max_number,
      vocabulary,
      args.digits_rate,
      copies=args.pretrain_copies,
      prefix_rate=args.prefix_rate,
  )
  key = [languages, tasks, train_size, args.max_number, args.pretrain_size]
  return Data(
      registration,
      vocabulary,
      name,
      texts,
      key + [args.digits_rate, args.prefix_rate, args.pretrain_copies],
      "the multilingual numbers mixture",
      f"numbers below {args.max_number} (currency below "
      f"{args.max_number // 10}.00, years 1000-2099) spelled by num2words, "
      f"{len(tasks)} tasks x {len(languages)} languages = "
      f"{len(registration.pairs)} pairs, "
      f"{_count(registration, 'train')} training examples; base "
      f"pre-trained on {len(texts)} spellings "
      f"({args.digits_rate:.0%} led by their digits); {_vocab_note(args)}.",
  )


def _count(registration, split: str) -> int:
  return sum(
      registration.num_examples[p][split] for p in registration.train_pairs
  )


def _vocab_note(args) -> str:
  if args.vocabulary == "bytes":
    return "bytes"
  return f"SentencePiece ({args.vocab_size} pieces, trained on the train split)"


def jsonl_data(args) -> Data:
  """Any featurized JSONL: one task per feature combination."""
  from flix_tasks import combinations  # pylint: disable=g-import-not-at-top
  from flix import featurized  # pylint: disable=g-import-not-at-top
  from flix_tasks import jsonl  # pylint: disable=g-import-not-at-top
  from flix_tasks import span_corruption  # pylint: disable=g-import-not-at-top

  patterns = {
      "train": args.train_files,
      "validation": args.validation_files,
      "test": args.test_files,
  }
  if not args.train_files or not patterns[args.split]:
    raise ValueError(
        f"--data=jsonl needs --train_files and --{args.split}_files."
    )
  digest = hashlib.sha256()
  examples = {}
  for split, pattern in patterns.items():
    examples[split] = []
    for path in jsonl.resolve_files(pattern) if pattern else []:
      with open(path, "rb") as f:
        digest.update(f.read())
      examples[split] += list(jsonl.read_examples([path]))
  groups = featurized.order_groups(
      g for split in examples.values() for e in split for g in e.features
  )
  if not groups:
    raise ValueError("--data=jsonl: the examples carry no features.")
  by_pair = collections.defaultdict(lambda: {s: [] for s in examples})
  for split, split_examples in examples.items():
    for e in split_examples:
      pair = tuple(e.features.get(g, "") for g in groups)
      by_pair[pair][split].append((e.inputs, e.targets))
  pairs = sorted(by_pair)
  held_out = [p for p in pairs if not by_pair[p]["train"]]
  texts = [("", t) for _, t in (x for p in pairs for x in by_pair[p]["train"])]
  for path in jsonl.resolve_files(args.pretrain_files or []):
    with open(path, encoding="utf-8") as f:
      lines = [line.strip() for line in f]
    digest.update("\n".join(lines).encode())
    texts += [("", line) for line in lines if line]
  vocabulary = _vocabulary(
      args,
      [s for p in pairs for x in by_pair[p]["train"] for s in x],
  )
  registration = combinations.register(
      "jsonl",
      groups,
      {p: {s: len(v) for s, v in by_pair[p].items()} for p in pairs},
      lambda pair, split: by_pair[pair][split],
      held_out=held_out,
      vocabulary=vocabulary,
      suffix="_reproduce",
  )
  name = "jsonl_pretrain_reproduce"
  span_corruption.register(
      name,
      lambda: texts,
      vocabulary,
      copies=args.pretrain_copies,
      prefix_rate=args.prefix_rate,
  )
  sizes = {s: len(v) for s, v in examples.items()}
  return Data(
      registration,
      vocabulary,
      name,
      texts,
      [digest.hexdigest(), args.prefix_rate, args.pretrain_copies],
      f"featurized JSONL ({args.train_files})",
      f"{sizes['train']} train, {sizes['validation']} validation, "
      f"{sizes['test']} test examples; feature groups {list(groups)}, "
      f"{len(pairs)} combinations, {len(held_out)} never in train; base "
      f"pre-trained on {len(texts)} texts (train targets"
      + (", --pretrain_files" if args.pretrain_files else "")
      + f"); {_vocab_note(args)}.",
  )


def feature_lengths(
    data: Data, max_length: int
) -> tuple[dict[str, int], dict[str, int]]:
  """Feature lengths that fit every example: (pre-training, adaptation).

  Token lengths + EOS, rounded up to a multiple of 8, at most `max_length`.
  A span-corrupted text of n tokens has at most n input and n + 1 target
  tokens; pre-training rows are at least `PACKED_LENGTH` long (packed).
  """
  from flix_tasks import span_corruption  # pylint: disable=g-import-not-at-top

  vocabulary, registration = data.vocabulary, data.registration
  longest = [1, 1]  # inputs, targets
  for pair in registration.pairs:
    for split, size in registration.num_examples[pair].items():
      for texts in registration.examples(pair, split) if size else ():
        for i, text in enumerate(texts):
          longest[i] = max(longest[i], len(vocabulary.encode(text)))
  pretrain = max(
      len(span_corruption.tokenize(lead, text, vocabulary)[0])
      for lead, text in data.pretrain_texts
  )
  round_up = lambda n: min(-(-(n + 1) // 8) * 8, max_length)
  packed = max(round_up(pretrain + 1), PACKED_LENGTH)  # base.gin packs.
  return (
      {"inputs": packed, "targets": packed},
      {"inputs": round_up(longest[0]), "targets": round_up(longest[1])},
  )
