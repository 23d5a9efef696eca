"""Tests for flix_tasks.xtreme_up on tiny synthetic XTREME-UP-format files."""

import copy
import json
import os
import pathlib

import pytest
import seqio

from flix import featurized
from flix_tasks import metrics
from flix_tasks import xtreme_up

# Amharic: 26 characters, 66 UTF-8 bytes; the span offsets are byte offsets.
_AMHARIC = "ዶክተር አብይ አህመድ ወደ ጎንደር ሄዱ ።"
_SWAHILI_NER = {
    "text": "Rais Samia Suluhu alizuru Arusha Jumatatu .",
    "spans": [
        {"start_byte": 5, "limit_byte": 17, "label": "PER"},
        {"start_byte": 26, "limit_byte": 32, "label": "LOC"},
        {"start_byte": 33, "limit_byte": 41, "label": "DATE"},
    ],
    "target": "PER: Samia Suluhu $$ LOC: Arusha $$ DATE: Jumatatu",
}
_AMHARIC_NER = {
    "text": _AMHARIC,
    "spans": [
        {"start_byte": 0, "limit_byte": 35, "label": "PER"},
        {"start_byte": 43, "limit_byte": 55, "label": "LOC"},
    ],
    "target": "PER: ዶክተር አብይ አህመድ $$ LOC: ጎንደር",
}
_QA = {
    "question": "Mji mkuu wa Tanzania ni upi?",
    "title": "Tanzania",
    "context": "Tanzania ni nchi ya Afrika Mashariki. Mji mkuu wake ni "
    "Dodoma.",
    "target": "Dodoma",
    "id": 17,
}
_QA_NO_ANSWER = {
    "question": "Rais wa kwanza ni nani?",
    "title": "Tanzania",
    "context": "Tanzania ni nchi.",
    "target": "No Answer",
}
_SP = {
    "input": "weka kengele saa kumi na mbili asubuhi",
    "target": "[IN:CREATE_ALARM [SL:DATE_TIME saa kumi na mbili asubuhi ] ]",
}

# Relative path -> records. Every file ends with blank lines (see _write).
_FILES = {
    "qa_in_lang/train/sw.jsonl": [_QA],
    "qa_in_lang/validation/sw.jsonl": [_QA_NO_ANSWER],
    "qa_in_lang/test/sw.jsonl": [_QA, _QA_NO_ANSWER],
    "qa_cross_lang/train/bn.jsonl": [
        {
            "question": "তানজানিয়ার রাজধানী কোথায়?",
            "title": "Dodoma",
            "context": "Dodoma is the capital city of Tanzania.",
            "target": "ডোডোমা",
        }
    ],
    "ner/train/sw.jsonl": [
        _SWAHILI_NER,
        {"text": "Hakuna\tchochote hapa .", "spans": [], "target": ""},
    ],
    "ner/train/am.jsonl": [_AMHARIC_NER],
    "ner/test/am.jsonl": [_AMHARIC_NER],
    "semantic_parsing/train/sw.jsonl": [_SP],
    "semantic_parsing/train/pt_br.jsonl": [
        {"input": "ligar para a mãe", "target": "[IN:CREATE_CALL ]"}
    ],
    "semantic_parsing/train/hi_cs.jsonl": [
        {"input": "alarm set karo", "target": "[IN:CREATE_ALARM ]"}
    ],
    "translation/train/en2sw.jsonl": [
        {"input": "The cat is sleeping.", "target": "Paka analala."}
    ],
    "translation/train/en2de.jsonl": [
        {"input": "The cat is sleeping.", "target": "Die Katze schläft."}
    ],
    "transliteration/train/Latn2Deva.hi.jsonl": [
        {"input": "namaste duniya", "target": "नमस्ते दुनिया"}
    ],
    "transliteration/train/Deva2Latn.hi.jsonl": [
        {"input": "नमस्ते दुनिया", "target": "namaste duniya"}
    ],
    "transliteration/train/Arab2Guru.pa.jsonl": [
        {"input": "ست سری اکال", "target": "ਸਤ ਸ੍ਰੀ ਅਕਾਲ"}
    ],
    "autocomplete/train/ga.jsonl": [
        {"context": "Tá an aimsir go ma", "target": "maith"}
    ],
    "asr/train/sw_ke.jsonl": [
        {
            "input": "habari za asubuhi rafiki",
            "target": "habari za asubuhi rafiki yangu",
        }
    ],
    "asr/train/cmn_hans_cn.jsonl": [{"input": "你好", "target": "你好。"}],
}


def _write(root: pathlib.Path, files) -> None:
  for relative, records in files.items():
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    # A blank line inside and blank trailing lines, as the converter allows.
    if len(lines) > 1:
      lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n\n   \n", encoding="utf-8")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("xtreme_up")
  _write(path, _FILES)
  for split in xtreme_up.SPLITS:  # Retrieval exists in the tarball; ignored.
    (path / "retrieval_in_lang" / split).mkdir(parents=True)
  return str(path)


@pytest.fixture
def registration(root) -> xtreme_up.Registration:
  return xtreme_up.register_xtreme_up(root)


def _examples(name: str, split: str = "train") -> list[dict]:
  dataset = seqio.get_mixture_or_task(name).get_dataset(
      sequence_length=None, split=split, shuffle=False
  )
  return [
      {k: v.decode() if isinstance(v, bytes) else v for k, v in example.items()}
      for example in dataset.as_numpy_iterator()
  ]


def _texts(name: str, split: str = "train") -> list[tuple[str, str]]:
  return [
      (e["inputs_pretokenized"], e["targets_pretokenized"])
      for e in _examples(name, split)
  ]


def _features(name: str) -> set[tuple[str, ...]]:
  return {
      tuple(
          sorted((k, v) for k, v in example.items() if k.startswith("feature_"))
      )
      for example in _examples(name)
  }


def test_qa_templates_no_answer_and_splits(registration):
  del registration
  name = "xtreme_up_qa_in_lang.sw_byt5"
  context = _QA["context"]
  assert _texts(name) == [
      (
          f"question: Mji mkuu wa Tanzania ni upi? title: Tanzania context: "
          f"{context}",
          "Dodoma",
      )
  ]
  assert _texts(name, "validation") == [
      (
          "question: Rais wa kwanza ni nani? title: Tanzania context: Tanzania ni"
          " nchi.",
          "No Answer",
      )
  ]
  assert [t for _, t in _texts(name, "test")] == ["Dodoma", "No Answer"]
  assert _features(name) == {
      (("feature_language", "sw"), ("feature_task", "qa_in_lang"))
  }
  cross = "xtreme_up_qa_cross_lang.bn_byt5"
  assert _texts(cross) == [
      (
          "question: তানজানিয়ার রাজধানী কোথায়? title: Dodoma context: Dodoma is"
          " the capital city of Tanzania.",
          "ডোডোমা",
      )
  ]
  assert seqio.get_mixture_or_task(cross).splits == ("train",)
  assert seqio.get_mixture_or_task(name).metric_fns == [metrics.squad_f1]


def test_ner_byte_offsets_and_empty_spans(registration):
  del registration
  assert len(_AMHARIC) == 26 and len(_AMHARIC.encode()) == 66
  assert _texts("xtreme_up_ner_am_byt5") == [
      (_AMHARIC, "PER: ዶክተር አብይ አህመድ $$ LOC: ጎንደር")
  ]
  assert _texts("xtreme_up_ner_am_byt5", "test") == _texts(
      "xtreme_up_ner_am_byt5"
  )
  assert _texts("xtreme_up_ner_sw_byt5") == [
      (_SWAHILI_NER["text"], _SWAHILI_NER["target"]),
      ("Hakuna chochote hapa .", ""),
  ]  # Tabs -> spaces; no spans -> "".
  assert _features("xtreme_up_ner_am_byt5") == {
      (("feature_language", "am"), ("feature_task", "ner"))
  }


def test_ner_target_rejects_bad_offsets():
  with pytest.raises(ValueError, match="character boundaries"):
    xtreme_up.ner_target(
        _AMHARIC, [{"start_byte": 1, "limit_byte": 3, "label": "PER"}]
    )
  with pytest.raises(ValueError, match="outside"):
    xtreme_up.ner_target(
        "abc", [{"start_byte": 0, "limit_byte": 4, "label": "PER"}]
    )


def test_semantic_parsing_language_codes_and_code_switching(root):
  registration = xtreme_up.register_xtreme_up(root, tasks=["semantic_parsing"])
  assert set(registration.tasks) == {
      "xtreme_up_semantic_parsing_sw_byt5",
      "xtreme_up_semantic_parsing_pt_br_byt5",
  }
  assert _texts("xtreme_up_semantic_parsing_sw_byt5") == [
      (_SP["input"], _SP["target"])
  ]
  assert _features("xtreme_up_semantic_parsing_pt_br_byt5") == {
      (("feature_language", "pt"), ("feature_task", "semantic_parsing"))
  }
  nocs = "xtreme_up_semantic_parsing.byt5.finetune.nocs"
  assert {t.name for t in seqio.get_mixture_or_task(nocs).tasks} == set(
      registration.tasks
  )

  with_cs = xtreme_up.register_xtreme_up(
      root, tasks=["semantic_parsing"], include_code_switched=True
  )
  assert "xtreme_up_semantic_parsing_hi_cs_byt5" in with_cs.tasks
  assert _features("xtreme_up_semantic_parsing_hi_cs_byt5") == {
      (("feature_language", "hi"), ("feature_task", "semantic_parsing"))
  }
  full = seqio.get_mixture_or_task("xtreme_up_semantic_parsing_byt5")
  assert len(full.tasks) == 3
  assert len(seqio.get_mixture_or_task(nocs).tasks) == 2


def test_translation_names_and_under_represented_mixture(root):
  xtreme_up.register_xtreme_up(root, tasks=["translation"])
  assert _texts("xtreme_up_translation_en_sw_byt5") == [
      ("The cat is sleeping.", "Paka analala.")
  ]
  assert _features("xtreme_up_translation_en_sw_byt5") == {
      (("feature_language", "sw"), ("feature_task", "translation"))
  }
  ul = seqio.get_mixture_or_task("xtreme_up_translation_byt5")
  assert [t.name for t in ul.tasks] == ["xtreme_up_translation_en_sw_byt5"]
  every = seqio.get_mixture_or_task("xtreme_up_translation_all_langs_byt5")
  assert len(every.tasks) == 2

  xtreme_up.register_xtreme_up(
      root, tasks=["translation"], translation_prefix="<2{lang}> "
  )
  assert _texts("xtreme_up_translation_en_de_byt5") == [
      ("<2de> The cat is sleeping.", "Die Katze schläft.")
  ]


def test_mt5_names_and_lazy_vocabulary(root, tmp_path):
  spm_path = str(tmp_path / "never_read.model")
  registration = xtreme_up.register_xtreme_up(
      root, vocabulary="mt5", spm_path=spm_path, tasks=["translation", "ner"]
  )
  assert "xtreme_up_translation_en_sw" in registration.tasks  # No suffix.
  assert "xtreme_up_ner_am_mt5" in registration.tasks
  assert registration.multitask == "xtreme_up_multitask_mt5"
  vocabulary = (
      seqio.get_mixture_or_task("xtreme_up_ner_am_mt5")
      .output_features["inputs"]
      .vocabulary
  )
  assert isinstance(vocabulary, seqio.SentencePieceVocabulary)
  assert not os.path.exists(spm_path)
  with pytest.raises(ValueError, match="vocabulary"):
    xtreme_up.register_xtreme_up(root, vocabulary="t5")


def test_transliteration_both_directions_and_scripts(registration):
  del registration
  cases = {
      "xtreme_up_transliteration_hi_Latn_Deva_byt5": (
          "hi-Latn-Deva namaste duniya",
          "नमस्ते दुनिया",
          "hi",
          "Latn2Deva",
      ),
      "xtreme_up_transliteration_hi_Deva_Latn_byt5": (
          "hi-Deva-Latn नमस्ते दुनिया",
          "namaste duniya",
          "hi",
          "Deva2Latn",
      ),
      "xtreme_up_transliteration_pa_Arab_Guru_byt5": (
          "pa-Arab-Guru ست سری اکال",
          "ਸਤ ਸ੍ਰੀ ਅਕਾਲ",
          "pa",
          "Arab2Guru",
      ),
  }
  for name, (inputs, targets, language, script) in cases.items():
    assert _texts(name) == [(inputs, targets)]
    assert _features(name) == {
        (
            ("feature_language", language),
            ("feature_script", script),
            ("feature_task", "transliteration"),
        )
    }


def test_autocomplete_template_and_postprocess(registration):
  del registration
  name = "xtreme_up_autocomplete_ga_byt5"
  assert _texts(name) == [("ga-Tá an aimsir go ma$", "maith")]
  task = seqio.get_mixture_or_task(name)
  assert task.postprocess_fn("maith", example={}, is_target=True) == "maith"
  one = task.postprocess_fn("maidin", example={}, is_target=False)
  assert one == ["maidin"] * 3
  top3 = ["mall", "maith", "maidin"]
  assert task.postprocess_fn(top3, example={}, is_target=False) == top3
  assert task.metric_fns[0](["maith", "maith"], [top3, one]) == {
      "top3_accuracy": 50.0
  }


def test_asr_locales(registration):
  del registration
  assert _texts("xtreme_up_asr_sw_ke_byt5") == [
      ("habari za asubuhi rafiki", "habari za asubuhi rafiki yangu")
  ]
  assert _features("xtreme_up_asr_sw_ke_byt5") == {
      (("feature_language", "sw"), ("feature_task", "asr"))
  }
  assert _features("xtreme_up_asr_cmn_hans_cn_byt5") == {
      (("feature_language", "zh"), ("feature_task", "asr"))
  }
  ul = seqio.get_mixture_or_task("xtreme_up_asr_byt5")
  assert [t.name for t in ul.tasks] == ["xtreme_up_asr_sw_ke_byt5"]
  every = seqio.get_mixture_or_task("xtreme_up_asr_all_langs_byt5")
  assert len(every.tasks) == 2
  assert seqio.get_mixture_or_task("xtreme_up_asr_sw_ke_byt5").metric_fns == [
      metrics.cer_normalized
  ]


def test_tokenized_features_and_example_counts(registration):
  del registration
  task = seqio.get_mixture_or_task("xtreme_up_ner_sw_byt5")
  example = _examples("xtreme_up_ner_sw_byt5")[1]
  vocabulary = seqio.ByteVocabulary()
  assert list(example["inputs"]) == vocabulary.encode(
      "Hakuna chochote hapa ."
  ) + [1]
  assert list(example["targets"]) == [1]  # EOS only.
  assert task.source.num_input_examples("train") == 2  # Blank lines skipped.
  assert task.metric_fns == [metrics.span_f1]


def test_multitask_mixture_features(registration):
  multitask = seqio.get_mixture_or_task(registration.multitask)
  assert {t.name for t in multitask.tasks} == set(registration.tasks)
  assert len(registration.tasks) == 14  # Every file key but hi_cs.
  assert "xtreme_up_semantic_parsing_hi_cs_byt5" not in registration.tasks
  values = featurized.feature_values(registration.multitask)
  assert list(values) == ["task", "language", "script"]
  assert values["task"] == tuple(sorted(xtreme_up.TASKS))
  assert values["language"] == (
      "am",
      "bn",
      "de",
      "ga",
      "hi",
      "pa",
      "pt",
      "sw",
      "zh",
  )
  assert values["script"] == ("Arab2Guru", "Deva2Latn", "Latn2Deva")

  dataset = multitask.get_dataset(
      sequence_length={"inputs": 512, "targets": 512},
      split="train",
      shuffle=False,
      num_epochs=1,
      copy_pretokenized=True,
  )
  examples = list(dataset.take(40).as_numpy_iterator())
  assert examples
  for example in examples:
    script = example["feature_script"].decode()
    if example["feature_task"] == b"transliteration":
      assert script in values["script"]
    else:
      assert script == ""


def test_zero_shot_holdout(root):
  holdout = [
      ("semantic_parsing", "sw"),
      ("transliteration", "Deva2Latn.hi"),
      ("asr", "zh"),
  ]
  registration = xtreme_up.register_xtreme_up(root, zero_shot_holdout=holdout)
  held_out = {
      "xtreme_up_semantic_parsing_sw_byt5",
      "xtreme_up_transliteration_hi_Deva_Latn_byt5",
      "xtreme_up_asr_cmn_hans_cn_byt5",
  }
  assert set(registration.held_out_tasks) == held_out
  train = {
      t.name
      for t in seqio.get_mixture_or_task(
          "xtreme_up_multitask_zeroshot_byt5"
      ).tasks
  }
  evaluation = {
      t.name
      for t in seqio.get_mixture_or_task(
          "xtreme_up_multitask_zeroshot_eval_byt5"
      ).tasks
  }
  assert train == set(registration.tasks) - held_out
  assert evaluation == set(registration.tasks)
  seen = featurized.seen_pairs(registration.zeroshot_train)
  assert ("semantic_parsing", "sw") not in seen
  assert ("asr", "zh") not in seen
  assert ("semantic_parsing", "pt") in seen
  # Only one direction was held out, so the (task, language) pair is seen.
  assert ("transliteration", "hi") in seen
  assert featurized.seen_pairs(registration.zeroshot_eval) > seen

  with pytest.raises(ValueError, match="match no registered file"):
    xtreme_up.register_xtreme_up(root, zero_shot_holdout=[("ner", "xx")])


def test_missing_root_and_task_directory(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError) as error:
    xtreme_up.register_xtreme_up(str(missing))
  assert str(missing) in str(error.value)
  assert xtreme_up.DOWNLOAD_URL in str(error.value)

  with pytest.raises(FileNotFoundError, match="XTREME_UP_DIR"):
    xtreme_up.register_xtreme_up(None)

  _write(tmp_path, {"ner/train/sw.jsonl": [_SWAHILI_NER]})
  with pytest.raises(FileNotFoundError) as error:
    xtreme_up.register_xtreme_up(str(tmp_path), tasks=["ner", "asr"])
  assert str(tmp_path / "asr") in str(error.value)
  assert xtreme_up.DOWNLOAD_URL in str(error.value)

  with pytest.raises(ValueError, match="dual encoder"):
    xtreme_up.register_xtreme_up(str(tmp_path), tasks=["retrieval_in_lang"])


def test_mixture_registers_from_gin_alone(root):
  """`MIXTURE_OR_TASK_NAME = @xtreme_up.mixture()`: the registering call is
  the mixture name, so nothing can leave it unregistered."""
  import gin  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  try:
    gin.parse_config(
        [
            "from __gin__ import dynamic_registration",
            "from flix_tasks import xtreme_up",
            "NAME = @xtreme_up.mixture()",
            f"xtreme_up.mixture.root = '{root}'",
            "xtreme_up.mixture.vocabulary = 'mt5'",
            "xtreme_up.mixture.spm_path = '/no/such/spm.model'",
            "xtreme_up.mixture.zero_shot_holdout = [('ner', 'am')]",
            "EVAL = @held_out/xtreme_up.mixture()",
            "held_out/xtreme_up.mixture.name = 'zeroshot_eval'",
        ]
    )
    # Evaluating a macro calls what it names (gin's deepcopy protocol).
    name = copy.deepcopy(gin.query_parameter("%NAME"))
    eval_name = copy.deepcopy(gin.query_parameter("%EVAL"))
  finally:
    gin.clear_config()
  assert name == "xtreme_up_multitask_mt5"
  assert eval_name == "xtreme_up_multitask_zeroshot_eval_mt5"
  assert name in seqio.MixtureRegistry.names()
  # SPM_PATH is honoured (loaded lazily, so a missing file fails on use).
  vocabulary = (
      seqio.get_mixture_or_task(name).output_features["targets"].vocabulary
  )
  assert vocabulary.sentencepiece_model_file == "/no/such/spm.model"
  assert (
      xtreme_up.mixture(
          "xtreme_up_ner_sw_mt5",
          root=root,
          vocabulary="mt5",
          spm_path="/no/such/spm.model",
          zero_shot_holdout=[("ner", "am")],
      )
      == "xtreme_up_ner_sw_mt5"
  )
  with pytest.raises(ValueError, match="not an XTREME-UP task or mixture"):
    xtreme_up.mixture("nope", root=root)
  with pytest.raises(ValueError, match="needs a zero_shot_holdout"):
    xtreme_up.mixture("zeroshot_train", root=root)


def test_bad_line_names_file_and_line(tmp_path):
  path = tmp_path / "asr" / "train" / "sw_ke.jsonl"
  path.parent.mkdir(parents=True)
  path.write_text(
      '{"input": "a", "target": "b"}\n{"input": "a"}\n', encoding="utf-8"
  )
  xtreme_up.register_xtreme_up(str(tmp_path), tasks=["asr"])
  with pytest.raises(Exception, match=r"sw_ke\.jsonl:2: .*'target'"):
    _examples("xtreme_up_asr_sw_ke_byt5")


def test_mixture_names_and_num_examples_rate(root):
  registration = xtreme_up.register_xtreme_up(
      root, multitask_rate=seqio.mixing_rate_num_examples
  )
  assert set(registration.mixtures) == {
      "xtreme_up_qa_in_lang_byt5",
      "xtreme_up_qa_cross_lang_byt5",
      "xtreme_up_ner_byt5",
      "xtreme_up_semantic_parsing_byt5",
      "xtreme_up_semantic_parsing.byt5.finetune.nocs",
      "xtreme_up_translation_byt5",
      "xtreme_up_translation_all_langs_byt5",
      "xtreme_up_transliteration_byt5",
      "xtreme_up_autocomplete_byt5",
      "xtreme_up_asr_byt5",
      "xtreme_up_asr_all_langs_byt5",
      "xtreme_up_multitask_byt5",
  }
  multitask = seqio.get_mixture_or_task(registration.multitask)
  rates = {t.name: multitask.get_rate(t) for t in multitask.tasks}
  assert rates["xtreme_up_ner_sw_byt5"] == 2  # Blank lines not counted.
  assert rates["xtreme_up_ner_am_byt5"] == 1
  assert rates["xtreme_up_qa_in_lang.sw_byt5"] == 1
