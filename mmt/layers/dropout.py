"""Dropout whose mask is a function of (seed, step, replica) and stays a runtime input under XLA."""

from __future__ import annotations

import keras
from keras import ops

from mmt import backend


class Dropout(keras.layers.Layer):
    """`keras.layers.Dropout`'s arguments and config, drawing from `mmt.backend`.

    Keras's layer draws from its own stateful `SeedGenerator`, whose state is not in
    `model.weights` and so not in checkpoints: a resumed run's dropout masks would
    restart. Here every mask comes from the seed of the enclosing `mmt.backend.scope` (the
    trainer's step seed), so a resumed run redraws what the uninterrupted run drew; the
    draw goes through `mmt.backend.uniform`, which keeps the seed a runtime input under XLA
    (Keras's TensorFlow backend compiles it as a constant: one recompilation per step).
    Not a subclass of Keras's layer, whose constructor creates that generator's state
    variable (a model weight that would be checkpointed for nothing).

    Args:
      rate: the fraction of inputs zeroed, in [0, 1).
      noise_shape: the mask's shape, None for the input's own (a `None` entry takes
        the input's size: `(None, 1, 1)` drops whole examples, as drop-path does).
      seed: accepted for `keras.layers.Dropout` compatibility; unused (the seed is the
        enclosing `mmt.backend.scope`'s).
    """

    def __init__(self, rate: float, noise_shape=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate < 1:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate}")
        self.rate, self.noise_shape, self.seed = float(rate), noise_shape, seed
        self.supports_masking = True
        self.built = True

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "noise_shape": self.noise_shape, "seed": self.seed}

    def call(self, inputs, training=False):
        if not training or self.rate <= 0:
            return inputs
        shape = ops.shape(inputs)
        if self.noise_shape is not None:
            shape = tuple(shape[i] if d is None else d for i, d in enumerate(self.noise_shape))
        keep = ops.greater_equal(backend.uniform(shape, backend.layer_seed(f"Dropout {self.name!r}")), self.rate)
        scaled = inputs / ops.cast(1.0 - self.rate, inputs.dtype)
        return ops.where(keep, scaled, ops.zeros_like(scaled))
