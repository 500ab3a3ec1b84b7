"""Losses, likelihoods and gradient estimators (`keras.ops` only; no TensorFlow, no gin)."""

from mmt.losses.estimators import gumbel_softmax, straight_through_argmax, straight_through_softmax
from mmt.losses.likelihoods import (
    LOGIT_LAPLACE_EPSILON,
    kl_to_uniform,
    logit_laplace_nll,
    logit_laplace_reconstruction,
    map_pixels,
    unmap_pixels,
)

__all__ = [
    "LOGIT_LAPLACE_EPSILON",
    "gumbel_softmax",
    "kl_to_uniform",
    "logit_laplace_nll",
    "logit_laplace_reconstruction",
    "map_pixels",
    "straight_through_argmax",
    "straight_through_softmax",
    "unmap_pixels",
]
