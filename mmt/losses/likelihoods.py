"""DALL-E's logit-Laplace pixel likelihood, its ε-transform, and the KL to a uniform prior.

Pure functions on `keras.ops` (no TensorFlow import). DALL-E Appendix A.3: pixel
values live in a bounded interval, so the dVAE models them with the *logit-Laplace*
distribution -- the law of `sigmoid(L)` for a Laplace variable `L ~ Laplace(mu, b)` --
whose density on (0, 1) is (eq. 2)

    f(x | mu, b) = 1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b).

Pixels are first squeezed into (ε, 1 - ε) by φ (eq. 3, ε = 0.1), away from the poles
of `1 / (x (1 - x))`; a reconstruction is `φ⁻¹(sigmoid(mu))`.
"""

from __future__ import annotations

import math

from keras import ops

#: DALL-E's ε (Appendix A.3: "We use ε = 0.1").
LOGIT_LAPLACE_EPSILON = 0.1


def map_pixels(x, epsilon: float = LOGIT_LAPLACE_EPSILON):
    """φ: pixels in [0, 1] -> [ε, 1 - ε], `(1 - 2ε) x + ε` (DALL-E eq. 3, with x = value / 255).

    Args:
      x: float [...] in [0, 1].
    Returns:
      float [...] in [ε, 1 - ε].
    """
    return (1.0 - 2.0 * epsilon) * x + epsilon


def unmap_pixels(y, epsilon: float = LOGIT_LAPLACE_EPSILON):
    """φ⁻¹, clipped to [0, 1]: `clip((y - ε) / (1 - 2ε), 0, 1)`.

    Args:
      y: float [...], typically `sigmoid(mu)` in (0, 1).
    Returns:
      float [...] in [0, 1].
    """
    return ops.clip((y - epsilon) / (1.0 - 2.0 * epsilon), 0.0, 1.0)


def logit_laplace_nll(x, mu, log_b):
    """Negative log-density of the logit-Laplace distribution, element by element.

        -ln f(x | mu, b) = ln 2 + ln b + ln x + ln(1 - x) + |ln x - ln(1 - x) - mu| / b

    Args:
      x: float [...], targets in (0, 1) (pixels mapped by `map_pixels`).
      mu: float [...], location in logit space (the decoder's first 3 channels).
      log_b: float [...], log of the scale b (the decoder's last 3 channels).
    Returns:
      float32 [...], nats per element (reduce it yourself; DALL-E averages over pixels
      and channels, A.2).
    """
    x = ops.cast(x, "float32")
    mu = ops.cast(mu, "float32")
    log_b = ops.cast(log_b, "float32")
    log_x, log_1mx = ops.log(x), ops.log1p(-x)
    return math.log(2.0) + log_b + log_x + log_1mx + ops.abs(log_x - log_1mx - mu) * ops.exp(-log_b)


def logit_laplace_reconstruction(mu, epsilon: float = LOGIT_LAPLACE_EPSILON):
    """The image DALL-E shows for decoder statistics `mu`: `φ⁻¹(sigmoid(mu))` in [0, 1].

    (`ln b` is ignored, Appendix A.3.)
    """
    return unmap_pixels(ops.sigmoid(ops.cast(mu, "float32")), epsilon)


def kl_to_uniform(logits):
    """KL(Categorical(softmax(logits)) || Uniform(K)) = ln K - H(q), per distribution.

    The KL term of DALL-E's ELB (eq. 1) for the uniform initial prior of stage one (§2.1).

    Args:
      logits: float [..., K].
    Returns:
      float32 [...], nats, >= 0.
    """
    logits = ops.cast(logits, "float32")
    log_q = ops.log_softmax(logits, axis=-1)
    num_classes = ops.shape(logits)[-1]
    return ops.sum(ops.exp(log_q) * log_q, axis=-1) + ops.log(ops.cast(num_classes, "float32"))


__all__ = [
    "LOGIT_LAPLACE_EPSILON",
    "kl_to_uniform",
    "logit_laplace_nll",
    "logit_laplace_reconstruction",
    "map_pixels",
    "unmap_pixels",
]
