"""XTREME-UP evaluation metrics (Ruder et al., 2023), reimplemented.

The functions reproduce the official `evaluation/metrics.py` scoring logic of
the XTREME-UP benchmark, including its quirks, as documented in
docs/xtreme_up.md (§3 metrics, §4 scoring). Every metric function has the
SeqIO signature `metric_fn(targets, predictions)` and returns a dict mapping a
metric name to a Python float, so it can be used directly in a SeqIO
`Task(metric_fns=...)` and in offline scoring of prediction files.

Scales: every metric is reported in [0, 100] except `mrr_at_10`, which is a
fraction in [0, 1] as in the official scorer. CER is lower-is-better; all
other metrics are higher-is-better.

Task -> metric (official metric key in brackets):
  qa_in_lang, qa_cross_lang: `squad_f1` ["f1"]
  retrieval_in_lang, retrieval_cross_lang: `mrr_at_10` ["mrr"]
  ner: `span_f1` ["span_f1"]
  semantic_parsing: `sequence_accuracy` ["sequence_accuracy"]
  translation: `chrf` ["chrf"]
  transliteration: `cer` ["cer"]
  asr: `cer_normalized` ["cer_normalized"]
  autocomplete: `top3_accuracy` ["top3_accuracy"]
"""

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
import re
import string
from typing import Any
import unicodedata

import sacrebleu

# Value added to NER denominators by the official span-F1 implementation.
_SPAN_F1_EPSILON = 1e-13
# Separator between "LABEL: entity" items in a linearised NER target.
_NER_ITEM_SEPARATOR = " $$ "
# Number of ranked candidates considered by MRR@10.
_MRR_CUTOFF = 10
# Number of decodes expected per autocomplete example.
_TOP_K = 3

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
# The ASR punctuation class: runs of , . ? ! (and nothing else).
_ASR_PUNCT_BEFORE_SPACE_RE = re.compile(r"[,.?!]+ ")
_ASR_PUNCT_AT_END_RE = re.compile(r"[,.?!]+$")
_ASR_PUNCT_AFTER_SPACE_RE = re.compile(r" [,.?!]+")
_ASR_BRACKETS_AND_QUOTE_RE = re.compile(r"['()\[\]]")


def _check_inputs(targets: Sequence[Any], predictions: Sequence[Any]) -> None:
  """Raises ValueError unless `targets` and `predictions` are aligned lists."""
  if isinstance(targets, str) or isinstance(predictions, str):
    raise ValueError(
        "targets and predictions must be sequences of examples, not a single"
        " string."
    )
  if len(targets) != len(predictions):
    raise ValueError(
        f"Found {len(targets)} targets and {len(predictions)} predictions, but"
        " expected counts to match."
    )
  if not targets:
    raise ValueError("Cannot compute a metric over zero examples.")


def _mean_percent(values: Sequence[bool | float]) -> float:
  """Returns 100 * mean(values) as a Python float."""
  return 100.0 * sum(values) / len(values)


# ----------------------------------------------------------------------------
# QA: SQuAD token F1 and exact match.
# ----------------------------------------------------------------------------


def squad_normalize(text: str) -> str:
  """Applies the SQuAD answer normalisation used by XTREME-UP QA.

  Steps, in order: lower-case; delete every character of Python's ASCII
  `string.punctuation` (non-ASCII punctuation such as the danda "।" or the
  Arabic comma "،" is kept); replace each English article `a|an|the` matched
  at word boundaries by a space; collapse whitespace runs to one space and
  strip. Because punctuation is deleted first, "the-end" becomes "theend" and
  keeps its article.

  Args:
    text: a raw answer string.

  Returns:
    The normalised answer.
  """
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _ASCII_PUNCTUATION)
  text = _ARTICLES_RE.sub(" ", text)
  return " ".join(text.split())


def _token_f1(target: str, prediction: str) -> float:
  """Token F1 between two already-normalised strings.

  With the common multiset C = tokens(prediction) ∩ tokens(target),
  P = |C| / |tokens(prediction)|, R = |C| / |tokens(target)| and
  F1 = 2PR / (P + R); F1 = 0 when |C| = 0 (so two empty strings score 0).
  """
  prediction_tokens = prediction.split()
  target_tokens = target.split()
  common = Counter(prediction_tokens) & Counter(target_tokens)
  num_common = sum(common.values())
  if num_common == 0:
    return 0.0
  precision = num_common / len(prediction_tokens)
  recall = num_common / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


def squad_f1(
    targets: Sequence[str], predictions: Sequence[str]
) -> dict[str, float]:
  """SQuAD-style token F1 and exact match (official QA metric: "f1").

  Both sides are normalised with `squad_normalize`. Per example,
  EM = [norm(t) == norm(p)] and F1 = `_token_f1(norm(t), norm(p))`; each is
  averaged over examples and multiplied by 100. Single reference per example.
  Quirk kept from the official code: if both sides normalise to the empty
  string (e.g. "The" vs "a"), EM is 1 but F1 is 0.

  Args:
    targets: gold answers.
    predictions: predicted answers.

  Returns:
    {"f1": mean F1 x 100, "exact_match": mean EM x 100}.
  """
  _check_inputs(targets, predictions)
  normalised = [
      (squad_normalize(t), squad_normalize(p))
      for t, p in zip(targets, predictions)
  ]
  return {
      "f1": _mean_percent([_token_f1(t, p) for t, p in normalised]),
      "exact_match": _mean_percent([t == p for t, p in normalised]),
  }


# ----------------------------------------------------------------------------
# NER: span F1 over "LABEL: entity $$ LABEL: entity" strings.
# ----------------------------------------------------------------------------


def _parse_ner_items(text: str) -> list[tuple[str, str]]:
  """Parses "LABEL: entity $$ LABEL: entity" into (label, entity) pairs.

  The string is split on " $$ " and each piece is stripped and split on ":".
  Pieces that do not give exactly two parts (no colon, or a colon inside the
  entity) are silently dropped, as in the official code; label and entity are
  stripped. The empty string therefore yields no pairs.
  """
  pairs = []
  for item in text.split(_NER_ITEM_SEPARATOR):
    parts = item.strip().split(":")
    if len(parts) == 2:
      pairs.append((parts[0].strip(), parts[1].strip()))
  return pairs


def span_f1(
    targets: Sequence[str], predictions: Sequence[str]
) -> dict[str, float]:
  """Micro-averaged span F1 for linearised NER outputs (official: "span_f1").

  For each example, every predicted (label, entity) pair is a true positive
  if it is still present in the example's remaining gold pairs (the matched
  gold pair is then removed, so duplicates are counted correctly) and a false
  positive otherwise; gold pairs left over are false negatives. Counts are
  summed over all examples, then with eps = 1e-13:
    P = TP / (TP + FP + eps),  R = TP / (TP + FN + eps),
    F1 = 2PR / (P + R + eps),
  reported x 100. Entities are compared as exact strings (no normalisation).
  Note: the official SeqIO variant returns the fraction in [0, 1]; this
  function always returns the official x 100 value.

  Args:
    targets: gold linearised entity strings ("" when there are no entities).
    predictions: predicted linearised entity strings.

  Returns:
    {"span_f1": F1 x 100}.
  """
  _check_inputs(targets, predictions)
  tp = fp = fn = 0
  for target, prediction in zip(targets, predictions):
    remaining_gold = _parse_ner_items(target)
    for pair in _parse_ner_items(prediction):
      if pair in remaining_gold:
        remaining_gold.remove(pair)
        tp += 1
      else:
        fp += 1
    fn += len(remaining_gold)
  precision = tp / (tp + fp + _SPAN_F1_EPSILON)
  recall = tp / (tp + fn + _SPAN_F1_EPSILON)
  f1 = 2 * precision * recall / (precision + recall + _SPAN_F1_EPSILON)
  return {"span_f1": 100.0 * f1}


# ----------------------------------------------------------------------------
# Semantic parsing, MT.
# ----------------------------------------------------------------------------


def sequence_accuracy(
    targets: Sequence[str], predictions: Sequence[str]
) -> dict[str, float]:
  """Exact-match accuracy: 100 * mean([t == p]) on raw, unstripped strings.

  Args:
    targets: gold sequences.
    predictions: predicted sequences.

  Returns:
    {"sequence_accuracy": accuracy x 100}.
  """
  _check_inputs(targets, predictions)
  return {
      "sequence_accuracy": _mean_percent(
          [t == p for t, p in zip(targets, predictions)]
      )
  }


def chrf(
    targets: Sequence[str], predictions: Sequence[str]
) -> dict[str, float]:
  """Corpus-level chrF (official MT metric), in [0, 100].

  sacrebleu 2.x `corpus_chrf(predictions, [targets]).score` with defaults:
  character n-grams n = 1..6, no word n-grams, beta = 2, whitespace ignored;
  chrF = (1 + beta^2) * chrP * chrR / (beta^2 * chrP + chrR), where chrP and
  chrR are the n-gram precision and recall averaged over n and computed from
  statistics summed over the corpus. Equals the official (sacrebleu 1.3 era)
  `100 * corpus_chrf(...)`.

  Args:
    targets: one reference per example.
    predictions: system outputs.

  Returns:
    {"chrf": chrF}.
  """
  _check_inputs(targets, predictions)
  score = sacrebleu.corpus_chrf(list(predictions), [list(targets)]).score
  return {"chrf": float(score)}


def bleu(
    targets: Sequence[str], predictions: Sequence[str]
) -> dict[str, float]:
  """Corpus BLEU (training-time diagnostic for MT; not an official metric).

  sacrebleu `corpus_bleu(predictions, [targets], tokenize="intl",
  smooth_method="exp", lowercase=False, use_effective_order=False).score`:
  BLEU = BP * exp(mean_{n=1..4} log p_n), BP = min(1, exp(1 - r / c)),
  already in [0, 100]. The baseline's `bleu_seqio` multiplies this score by
  100 again (reporting values 100x too large); that bug is fixed here and the
  score is returned as-is.

  Args:
    targets: one reference per example.
    predictions: system outputs.

  Returns:
    {"bleu": BLEU in [0, 100]}.
  """
  _check_inputs(targets, predictions)
  score = sacrebleu.corpus_bleu(
      list(predictions),
      [list(targets)],
      smooth_method="exp",
      lowercase=False,
      tokenize="intl",
      use_effective_order=False,
  ).score
  return {"bleu": float(score)}


# ----------------------------------------------------------------------------
# Transliteration and ASR: character error rate.
# ----------------------------------------------------------------------------


def asr_normalize(text: str) -> str:
  """Applies the XTREME-UP ASR text normalisation (used for CER_normalized).

  Steps, in order: lower-case; replace tabs and newlines by spaces; replace
  each run of `, . ? !` followed by a space with a single space; replace such
  a run at the end of the string with a space; replace a space followed by
  such a run with a single space; replace each of `' ( ) [ ]` with a space;
  strip, then collapse runs of spaces. Only ASCII spaces are collapsed.
  Example: "Hello, World! (test) it's  ok." -> "hello world test it s ok".

  Args:
    text: a raw transcript.

  Returns:
    The normalised transcript.
  """
  text = re.sub(r"[\t\n]", " ", text.lower())
  text = _ASR_PUNCT_BEFORE_SPACE_RE.sub(" ", text)
  text = _ASR_PUNCT_AT_END_RE.sub(" ", text)
  text = _ASR_PUNCT_AFTER_SPACE_RE.sub(" ", text)
  text = _ASR_BRACKETS_AND_QUOTE_RE.sub(" ", text)
  return re.sub(" +", " ", text.strip())


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance between two strings over characters.

  Unit costs for insertion, deletion and substitution; no transpositions:
    d(i, 0) = i,  d(0, j) = j,
    d(i, j) = min(d(i-1, j) + 1, d(i, j-1) + 1, d(i-1, j-1) + [a_i != b_j]).

  Args:
    a: first string.
    b: second string.

  Returns:
    The minimum number of single-character edits turning `a` into `b`.
  """
  # A shared prefix or suffix never needs an edit; dropping it is exact.
  while a and b and a[0] == b[0]:
    a, b = a[1:], b[1:]
  while a and b and a[-1] == b[-1]:
    a, b = a[:-1], b[:-1]
  if len(a) < len(b):
    a, b = b, a  # The distance is symmetric; keep the DP row short.
  previous = list(range(len(b) + 1))
  for i, char_a in enumerate(a, start=1):
    current = [i]
    for j, char_b in enumerate(b, start=1):
      current.append(
          min(
              previous[j] + 1,
              current[j - 1] + 1,
              previous[j - 1] + (char_a != char_b),
          )
      )
    previous = current
  return previous[-1]


def cer(
    targets: Sequence[str],
    predictions: Sequence[str],
    normalize_asr: bool = False,
) -> dict[str, float]:
  """Corpus-level character error rate, in percent (lower is better).

  Optionally applies `asr_normalize` to both sides, then Unicode NFKC to both
  sides, and computes
    CER = 100 * sum_i edit_distance(t_i, p_i) / sum_i len(t_i),
  i.e. total edits over total target characters (not a mean of per-sentence
  rates). The denominator uses the (normalised) targets only.

  Args:
    targets: gold strings.
    predictions: predicted strings.
    normalize_asr: apply the ASR normalisation first (official ASR metric
      "CER_normalized"); transliteration uses plain CER.

  Returns:
    {"cer": CER}, or {"cer_normalized": CER} when `normalize_asr` is True.

  Raises:
    ValueError: on misaligned inputs, or if all targets are empty (after
      normalisation), which leaves CER undefined.
  """
  _check_inputs(targets, predictions)
  if normalize_asr:
    targets = [asr_normalize(t) for t in targets]
    predictions = [asr_normalize(p) for p in predictions]
  targets = [unicodedata.normalize("NFKC", t) for t in targets]
  predictions = [unicodedata.normalize("NFKC", p) for p in predictions]
  total_chars = sum(len(t) for t in targets)
  if total_chars == 0:
    raise ValueError("CER is undefined when all targets are empty.")
  total_edits = sum(edit_distance(t, p) for t, p in zip(targets, predictions))
  key = "cer_normalized" if normalize_asr else "cer"
  return {key: 100.0 * total_edits / total_chars}


def cer_normalized(
    targets: Sequence[str], predictions: Sequence[str]
) -> dict[str, float]:
  """ASR metric: `cer(targets, predictions, normalize_asr=True)`.

  Args:
    targets: gold transcripts.
    predictions: predicted transcripts.

  Returns:
    {"cer_normalized": CER after ASR normalisation and NFKC}.
  """
  return cer(targets, predictions, normalize_asr=True)


def exact_match_and_cer(
    targets: Sequence[str], predictions: Sequence[str]
) -> dict[str, float]:
  """Raw exact match and un-normalised CER (for the offline demo mixture).

  Args:
    targets: gold strings.
    predictions: predicted strings.

  Returns:
    {"exact_match": 100 * mean([t == p]), "cer": `cer(targets, predictions)`}.
  """
  _check_inputs(targets, predictions)
  return {
      "exact_match": _mean_percent(
          [t == p for t, p in zip(targets, predictions)]
      ),
      "cer": cer(targets, predictions)["cer"],
  }


# The metrics of flix_tasks' own featurized tasks (numbers, JSONL).
DEFAULT_METRIC_FNS = (exact_match_and_cer,)


# ----------------------------------------------------------------------------
# Autocomplete and retrieval: ranked predictions.
# ----------------------------------------------------------------------------


def top3_accuracy(
    targets: Sequence[str], predictions: Sequence[Sequence[str]]
) -> dict[str, float]:
  """Acc@3: 100 * mean([t in top3]) with exact, case-sensitive matching.

  Args:
    targets: gold next words.
    predictions: for each example, a list of exactly 3 predicted strings.

  Returns:
    {"top3_accuracy": Acc@3 x 100}.

  Raises:
    ValueError: on misaligned inputs, or when a prediction is not a sequence
      of exactly 3 strings (the message names the first offending index).
  """
  _check_inputs(targets, predictions)
  for index, top3 in enumerate(predictions):
    if (
        isinstance(top3, (str, bytes))
        or len(top3) != _TOP_K
        or not all(isinstance(word, str) for word in top3)
    ):
      raise ValueError(
          f"Prediction at index {index} must be a list of exactly {_TOP_K}"
          f" strings; got {top3!r}."
      )
  return {
      "top3_accuracy": _mean_percent(
          [
              any(word == target for word in top3)
              for target, top3 in zip(targets, predictions)
          ]
      )
  }


def mrr_at_10(
    targets: Sequence[str], predictions: Sequence[Sequence[str]]
) -> dict[str, float]:
  """Mean reciprocal rank at 10 for retrieval, as a fraction in [0, 1].

  MRR@10 = mean_i 1 / rank_i, where rank_i is the 1-based position of the
  first exact match of the gold id among the first 10 predicted ids, and the
  term is 0 if the gold id is not among them. (The official code scans the
  whole list, which is always 10 long in practice; ids past 10 are ignored
  here.) The parameters are named `targets`/`predictions` so that SeqIO
  accepts the function.

  Args:
    targets: gold passage ids.
    predictions: for each example, predicted ids ranked best first.

  Returns:
    {"mrr": MRR@10}.
  """
  _check_inputs(targets, predictions)
  reciprocal_ranks = []
  for gold_id, ranked_ids in zip(targets, predictions):
    reciprocal_rank = 0.0
    for rank, candidate in enumerate(ranked_ids[:_MRR_CUTOFF], start=1):
      if candidate == gold_id:
        reciprocal_rank = 1.0 / rank
        break
    reciprocal_ranks.append(reciprocal_rank)
  return {"mrr": sum(reciprocal_ranks) / len(reciprocal_ranks)}


# ----------------------------------------------------------------------------
# Task registry and overall score.
# ----------------------------------------------------------------------------

MetricFn = Callable[[Sequence[Any], Sequence[Any]], dict[str, float]]

# SeqIO metric functions per generative XTREME-UP task. Retrieval is absent:
# it is scored from nearest-neighbour lists with `mrr_at_10`, not by SeqIO.
TASK_METRICS: dict[str, tuple[MetricFn, ...]] = {
    "qa_in_lang": (squad_f1,),
    "qa_cross_lang": (squad_f1,),
    "ner": (span_f1,),
    "semantic_parsing": (sequence_accuracy,),
    "translation": (chrf,),
    "transliteration": (cer,),
    "autocomplete": (top3_accuracy,),
    "asr": (cer_normalized,),
}

# Task -> key of the official metric in the dict returned by its metric
# function. Includes the retrieval tasks so that all ten tasks can be
# aggregated.
OFFICIAL_METRIC: dict[str, str] = {
    "qa_in_lang": "f1",
    "qa_cross_lang": "f1",
    "retrieval_in_lang": "mrr",
    "retrieval_cross_lang": "mrr",
    "ner": "span_f1",
    "semantic_parsing": "sequence_accuracy",
    "translation": "chrf",
    "transliteration": "cer",
    "autocomplete": "top3_accuracy",
    "asr": "cer_normalized",
}


def aggregate_xtreme_up(
    task_scores: Mapping[str, float], fix_asr_quirk: bool = False
) -> float:
  """Overall XTREME-UP score, following the official `score_system.py`.

  Each input is a task score: the mean over the task's under-represented
  languages of the per-language score (itself the mean over that language's
  files), on the official scale of `OFFICIAL_METRIC[task]`. The overall score
  is the plain mean over the given tasks of
    100 - s    if the task's metric is "cer" (transliteration),
    100 * s    if the task's metric is "mrr" (retrieval, a fraction),
    s          otherwise.
  Quirk (reproduced by default): ASR's metric is "cer_normalized", which the
  official rule does not recognise as CER, so the raw, lower-is-better ASR CER
  is averaged in unchanged. This is what reproduces the published v1.0
  overall scores (e.g. mT5-Base 39.40). With `fix_asr_quirk=True` ASR is
  converted to 100 - CER like transliteration.

  Args:
    task_scores: task name (a key of `OFFICIAL_METRIC`) -> task score.
    fix_asr_quirk: convert the ASR CER to 100 - CER as well.

  Returns:
    The overall score (higher is better, except for the ASR quirk).

  Raises:
    ValueError: if `task_scores` is empty or names an unknown task.
  """
  if not task_scores:
    raise ValueError("task_scores is empty.")
  converted = []
  for task, score in task_scores.items():
    if task not in OFFICIAL_METRIC:
      raise ValueError(
          f"Unknown XTREME-UP task {task!r}; expected one of"
          f" {sorted(OFFICIAL_METRIC)}."
      )
    metric = OFFICIAL_METRIC[task]
    if metric == "cer" or (fix_asr_quirk and metric == "cer_normalized"):
      converted.append(100.0 - score)
    elif metric == "mrr":
      converted.append(100.0 * score)
    else:
      converted.append(float(score))
  return sum(converted) / len(converted)
