"""Masked cross-entropy with label smoothing, over hard or soft targets (keras.ops only)."""

from __future__ import annotations

from keras import ops


def masked_cross_entropy(logits, targets, weights, label_smoothing: float = 0.0):
    """Sum of per-position cross-entropy over the weighted positions, and the weight sum.

    Args:
      logits: float [..., V] (computed in float32).
      targets: int [...] ids.
      weights: float or bool [...]: 1 where the position counts (masked image tokens,
        non-padding text), 0 elsewhere.
      label_smoothing: the target is `(1 - s) * one_hot + s / V` (ITIT I2T: 0.1).

    Returns:
      (numerator, denominator) float32 scalars -- an `mmt.tasks.base.Ratio`, so the
      mean is taken over the global batch.
    """
    logits = ops.cast(logits, "float32")
    log_probs = ops.log_softmax(logits, axis=-1)
    picked = ops.take_along_axis(log_probs, ops.expand_dims(ops.cast(targets, "int32"), -1), axis=-1)[..., 0]
    nll = -picked
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * ops.mean(log_probs, axis=-1)
    weights = ops.cast(weights, "float32")
    return ops.sum(nll * weights), ops.sum(weights)
