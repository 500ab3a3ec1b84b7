"""The `text/ids` convention of mmt's records and batches, shared by tokenizers and input pipelines.

A caption's ids are `pieces[:length - 1] + [EOS] + [pad] * ...`: truncation always keeps
the EOS, so a decoder learns to stop even on over-long captions. A NumPy version for
eager code and a TensorFlow twin for tf.data (TensorFlow imported lazily, so this
module loads under any Keras backend).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf


def terminate_and_pad_numpy(
    ids: Sequence[Sequence[int]], length: int, eos_id: int, pad_id: int
) -> np.ndarray:
    """`ids[:length - 1] + [eos] + [pad]...` per row: int32 [batch, length]."""
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    out = np.full((len(ids), length), pad_id, dtype=np.int32)
    for row, seq in enumerate(ids):
        seq = list(seq)[: length - 1]
        out[row, : len(seq)] = seq
        out[row, len(seq)] = eos_id
    return out


def terminate_and_pad(ids: "tf.RaggedTensor", length: int, eos_id: int, pad_id: int) -> "tf.Tensor":
    """TensorFlow twin of `terminate_and_pad_numpy`.

    Args:
      ids: int32 or int64 ragged [batch, None] piece ids without EOS.
      length: the static output length.
      eos_id, pad_id: ids appended after the (truncated) pieces and padded with.

    Returns:
      int32 [batch, length]: at most `length - 1` pieces, EOS, then padding.
    """
    import tensorflow as tf

    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    # Row splits may be int32 (tf_text) or int64 (tf.ragged.constant); concat needs one.
    ids = tf.cast(ids[:, : length - 1], tf.int32).with_row_splits_dtype(tf.int64)
    eos = tf.fill([ids.nrows(), 1], tf.constant(eos_id, tf.int32))
    eos = tf.RaggedTensor.from_tensor(eos, row_splits_dtype=tf.int64)
    ids = tf.concat([ids, eos], axis=1)
    dense = ids.to_tensor(default_value=pad_id, shape=[None, length])
    return tf.ensure_shape(dense, [None, length])
