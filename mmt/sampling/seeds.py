"""Randomness for the samplers: per-step seeds inside compiled loops, Gumbel noise.

A `keras.random.SeedGenerator` drawn inside a `fori_loop` body is traced once, so every
iteration would get the same numbers (and Keras's stateful generator cannot update its
variable inside a JAX trace). The samplers therefore draw one table of seeds before the
loop and index it with the loop counter: step `i`'s numbers are a pure function of the
caller's seed and `i`, identical in eager, `tf.function` and XLA runs.
"""

from __future__ import annotations

import keras
from keras import ops
from keras import random as krandom
from keras.random import SeedGenerator
from keras.src.backend import random_seed_dtype  # the backend's seed dtype (no public alias)

# Gumbel noise comes from 23-bit integers: TensorFlow's float `stateless_uniform` gives
# different numbers eagerly and under XLA, its integer draws do not, so a sampler traced
# with `jit_compile=True` reproduces the eager run. u = (k + 1/2) / 2^23 is exact in
# float32 and lies strictly inside (0, 1), so log(-log(u)) is finite (|g| < 17).
_UNIFORM_BITS = 23


class FixedSeed(SeedGenerator):
    """A stateless `SeedGenerator` over a tensor seed: each `next()` gives a new stream.

    Args:
      seed: int `[2]` tensor (any integer dtype), e.g. one row of `step_seeds`.
    """

    def __init__(self, seed):
        # No state variable: like mmt.training.task.StepSeed, draws are counted at trace time.
        self._seed = ops.cast(seed, random_seed_dtype())
        self._draws = 0

    def next(self, ordered=True):
        self._draws += 1
        return ops.stack([self._seed[0], self._seed[1] + self._draws])


def _backend_draws():
    """The module with XLA-safe `uniform` / `randint` for this backend, or None (use `keras.random`)."""
    if keras.backend.backend() != "tensorflow":
        return None
    from mmt import tf_random  # TensorFlow-only; see its docstring for why

    return tf_random


def uniform(shape, seed, minval=0.0, maxval=1.0, dtype="float32"):
    """`keras.random.uniform`, except that under TensorFlow it stays compiled under XLA.

    Keras's TensorFlow backend makes XLA treat the seed as a compile-time constant, so a
    compiled step would recompile for every new seed; `mmt.tf_random` draws with the
    seed as a runtime input. Other backends use `keras.random` unchanged.
    """
    draws = _backend_draws()
    if draws is None:
        return krandom.uniform(shape, minval=minval, maxval=maxval, dtype=dtype, seed=seed)
    return draws.uniform(shape, seed, minval, maxval, dtype)


def randint(shape, minval, maxval, seed, dtype="int32"):
    """`keras.random.randint` (int `[minval, maxval)`), XLA-safe as `uniform`."""
    draws = _backend_draws()
    if draws is None:
        return krandom.randint(shape, minval, maxval, seed=seed, dtype=dtype)
    return draws.randint(shape, minval, maxval, seed, dtype)


def step_seeds(seed, num_steps: int):
    """int32 `[num_steps, 2]` independent seeds drawn from `seed` (one draw).

    Args:
      seed: anything `keras.random` accepts: an int or a `SeedGenerator` (including
        `mmt.training.task.StepSeed`).
      num_steps: static number of rows.
    """
    return randint((num_steps, 2), 0, 2**31 - 1, seed)


def seed_at(table, index) -> FixedSeed:
    """The `FixedSeed` for row `index` (int scalar, may be traced) of a `step_seeds` table."""
    return FixedSeed(ops.take(table, index, axis=0))


def _grid_uniform(shape, seed):
    """float32 `shape` uniform on the 2^-23 grid `(k + 1/2) / 2^23`: strictly inside (0, 1)."""
    k = randint(shape, 0, 2**_UNIFORM_BITS, seed)
    return (ops.cast(k, "float32") + 0.5) * (2.0**-_UNIFORM_BITS)


def gumbel(shape, seed, dtype="float32"):
    """Standard Gumbel noise float `shape`: `-log(-log(u))`, `u` uniform on a 2^-23 grid."""
    return ops.cast(-ops.log(-ops.log(_grid_uniform(shape, seed))), dtype)


def categorical(logits, seed, temperature: float = 1.0):
    """Samples int32 `[...]` from float `[..., V]` logits (`softmax(logits / temperature)`).

    By inversion: one uniform per sample against the cumulative distribution, not one
    Gumbel variate per vocabulary entry -- V times fewer random numbers and no logs,
    which is most of a sampling step's cost (8 x 256 x 256 logits: 11 ms -> 2.5 ms on
    2 CPU cores). Entries of zero probability (logits of -1e9, -inf) are never drawn:
    the uniform is scaled to the distribution's own total and lies strictly inside it.
    Exact up to float32: the uniform's 2^-23 grid and the rounding of the cumulative
    sum (about V * 2^-24 at worst) blur probabilities below ~1e-6, as the Gumbel-max
    draw's 23-bit uniforms did.
    `temperature == 0` is argmax (greedy). Rows whose logits are all equal to a large
    negative value still return a valid index.
    """
    logits = ops.cast(logits, "float32")
    if isinstance(temperature, (int, float)) and temperature == 0:
        return ops.cast(ops.argmax(logits, axis=-1), "int32")
    cdf = ops.cumsum(ops.softmax(logits / temperature, axis=-1), axis=-1)  # [..., V], nondecreasing
    target = _grid_uniform(ops.shape(logits)[:-1], seed)[..., None] * cdf[..., -1:]  # in (0, total)
    # The first index whose cumulative probability reaches the target.
    return ops.sum(ops.cast(cdf < target, "int32"), axis=-1)
