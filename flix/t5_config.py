"""The mT5 / T5 v1.1 network config and the size presets (T5X's gin sizes).

`T5Config` is a frozen, hashable dataclass validated in `__post_init__`;
`preset(name, **overrides)` returns mT5 small..xxl, ByT5 small/base, the
tiny T5 v1.1 of prompt-tuning's test checkpoint, or a tiny test model (sizes:
docs/mt5_reference.md §3). The FLix
fields say which dense layers carry adapters and how they are computed;
`scan_layers` and `remat_policy` say how the layer stacks are run (T5X's
options of the same names).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flix import features as features_lib
from flix import layers

# Dense layers that can carry adapters ('wi_<n>' for gated MLPs).
_TARGET_RE = re.compile(r"^(query|key|value|out|wi|wi_\d+|wo|logits_dense)$")
_STACKS = ("encoder", "decoder")
# Named rematerialisation policies: what a layer's backward pass may keep of
# its forward pass instead of recomputing it ('none': no rematerialisation).
_NAMED_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # T5X's 'minimal': keep the matmuls with weights (no batch dimensions).
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
# jax.checkpoint_policies that are policies themselves (not factories).
_JAX_POLICIES = (
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
    "nothing_saveable",
)
REMAT_POLICIES = ("none",) + tuple(_NAMED_POLICIES) + _JAX_POLICIES


def remat_policy(name: str) -> Optional[Callable[..., bool]]:
  """The `jax.checkpoint` policy of a `REMAT_POLICIES` name (None: 'none')."""
  if name not in REMAT_POLICIES:
    raise ValueError(
        f"T5Config: unknown remat_policy {name!r}; use one of "
        f"{REMAT_POLICIES}."
    )
  if name == "none":
    return None
  return _NAMED_POLICIES.get(name) or getattr(jax.checkpoint_policies, name)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Global hyperparameters of the network (T5X `network.T5Config` + FLix).

  Attributes:
    vocab_size: V, rows of the token embedding and logits.
    dtype: activation dtype name ('float32', 'bfloat16'); params stay float32.
    emb_dim: D.
    num_heads: H.
    num_encoder_layers: encoder depth.
    num_decoder_layers: decoder depth.
    head_dim: K; the joined attention width H * K may differ from D.
    mlp_dim: F.
    mlp_activations: one activation per input projection (`flax.linen` names
      or 'linear'), multiplied elementwise: ('gelu', 'linear') is gated GELU.
    dropout_rate: the one rate used everywhere.
    logits_via_embedding: the output projection is the token embedding
      (tied; T5 1.0, transformers' MT5 without an `lm_head.weight`).
    scale_decoder_outputs: multiply the decoder output by emb_dim**-0.5
      before the output projection. None: exactly when logits_via_embedding
      (T5X, T5 1.0). transformers' MT5 never rescales, also when tied; its T5
      follows `config.scale_decoder_outputs` (`hf_checkpoint.logits_form`).
    float32_attention_logits: compute q.k and softmax in float32.
    relative_attention_num_buckets: relative position buckets per stack.
    relative_attention_max_distance: distance of the last (log) bucket.
    one_hot_embedding: look tokens up as one-hot @ table (T5X's TPU trick)
      instead of a gather.
    feature_space: FLix feature groups; None means no adapters and feature
      ids are ignored.
    adapter_targets: names of the dense layers that get adapters.
    adapter_stacks: 'encoder' and/or 'decoder'.
    flix_strategy: `layers.STRATEGIES` entry of the adapter computation.
    max_segments: per-row slots of the 'segment' strategy (>= the number of
      packed examples per row).
    scan_layers: run each stack as one `nn.scan` over its layers, params
      stacked on a leading 'layers' axis (`flix.layer_layout`); compiles in
      time independent of depth. Checkpoints keep the per-layer layout.
    remat_policy: rematerialisation of each layer in the backward pass, one
      of `REMAT_POLICIES`: 'none', 'full' (recompute everything), 'minimal'
      (keep matmuls with weights, T5X's), or a `jax.checkpoint_policies` name.
  """

  vocab_size: int
  dtype: Any = "float32"
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  mlp_activations: tuple[str, ...] = ("gelu", "linear")
  dropout_rate: float = 0.1
  logits_via_embedding: bool = False
  scale_decoder_outputs: Optional[bool] = None
  float32_attention_logits: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  one_hot_embedding: bool = False
  feature_space: Optional[features_lib.FeatureSpace] = None
  adapter_targets: tuple[str, ...] = (
      "query",
      "key",
      "value",
      "out",
      "wi_0",
      "wi_1",
      "wo",
  )
  adapter_stacks: tuple[str, ...] = ("encoder", "decoder")
  flix_strategy: str = "segment"
  max_segments: int = 1
  scan_layers: bool = False
  remat_policy: str = "none"

  def __post_init__(self):
    try:
      dtype = jnp.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(f"T5Config: unknown dtype {self.dtype!r}.") from e
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"T5Config: dtype must be floating, got {dtype}.")
    # Canonical string: hashable, gin- and JSON-friendly.
    object.__setattr__(self, "dtype", dtype.name)
    for name in ("mlp_activations", "adapter_targets", "adapter_stacks"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    for name in (
        "vocab_size",
        "emb_dim",
        "num_heads",
        "head_dim",
        "mlp_dim",
        "max_segments",
        "relative_attention_max_distance",
    ):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"T5Config: {name} must be >= 1.")
    if self.num_encoder_layers < 0 or self.num_decoder_layers < 0:
      raise ValueError("T5Config: layer counts must be >= 0.")
    if self.relative_attention_num_buckets < 4:
      raise ValueError("T5Config: relative_attention_num_buckets must be >= 4.")
    if (
        self.relative_attention_max_distance
        <= self.relative_attention_num_buckets // 2
    ):
      raise ValueError(
          "T5Config: relative_attention_max_distance must exceed "
          "the exact buckets (num_buckets // 2)."
      )
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(
          f"T5Config: dropout_rate {self.dropout_rate} not in [0, 1)."
      )
    if not self.mlp_activations:
      raise ValueError("T5Config: mlp_activations is empty.")
    for act in self.mlp_activations:
      if act != "linear" and not callable(getattr(nn, act, None)):
        raise ValueError(f"T5Config: unknown activation {act!r}.")
    bad = [t for t in self.adapter_targets if not _TARGET_RE.match(t)]
    if bad:
      raise ValueError(
          f"T5Config: unknown adapter_targets {bad}; use query, "
          "key, value, out, wi, wi_<n>, wo, logits_dense."
      )
    bad = [s for s in self.adapter_stacks if s not in _STACKS]
    if bad:
      raise ValueError(f"T5Config: unknown adapter_stacks {bad}.")
    if self.flix_strategy not in layers.STRATEGIES:
      raise ValueError(
          f"T5Config: flix_strategy {self.flix_strategy!r} not "
          f"in {layers.STRATEGIES}."
      )
    remat_policy(self.remat_policy)  # validates the name
    if self.scan_layers and not (
        self.num_encoder_layers and self.num_decoder_layers
    ):
      raise ValueError("T5Config: scan_layers needs layers in both stacks.")
    if not isinstance(
        self.feature_space, (features_lib.FeatureSpace, type(None))
    ):
      raise ValueError("T5Config: feature_space must be a FeatureSpace.")

  def to_dict(self) -> dict[str, Any]:
    """The config as a JSON-able dict, without the feature space (which
    checkpoints save on its own)."""
    return {
        field.name: (list(value) if isinstance(value, tuple) else value)
        for field in dataclasses.fields(self)
        if field.name != "feature_space"
        for value in [getattr(self, field.name)]
    }

  @property
  def rescales_logits(self) -> bool:
    """Whether the decoder output is scaled by emb_dim**-0.5 before the
    output projection (`scale_decoder_outputs`, default: when tied)."""
    if self.scale_decoder_outputs is None:
      return self.logits_via_embedding
    return self.scale_decoder_outputs

  def adapted(self, stack: str) -> tuple[str, ...]:
    """Names of the dense layers with adapters in `stack`."""
    if self.feature_space is None or stack not in self.adapter_stacks:
      return ()
    return self.adapter_targets


def _mt5(emb, heads, mlp, layers_, **kw) -> T5Config:
  return T5Config(
      vocab_size=250112,
      dtype="bfloat16",
      emb_dim=emb,
      num_heads=heads,
      head_dim=64,
      mlp_dim=mlp,
      num_encoder_layers=layers_,
      num_decoder_layers=layers_,
      **kw,
  )


def _byt5(emb, heads, mlp, enc, dec) -> T5Config:
  return T5Config(
      vocab_size=384,
      dtype="bfloat16",
      emb_dim=emb,
      num_heads=heads,
      head_dim=64,
      mlp_dim=mlp,
      num_encoder_layers=enc,
      num_decoder_layers=dec,
  )


PRESETS: dict[str, T5Config] = {
    # t5x/examples/t5/mt5/*.gin; dropout 0.1 = finetune.gin's DROPOUT_RATE.
    "mt5_small": _mt5(512, 6, 1024, 8),
    "mt5_base": _mt5(768, 12, 2048, 12),
    "mt5_large": _mt5(1024, 16, 2816, 24),
    "mt5_xl": _mt5(2048, 32, 5120, 24),
    "mt5_xxl": _mt5(4096, 64, 10240, 24),
    # t5x/examples/t5/byt5/*.gin.
    "byt5_small": _byt5(1472, 6, 3584, 12, 4),
    "byt5_base": _byt5(1536, 12, 3968, 18, 6),
    # prompt-tuning's test checkpoint (docs/mt5_reference.md §3).
    "t5_1_1_tiny": T5Config(
        vocab_size=32128,
        emb_dim=4,
        num_heads=2,
        head_dim=2,
        mlp_dim=8,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dropout_rate=0.0,
        relative_attention_num_buckets=4,
        relative_attention_max_distance=8,
    ),
    # The CPU demo and the reproduction (~1.5M params), byte-sized vocabulary.
    "demo_small": T5Config(
        vocab_size=384,
        emb_dim=128,
        num_heads=4,
        head_dim=32,
        mlp_dim=384,
        num_encoder_layers=3,
        num_decoder_layers=3,
        dropout_rate=0.0,
    ),
    # For tests: byte-sized vocabulary.
    "tiny": T5Config(
        vocab_size=384,
        emb_dim=16,
        num_heads=2,
        head_dim=8,
        mlp_dim=32,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dropout_rate=0.0,
    ),
}


def preset(name: str, **overrides: Any) -> T5Config:
  """A `PRESETS` config with fields replaced: `preset('tiny', dtype=...)`."""
  if name not in PRESETS:
    raise ValueError(
        f"Unknown network preset {name!r}; presets: "
        f"{', '.join(sorted(PRESETS))}."
    )
  return dataclasses.replace(PRESETS[name], **overrides)
