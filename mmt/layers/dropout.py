"""Dropout whose mask is a function of (seed, step, replica) and stays a runtime input under XLA."""

from __future__ import annotations

import keras
from keras import ops

from mmt import rng


class Dropout(keras.layers.Dropout):
    """`keras.layers.Dropout` with the same arguments and config, drawing from `mmt.rng`.

    Keras's layer draws from its own stateful `SeedGenerator`, whose state is not in
    `model.weights` and so not in checkpoints: a resumed run's dropout masks would
    restart. Here every mask comes from the seed of the enclosing `mmt.rng.scope` (the
    trainer's step seed), so a resumed run redraws what the uninterrupted run drew; the
    draw goes through `mmt.rng.uniform`, which keeps the seed a runtime input under XLA
    (Keras's TensorFlow backend compiles it as a constant: one recompilation per step).
    """

    def call(self, inputs, training=False):
        if not training or self.rate <= 0:
            return inputs
        shape = ops.shape(inputs)
        if self.noise_shape is not None:
            shape = tuple(shape[i] if d is None else d for i, d in enumerate(self.noise_shape))
        keep = ops.greater_equal(rng.uniform(shape, rng.layer_seed(f"Dropout {self.name!r}")), self.rate)
        scaled = inputs / ops.cast(1.0 - self.rate, inputs.dtype)
        return ops.where(keep, scaled, ops.zeros_like(scaled))
