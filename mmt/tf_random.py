"""XLA-safe stateless random draws for Keras's TensorFlow backend.

`mmt.rng` dispatches here when the backend is TensorFlow; model code never
imports this module, so it keeps running under JAX without TensorFlow installed.

Keras's TensorFlow backend casts the seed to int32 and lets TensorFlow pick the
algorithm ("auto_select"); XLA then treats the seed as a compile-time constant and
recompiles the whole step for every new seed (measured: an ITIT train step under
`jit_compile=True` recompiled at every step, 25 s each on CPU). Calling TensorFlow with
the int64 seed and `alg="philox"` keeps it a runtime input.
"""

from __future__ import annotations

import tensorflow as tf
from keras.src.random.seed_generator import draw_seed  # int / SeedGenerator -> seed tensor


def uniform(shape, seed, minval, maxval, dtype):
    """`keras.random.uniform` with a runtime seed under XLA."""
    return tf.random.stateless_uniform(shape, seed=draw_seed(seed), minval=tf.cast(minval, dtype),
                                       maxval=tf.cast(maxval, dtype), dtype=dtype, alg="philox")


def randint(shape, minval, maxval, seed, dtype):
    """`keras.random.randint` (int `[minval, maxval)`) with a runtime seed under XLA."""
    return tf.random.stateless_uniform(shape, seed=draw_seed(seed), minval=minval, maxval=maxval, dtype=dtype,
                                       alg="philox")
