"""The golden end-to-end run on the mT5 path, through the command line.

A user's path, at toy size: a SentencePiece vocabulary trained on the data,
a tiny mT5-shaped model (gated GELU, untied lm_head) saved by transformers'
`save_pretrained`, XTREME-UP-format files for 3 tasks x 4 languages with
(asr, am) held out, registered by the user's own task module; then

  python -m flix.train   FLix from the HF checkpoint, configs/models/
                         mt5_small.gin shrunk by --gin overrides
  python -m flix.eval    per (task, language), zero-shot flagged
  python -m flix.infer   a JSONL with every test example, the held-out pair
                         and an unknown language
  python -m flix.export  the held-out pair as a PEFT LoRA and merged (hf)

and transformers' greedy generate() with the PEFT adapter (and with the
merged model) writes exactly flix.infer's text, which equals flix.eval's
predictions for the same examples.
"""

import json
import os
import time

import pytest
import seqio

import conftest
from flix_tasks import sentencepiece_trainer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

_LANGUAGES = ("sw", "de", "hi", "am")
_WORDS = {
    "en": (
        "cat dog house water sun book tree bird river market school mother "
        "child road rain night bread milk friend city"
    ).split(),
    "sw": (
        "paka mbwa nyumba maji jua kitabu mti ndege mto soko shule mama "
        "mtoto barabara mvua usiku mkate maziwa rafiki mji"
    ).split(),
    "de": (
        "Katze Hund Haus Wasser Sonne Buch Baum Vogel Fluss Markt Schule "
        "Mutter Kind Straße Regen Nacht Brot Milch Freund Stadt"
    ).split(),
    "hi": (
        "बिल्ली कुत्ता घर पानी सूरज किताब पेड़ पक्षी नदी बाज़ार स्कूल माँ "
        "बच्चा सड़क बारिश रात रोटी दूध दोस्त शहर"
    ).split(),
    "am": (
        "ድመት ውሻ ቤት ውሃ ፀሐይ መጽሐፍ ዛፍ ወፍ ወንዝ ገበያ ትምህርት እናት ልጅ "
        "መንገድ ዝናብ ሌሊት ዳቦ ወተት ጓደኛ ከተማ"
    ).split(),
}
_HELD_OUT = ("asr", "am")
_SPLIT_SIZES = {"train": 16, "validation": 2, "test": 2}
_LENGTHS = {"inputs": 24, "targets": 12}
# mT5 shapes at toy size: gated GELU, untied head, 4 heads x 8 != d_model 24.
_HF_DIMS = dict(
    d_model=24,
    d_kv=8,
    num_heads=4,
    d_ff=40,
    num_layers=2,
    num_decoder_layers=2,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
)


def _examples(task, language, count, offset):
  """`count` XTREME-UP records of one file, built from the word lists."""
  words, english = _WORDS[language], _WORDS["en"]
  records = []
  for k in range(offset, offset + count):
    i, j = k % 20, (7 * k + 3) % 20
    if task == "translation":
      records.append(
          {
              "input": f"the {english[i]} and the {english[j]}",
              "target": f"{words[i]} {words[j]}",
          }
      )
    elif task == "semantic_parsing":
      records.append(
          {
              "input": f"{words[i]} {words[j]} {k}",
              "target": f"[IN:FIND [SL:OBJ {words[i]} ] [SL:NUM {k} ] ]",
          }
      )
    else:  # asr
      records.append(
          {
              "input": f"{words[j]} {words[i]}",
              "target": f"{words[j]} {words[i]} {words[j]}",
          }
      )
  return records


def _file_key(task, language):
  return {
      "translation": f"en2{language}",
      "semantic_parsing": language,
      "asr": f"{language}_x",
  }[task]


def _write_xtreme_up(root):
  """`root/<task>/<split>/<file>.jsonl`; returns every text written."""
  texts = []
  for task in ("translation", "semantic_parsing", "asr"):
    for language in _LANGUAGES:
      offset = 0
      for split, count in _SPLIT_SIZES.items():
        records = _examples(task, language, count, offset)
        offset += count
        path = os.path.join(
            root, task, split, _file_key(task, language) + ".jsonl"
        )
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
          for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            texts += [record["input"], record["target"]]
  return texts


def _save_hf_model(directory, vocab_size):
  """A random tiny mT5 with an lm_head of its own, as google/mt5-* has."""
  torch.manual_seed(0)
  model = transformers.MT5ForConditionalGeneration(
      transformers.MT5Config(vocab_size=vocab_size, **_HF_DIMS)
  )
  with torch.no_grad():
    model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab_size, 24))
  model.save_pretrained(directory)


def _model_flags(vocab_size):
  """configs/models/mt5_small.gin shrunk to the HF model's sizes."""
  overrides = {
      "vocab_size": vocab_size,
      "emb_dim": 24,
      "head_dim": 8,
      "num_heads": 4,
      "mlp_dim": 40,
      "num_encoder_layers": 2,
      "num_decoder_layers": 2,
      "dtype": "'float32'",
  }
  return ["--gin_file=configs/models/mt5_small.gin"] + [
      f"--gin.network.preset.{name}={value}"
      for name, value in overrides.items()
  ]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
  """Runs the whole path once; returns its paths, outputs and timings."""
  root = str(tmp_path_factory.mktemp("mt5_golden"))
  timings = {}
  start = time.time()
  data = os.path.join(root, "xtreme_up")
  texts = _write_xtreme_up(data)
  spm = os.path.join(root, "spm.model")
  with open(spm, "wb") as f:
    f.write(sentencepiece_trainer.train_sentencepiece(texts, 300))
  pieces = seqio.SentencePieceVocabulary(spm).vocab_size
  vocab_size = pieces + 16 - pieces % 16 + 16  # padded rows, as in mT5
  hf_dir = os.path.join(root, "hf_mt5")
  _save_hf_model(hf_dir, vocab_size)
  # The user's task module: XTREME-UP with this vocabulary and hold-out.
  pylib = os.path.join(root, "pylib")
  os.makedirs(pylib)
  with open(os.path.join(pylib, "golden_tasks.py"), "w") as f:
    f.write(
        "from flix_tasks import xtreme_up\n"
        f"xtreme_up.register_xtreme_up(root={data!r}, vocabulary='mt5', "
        f"spm_path={spm!r}, tasks=('translation', 'semantic_parsing', "
        f"'asr'), zero_shot_holdout=[{_HELD_OUT!r}])\n"
    )
  tasks_gin = os.path.join(root, "tasks.gin")
  with open(tasks_gin, "w") as f:
    f.write("import golden_tasks\n")
  env = {"PYTHONPATH": pylib}
  timings["fixture"] = time.time() - start

  model = _model_flags(vocab_size)
  lengths = f"--gin.TASK_FEATURE_LENGTHS={_LENGTHS!r}"
  run_dir = os.path.join(root, "flix")
  start = time.time()
  conftest.run_module(
      "flix.train",
      *model,
      "--gin_file=configs/peft/flix.gin",
      "--gin_file=configs/runs/finetune.gin",
      f"--gin_file={tasks_gin}",
      f'--gin.MODEL_DIR="{run_dir}"',
      f'--gin.INITIAL_CHECKPOINT_PATH="{hf_dir}"',
      "--gin.MIXTURE_OR_TASK_NAME='xtreme_up_multitask_zeroshot_mt5'",
      lengths,
      "--gin.TRAIN_STEPS=12",
      "--gin.BATCH_SIZE=8",
      "--gin.OPTIMIZER_NAME='adamw'",
      "--gin.LEARNING_RATE=0.02",
      "--gin.trainer.train.evaluate_fn=None",
      env=env,
  )
  timings["train"] = time.time() - start

  start = time.time()
  eval_dir = os.path.join(root, "eval")
  conftest.run_module(
      "flix.eval",
      *model,
      "--gin_file=configs/runs/eval.gin",
      f"--gin_file={tasks_gin}",
      "--gin.FEATURE_SPACE=None",
      f'--gin.CHECKPOINT_PATH="{run_dir}"',
      f'--gin.EVAL_OUTPUT_DIR="{eval_dir}"',
      "--gin.MIXTURE_OR_TASK_NAME='xtreme_up_multitask_zeroshot_eval_mt5'",
      lengths,
      env=env,
  )
  timings["eval"] = time.time() - start
  with open(os.path.join(eval_dir, "predictions-test-12.jsonl")) as f:
    evaluated = [json.loads(line) for line in f]
  with open(os.path.join(eval_dir, "results-test-12.json")) as f:
    results = json.load(f)

  inputs = [
      {"inputs": r["inputs"], "features": r["features"]} for r in evaluated
  ]
  inputs.append(
      {
          "inputs": "the cat and the bird",
          "features": {"task": "translation", "language": "xx"},
      }
  )
  input_file = os.path.join(root, "inputs.jsonl")
  with open(input_file, "w", encoding="utf-8") as f:
    for record in inputs:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  start = time.time()
  infer_dir = os.path.join(root, "infer")
  infer_log = conftest.run_module(
      "flix.infer",
      *model,
      "--gin_file=configs/runs/infer.gin",
      "--gin.FEATURE_SPACE=None",
      f'--gin.CHECKPOINT_PATH="{run_dir}"',
      f'--gin.INFER_OUTPUT_DIR="{infer_dir}"',
      f'--gin.INPUT_FILE="{input_file}"',
      lengths,
  )
  timings["infer"] = time.time() - start
  with open(os.path.join(infer_dir, "inputs-predictions.jsonl")) as f:
    inferred = [json.loads(line) for line in f]

  exports = {}
  for output_format in ("peft", "hf"):
    start = time.time()
    exports[output_format] = os.path.join(root, f"export_{output_format}")
    conftest.run_module(
        "flix.export",
        f"--checkpoint={run_dir}",
        *model,
        f"--features=task={_HELD_OUT[0]},language={_HELD_OUT[1]}",
        f"--format={output_format}",
        f"--output={exports[output_format]}",
    )
    timings[f"export_{output_format}"] = time.time() - start
  return {
      "hf_dir": hf_dir,
      "spm": spm,
      "pieces": pieces,
      "vocab_size": vocab_size,
      "run_dir": run_dir,
      "evaluated": evaluated,
      "results": results,
      "inferred": inferred,
      "infer_log": infer_log,
      "exports": exports,
      "timings": timings,
  }


def _held_out(records):
  return [
      r
      for r in records
      if (r["features"].get("task"), r["features"].get("language")) == _HELD_OUT
  ]


def _generate(model, spm, texts):
  """Greedy transformers generate() of each text, tokenized and detokenized
  with the SentencePiece model at `spm`."""
  vocabulary = seqio.SentencePieceVocabulary(spm)
  outputs = []
  for text in texts:
    ids = list(vocabulary.encode(text))[: _LENGTHS["inputs"] - 1]
    with torch.no_grad():
      tokens = model.generate(
          input_ids=torch.tensor([ids + [vocabulary.eos_id]]),
          max_new_tokens=_LENGTHS["targets"],
          do_sample=False,
          num_beams=1,
      )[0].tolist()
    tokens = tokens[1:]  # the decoder start token
    if vocabulary.eos_id in tokens:
      tokens = tokens[: tokens.index(vocabulary.eos_id)]
    outputs.append(vocabulary.decode([t for t in tokens if t > 1]))
  return outputs


def test_sentencepiece_vocabulary_and_model_sizes(golden):
  print(f"\ntimings (s): {golden['timings']}")
  assert 200 <= golden["pieces"] <= 300
  meta_dir = os.path.join(golden["run_dir"], "checkpoints", "12", "meta")
  with open(os.path.join(meta_dir, "metadata")) as f:
    vocabulary = json.load(f)["vocabulary"]
  assert vocabulary["type"] == "sentencepiece"
  assert vocabulary["size"] == golden["pieces"]
  assert os.path.isfile(vocabulary["file"])


def test_eval_reports_every_pair_with_the_held_out_one_zero_shot(golden):
  flags = {
      (r["features"]["task"], r["features"]["language"]): r["seen_in_training"]
      for r in golden["results"]
  }
  assert len(flags) == 12
  assert [pair for pair, seen in flags.items() if not seen] == [_HELD_OUT]


def test_infer_on_a_file_gives_the_evaluation_predictions(golden):
  inferred = golden["inferred"]
  assert len(inferred) == len(golden["evaluated"]) + 1
  for evaluated, record in zip(golden["evaluated"], inferred):
    assert record["inputs"] == evaluated["inputs"]
    assert record["prediction"] == evaluated["prediction"], record
  # Real SentencePiece text, not bytes: pieces of the fixture's words.
  predictions = [r["prediction"] for r in inferred]
  assert any(len(p) > 3 for p in predictions)
  # The unknown language: its known task adapter only, with a warning.
  assert inferred[-1]["features"]["language"] == "xx"
  assert "xx" in golden["infer_log"]


def test_peft_adapter_generates_the_flix_text(golden):
  held_out = _held_out(golden["inferred"])
  assert len(held_out) == _SPLIT_SIZES["test"]
  texts = [r["inputs"] for r in held_out]
  expected = [r["prediction"] for r in held_out]
  adapter = golden["exports"]["peft"]
  assert os.path.isfile(os.path.join(adapter, "spiece.model"))
  base = transformers.MT5ForConditionalGeneration.from_pretrained(
      golden["hf_dir"]
  ).eval()
  base_texts = _generate(base, golden["spm"], texts)
  model = peft.PeftModel.from_pretrained(base, adapter).eval()
  got = _generate(model, os.path.join(adapter, "spiece.model"), texts)
  print(
      f"\nflix.infer: {expected}\npeft:       {got}\nbase:       {base_texts}"
  )
  assert got == expected
  # The adapter changed what the model writes: the comparison is not moot.
  assert got != base_texts


def test_merged_hf_export_generates_the_flix_text(golden):
  held_out = _held_out(golden["inferred"])
  merged = golden["exports"]["hf"]
  model = transformers.MT5ForConditionalGeneration.from_pretrained(merged)
  got = _generate(
      model.eval(),
      os.path.join(merged, "spiece.model"),
      [r["inputs"] for r in held_out],
  )
  assert got == [r["prediction"] for r in held_out]


def test_another_vocabulary_is_an_error(golden):
  from flix import vocabularies  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="VOCABULARY is bytes .* trained with"):
    vocabularies.vocabulary_for_checkpoint(golden["run_dir"], "bytes")
  # A model with fewer embedding rows than the recorded vocabulary's ids.
  with pytest.raises(ValueError, match="this is not the model's vocabulary"):
    vocabularies.vocabulary_for_checkpoint(
        golden["run_dir"], embedding_rows=golden["pieces"] - 1
    )
