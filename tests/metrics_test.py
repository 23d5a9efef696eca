"""Tests for flix_tasks.metrics against hand-computed XTREME-UP values."""

import inspect
import random

import pytest

from flix_tasks import metrics

approx = pytest.approx


# ----------------------------------------------------------------------------
# SQuAD F1 / EM.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        # lower -> "the cat, a dog!"; delete ASCII punct -> "the cat a dog";
        # articles -> " cat   dog"; collapse -> "cat dog".
        ("The Cat, a dog!", "cat dog"),
        # The danda "।" is not ASCII punctuation, so it is kept.
        ("ঢাকা।", "ঢাকা।"),
        # The Arabic comma "،" is kept too; the ASCII "." is deleted.
        ("القاهرة،.", "القاهرة،"),
        # Hyphen is deleted first, so "the" is no longer a separate word.
        ("The-End", "theend"),
        # "an"/"a" inside words are not articles; "An" alone is.
        ("An analyst and a banana", "analyst and banana"),
        ("  multiple\t\nspaces  ", "multiple spaces"),
    ],
)
def test_squad_normalize(text, expected):
  assert metrics.squad_normalize(text) == expected


def test_squad_f1_partial_and_exact():
  # Example 1: target "dodoma city" (2 tokens); prediction
  #   "the city of Dodoma" -> "city of dodoma" (3 tokens); common = 2
  #   P = 2/3, R = 2/2 = 1, F1 = 2 * (2/3) / (5/3) = 0.8; EM = 0.
  # Example 2: "No Answer" vs "no answer." -> both "no answer": F1 = EM = 1.
  # Means: F1 = (0.8 + 1) / 2 = 0.9 -> 90; EM = 1/2 -> 50.
  result = metrics.squad_f1(
      ["Dodoma city", "No Answer"], ["the city of Dodoma", "no answer."]
  )
  assert result == {"f1": approx(90.0), "exact_match": approx(50.0)}


def test_squad_f1_multiset_overlap():
  # tokens t = [x, y, y], p = [y, y, y]; common multiset = {y: 2}
  # P = 2/3, R = 2/3, F1 = 2/3 -> 66.666...
  result = metrics.squad_f1(["x y y"], ["y y y"])
  assert result["f1"] == approx(200 / 3)
  assert result["exact_match"] == 0.0


def test_squad_f1_keeps_non_ascii_punctuation():
  # "ঢাকা।" keeps the danda: token "ঢাকা।" != "ঢাকা" -> F1 0, EM 0.
  # "ঢাকা," loses the ASCII comma: exact match -> F1 1, EM 1.
  # Means: F1 = (0 + 1) / 2 -> 50; EM -> 50.
  result = metrics.squad_f1(["ঢাকা", "ঢাকা"], ["ঢাকা।", "ঢাকা,"])
  assert result == {"f1": approx(50.0), "exact_match": approx(50.0)}


def test_squad_f1_empty_after_normalisation_quirk():
  # "The" -> "" and "a" -> "": EM = 1 ("" == ""), but F1 = 0 (no common
  # tokens), as in the official qa_utils.
  assert metrics.squad_f1(["The"], ["a"]) == {"f1": 0.0, "exact_match": 100.0}


# ----------------------------------------------------------------------------
# NER span F1.
# ----------------------------------------------------------------------------


def test_span_f1_basic():
  # Gold {PER Samia Suluhu, LOC Arusha, DATE Jumatatu};
  # predicted {PER Samia Suluhu, LOC Dodoma}.
  # TP = 1, FP = 1 (LOC Dodoma), FN = 2 (LOC Arusha, DATE Jumatatu)
  # P = 1/2, R = 1/3, F1 = 2 * (1/6) / (5/6) = 2/5 -> 40.
  result = metrics.span_f1(
      ["PER: Samia Suluhu $$ LOC: Arusha $$ DATE: Jumatatu"],
      ["PER: Samia Suluhu $$ LOC: Dodoma"],
  )
  assert result["span_f1"] == approx(40.0)


def test_span_f1_is_micro_averaged():
  # Ex 1: TP 1 (PER Ama), FN 1 (LOC Accra).
  # Ex 2: wrong label -> FP 1 (ORG Ama) and FN 1 (PER Ama).
  # Ex 3: TP 2 (order does not matter).
  # Totals TP 3, FP 1, FN 2: P = 3/4, R = 3/5,
  # F1 = 2 * (9/20) / (27/20) = 2/3 -> 66.67.
  # (A macro mean of per-example F1 = (2/3 + 0 + 1) / 3 = 55.6 would differ.)
  result = metrics.span_f1(
      ["PER: Ama $$ LOC: Accra", "PER: Ama", "PER: Kofi $$ LOC: Kumasi"],
      ["PER: Ama", "ORG: Ama", "LOC: Kumasi $$ PER: Kofi"],
  )
  assert result["span_f1"] == approx(200 / 3)


def test_span_f1_entity_with_colon_is_dropped():
  # "TIME: 10:30".split(":") has 3 parts -> dropped on both sides.
  # Ex 1: gold {PER Ama}, pred {PER Kofi} -> FP 1, FN 1.
  # Ex 2: gold {LOC Accra}, pred {LOC Accra} -> TP 1.
  # TP 1, FP 1, FN 1: P = R = 1/2 -> 50 (counting TIME would give 66.7).
  result = metrics.span_f1(
      ["TIME: 10:30 $$ PER: Ama", "LOC: Accra"],
      ["TIME: 10:30 $$ PER: Kofi", "LOC: Accra"],
  )
  assert result["span_f1"] == approx(50.0)
  # Alone, an exactly-correct colon entity scores 0: TP = FP = FN = 0.
  assert metrics.span_f1(["TIME: 10:30"], ["TIME: 10:30"]) == {"span_f1": 0.0}


def test_span_f1_missing_separator_spaces_drop_the_piece():
  # "PER: Ama $$LOC: Accra" is not split (separator is " $$ "), and the
  # single piece has 3 colon parts -> dropped. Pred yields nothing:
  # TP 0, FP 0, FN 2 -> F1 0.
  result = metrics.span_f1(
      ["PER: Ama $$ LOC: Accra"], ["PER: Ama $$LOC: Accra"]
  )
  assert result == {"span_f1": 0.0}


def test_span_f1_strips_labels_and_entities():
  # " PER :  Ama " parses as ("PER", "Ama"), matching gold -> TP 1 only.
  # F1 = 2PR/(P+R+eps) with P = R = 1/(1+1e-13):
  #   = 100 * (1 - 1.5e-13) approximately -> just below 100.
  result = metrics.span_f1(["PER: Ama"], [" PER :  Ama "])["span_f1"]
  assert result == approx(100.0 - 1.5e-11, abs=1e-12)
  assert result < 100.0


@pytest.mark.parametrize(
    "prediction, expected",
    [
        # Gold has PER Ama twice. One prediction: TP 1, FN 1:
        # P = 1, R = 1/2, F1 = 2 * (1/2) / (3/2) = 2/3 -> 66.67.
        ("PER: Ama", 200 / 3),
        # Two predictions: TP 2 -> 100.
        ("PER: Ama $$ PER: Ama", 100.0),
        # Three predictions: the third finds no gold left -> TP 2, FP 1:
        # P = 2/3, R = 1, F1 = 2 * (2/3) / (5/3) = 4/5 -> 80.
        ("PER: Ama $$ PER: Ama $$ PER: Ama", 80.0),
    ],
)
def test_span_f1_duplicates_consume_gold(prediction, expected):
  result = metrics.span_f1(["PER: Ama $$ PER: Ama"], [prediction])
  assert result["span_f1"] == approx(expected)


def test_span_f1_empty_target():
  # Ex 1: gold "" (no entities), pred {LOC Accra} -> FP 1.
  # Ex 2: TP 1.  P = 1/2, R = 1/1, F1 = 2 * (1/2) / (3/2) = 2/3 -> 66.67.
  result = metrics.span_f1(["", "PER: Ama"], ["LOC: Accra", "PER: Ama"])
  assert result["span_f1"] == approx(200 / 3)
  # Empty gold and empty prediction contribute nothing: Ex 2 alone -> 100.
  result = metrics.span_f1(["", "PER: Ama"], ["", "PER: Ama"])
  assert result["span_f1"] == approx(100.0)
  # A file with no entities anywhere scores 0 (TP = FP = FN = 0).
  assert metrics.span_f1([""], [""]) == {"span_f1": 0.0}


# ----------------------------------------------------------------------------
# Sequence accuracy.
# ----------------------------------------------------------------------------


def test_sequence_accuracy_is_raw_equality():
  # Ex 1: equal -> 1. Ex 2: trailing space -> 0. Ex 3: case differs -> 0.
  # Ex 4: equal -> 1.  Mean = 2/4 -> 50.
  targets = ["[IN:GET_WEATHER ]", "[IN:A ]", "[IN:A ]", "x"]
  predictions = ["[IN:GET_WEATHER ]", "[IN:A ] ", "[in:a ]", "x"]
  assert metrics.sequence_accuracy(targets, predictions) == {
      "sequence_accuracy": approx(50.0)
  }


# ----------------------------------------------------------------------------
# chrF and BLEU.
# ----------------------------------------------------------------------------


def test_chrf_single_sentence():
  # "abd" vs ref "abc": 1-grams P = R = 2/3; 2-grams {ab,bd} vs {ab,bc}:
  # P = R = 1/2; 3-grams: 0/1; orders 4..6 have no n-grams (ignored).
  # avgP = avgR = (2/3 + 1/2 + 0) / 3 = 7/18; with P = R, F_beta = P
  # -> 100 * 7/18 = 38.888...
  assert metrics.chrf(["abc"], ["abd"])["chrf"] == approx(700 / 18)


def test_chrf_uses_beta_2():
  # "ab" vs ref "abcd": 1-grams P = 2/2, R = 2/4; 2-grams P = 1/1, R = 1/3;
  # 3-grams: hypothesis has none (ignored).
  # avgP = 1, avgR = (1/2 + 1/3) / 2 = 5/12.
  # F_2 = 5 P R / (4 P + R) = (25/12) / (53/12) = 25/53 -> 47.1698
  # (F_1 would be 10/17 = 58.8).
  assert metrics.chrf(["abcd"], ["ab"])["chrf"] == approx(2500 / 53)


def test_chrf_is_corpus_level():
  # Statistics summed over both sentences above:
  # 1-grams hyp 3+2, ref 3+4, match 2+2 -> P = 4/5, R = 4/7
  # 2-grams hyp 2+1, ref 2+3, match 1+1 -> P = 2/3, R = 2/5
  # 3-grams hyp 1+0, ref 1+2, match 0   -> P = R = 0
  # avgP = 22/45, avgR = 34/105; F_2 = 5PR / (4P + R) = 374/1077 -> 34.7261
  # (not the mean of the sentence scores, 43.03).
  result = metrics.chrf(["abc", "abcd"], ["abd", "ab"])
  assert result["chrf"] == approx(37400 / 1077)


def test_chrf_ignores_whitespace():
  assert metrics.chrf(["a b"], ["ab"])["chrf"] == approx(100.0)


def test_bleu_is_not_multiplied_by_100():
  # "a b c d f" vs "a b c d e": p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2,
  # BP = 1: BLEU = 100 * (4/5 * 3/4 * 2/3 * 1/2) ** (1/4) = 100 * 0.2 ** 0.25
  # = 66.874 (the baseline would report 6687.4).
  result = metrics.bleu(["a b c d e"], ["a b c d f"])
  assert result["bleu"] == approx(100 * 0.2**0.25)


# ----------------------------------------------------------------------------
# Edit distance, ASR normalisation, CER.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("", "abc", 3),
        ("abc", "", 3),
        ("ab", "ba", 2),  # no transpositions
        ("flaw", "lawn", 2),  # -f, +n
        ("abcxdef", "abcydef", 1),
        ("aaa", "aa", 1),
        ("नमस्ते", "नमसते", 1),  # one combining virama deleted
    ],
)
def test_edit_distance(a, b, expected):
  assert metrics.edit_distance(a, b) == expected
  assert metrics.edit_distance(b, a) == expected


def _naive_edit_distance(a, b):
  """Full-table Levenshtein DP, independent of the prefix/suffix shortcuts."""
  table = [
      [i + j if i * j == 0 else 0 for j in range(len(b) + 1)]
      for i in range(len(a) + 1)
  ]
  for i in range(1, len(a) + 1):
    for j in range(1, len(b) + 1):
      table[i][j] = min(
          table[i - 1][j] + 1,
          table[i][j - 1] + 1,
          table[i - 1][j - 1] + (a[i - 1] != b[j - 1]),
      )
  return table[-1][-1]


def test_edit_distance_matches_naive_dp_on_random_strings():
  rng = random.Random(0)
  for _ in range(300):
    a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 8)))
    b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 8)))
    assert metrics.edit_distance(a, b) == _naive_edit_distance(a, b), (a, b)


@pytest.mark.parametrize(
    "text, expected",
    [
        # The example of docs/xtreme_up.md §3.
        ("Hello, World! (test) it's  ok.", "hello world test it s ok"),
        # "?! " -> " "; "..." inside a word is not before/after a space: kept.
        ("Wait...what?! Yes", "wait...what yes"),
        ("a\tb\nc", "a b c"),
        # ", " -> " "; the decimal point is kept.
        ("3.5 , x", "3.5 x"),
        # " ," (after a space) -> " ", then strip.
        (" ,hello", "hello"),
        ("[noise] (laughs) don't", "noise laughs don t"),
        ("ÀB", "àb"),
        # "¿" is not in the punctuation class; final "?" -> " ", stripped.
        ("¿Qué?", "¿qué"),
    ],
)
def test_asr_normalize(text, expected):
  assert metrics.asr_normalize(text) == expected


def test_cer_documented_asr_example():
  # Normalised target "this is a cat" (13 chars), prediction "this is a t":
  # delete "c", "a" -> 2 edits; CER = 100 * 2 / 13 = 15.3846.
  result = metrics.cer(["This is a cat?"], ["this is a t"], normalize_asr=True)
  assert result == {"cer_normalized": approx(15.3846, abs=1e-4)}
  # The denominator is the target length: with the roles swapped the target is
  # "this is a t" (11 chars): 2 / 11 -> 18.1818.
  swapped = metrics.cer(["this is a t"], ["This is a cat?"], normalize_asr=True)
  assert swapped == {"cer_normalized": approx(200 / 11)}
  assert metrics.cer_normalized(["This is a cat?"], ["this is a t"]) == result


def test_cer_without_normalisation():
  # "This is a cat?" (14 chars) vs "this is a t": T->t, delete c, a, ? = 4
  # edits -> 100 * 4 / 14 = 28.571.
  result = metrics.cer(["This is a cat?"], ["this is a t"])
  assert result == {"cer": approx(400 / 14)}


def test_cer_is_corpus_level():
  # ("abc", "abd"): 1 edit; ("aa", "a"): 1 edit. CER = 100 * 2 / (3 + 2) = 40
  # (the mean of per-sentence rates would be (33.3 + 50) / 2 = 41.7).
  assert metrics.cer(["abc", "aa"], ["abd", "a"]) == {"cer": approx(40.0)}


def test_cer_applies_nfkc():
  # NFKC("ﬁ") = "fi" (2 chars), NFKC("①") = "1": 0 edits -> 0.
  # Without NFKC it would be 2 edits ("ﬁ" -> "f", +"i") plus 1.
  assert metrics.cer(["ﬁx", "①"], ["fix", "1"]) == {"cer": 0.0}
  # Decomposed "é" (e + U+0301) composes under NFKC, so target "café" has 4
  # chars and prediction "cafe" is 1 substitution: 100 * 1 / 4 = 25.
  assert metrics.cer(["cafe\u0301"], ["cafe"]) == {"cer": approx(25.0)}


def test_cer_rejects_all_empty_targets():
  with pytest.raises(ValueError, match="empty"):
    metrics.cer([""], ["abc"])
  # "?!" normalises to "" under ASR normalisation.
  with pytest.raises(ValueError, match="empty"):
    metrics.cer(["?!"], ["x"], normalize_asr=True)


def test_exact_match_and_cer():
  # EM: [1, 0] -> 50. CER: ("abc","abc") 0 edits + ("aa","a") 1 edit over
  # 3 + 2 chars -> 100 * 1 / 5 = 20. The CER is not ASR-normalised: "A" vs
  # "a" costs 1 -> with a third pair ("A", "a"): EM 1/3, CER 2 / 6.
  assert metrics.exact_match_and_cer(["abc", "aa"], ["abc", "a"]) == {
      "exact_match": approx(50.0),
      "cer": approx(20.0),
  }
  assert metrics.exact_match_and_cer(["abc", "aa", "A"], ["abc", "a", "a"]) == {
      "exact_match": approx(100 / 3),
      "cer": approx(200 / 6),
  }


# ----------------------------------------------------------------------------
# Acc@3 and MRR@10.
# ----------------------------------------------------------------------------


def test_top3_accuracy():
  # Ex 1: "maith" is 2nd -> hit. Ex 2: "Spring" != "spring" -> miss.
  # Ex 3: 3rd -> hit.  2/3 -> 66.67.
  targets = ["maith", "spring", "go"]
  predictions = [
      ["mait", "maith", "math"],
      ["Spring", "spread", "spend"],
      ["got", "gone", "go"],
  ]
  result = metrics.top3_accuracy(targets, predictions)
  assert result == {"top3_accuracy": approx(200 / 3)}


@pytest.mark.parametrize(
    "bad_prediction",
    [["a", "b"], ["a", "b", "c", "d"], "abc", [b"a", b"b", b"c"]],
)
def test_top3_accuracy_rejects_wrong_shape(bad_prediction):
  with pytest.raises(ValueError, match="index 1"):
    metrics.top3_accuracy(["a", "b"], [["a", "b", "c"], bad_prediction])


def test_mrr_at_10():
  # p1 at rank 1 -> 1; p2 at rank 4 -> 1/4; p3 absent -> 0;
  # p4 at rank 11 (beyond the cut-off) -> 0; p5 at ranks 2 and 3 -> first: 1/2.
  # MRR = (1 + 0.25 + 0 + 0 + 0.5) / 5 = 0.35 (a fraction, not x 100).
  fillers = [f"n{i}" for i in range(10)]
  targets = ["p1", "p2", "p3", "p4", "p5"]
  predictions = [
      ["p1"] + fillers[:9],
      fillers[:3] + ["p2"] + fillers[3:9],
      fillers,
      fillers + ["p4"],
      ["n0", "p5", "p5"] + fillers[3:],
  ]
  assert metrics.mrr_at_10(targets, predictions) == {"mrr": approx(0.35)}


# ----------------------------------------------------------------------------
# Shared input checks and SeqIO compatibility.
# ----------------------------------------------------------------------------

_ALL_METRIC_FNS = (
    metrics.squad_f1,
    metrics.span_f1,
    metrics.sequence_accuracy,
    metrics.chrf,
    metrics.bleu,
    metrics.cer,
    metrics.cer_normalized,
    metrics.exact_match_and_cer,
    metrics.top3_accuracy,
    metrics.mrr_at_10,
)


@pytest.mark.parametrize("metric_fn", _ALL_METRIC_FNS)
def test_length_mismatch_raises(metric_fn):
  with pytest.raises(ValueError, match="1 targets and 2 predictions"):
    metric_fn(["a"], [["a", "b", "c"], ["a", "b", "c"]])


@pytest.mark.parametrize("metric_fn", _ALL_METRIC_FNS)
def test_empty_inputs_raise(metric_fn):
  with pytest.raises(ValueError):
    metric_fn([], [])


@pytest.mark.parametrize("metric_fn", _ALL_METRIC_FNS)
def test_seqio_signature(metric_fn):
  # SeqIO dispatches on the names of the required positional parameters.
  required = tuple(
      name
      for name, param in inspect.signature(metric_fn).parameters.items()
      if param.default is inspect.Parameter.empty
  )
  assert required == ("targets", "predictions")


_SAMPLE_PREDICTION = {
    "autocomplete": ["x", "y", "z"],
}


@pytest.mark.parametrize("task", sorted(metrics.TASK_METRICS))
def test_task_metrics_return_official_key_as_python_float(task):
  prediction = _SAMPLE_PREDICTION.get(task, "PER: y")
  outputs = {}
  for metric_fn in metrics.TASK_METRICS[task]:
    outputs.update(metric_fn(["PER: x"], [prediction]))
  assert metrics.OFFICIAL_METRIC[task] in outputs
  # Exactly float (not numpy.float64), as SeqIO summaries expect.
  for value in outputs.values():
    assert type(value) is float  # pylint: disable=unidiomatic-typecheck


def test_task_metric_assignment():
  assert metrics.TASK_METRICS == {
      "qa_in_lang": (metrics.squad_f1,),
      "qa_cross_lang": (metrics.squad_f1,),
      "ner": (metrics.span_f1,),
      "semantic_parsing": (metrics.sequence_accuracy,),
      "translation": (metrics.chrf,),
      "transliteration": (metrics.cer,),
      "autocomplete": (metrics.top3_accuracy,),
      "asr": (metrics.cer_normalized,),
  }
  # The ASR metric normalises; transliteration's does not.
  assert metrics.TASK_METRICS["asr"][0](["A."], ["a"]) == {
      "cer_normalized": 0.0
  }
  assert metrics.TASK_METRICS["transliteration"][0](["A."], ["a"]) == {
      "cer": approx(100.0)
  }


# ----------------------------------------------------------------------------
# Overall score.
# ----------------------------------------------------------------------------

# v1.0 mT5-Base task scores (docs/xtreme_up.md §4).
_MT5_BASE_V1 = {
    "transliteration": 12.8,  # CER
    "translation": 27.0,  # chrF
    "ner": 78.2,  # span F1
    "semantic_parsing": 19.8,  # accuracy
    "asr": 10.3,  # CER_normalized
    "autocomplete": 13.9,  # Acc@3
}


def test_aggregate_reproduces_published_score_with_asr_quirk():
  # (100 - 12.8) + 27.0 + 78.2 + 19.8 + 10.3 + 13.9 = 236.4; / 6 = 39.4,
  # the published v1.0 overall score: ASR's raw CER is averaged in.
  assert metrics.aggregate_xtreme_up(_MT5_BASE_V1) == approx(39.4)


def test_aggregate_with_asr_fix():
  # As above but ASR -> 100 - 10.3 = 89.7: (236.4 - 10.3 + 89.7) / 6
  # = 315.8 / 6 = 52.6333.
  result = metrics.aggregate_xtreme_up(_MT5_BASE_V1, fix_asr_quirk=True)
  assert result == approx(315.8 / 6)


def test_aggregate_converts_mrr_and_cer():
  # retrieval 0.5 -> 50; qa 70 -> 70; transliteration CER 10 -> 90;
  # mean = 210 / 3 = 70.
  scores = {
      "retrieval_in_lang": 0.5,
      "qa_in_lang": 70.0,
      "transliteration": 10.0,
  }
  assert metrics.aggregate_xtreme_up(scores) == approx(70.0)
  assert metrics.aggregate_xtreme_up(scores, fix_asr_quirk=True) == approx(70.0)


@pytest.mark.parametrize("scores", [{}, {"ocr": 1.0}])
def test_aggregate_rejects_bad_input(scores):
  with pytest.raises(ValueError):
    metrics.aggregate_xtreme_up(scores)
