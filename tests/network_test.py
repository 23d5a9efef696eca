"""The mT5 network: T5X parameter tree, relative positions, FLix wiring."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flix import features as features_lib
from flix import network
from flix import t5_layers
from flix import t5x_checkpoint

import conftest
from conftest import SHARED_TESTDATA

SPACE = features_lib.FeatureSpace(
    groups=(
        features_lib.FeatureGroup("task", ("a", "b", "c"), rank=4, alpha=8.0),
        features_lib.FeatureGroup(
            "language",
            ("x", "y", "z", "w", "v"),
            rank=2,
            value_ranks=(("w", 3),),
        ),
    )
)


def _flat(tree):
  return t5x_checkpoint.flatten_params(tree)


@functools.lru_cache(maxsize=None)
def _abstract_params(cfg, length=1):
  """Boxed abstract params of `cfg` from `jax.eval_shape` (no allocation)."""
  model = network.Transformer(cfg)
  tokens = jnp.ones((1, length), jnp.int32)
  ids = None
  if cfg.feature_space is not None:
    ids = jnp.zeros((1, length, cfg.feature_space.num_groups), jnp.int32)
  variables = jax.eval_shape(
      lambda rng: model.init(
          rng, tokens, tokens, tokens, ids, ids, enable_dropout=False
      ),
      jax.random.PRNGKey(0),
  )
  return variables["params"]


def t5x_tree(cfg):
  return conftest.t5x_tree(
      cfg.vocab_size,
      cfg.emb_dim,
      cfg.num_heads * cfg.head_dim,
      cfg.mlp_dim,
      cfg.num_heads,
      32,
      cfg.num_encoder_layers,
      cfg.num_decoder_layers,
  )


# Millions of parameters (docs/mt5_reference.md §3; ByT5: the published sizes).
_TOTALS = {
    "mt5_small": 300.2,
    "mt5_base": 582.4,
    "mt5_large": 1229.6,
    "mt5_xl": 3742.6,
    "mt5_xxl": 12921.1,
    "byt5_small": 300.0,
    "byt5_base": 582.0,
}


@pytest.mark.parametrize("name", sorted(_TOTALS))
def test_param_tree_is_t5x(name):
  cfg = network.preset(name)
  params = _abstract_params(cfg)
  got = _flat(params)
  expected = t5x_tree(cfg)
  assert sorted(got) == sorted(expected)
  for path, (shape, axes) in expected.items():
    leaf = got[path]
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    assert leaf.value.shape == shape, path
    assert leaf.value.dtype == jnp.float32, path
    assert tuple(leaf.names) == axes, path
  total = sum(math.prod(s) for s, _ in expected.values()) / 1e6
  if name.startswith("mt5"):
    assert round(total, 1) == _TOTALS[name]
  assert abs(total / _TOTALS[name] - 1) < 0.01


def test_mt5_xl_has_3_74b_params():
  params = nn.unbox(_abstract_params(network.preset("mt5_xl")))
  total = sum(x.size for x in jax.tree.leaves(params))
  assert abs(total / 3.74e9 - 1) < 0.01


def _adapted_layers(cfg):
  """(d_in, d_out) of every layer that should carry adapters."""
  d, hk, f = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
  dims = {
      "query": (d, hk),
      "key": (d, hk),
      "value": (d, hk),
      "out": (hk, d),
      "wi_0": (d, f),
      "wi_1": (d, f),
      "wo": (f, d),
  }
  shapes = []
  for stack, n_layers, n_attn in (
      ("encoder", cfg.num_encoder_layers, 1),
      ("decoder", cfg.num_decoder_layers, 2),
  ):
    if stack not in cfg.adapter_stacks:
      continue
    for name in cfg.adapter_targets:
      reps = n_attn if name in ("query", "key", "value", "out") else 1
      shapes += [dims[name]] * (reps * n_layers)
  return shapes


@pytest.mark.parametrize(
    "name,space,overrides",
    [
        ("tiny", SPACE, {}),
        (
            "tiny",
            SPACE,
            dict(
                adapter_stacks=("decoder",),
                adapter_targets=("query", "value", "wo"),
            ),
        ),
        ("mt5_small", features_lib.FeatureSpace.lora(rank=8), {}),
    ],
)
def test_adapters_add_exactly_their_params(name, space, overrides):
  base = network.preset(name, **overrides)
  cfg = network.preset(name, feature_space=space, **overrides)
  base_params = _flat(nn.unbox(_abstract_params(base)))
  params = _flat(nn.unbox(_abstract_params(cfg)))
  adapter_paths = [p for p in params if "/lora_" in p]
  assert set(params) - set(adapter_paths) == set(base_params)
  for path in adapter_paths:
    kernel = params[path.rsplit("/", 1)[0] + "/kernel"]
    group = space.group(path.rsplit("/lora_", 1)[1][2:])
    d_in, d_out = kernel.shape
    expected = (
        (group.num_values, d_in, group.max_rank)
        if "/lora_a_" in path
        else (group.num_values, group.max_rank, d_out)
    )
    assert params[path].shape == expected, path
  added = sum(params[p].size for p in adapter_paths)
  assert added == sum(
      space.num_adapter_params(i, o) for i, o in _adapted_layers(cfg)
  )


# ---- Relative position buckets ----


def _bucket_by_hand(n, bidirectional, num_buckets=32, max_distance=128):
  """docs/mt5_reference.md §1.2, n = query_pos - memory_pos, per scalar."""
  offset = 0
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      offset, n = num_buckets, -n
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return offset + n
  ratio = np.float32(n) / np.float32(max_exact) + np.finfo(np.float32).eps
  val = np.log(ratio) / np.float32(math.log(max_distance / max_exact))
  val = max_exact + int(val * np.float32(num_buckets - max_exact))
  return offset + min(val, num_buckets - 1)


# (n = query - memory position, expected bucket): exact, log and far ranges.
_BIDIRECTIONAL = [
    (0, 0),
    (1, 1),
    (7, 7),
    (8, 8),
    (11, 8),
    (12, 9),
    (16, 10),
    (31, 11),
    (32, 12),
    (63, 13),
    (64, 14),
    (90, 14),
    (91, 15),
    (127, 15),
    (128, 15),
    (129, 15),
    (500, 15),
    (-1, 17),
    (-7, 23),
    (-8, 24),
    (-16, 26),
    (-32, 28),
    (-64, 30),
    (-128, 31),
    (-1000, 31),
]
_UNIDIRECTIONAL = [
    (0, 0),
    (15, 15),
    (16, 16),
    (31, 21),
    (32, 21),
    (64, 26),
    (127, 31),
    (128, 31),
    (129, 31),
    (1000, 31),
    (-1, 0),
    (-64, 0),
]


@pytest.mark.parametrize(
    "bidirectional,table", [(True, _BIDIRECTIONAL), (False, _UNIDIRECTIONAL)]
)
def test_relative_position_buckets(bidirectional, table):
  n = np.array([n for n, _ in table])
  got = t5_layers.relative_position_bucket(-n, bidirectional)
  np.testing.assert_array_equal(got, [b for _, b in table])
  assert [_bucket_by_hand(int(x), bidirectional) for x in n] == [
      b for _, b in table
  ]
  # Whole range, including small tables (t5_1_1_tiny: 4 buckets, distance 8).
  for buckets, distance in ((32, 128), (4, 8)):
    n = np.arange(-300, 300)
    got = t5_layers.relative_position_bucket(
        -n, bidirectional, buckets, distance
    )
    want = [
        _bucket_by_hand(int(x), bidirectional, buckets, distance) for x in n
    ]
    np.testing.assert_array_equal(got, want)


def test_relative_position_bias_module_gathers_table():
  module = t5_layers.RelativePositionBiases(32, 128, num_heads=3)
  variables = nn.unbox(module.init(jax.random.PRNGKey(0), 5, 7, True))
  bias = module.apply(variables, 5, 7, True)
  table = variables["params"]["rel_embedding"]
  rel = np.arange(7)[None] - np.arange(5)[:, None]
  buckets = t5_layers.relative_position_bucket(rel, True)
  assert bias.shape == (1, 3, 5, 7)
  np.testing.assert_array_equal(bias[0], np.asarray(table)[:, buckets])


# ---- FLix wiring ----
#
# Every test below runs on the same two batch shapes (4 examples alone, or
# the same 4 packed into 2 rows) so that jit compiles are shared.


def _example(rng, enc_len, dec_len, ids):
  enc = rng.integers(2, 384, size=enc_len)
  tgt = rng.integers(2, 384, size=dec_len)
  tgt[-1] = 1  # EOS
  return enc, tgt, np.array(ids, np.int32)


def _examples(seed=1):
  """Two rows of two examples each, all with different feature ids."""
  rng = np.random.default_rng(seed)
  return [
      [_example(rng, 5, 4, (1, 2)), _example(rng, 6, 3, (2, 5))],
      [_example(rng, 7, 5, (3, 0)), _example(rng, 4, 4, (1, 4))],
  ]


def _batch(rows, enc_len=12, dec_len=9, packed=True):
  """Packs each row's examples: tokens, shifted inputs, ids (+ segments)."""
  n = len(rows)
  enc = np.zeros((n, enc_len), np.int32)
  tgt = np.zeros((n, dec_len), np.int32)
  dec_in = np.zeros((n, dec_len), np.int32)
  enc_seg, dec_seg = np.zeros_like(enc), np.zeros_like(tgt)
  enc_ids = np.zeros((n, enc_len, SPACE.num_groups), np.int32)
  dec_ids = np.zeros((n, dec_len, SPACE.num_groups), np.int32)
  spans = []
  for r, row in enumerate(rows):
    e = d = 0
    row_spans = []
    for s, (x, y, ids) in enumerate(row):
      enc[r, e : e + len(x)], enc_seg[r, e : e + len(x)] = x, s + 1
      enc_ids[r, e : e + len(x)] = ids
      tgt[r, d : d + len(y)], dec_seg[r, d : d + len(y)] = y, s + 1
      dec_in[r, d + 1 : d + len(y)] = y[:-1]  # Each segment starts with BOS 0.
      dec_ids[r, d : d + len(y)] = ids
      row_spans.append((d, len(y)))
      e, d = e + len(x), d + len(y)
    spans.append(row_spans)
  batch = dict(
      encoder_input_tokens=enc,
      decoder_input_tokens=dec_in,
      decoder_target_tokens=tgt,
      encoder_feature_ids=enc_ids,
      decoder_feature_ids=dec_ids,
  )
  if packed:
    batch.update(encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg)
  return batch, spans


def _alone(rows):
  """Every example in its own row, unpacked, with per-example ids [B, G]."""
  batch = _batch([[ex] for row in rows for ex in row], packed=False)[0]
  for key in ("encoder_feature_ids", "decoder_feature_ids"):
    batch[key] = batch[key][:, 0]
  return batch


def numpy_params(cfg, seed=0):
  """Random params of `cfg` drawn in NumPy (fast; no jitted RNG init).

  Kernels and A ~ N(0, 1/d_in), embeddings N(0, 1), norms 1, B = 0.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(leaf.shape, np.float32)
    if "lora_b" in name:
      return np.zeros(leaf.shape, np.float32)
    std = 1.0 if "embedding" in name else leaf.shape[-2] ** -0.5
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

  abstract = nn.unbox(_abstract_params(cfg))
  return jax.tree_util.tree_map_with_path(draw, abstract)


def random_b(params, seed=1, scale=0.5):
  """`params` with every `lora_b_*` leaf drawn from N(0, scale^2)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (scale * rng.standard_normal(x.shape)).astype(np.float32)
      if "lora_b" in jax.tree_util.keystr(path)
      else x,
      params,
  )


@functools.lru_cache(maxsize=None)
def _apply_fn(cfg):
  return jax.jit(
      lambda p, b: network.Transformer(cfg).apply(
          {"params": p}, **b, enable_dropout=False
      )
  )


def _logits(cfg, params, batch):
  return _apply_fn(cfg)(params, batch)


FLIX_CFG = network.preset("tiny", feature_space=SPACE, max_segments=2)


@pytest.fixture(scope="module")
def flix_params():
  return numpy_params(FLIX_CFG)


# Rate > 0 but never enabled in `_logits`: proves disabled dropout is a no-op.
PLAIN_CFG = network.preset("tiny", dropout_rate=0.3)


def _plain(params, batch):
  base = {k: v for k, v in _flat(params).items() if "/lora_" not in k}
  batch = {k: v for k, v in batch.items() if "feature_ids" not in k}
  return _logits(PLAIN_CFG, t5x_checkpoint.unflatten_params(base), batch)


def test_zero_b_equals_network_without_features(flix_params):
  batch = _alone(_examples())
  with_features = _logits(FLIX_CFG, flix_params, batch)
  plain = _plain(flix_params, batch)
  assert with_features.dtype == jnp.float32
  np.testing.assert_allclose(with_features, plain, atol=1e-5, rtol=1e-5)
  # Non-zero B changes the logits (the adapters are wired in).
  changed = _logits(FLIX_CFG, random_b(flix_params), batch)
  assert float(jnp.max(jnp.abs(changed - plain))) > 1e-2


def test_packed_segments_equal_examples_alone(flix_params):
  """Per-token ids, masks and positions of packed rows are right.

  The packed rows carry per-token ids (0 on padding); the examples alone
  carry per-example ids [B, G], so this also checks their broadcasting.
  """
  params = random_b(flix_params)
  rows = _examples()
  packed, spans = _batch(rows)
  packed_logits = _logits(FLIX_CFG, params, packed)
  alone_logits = _logits(FLIX_CFG, params, _alone(rows))
  for r, row_spans in enumerate(spans):
    for s, (start, length) in enumerate(row_spans):
      np.testing.assert_allclose(
          packed_logits[r, start : start + length],
          alone_logits[2 * r + s, :length],
          atol=1e-4,
          rtol=1e-4,
      )


def test_feature_ids_are_required_and_checked(flix_params):
  batch = _alone(_examples())
  no_ids = {k: v for k, v in batch.items() if "feature_ids" not in k}
  with pytest.raises(ValueError, match="encoder_feature_ids"):
    _logits(FLIX_CFG, flix_params, no_ids)
  with pytest.raises(ValueError, match="expected"):
    _logits(
        FLIX_CFG,
        flix_params,
        dict(batch, encoder_feature_ids=batch["encoder_feature_ids"][..., :1]),
    )


def test_packing_is_rejected_when_decoding(flix_params):
  tokens = jnp.ones((2, 1), jnp.int32)
  ids = jnp.ones((2, 1, SPACE.num_groups), jnp.int32)
  with pytest.raises(ValueError, match="Packing"):
    network.Transformer(FLIX_CFG).apply(
        {"params": flix_params},
        tokens,
        tokens,
        tokens,
        ids,
        ids,
        tokens,
        tokens,
        enable_dropout=False,
        decode=True,
        mutable=["cache"],
    )


def test_bfloat16_runs_with_float32_logits(flix_params):
  cfg = network.preset(
      "tiny", dtype="bfloat16", feature_space=SPACE, max_segments=2
  )
  assert cfg.dtype == "bfloat16"
  # Small B: large random adapters make this untrained, unscaled-attention
  # network chaotic enough that bf16 rounding alone moves the logits a lot.
  params = random_b(flix_params, scale=0.1)
  batch, _ = _batch(_examples())
  logits = _logits(cfg, params, batch)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  f32 = _logits(FLIX_CFG, params, batch)
  valid = batch["decoder_target_tokens"] > 0
  assert float(jnp.mean(jnp.abs(logits - f32)[valid])) < 0.05 * float(
      jnp.mean(jnp.abs(f32)[valid])
  )


def test_dropout_is_used_when_enabled(flix_params):
  batch = _alone(_examples())
  base = {k: v for k, v in _flat(flix_params).items() if "/lora_" not in k}
  params = t5x_checkpoint.unflatten_params(base)
  batch = {k: v for k, v in batch.items() if "feature_ids" not in k}
  run = jax.jit(
      lambda rng: network.Transformer(PLAIN_CFG).apply(
          {"params": params},
          **batch,
          enable_dropout=True,
          rngs={"dropout": rng},
      )
  )
  a, b = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2))
  assert not np.allclose(a, b)
  assert not np.allclose(a, _plain(flix_params, batch))


def test_t5_1_1_tiny_preset_matches_real_checkpoint():
  ckpt = SHARED_TESTDATA / "t5x_t5_1_1_tiny" / "checkpoint_3"
  if not ckpt.exists():
    pytest.skip(
        "The tiny T5X test checkpoint (../shared/testdata) is not at"
        f" {ckpt}."
    )
  real = _flat(t5x_checkpoint.read_t5x_checkpoint(str(ckpt)))
  cfg = network.preset("t5_1_1_tiny")
  ours = _flat(nn.unbox(_abstract_params(cfg)))
  assert {k: v.shape for k, v in ours.items()} == {
      k: v.shape for k, v in real.items()
  }
  tokens = jnp.array([[5, 6, 7, 1, 0]], jnp.int32)
  logits = jax.jit(
      lambda p: network.Transformer(cfg).apply(
          {"params": p}, tokens, tokens, tokens, enable_dropout=False
      )
  )(t5x_checkpoint.unflatten_params(real))
  assert logits.shape == (1, 5, 32128)
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_embedding_lookups_and_tied_logits():
  embed = t5_layers.Embed(10, 4, one_hot=True)
  tokens = jnp.array([[3, 0, 9]])
  variables = nn.unbox(embed.init(jax.random.PRNGKey(0), tokens))
  gather = t5_layers.Embed(10, 4, one_hot=False)
  np.testing.assert_allclose(
      embed.apply(variables, tokens), gather.apply(variables, tokens), atol=1e-6
  )
  tied = _flat(
      _abstract_params(network.preset("tiny", logits_via_embedding=True))
  )
  assert "decoder/logits_dense/kernel" not in tied
  assert "token_embedder/embedding" in tied


def test_config_validation():
  with pytest.raises(ValueError, match="adapter_targets"):
    network.preset("tiny", adapter_targets=("qkv",))
  with pytest.raises(ValueError, match="flix_strategy"):
    network.preset("tiny", flix_strategy="magic")
  with pytest.raises(ValueError, match="dtype"):
    network.preset("tiny", dtype="int32")
  with pytest.raises(ValueError, match="Unknown network preset 'mt5_huge'"):
    network.preset("mt5_huge")
  cfg = network.preset("tiny", dtype=jnp.bfloat16, feature_space=SPACE)
  assert cfg.dtype == "bfloat16"
  assert hash(cfg) == hash(
      network.preset("tiny", dtype="bfloat16", feature_space=SPACE)
  )
