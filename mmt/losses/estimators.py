"""Gradient estimators through discrete choices: Gumbel-softmax and straight-through.

Pure functions on `keras.ops` (no TensorFlow import), shared by the dVAE (DALL-E §2.1:
the Gumbel-softmax relaxation of the encoder's categorical) and ITIT's cycle losses
(which backpropagate through sampled tokens).

All take `logits: float [..., K]` (the last axis holds the categories) and return a
float tensor of the same shape. "One-hot forward" means the returned *values* are
exactly 0 or 1; the gradient each one passes back is documented per function. They use
the identity `stop_gradient(hard) + soft - stop_gradient(soft)`: its value is `hard`
exactly (`soft - soft` is exactly 0), its gradient that of `soft`.
"""

from __future__ import annotations

from keras import ops

from mmt import backend


def _straight_through(hard, soft):
    """Value `hard`, gradient of `soft` (same shapes)."""
    return ops.stop_gradient(hard) + (soft - ops.stop_gradient(soft))


def _one_hot_argmax(x):
    """float [..., K] -> one-hot float [..., K] of the argmax (first maximum on ties)."""
    return ops.one_hot(ops.argmax(x, axis=-1), ops.shape(x)[-1], dtype=x.dtype)


def gumbel_softmax(logits, temperature, seed, hard: bool = False):
    """A sample of the Gumbel-softmax (Concrete) relaxation of `Categorical(logits)`.

        y = softmax((logits + g) / temperature),   g ~ Gumbel(0, 1) i.i.d.

    (Jang et al. 2016; Maddison et al. 2016.) As `temperature -> 0`, `y` tends to the
    one-hot of a sample of the categorical; DALL-E anneals it from 1 to 1/16.

    Args:
      logits: float [..., K], unnormalised log-probabilities.
      temperature: positive float scalar (Python number or scalar tensor).
      seed: a `keras.random` seed (an int, a `SeedGenerator` or the trainer's `StepSeed`).
      hard: straight-through Gumbel-softmax: the value is the one-hot of `argmax(y)`
        (a sample of the categorical), the gradient that of the soft `y`.

    Returns:
      float [..., K] (the dtype of `logits`): rows sum to 1.
    """
    logits = ops.convert_to_tensor(logits)
    noise = backend.gumbel(ops.shape(logits), seed)  # the one Gumbel of mmt, finite by construction
    temperature = ops.cast(temperature, "float32")
    soft = ops.softmax((ops.cast(logits, "float32") + noise) / temperature, axis=-1)
    soft = ops.cast(soft, logits.dtype)
    if not hard:
        return soft
    return _straight_through(_one_hot_argmax(soft), soft)


def straight_through_softmax(logits):
    """One-hot of `argmax(logits)` forward; the gradient of `softmax(logits)` backward.

    The softmax straight-through estimator (Bengio et al. 2013, as used for
    categorical variables by Jang et al. 2016): deterministic, biased, low variance.

    Args:
      logits: float [..., K].
    Returns:
      float [..., K], exactly one-hot in value.
    """
    logits = ops.convert_to_tensor(logits)
    return _straight_through(_one_hot_argmax(logits), ops.softmax(logits, axis=-1))


def straight_through_argmax(logits):
    """One-hot of `argmax(logits)` forward; the identity gradient backward.

    Bengio et al. (2013)'s original straight-through estimator: the incoming gradient
    reaches `logits` unchanged, as if the one-hot were the logits themselves. Use it
    where `logits` are already normalised scores (e.g. probabilities); otherwise
    `straight_through_softmax` keeps the gradient's scale tied to the distribution.

    Args:
      logits: float [..., K].
    Returns:
      float [..., K], exactly one-hot in value.
    """
    logits = ops.convert_to_tensor(logits)
    return _straight_through(_one_hot_argmax(logits), logits)


__all__ = ["gumbel_softmax", "straight_through_argmax", "straight_through_softmax"]
