"""Dropout whose random mask stays a runtime input when the step is XLA-compiled."""

from __future__ import annotations

import keras
from keras import ops

from mmt.sampling import seeds


class Dropout(keras.layers.Dropout):
    """`keras.layers.Dropout` with the same arguments and config.

    Keras's TensorFlow backend hands the seed to TensorFlow as int32 with the "auto_select"
    algorithm, which XLA compiles as a constant: every training step of a
    `jit_compile=True` function with dropout was compiled anew (see
    `mmt.sampling.seeds.uniform`). The mask here is drawn through that function instead.
    """

    def call(self, inputs, training=False):
        if not training or self.rate <= 0:
            return inputs
        shape = ops.shape(inputs)
        if self.noise_shape is not None:
            shape = tuple(shape[i] if d is None else d for i, d in enumerate(self.noise_shape))
        keep = ops.greater_equal(seeds.uniform(shape, self.seed_generator), self.rate)
        scaled = inputs / ops.cast(1.0 - self.rate, inputs.dtype)
        return ops.where(keep, scaled, ops.zeros_like(scaled))
