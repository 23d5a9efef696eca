"""Shared test set-up: quiet TensorFlow, CPU only, repo paths."""

import atexit
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The tests compile far more than they compute (tiny models, a few steps):
# XLA:CPU's backend optimisation level 0 cuts a tiny training command's CPU
# time by a fifth. Results stay within the tests' tolerances; speed is
# measured by scripts/, never here. Commands the tests start inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  ).strip()


def _temporary_directory_env(name: str, prefix: str) -> bool:
  """Unless $name is set, points it at a new temporary directory, removed at
  exit (the test run's processes and the commands they start share it).
  Returns whether it did."""
  if name in os.environ:
    return False
  os.environ[name] = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, os.environ[name], True)
  return True


# flix_tasks.numbers_demo trains its vocabulary into $FLIX_CACHE_DIR (default
# ~/.cache/flix): tests, and the commands they run, keep it in a temporary one.
_temporary_directory_env("FLIX_CACHE_DIR", "flix_test_cache_")
# One persistent XLA compilation cache: the suite compiles the same tiny
# programs in many subprocesses (a run, its restarts, its evaluation), and a
# cache hit halves such a command's CPU time. Programs that compile in under
# half a second are not worth the disk round trip.
if _temporary_directory_env(
    "JAX_COMPILATION_CACHE_DIR", "flix_test_xla_cache_"
):
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_TESTDATA = REPO.parent / "shared" / "testdata"

# Files whose module fixtures train through the CLI for minutes, slowest
# first. README's `-n 2 --dist loadfile` runs each file on one worker (so
# each fixture runs once); handing these out first lets the workers finish
# together.
SLOW_FILES = (
    "t5x_test.py",
    "cli_test.py",
    "grow_test.py",
    "reproduce_test.py",
    "kill_resume_test.py",
    "trainer_test.py",
    "mt5_golden_test.py",
    "sharding_test.py",
    "aot_memory_test.py",
)


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

  items.sort(key=rank)  # Stable: each file keeps its own order.


def t5x_tree(
    vocab: int,
    d: int,
    hk: int,
    f: int,
    heads: int,
    buckets: int,
    num_enc: int,
    num_dec: int,
    untied: bool = True,
) -> dict:
  """{path: (shape, logical axes)} of docs/mt5_reference.md §2, written out.

  d = emb_dim, hk = heads * head_dim, f = mlp_dim; gated-GELU MLP.
  """
  embed = ((d,), ("embed",))
  relpos = ((heads, buckets), ("heads", "relpos_buckets"))
  tree = {
      "token_embedder/embedding": ((vocab, d), ("vocab", "embed")),
      "encoder/relpos_bias/rel_embedding": relpos,
      "encoder/encoder_norm/scale": embed,
      "decoder/relpos_bias/rel_embedding": relpos,
      "decoder/decoder_norm/scale": embed,
  }
  if untied:
    tree["decoder/logits_dense/kernel"] = ((d, vocab), ("embed", "vocab"))

  def attention(prefix):
    for name in ("query", "key", "value"):
      tree[f"{prefix}/{name}/kernel"] = ((d, hk), ("embed", "joined_kv"))
    tree[f"{prefix}/out/kernel"] = ((hk, d), ("joined_kv", "embed"))

  def mlp(prefix):
    tree[f"{prefix}/wi_0/kernel"] = ((d, f), ("embed", "mlp"))
    tree[f"{prefix}/wi_1/kernel"] = ((d, f), ("embed", "mlp"))
    tree[f"{prefix}/wo/kernel"] = ((f, d), ("mlp", "embed"))

  for i in range(num_enc):
    p = f"encoder/layers_{i}"
    tree[f"{p}/pre_attention_layer_norm/scale"] = embed
    attention(f"{p}/attention")
    tree[f"{p}/pre_mlp_layer_norm/scale"] = embed
    mlp(f"{p}/mlp")
  for i in range(num_dec):
    p = f"decoder/layers_{i}"
    tree[f"{p}/pre_self_attention_layer_norm/scale"] = embed
    attention(f"{p}/self_attention")
    tree[f"{p}/pre_cross_attention_layer_norm/scale"] = embed
    attention(f"{p}/encoder_decoder_attention")
    tree[f"{p}/pre_mlp_layer_norm/scale"] = embed
    mlp(f"{p}/mlp")
  return tree


def t5x_shapes(*args, **kwargs) -> dict:
  """{path: shape} of `t5x_tree`."""
  return {path: shape for path, (shape, _) in t5x_tree(*args, **kwargs).items()}


def run_python(*args: str, env=None) -> str:
  """Runs `python args` from the repository root; asserts it succeeded and
  returns its output (stderr + stdout, stdout last)."""
  result = subprocess.run(
      [sys.executable, *args],
      cwd=REPO,
      env=dict(
          os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", **env or {}
      ),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stderr + result.stdout


def run_module(module: str, *args: str, env=None) -> str:
  """Runs `python -m module args` (`run_python`)."""
  return run_python("-m", module, *args, env=env)


# ---- XTREME-UP-format fixture data (every task folder, a few lines) ----


def _seqio_test_spm() -> str:
  """seqio's own test SentencePiece model (26 pieces)."""
  import seqio  # pylint: disable=g-import-not-at-top

  return os.path.join(
      os.path.dirname(seqio.__file__),
      "test_data",
      "sentencepiece",
      "sentencepiece.model",
  )


def _xtreme_up_records(task: str, key: str, split: str, n: int) -> list:
  """`n` small, well-formed records of one XTREME-UP file."""
  records = []
  for i in range(n):
    word = f"{key} {split} {i}"
    if task in ("qa_in_lang", "qa_cross_lang"):
      records.append(
          {
              "question": f"where is {word}",
              "title": "the world",
              "context": f"the world is where {word} is",
              "target": "the world",
          }
      )
    elif task == "ner":
      text = f"hello {word} there"
      start = len("hello ".encode("utf-8"))
      records.append(
          {
              "text": text,
              "spans": [
                  {
                      "start_byte": start,
                      "limit_byte": start + len(word.encode("utf-8")),
                      "label": "LOC",
                  }
              ],
          }
      )
    elif task == "autocomplete":
      records.append(
          {"context": f"he went to the {word} wor", "target": "world"}
      )
    else:  # semantic_parsing, translation, transliteration, asr
      records.append({"input": f"hello {word}", "target": f"world {word}"})
  return records


# task -> file names (without .jsonl); languages sw and yo (hi for
# transliteration).
XTREME_UP_FILES = {
    "qa_in_lang": ("sw", "yo"),
    "qa_cross_lang": ("sw", "yo"),
    "ner": ("sw", "yo"),
    "semantic_parsing": ("sw", "yo"),
    "translation": ("en2sw", "en2yo"),
    "transliteration": ("Latn2Deva.hi", "Deva2Latn.hi"),
    "autocomplete": ("sw", "yo"),
    "asr": ("sw_ke", "yo_ng"),
}


def write_xtreme_up(root, files=None) -> str:
  """Writes XTREME-UP-format JSONL for every task of `files` (default
  `XTREME_UP_FILES`): train (3 lines), validation and test (2 lines each)
  per file. Returns the root."""
  root = pathlib.Path(root)
  for task, keys in (files or XTREME_UP_FILES).items():
    for key in keys:
      for split, n in (("train", 3), ("validation", 2), ("test", 2)):
        path = root / task / split / f"{key}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "".join(
                json.dumps(r) + "\n"
                for r in _xtreme_up_records(task, key, split, n)
            ),
            encoding="utf-8",
        )
  return str(root)
