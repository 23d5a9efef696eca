"""Shared test set-up: quiet TensorFlow, CPU only, repo paths."""

import os
import pathlib
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_TESTDATA = REPO.parent / "shared" / "testdata"


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


def run_module(module: str, *args: str, env=None) -> str:
  """Runs `python -m module args` from the repository root; asserts it
  succeeded and returns its output (stderr + stdout)."""
  result = subprocess.run(
      [sys.executable, "-m", module, *args],
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
