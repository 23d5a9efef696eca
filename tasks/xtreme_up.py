"""XTREME-UP (Ruder et al., 2023) as featurized SeqIO tasks.

Reads the released JSONL files (`<root>/<task>/<split>/<file>.jsonl`, splits
`train`, `validation`, `test`; download `DOWNLOAD_URL` and extract it) directly
in Python, applies the baseline's exact input templates, and registers one
featurized task per (task, language file) plus the baseline's per-task
mixtures and our multitask mixtures. Every example carries FLix features:
`feature_task` (the XTREME-UP task, e.g. `semantic_parsing`),
`feature_language` (a language code, see below) and, for transliteration only,
`feature_script` (the direction, e.g. `Latn2Deva`).

Inputs and targets (`record` = one JSON line):
  qa_in_lang, qa_cross_lang: `question: {question} title: {title} context:
    {context}` -> `target`.
  ner: `text` with tabs -> spaces -> `"{label}: {entity}"` per span, joined by
    " $$ " ("" without spans); entities are UTF-8 *byte* slices of `text`.
  semantic_parsing, translation, asr: `input` -> `target`, verbatim
    (translation may get an optional `translation_prefix`, default none as in
    the baseline).
  transliteration (`{Src}2{Tgt}.{lang}.jsonl`): `{lang}-{Src}-{Tgt} {input}`.
  autocomplete: `{lang}-{context}$` -> `target`.

Names (`{model}` is `byt5` or `mt5`; `{file}` is the file name without
`.jsonl`):
  tasks: `xtreme_up_qa_in_lang.{file}_{model}`,
    `xtreme_up_qa_cross_lang.{file}_{model}`, `xtreme_up_ner_{file}_{model}`,
    `xtreme_up_semantic_parsing_{file}_{model}`,
    `xtreme_up_translation_en_{lang}` (mT5) / `..._en_{lang}_byt5`,
    `xtreme_up_transliteration_{lang}_{Src}_{Tgt}_{model}`,
    `xtreme_up_autocomplete_{file}_{model}`, `xtreme_up_asr_{locale}_{model}`.
  baseline mixtures: `xtreme_up_{task}_{model}` (all languages; for
    translation and asr only the under-represented ones, as in the baseline,
    with `xtreme_up_{translation,asr}_all_langs_{model}` for all), and
    `xtreme_up_semantic_parsing.{model}.finetune.nocs`.
  ours: `xtreme_up_multitask_{model}` (every registered task), and with a
    zero-shot hold-out `xtreme_up_multitask_zeroshot_{model}` (training: all
    but the held-out pairs) and `xtreme_up_multitask_zeroshot_eval_{model}`
    (all pairs; `flix.featurized.seen_pairs` of the training mixture
    marks which are zero-shot).

Language codes: the ISO code of the file name, with two reductions so that
one language shares one adapter across tasks. Regional or variant suffixes are
dropped for semantic parsing (`pt_br` -> `pt`, `de_localized` -> `de`, the
code-switched `hi_cs` -> `hi`) and ASR locales (`sw_ke` -> `sw`,
`sd_arab_in` -> `sd`); translation files `en2{lang}` give `{lang}`. Codes that
name the same language differently in different tasks are unified by
`LANGUAGE_ALIASES` (ASR `cmn_*` -> `zh`, `nb_no` -> `no`, as in translation).
Task names keep the file names, so nothing is lost.

Left out: retrieval (`retrieval_in_lang`, `retrieval_cross_lang`) needs a dual
encoder, which flix does not have. Code-switched semantic-parsing files
(`*_cs`) are skipped unless `include_code_switched=True`, as in the baseline.

Autocomplete: metric `top3_accuracy` takes 3 predictions per example; decode
with 3 beams and all decodes returned (the baseline's `top3.gin`). The
baseline instead replicated the *target* 3x and used a dummy metric; here the
target stays a string and `autocomplete_postprocess` turns a single decoded
prediction into 3 copies, so ordinary one-decode evaluation reports Acc@1
under the `top3_accuracy` key instead of failing.

Registration is explicit: `register_xtreme_up(root=...)`, or from gin alone
with `mixture(...)`, which registers and returns a mixture's name
(`MIXTURE_OR_TASK_NAME = @xtreme_up.mixture()`; `configs/flix_mt5_xl.gin`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import dataclasses
import json
import logging
import os
import re
from typing import Any, Optional, Union

import seqio
import tensorflow as tf

from flix import featurized
from flix_tasks import metrics

DOWNLOAD_URL = (
    "https://storage.googleapis.com/xtreme-up/xtreme-up-v1.1.jsonl.tgz"
)
# mT5's SentencePiece model (multilingual_t5.vocab.DEFAULT_SPM_PATH).
DEFAULT_SPM_PATH = "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model"
SPLITS = ("train", "validation", "test")
MODELS = ("byt5", "mt5")
TASKS = (
    "qa_in_lang",
    "qa_cross_lang",
    "ner",
    "semantic_parsing",
    "translation",
    "transliteration",
    "autocomplete",
    "asr",
)
# Codes for one language that differ between XTREME-UP tasks -> the code used
# by the other tasks (translation), so that they share a language adapter.
LANGUAGE_ALIASES = {"cmn": "zh", "nb": "no"}

# Not under-represented per XTREME-UP `evaluation/constants.py`; the baseline
# translation mixture and the baseline ASR tasks cover only the others.
_TRANSLATION_NOT_UL = frozenset(
    "ar ca cs de es fa fi fr hi hr hu it ja ko nl pl pt ru sr sv tr vi zh".split()
)
_ASR_NOT_UL = frozenset(
    "ar_eg ca_es cmn_hans_cn cmn_hant_hk cs_cz de_de en_us es_419 fa_ir fi_fi"
    " fr_fr hi_in hr_hr hu_hu it_it ja_jp ko_kr nl_nl pl_pl pt_br ru_ru sr_rs"
    " sv_se tr_tr vi_vn".split()
)

_QA_TEMPLATE = "question: {question} title: {title} context: {context}"
_NER_SEPARATOR = " $$ "
_TOP_K = 3
_TRANSLITERATION_FILE_RE = re.compile(r"([A-Za-z]+)2([A-Za-z]+)\.([a-z]+)")
_TRANSLATION_FILE_RE = re.compile(r"en2([a-z]+)")
_FILE_RE = re.compile(r"[a-z]+(?:_[A-Za-z0-9]+)*")

MixingRate = Union[float, Callable[[seqio.Task], float]]


# ---- Files, names and features ----


def language_of(task: str, file_key: str) -> str:
  """The `feature_language` value of an XTREME-UP file (see module doc).

  Args:
    task: XTREME-UP task, e.g. "asr".
    file_key: file name without `.jsonl`, e.g. "sw_ke", "en2sw",
      "Latn2Deva.hi", "pt_br".

  Returns:
    The language code, e.g. "sw".
  """
  if task == "transliteration":
    language = _match(_TRANSLITERATION_FILE_RE, task, file_key).group(3)
  elif task == "translation":
    language = _match(_TRANSLATION_FILE_RE, task, file_key).group(1)
  elif task in ("semantic_parsing", "asr"):
    language = file_key.split("_")[0]
  else:
    language = file_key
  return LANGUAGE_ALIASES.get(language, language)


def features_of(task: str, file_key: str) -> dict[str, str]:
  """`{group: value}` features of every example of one XTREME-UP file."""
  features = {"task": task, "language": language_of(task, file_key)}
  if task == "transliteration":
    features["script"] = file_key.split(".")[0]
  return features


def task_name(task: str, file_key: str, model: str) -> str:
  """The baseline's SeqIO task name for one file (see module docstring)."""
  if task in ("qa_in_lang", "qa_cross_lang"):
    return f"xtreme_up_{task}.{file_key}_{model}"
  if task == "translation":
    language = _match(_TRANSLATION_FILE_RE, task, file_key).group(1)
    suffix = "" if model == "mt5" else f"_{model}"
    return f"xtreme_up_translation_en_{language}{suffix}"
  if task == "transliteration":
    source, target, language = _match(
        _TRANSLITERATION_FILE_RE, task, file_key
    ).groups()
    return f"xtreme_up_transliteration_{language}_{source}_{target}_{model}"
  return f"xtreme_up_{task}_{file_key}_{model}"


def _match(pattern: re.Pattern[str], task: str, file_key: str) -> re.Match[str]:
  match = pattern.fullmatch(file_key)
  if match is None:
    raise ValueError(
        f"{task} file name {file_key!r}.jsonl does not match "
        f"{pattern.pattern!r}.jsonl."
    )
  return match


def _is_valid_file_key(task: str, file_key: str) -> bool:
  pattern = {
      "transliteration": _TRANSLITERATION_FILE_RE,
      "translation": _TRANSLATION_FILE_RE,
  }.get(task, _FILE_RE)
  return pattern.fullmatch(file_key) is not None


def _is_under_represented(task: str, file_key: str) -> bool:
  if task == "translation":
    return language_of(task, file_key) not in _TRANSLATION_NOT_UL
  if task == "asr":
    return file_key not in _ASR_NOT_UL
  return True


# ---- Example construction ----


def _text(record: Mapping[str, Any], field: str) -> str:
  if field not in record:
    raise KeyError(f"missing field {field!r} (has {sorted(record)})")
  value = record[field]
  if not isinstance(value, str):
    raise TypeError(f"field {field!r} must be a string, got {value!r}")
  return value


def ner_target(text: str, spans: Sequence[Mapping[str, Any]]) -> str:
  """Linearises NER spans: `"{label}: {entity}"` joined by " $$ ".

  Offsets are end-exclusive UTF-8 *byte* offsets into `text`, so non-ASCII
  text (e.g. Amharic, 3 bytes per character) must be sliced as bytes. Tabs
  become spaces, as in the baseline converter.

  Args:
    text: the sentence.
    spans: `[{"start_byte": int, "limit_byte": int, "label": str}, ...]`.

  Returns:
    The target string; "" when there are no spans.

  Raises:
    ValueError: if a span lies outside `text` or cuts a character.
  """
  data = text.encode("utf-8")
  items = []
  for span in spans:
    start, limit = span["start_byte"], span["limit_byte"]
    if not 0 <= start <= limit <= len(data):
      raise ValueError(
          f"span [{start}, {limit}) outside the {len(data)} bytes of the text"
      )
    try:
      entity = data[start:limit].decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(
          f"span [{start}, {limit}) is not on UTF-8 character boundaries"
      ) from e
    items.append(f"{span['label']}: {entity}")
  return _NER_SEPARATOR.join(items).replace("\t", " ")


def format_example(
    task: str,
    file_key: str,
    record: Mapping[str, Any],
    translation_prefix: str = "",
) -> tuple[str, str]:
  """One JSONL record -> `(inputs, targets)` with the baseline's templates.

  Args:
    task: XTREME-UP task.
    file_key: file name without `.jsonl` (carries language and scripts).
    record: the parsed JSON line.
    translation_prefix: prepended to translation inputs after
      `.format(lang=...)`, e.g. "<2{lang}> "; "" (baseline) adds nothing.

  Returns:
    `(inputs, targets)` strings.
  """
  if task in ("qa_in_lang", "qa_cross_lang"):
    inputs = _QA_TEMPLATE.format(
        question=_text(record, "question"),
        title=_text(record, "title"),
        context=_text(record, "context"),
    )
    return inputs, _text(record, "target")
  if task == "ner":
    text = _text(record, "text")
    if "spans" not in record:
      raise KeyError(f"missing field 'spans' (has {sorted(record)})")
    return text.replace("\t", " "), ner_target(text, record["spans"])
  if task == "transliteration":
    source, target, language = _match(
        _TRANSLITERATION_FILE_RE, task, file_key
    ).groups()
    inputs = f"{language}-{source}-{target} {_text(record, 'input')}"
    return inputs, _text(record, "target")
  if task == "autocomplete":
    # The "$" marks where the context ends, so that SentencePiece keeps
    # "word finished" apart from "word still being typed".
    return f"{file_key}-{_text(record, 'context')}$", _text(record, "target")
  if task == "translation":
    prefix = translation_prefix.format(lang=language_of(task, file_key))
    return prefix + _text(record, "input"), _text(record, "target")
  if task in ("semantic_parsing", "asr"):
    return _text(record, "input"), _text(record, "target")
  raise ValueError(f"Unknown XTREME-UP task {task!r}.")


def autocomplete_postprocess(
    output: Any, example: Any = None, is_target: bool = False
) -> Any:
  """Gives `top3_accuracy` 3 predictions when decoding returned only one.

  Targets and multi-decode predictions (3 strings) pass through unchanged; a
  single predicted string becomes 3 copies (so the score is Acc@1).
  """
  del example  # Unused; part of SeqIO's postprocess_fn signature.
  if is_target or not isinstance(output, str):
    return output
  return [output] * _TOP_K


def _read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields `(line_number, record)`, skipping blank lines."""
  with tf.io.gfile.GFile(path, "r") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield line_number, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: invalid JSON: {e}") from e


class _JsonlDatasetFn:
  """`dataset_fn` of a `seqio.FunctionDataSource` over one file per split."""

  def __init__(
      self,
      task: str,
      file_key: str,
      files: Mapping[str, str],
      translation_prefix: str,
  ):
    self._task = task
    self._file_key = file_key
    self._files = dict(files)
    self._translation_prefix = translation_prefix

  def _examples(self, path: str) -> Iterator[dict[str, str]]:
    for line_number, record in _read_jsonl(path):
      try:
        inputs, targets = format_example(
            self._task, self._file_key, record, self._translation_prefix
        )
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}:{line_number}: {e}") from e
      yield {"inputs": inputs, "targets": targets}

  def __call__(
      self, split: str, shuffle_files: bool, seed: Optional[int] = None
  ) -> tf.data.Dataset:
    del shuffle_files, seed  # One file per split; SeqIO shuffles examples.
    path = self._files[split]
    return tf.data.Dataset.from_generator(
        lambda: self._examples(path),
        output_signature={
            "inputs": tf.TensorSpec((), tf.string),
            "targets": tf.TensorSpec((), tf.string),
        },
    )


class _LineCounts(Mapping[str, int]):
  """Examples per split, counted on first use (for `num_input_examples`)."""

  def __init__(self, files: Mapping[str, str]):
    self._files = dict(files)
    self._counts: dict[str, int] = {}

  def __getitem__(self, split: str) -> int:
    if split not in self._files:
      return 0  # E.g. the train size of an eval-only file, for mixing rates.
    if split not in self._counts:
      self._counts[split] = sum(1 for _ in _read_jsonl(self._files[split]))
    return self._counts[split]

  def __iter__(self) -> Iterator[str]:
    return iter(self._files)

  def __len__(self) -> int:
    return len(self._files)


# ---- Registration ----


@dataclasses.dataclass(frozen=True)
class Registration:
  """What one `register_xtreme_up` call registered.

  Attributes:
    model: "byt5" or "mt5".
    tasks: all task names.
    mixtures: all mixture names.
    multitask: the all-tasks mixture.
    zeroshot_train: training mixture without the held-out pairs, or None.
    zeroshot_eval: all pairs (for zero-shot evaluation), or None.
    held_out_tasks: task names left out of `zeroshot_train`.
  """

  model: str
  tasks: tuple[str, ...]
  mixtures: tuple[str, ...]
  multitask: str
  zeroshot_train: Optional[str] = None
  zeroshot_eval: Optional[str] = None
  held_out_tasks: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)  # Hashed by identity.
class _File:
  task: str
  key: str
  files: Mapping[str, str]  # split -> path


def _missing_data_error(what: str, path: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"XTREME-UP {what} not found: {path}. Download {DOWNLOAD_URL}, extract "
      f"it, and pass the extracted directory (the one holding qa_in_lang/, "
      f"ner/, ...) as `root` (gin: --gin.XTREME_UP_DIR=...)."
  )


def _scan(root: str, task: str, include_code_switched: bool) -> list[_File]:
  """Finds `<root>/<task>/<split>/<file>.jsonl`, one `_File` per file name."""
  task_dir = os.path.join(root, task)
  if not tf.io.gfile.isdir(task_dir):
    raise _missing_data_error(f"task directory for {task!r}", task_dir)
  by_key: dict[str, dict[str, str]] = {}
  for split in SPLITS:
    split_dir = os.path.join(task_dir, split)
    if not tf.io.gfile.isdir(split_dir):
      continue
    for filename in tf.io.gfile.listdir(split_dir):
      if filename.endswith(".jsonl"):
        key = filename[: -len(".jsonl")]
        by_key.setdefault(key, {})[split] = os.path.join(split_dir, filename)
  found = []
  for key in sorted(by_key):
    if not _is_valid_file_key(task, key):
      logging.warning(
          "Skipping %s: not an XTREME-UP %s file name.",
          os.path.join(task_dir, "*", key + ".jsonl"),
          task,
      )
    elif (
        task == "semantic_parsing"
        and key.endswith("_cs")
        and not include_code_switched
    ):
      logging.info("Skipping code-switched semantic parsing file %s.", key)
    else:
      found.append(_File(task, key, by_key[key]))
  if not found:
    raise _missing_data_error(
        f"{task} files",
        os.path.join(task_dir, "{" + ",".join(SPLITS) + "}", "*.jsonl"),
    )
  return found


def _vocabulary(vocabulary: str, spm_path: Optional[str]) -> seqio.Vocabulary:
  if vocabulary == "byt5":
    return seqio.ByteVocabulary()
  if vocabulary == "mt5":
    # Loaded lazily: nothing is read until the first encode/decode.
    return seqio.SentencePieceVocabulary(spm_path or DEFAULT_SPM_PATH)
  raise ValueError(f"vocabulary must be one of {MODELS}, got {vocabulary!r}.")


def _register_task(
    file: _File,
    model: str,
    vocabulary: seqio.Vocabulary,
    translation_prefix: str,
) -> str:
  name = task_name(file.task, file.key, model)
  output_features = {
      "inputs": seqio.Feature(vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary, add_eos=True),
  }
  source = seqio.FunctionDataSource(
      _JsonlDatasetFn(file.task, file.key, file.files, translation_prefix),
      splits=tuple(s for s in SPLITS if s in file.files),
      num_input_examples=_LineCounts(file.files),
  )
  featurized.add_task(
      name,
      source=source,
      preprocessors=featurized.text_preprocessors(),
      output_features=output_features,
      metric_fns=metrics.TASK_METRICS[file.task],
      features=features_of(file.task, file.key),
      postprocess_fn=(
          autocomplete_postprocess if file.task == "autocomplete" else None
      ),
  )
  return name


def _register_baseline_mixtures(
    files: Sequence[_File], names: Mapping[_File, str], model: str
) -> list[str]:
  """Registers the baseline's per-task mixtures (rate 1.0 per language)."""
  mixtures = {}
  for file in files:
    task, name = file.task, names[file]
    if task in ("translation", "asr"):
      mixtures.setdefault(f"xtreme_up_{task}_all_langs_{model}", []).append(
          name
      )
      if not _is_under_represented(task, file.key):
        continue
    mixtures.setdefault(f"xtreme_up_{task}_{model}", []).append(name)
    if task == "semantic_parsing" and not file.key.endswith("_cs"):
      mixtures.setdefault(
          f"xtreme_up_semantic_parsing.{model}.finetune.nocs", []
      ).append(name)
  for name, members in mixtures.items():
    featurized.add_mixture(name, members, default_rate=1.0)
  return list(mixtures)


def _held_out(
    file: _File, holdout: set[tuple[str, str]]
) -> set[tuple[str, str]]:
  """The hold-out pairs that select `file` (by language or file name)."""
  return {
      pair
      for pair in holdout
      if pair[0] == file.task
      and pair[1] in (language_of(file.task, file.key), file.key)
  }


def register_xtreme_up(
    root: Optional[str],
    vocabulary: str = "byt5",
    spm_path: Optional[str] = None,
    tasks: Sequence[str] = TASKS,
    include_code_switched: bool = False,
    zero_shot_holdout: Sequence[tuple[str, str]] = (),
    translation_prefix: str = "",
    multitask_rate: MixingRate = 1.0,
) -> Registration:
  """Registers XTREME-UP tasks and mixtures for one model's vocabulary.

  Only files present under `root` are registered; calling again replaces
  tasks and mixtures of the same names.

  Args:
    root: the extracted data directory (gin: `XTREME_UP_DIR`). May be a
      `gs://` path.
    vocabulary: "byt5" (`seqio.ByteVocabulary`) or "mt5" (SentencePiece).
    spm_path: mT5 SentencePiece model; default `DEFAULT_SPM_PATH`.
    tasks: XTREME-UP tasks to register (a subset of `TASKS`).
    include_code_switched: also register `semantic_parsing/*_cs` files.
    zero_shot_holdout: `(task, language)` pairs to leave out of
      `xtreme_up_multitask_zeroshot_{model}`; `language` is a
      `feature_language` value (e.g. `("semantic_parsing", "sw")`) or a file
      name without `.jsonl` (e.g. `("transliteration", "Deva2Latn.hi")`).
    translation_prefix: see `format_example`; default none (baseline).
    multitask_rate: per-task rate in the multitask mixtures, a number or a
      function of the task (e.g. `seqio.mixing_rate_num_examples`, which
      works here: examples are counted from the files on first use).

  Returns:
    The registered names.

  Raises:
    FileNotFoundError: no root configured, or a root, task directory or
      task's files missing (the message names the path and `DOWNLOAD_URL`).
    ValueError: unknown task or vocabulary, or a hold-out pair that selects
      no registered file.
  """
  if not root:
    raise FileNotFoundError(
        "No XTREME-UP directory given: pass `root` (gin: "
        f"--gin.XTREME_UP_DIR=...). Download {DOWNLOAD_URL} and extract it."
    )
  if not tf.io.gfile.isdir(root):
    raise _missing_data_error("directory", root)
  tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    raise ValueError(
        f"Unknown or unsupported XTREME-UP tasks {unknown}; supported: "
        f"{list(TASKS)} (retrieval needs a dual encoder and is not included)."
    )
  tasks = tuple(dict.fromkeys(tasks))
  vocab = _vocabulary(vocabulary, spm_path)
  model = vocabulary
  files = [
      f for task in tasks for f in _scan(root, task, include_code_switched)
  ]
  names = {
      f: _register_task(f, model, vocab, translation_prefix) for f in files
  }
  mixtures = _register_baseline_mixtures(files, names, model)
  multitask = f"xtreme_up_multitask_{model}"
  featurized.add_mixture(
      multitask, list(names.values()), default_rate=multitask_rate
  )
  registration = Registration(
      model=model,
      tasks=tuple(names.values()),
      mixtures=tuple(mixtures) + (multitask,),
      multitask=multitask,
  )
  if not zero_shot_holdout:
    return registration

  holdout = {tuple(pair) for pair in zero_shot_holdout}
  selected = {f: _held_out(f, holdout) for f in files}
  unused = holdout - set().union(*selected.values())
  if unused:
    raise ValueError(
        f"zero_shot_holdout pairs {sorted(unused)} match no registered file "
        f"(tasks {list(tasks)}, root {root})."
    )
  if all(selected.values()):
    raise ValueError("zero_shot_holdout holds out every registered task.")
  train = f"xtreme_up_multitask_zeroshot_{model}"
  evaluation = f"xtreme_up_multitask_zeroshot_eval_{model}"
  featurized.add_mixture(
      train,
      [names[f] for f in files if not selected[f]],
      default_rate=multitask_rate,
  )
  featurized.add_mixture(
      evaluation, list(names.values()), default_rate=multitask_rate
  )
  return dataclasses.replace(
      registration,
      mixtures=registration.mixtures + (train, evaluation),
      zeroshot_train=train,
      zeroshot_eval=evaluation,
      held_out_tasks=tuple(names[f] for f in files if selected[f]),
  )


_registered: dict[str, Registration] = {}


def mixture(
    name: str = "multitask",
    *,
    root: Optional[str],
    vocabulary: str = "byt5",
    spm_path: Optional[str] = None,
    tasks: Sequence[str] = TASKS,
    include_code_switched: bool = False,
    zero_shot_holdout: Sequence[tuple[str, str]] = (),
    translation_prefix: str = "",
    multitask_rate: MixingRate = 1.0,
) -> str:
  """Registers XTREME-UP (see `register_xtreme_up`) and returns a name.

  For gin: `MIXTURE_OR_TASK_NAME = @xtreme_up.mixture()` registers the data of
  `XTREME_UP_DIR` before anything looks the mixture up. Repeated calls with
  the same arguments register once.

  Args:
    name: "multitask" (`xtreme_up_multitask_{vocabulary}`), with a
      `zero_shot_holdout` "zeroshot_train" (without the held-out pairs) or
      "zeroshot_eval" (all pairs), or the name of any task or mixture the
      registration made (e.g. `xtreme_up_ner_sw_mt5`).
    root: the extracted data directory.
    vocabulary: "byt5" or "mt5".
    spm_path: the mT5 SentencePiece model (default `DEFAULT_SPM_PATH`).
    tasks: XTREME-UP tasks to register.
    include_code_switched: also register `semantic_parsing/*_cs` files.
    zero_shot_holdout: `(task, language)` pairs held out of "zeroshot_train".
    translation_prefix: see `format_example`.
    multitask_rate: per-task rate in the multitask mixtures.

  Returns:
    The registered task's or mixture's name.

  Raises:
    ValueError: `name` is none of these.
  """
  kwargs = dict(
      root=root,
      vocabulary=vocabulary,
      spm_path=spm_path,
      tasks=(tasks,) if isinstance(tasks, str) else tuple(tasks),
      include_code_switched=include_code_switched,
      zero_shot_holdout=tuple(tuple(pair) for pair in zero_shot_holdout),
      translation_prefix=translation_prefix,
      multitask_rate=multitask_rate,
  )
  key = repr(sorted(kwargs.items()))
  if key not in _registered:
    _registered[key] = register_xtreme_up(**kwargs)
  registration = _registered[key]
  aliases = {
      "multitask": registration.multitask,
      "zeroshot_train": registration.zeroshot_train,
      "zeroshot_eval": registration.zeroshot_eval,
  }
  if name in aliases and aliases[name] is None:
    raise ValueError(
        f"XTREME-UP mixture {name!r} needs a zero_shot_holdout (gin: "
        "xtreme_up.mixture.zero_shot_holdout = [('ner', 'sw')])."
    )
  if name in aliases:
    return aliases[name]
  if name not in registration.tasks + registration.mixtures:
    raise ValueError(
        f"{name!r} is not an XTREME-UP task or mixture registered from "
        f"{root}; use one of {sorted(aliases)}, a mixture "
        f"({', '.join(registration.mixtures)}) or a task such as "
        f"{registration.tasks[0]!r}."
    )
  return name
