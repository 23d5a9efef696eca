"""`FlixFeatureConverter`: SeqIO encoder-decoder features plus feature ids.

The converter outputs everything `seqio.EncDecFeatureConverter` does, plus

  encoder_feature_ids   int32 [L_enc, G]
  decoder_feature_ids   int32 [L_dec, G]

(`[B, L, G]` once batched): for every token, the id (see `flix.features`) of
each feature group of the example the token came from, 0 on padding. Ids are
per token rather than per row, so packing keeps each packed example's own
features: before packing, every example's ids are broadcast to rank-1
per-token features aligned with `inputs` and `targets`, which SeqIO's packing
then concatenates exactly like the tokens.

Feature strings come from the `feature_<group>` keys that featurized tasks
carry (see `flix.featurized`). A missing key, an empty string or a value
the feature space does not know gives the group's default (usually 0, no
feature); an unknown value also logs a warning, once per (group, value).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf

from flix import features as features_lib
from flix import featurized

_FeatureSpec = seqio.FeatureConverter.FeatureSpec

ENCODER_FEATURE_IDS = "encoder_feature_ids"
DECODER_FEATURE_IDS = "decoder_feature_ids"


def _token_key(prefix: str, group_index: int) -> str:
  """Internal per-token id feature aligned with `inputs` or `targets`."""
  return f"{prefix}_fid_{group_index}"


class FlixFeatureConverter(seqio.EncDecFeatureConverter):
  """Encoder-decoder feature converter that adds per-token FLix feature ids.

  Attributes:
    feature_space: the `flix.features.FeatureSpace` that maps values to ids.
  """

  MODEL_FEATURES = {
      **seqio.EncDecFeatureConverter.MODEL_FEATURES,
      ENCODER_FEATURE_IDS: _FeatureSpec(dtype=tf.int32, rank=2),
      DECODER_FEATURE_IDS: _FeatureSpec(dtype=tf.int32, rank=2),
  }

  def __init__(
      self,
      feature_space: features_lib.FeatureSpace,
      pack: bool = True,
      use_custom_packing_ops: bool = False,
      apply_length_check: bool = True,
      bos_id: int = 0,
      passthrough_features: Optional[Mapping[str, _FeatureSpec]] = None,
      warn_unknown: bool = True,
  ):
    """Constructor.

    Args:
      feature_space: maps each group's value strings to ids.
      pack: pack several examples per row (each keeps its own feature ids).
      use_custom_packing_ops: use SeqIO's custom packing ops.
      apply_length_check: check output lengths (SeqIO's validation).
      bos_id: decoder start id.
      passthrough_features: extra features copied as they are (unpacked only).
      warn_unknown: log a warning the first time an example carries a value
        the space does not know. This puts a `tf.py_function` (run only for
        unknown values) in the input pipeline; turn it off where the pipeline
        must be serialisable, and use
        `flix.featurized.check_feature_values` instead.
    """
    if not isinstance(feature_space, features_lib.FeatureSpace):
      raise TypeError(
          "FlixFeatureConverter needs a flix.features.FeatureSpace, got "
          f"{type(feature_space).__name__}."
      )
    super().__init__(
        pack=pack,
        use_custom_packing_ops=use_custom_packing_ops,
        apply_length_check=apply_length_check,
        bos_id=bos_id,
        passthrough_features=passthrough_features,
    )
    self._feature_space = feature_space
    self._warn_unknown = warn_unknown
    self._tables: Optional[list[tf.lookup.StaticHashTable]] = None

  @property
  def feature_space(self) -> features_lib.FeatureSpace:
    return self._feature_space

  # ---- Strings to ids ----

  def _lookup_tables(self) -> list[tf.lookup.StaticHashTable]:
    """One value -> id table per group (-1 when not found), built lazily.

    Built eagerly (`init_scope`) even when first needed inside a `map`
    function's graph, so every later dataset (seqio's evaluator converts one
    per task) can capture the same tables.
    """
    if self._tables is None:
      with tf.init_scope():
        self._tables = self._build_tables()
    return self._tables

  def _build_tables(self) -> list[tf.lookup.StaticHashTable]:
    return [
        tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                keys=tf.constant(group.values, tf.string),
                values=tf.range(1, group.num_values + 1, dtype=tf.int32),
            ),
            default_value=-1,
        )
        for group in self._feature_space.groups
    ]

  def _warn_and_default(
      self, group: features_lib.FeatureGroup, value: tf.Tensor
  ) -> tf.Tensor:
    """Logs the unknown-value warning (once) and returns the default id."""

    def _warn(value_tensor):
      # `encode` warns once per (group, value) and applies the default.
      value_str = value_tensor.numpy().decode("utf-8", errors="replace")
      ids = self._feature_space.encode({group.name: value_str})
      return np.int32(ids[self._feature_space.group_names.index(group.name)])

    fid = tf.py_function(_warn, [value], tf.int32)
    return tf.reshape(fid, [])

  def _example_ids(self, example: Mapping[str, tf.Tensor]) -> list[tf.Tensor]:
    """Scalar int32 id of each group for one example."""
    ids = []
    for group, table in zip(self._feature_space.groups, self._lookup_tables()):
      default = tf.constant(group.default_id, tf.int32)
      key = featurized.feature_key(group.name)
      if key not in example:
        ids.append(default)
        continue
      value = example[key]
      if value.dtype != tf.string:
        raise ValueError(
            f"Feature {key!r} must be a tf.string scalar, got {value.dtype}."
        )
      value = tf.reshape(value, [])
      found = table.lookup(value)
      known = found >= 0
      fid = tf.where(known, found, default)
      if self._warn_unknown:
        unknown = tf.logical_and(tf.logical_not(known), tf.not_equal(value, ""))
        fid = tf.cond(
            unknown,
            lambda g=group, v=value: self._warn_and_default(g, v),
            lambda f=fid: f,
        )
      ids.append(fid)
    return ids

  def _add_token_feature_ids(
      self, example: Mapping[str, tf.Tensor]
  ) -> dict[str, tf.Tensor]:
    """Broadcasts the example's ids to its tokens, stored as id + 1.

    The + 1 keeps real tokens non-zero: SeqIO's packing measures a feature's
    length by its non-zero entries, so an absent feature (id 0) must not read
    as padding. `_stack_ids` undoes the shift (padding becomes 0).
    """
    example = dict(example)
    for i, fid in enumerate(self._example_ids(example)):
      for prefix in ("inputs", "targets"):
        example[_token_key(prefix, i)] = tf.fill(
            tf.shape(example[prefix]), fid + 1
        )
    return example

  def _stack_ids(
      self, features: Mapping[str, tf.Tensor], prefix: str
  ) -> tf.Tensor:
    """Per-token [L, G] ids from the shifted per-group columns."""
    num_groups = self._feature_space.num_groups
    if num_groups == 0:
      return tf.zeros_like(features[prefix])[:, None][:, :0]  # [L, 0]
    columns = [
        tf.maximum(features[_token_key(prefix, i)] - 1, 0)
        for i in range(num_groups)
    ]
    return tf.stack(columns, axis=-1)

  # ---- seqio.FeatureConverter interface ----

  def _convert_example(
      self, features: Mapping[str, tf.Tensor]
  ) -> Mapping[str, tf.Tensor]:
    d = dict(super()._convert_example(features))
    d[ENCODER_FEATURE_IDS] = self._stack_ids(features, "inputs")
    d[DECODER_FEATURE_IDS] = self._stack_ids(features, "targets")
    return d

  def _convert_features(
      self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    ds = ds.map(
        self._add_token_feature_ids, num_parallel_calls=tf.data.AUTOTUNE
    )
    lengths = dict(task_feature_lengths)
    for i in range(self._feature_space.num_groups):
      for prefix in ("inputs", "targets"):
        lengths[_token_key(prefix, i)] = task_feature_lengths[prefix]
    ds = self._pack_or_pad(ds, lengths)
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(
      self, task_feature_lengths: Mapping[str, int]
  ) -> Mapping[str, int]:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    lengths[ENCODER_FEATURE_IDS] = task_feature_lengths["inputs"]
    lengths[DECODER_FEATURE_IDS] = task_feature_lengths["targets"]
    return lengths

  def __call__(
      self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    """Converts task features to model features, with SeqIO's validations.

    Same checks as `seqio.FeatureConverter.__call__`, except that the rank-2
    feature-id outputs are allowed with packing (they are packed as rank-1
    per-group columns and stacked afterwards).

    Args:
      ds: task dataset (`inputs`, `targets`, `feature_<group>` strings).
      task_feature_lengths: `{"inputs": L_enc, "targets": L_dec}`.

    Returns:
      The model-feature dataset.
    """
    task_features = dict(self.TASK_FEATURES)
    task_features.update(self._passthrough_features)
    _check_same_keys(
        task_features,
        task_feature_lengths,
        "TASK_FEATURES",
        "task_feature_lengths",
    )
    ds = self._validate_dataset(
        ds,
        expected_features=task_features,
        expected_lengths=task_feature_lengths,
        strict=False,
        error_label="input_validation",
    )

    ds = self._convert_features(ds, task_feature_lengths)

    expected = dict(self.MODEL_FEATURES)
    expected.update(self._passthrough_features)
    if self.pack:
      for key, dtype in self.PACKING_FEATURE_DTYPES.items():
        expected[key] = _FeatureSpec(dtype=dtype, rank=1)
    model_feature_lengths = self.get_model_feature_lengths(task_feature_lengths)
    _check_same_keys(
        expected,
        model_feature_lengths,
        "model features",
        "model_feature_lengths",
    )
    ds = self._validate_dataset(
        ds,
        expected_features=expected,
        expected_lengths=model_feature_lengths,
        strict=True,
        error_label="output_validation",
    )
    _check_same_keys(
        expected, ds.element_spec, "model features", "output dataset"
    )
    return ds


def _check_same_keys(
    expected: Mapping[str, Any],
    actual: Mapping[str, Any],
    expected_source: str,
    actual_source: str,
) -> None:
  extra = set(actual) - set(expected)
  missing = set(expected) - set(actual)
  if extra:
    raise ValueError(
        f"The {actual_source} contains features not in the {expected_source}: "
        f"{sorted(extra)}."
    )
  if missing:
    raise ValueError(
        f"The {actual_source} is missing features of the {expected_source}: "
        f"{sorted(missing)}."
    )


# ---- Plain NumPy path (evaluation, inference) ----


def _encode_text(
    vocabulary: Optional[seqio.Vocabulary],
    value: Union[None, str, bytes, Sequence[int], np.ndarray],
    length: int,
    add_eos: bool,
) -> np.ndarray:
  """One example's token ids, trimmed and padded to `length`.

  `value` is text (tokenized with `vocabulary`, EOS appended and kept when
  trimming, as SeqIO's `append_eos_after_trim` does), already-tokenized ids
  (a task's `inputs` / `targets`, EOS included: used as they are, trimmed),
  or None (all padding).
  """
  tokens = np.zeros((length,), np.int32)
  if value is None:
    return tokens
  if isinstance(value, (str, bytes)):
    if vocabulary is None:
      raise ValueError("Text examples need a vocabulary to be tokenized.")
    text = value.decode("utf-8") if isinstance(value, bytes) else value
    ids = list(vocabulary.encode(text))
    if add_eos:
      ids = ids[: max(length - 1, 0)] + [vocabulary.eos_id]
  else:
    ids = [int(t) for t in np.asarray(value).reshape(-1)]
  ids = ids[:length]
  tokens[: len(ids)] = ids
  return tokens


def encode_examples(
    examples: Sequence[Mapping[str, Any]],
    feature_space: Optional[features_lib.FeatureSpace],
    lengths: Mapping[str, int],
    vocabulary: Optional[seqio.Vocabulary] = None,
    output_vocabulary: Optional[seqio.Vocabulary] = None,
    add_eos: bool = True,
    bos_id: int = 0,
    batch_size: Optional[int] = None,
) -> dict[str, np.ndarray]:
  """Builds an unpacked model batch in NumPy, as `FlixFeatureConverter` does.

  The one batch builder outside tf.data (evaluation, inference, export
  checks); tests pin it equal to the converter with `pack=False`.

  Args:
    examples: dicts with `inputs` (text, or token ids from a SeqIO task),
      optional `targets` (same; omitted or None for inference: all-padding
      targets) and the example's features, either as `features`
      (`{group: value}`) or as a task's `feature_<group>` strings. Unknown
      values warn and count as absent.
    feature_space: maps feature values to ids (None: no adapters).
    lengths: `{"inputs": L_enc, "targets": L_dec}`.
    vocabulary: tokenizes text inputs (and targets unless
      `output_vocabulary` is given); not needed for token ids.
    output_vocabulary: targets vocabulary, default `vocabulary`.
    add_eos: append EOS to text (kept when trimming).
    bos_id: decoder start id.
    batch_size: pad with empty rows up to this many (default: no padding).

  Returns:
    The keys of `FlixFeatureConverter(pack=False)`: int32 `[B, L]` arrays
    and feature ids `[B, L, G]` (0 on padding).
  """
  space = feature_space or features_lib.FeatureSpace(groups=())
  output_vocabulary = output_vocabulary or vocabulary
  enc_len, dec_len = int(lengths["inputs"]), int(lengths["targets"])
  batch_size = len(examples) if batch_size is None else batch_size
  if batch_size < len(examples):
    raise ValueError(
        f"{len(examples)} examples do not fit a batch of {batch_size}."
    )
  encoder = np.zeros((batch_size, enc_len), np.int32)
  targets = np.zeros((batch_size, dec_len), np.int32)
  ids = np.zeros((batch_size, space.num_groups), np.int32)
  for row, example in enumerate(examples):
    encoder[row] = _encode_text(vocabulary, example["inputs"], enc_len, add_eos)
    targets[row] = _encode_text(
        output_vocabulary, example.get("targets"), dec_len, add_eos
    )
    ids[row] = space.encode(example_features(example))
  decoder_inputs = np.full_like(targets, bos_id)
  decoder_inputs[:, 1:] = targets[:, :-1]
  return {
      "encoder_input_tokens": encoder,
      "decoder_target_tokens": targets,
      "decoder_input_tokens": decoder_inputs,
      "decoder_loss_weights": (targets != 0).astype(np.int32),
      ENCODER_FEATURE_IDS: (
          ids[:, None, :] * (encoder != 0)[:, :, None]
      ).astype(np.int32),
      DECODER_FEATURE_IDS: (
          ids[:, None, :] * (targets != 0)[:, :, None]
      ).astype(np.int32),
  }


def example_features(example: Mapping[str, Any]) -> dict[str, str]:
  """`{group: value}` of an example: its `features` dict, or a SeqIO task's
  `feature_<group>` strings (empty = absent)."""
  if "features" in example:
    return {k: v for k, v in (example["features"] or {}).items() if v}
  out = {}
  for key, value in example.items():
    if key.startswith(featurized.FEATURE_PREFIX):
      value = value.decode("utf-8") if isinstance(value, bytes) else str(value)
      if value:
        out[key[len(featurized.FEATURE_PREFIX) :]] = value
  return out
