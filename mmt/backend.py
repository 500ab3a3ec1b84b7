"""Randomness and the backend seams: the one module that touches backend specifics.

**Every random draw of mmt is a pure function of (run seed, step, replica).**
Preemption-safe training needs a resumed run to redraw exactly what the uninterrupted
run drew: dropout masks, drop-path decisions, token masks, Gumbel noise, quantizer
restarts and the samplers inside a step. Keras's own `SeedGenerator` keeps its state in
a variable that is neither in `model.weights` nor checkpointed, so this module is the
only place mmt draws random numbers (`tests/test_rng.py` scans `mmt/` for other uses):

* `StepSeed(seed)` / `FixedSeed(seed)`: stateless seed generators over an int `[2]`
  seed; each `next()` (each draw) gets a new stream, counted at trace time, so a traced
  step's draws depend only on the seed and the order of draws in the program.
* `for_step(run_seed, step, replica)`: the trainer's seed for one replica's step.
* `scope(seed)` / `layer_seed()`: the seed that layers (Dropout, drop-path) draw from
  without taking a `seed` argument. The trainer opens the scope around a task's losses;
  a layer called with `training=True` outside any scope raises instead of falling back
  to a stateful generator.
* `uniform`, `randint`, `gumbel`, `categorical`: the draws themselves; under
  TensorFlow they keep the seed a runtime input of an XLA program (see `_tf_uniform`).

**Backend seams**, each used where model code needs something `keras.ops` lacks:
`compile_function` (the backend's XLA), `gradient` (the backend's autodiff of a scalar
function), `keep_replica_gradients` (a Keras optimizer that must not all-reduce),
`gradient_scale_entry` / `gradient_scale_exit` (the custom gradients of DALL-E's
per-resblock gradient scaling: `tf.custom_gradient` / `jax.custom_vjp`).
Private Keras APIs are touched here only, each with its reason.

`keras.ops` only at import time: importing this module does not import TensorFlow.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import keras
from keras import ops
from typing import Any, Callable

from keras import random as krandom
from keras.random import SeedGenerator
# Private Keras API: the backend's seed dtype has no public alias (int64 under TF, uint32 under JAX).
from keras.src.backend import random_seed_dtype

# Gumbel noise comes from 23-bit integers: TensorFlow's float `stateless_uniform` gives
# different numbers eagerly and under XLA, its integer draws do not, so a sampler traced
# with `jit_compile=True` reproduces the eager run. u = (k + 1/2) / 2^23 is exact in
# float32 and lies strictly inside (0, 1), so log(-log(u)) is finite (|g| < 17).
_UNIFORM_BITS = 23
# Step seeds: (run seed, step * _REPLICA_STRIDE + replica) -- distinct for up to 4096
# replicas, the trainer's layout since the first checkpoints (keep it: resumes redraw).
_REPLICA_STRIDE = 4096


class _StatelessSeed(SeedGenerator):
    """A `SeedGenerator` without a state variable: draw `n` uses `[s0, s1 + n * stride]`."""

    _stride = 1

    def __init__(self, seed):
        # Not calling super().__init__: there is no state variable to create.
        self._seed = ops.cast(seed, random_seed_dtype())
        self._draws = 0

    def next(self, ordered=True):
        self._draws += 1
        return ops.stack([self._seed[0], self._seed[1] + self._draws * self._stride])


class StepSeed(_StatelessSeed):
    """The trainer's seed of one replica's step (see `for_step`); pass it as `seed=`.

    Its draws are spread by a large odd stride so that they never meet the streams of
    neighbouring steps (`step * 4096 + replica` + a few draws).
    """

    _stride = 1_000_003


class FixedSeed(_StatelessSeed):
    """A stateless seed over an int `[2]` tensor (e.g. one row of `step_seeds`) for samplers."""


def for_step(run_seed: int, step, replica) -> StepSeed:
    """The `StepSeed` of (run seed, step, replica); `step` and `replica` may be tensors."""
    dtype = random_seed_dtype()
    second = ops.cast(step, dtype) * _REPLICA_STRIDE + ops.cast(replica, dtype)
    return StepSeed(ops.stack([ops.convert_to_tensor(int(run_seed), dtype), second]))


def seed_initial_weights(run_seed: int) -> None:
    """Seeds Keras's global generator, which weight initializers (and tf.data's global seed) use.

    Initial weights are the one draw made before the first step; seeding them from the
    run's seed makes two runs of one config start from the same weights.
    """
    keras.utils.set_random_seed(int(run_seed))


# -- the layers' seed ---------------------------------------------------------------------

_CURRENT = threading.local()


@contextlib.contextmanager
def scope(seed):
    """Makes `seed` (a `SeedGenerator`, usually a `StepSeed`) the one layers draw from."""
    stack = _CURRENT.__dict__.setdefault("stack", [])
    stack.append(seed)
    try:
        yield seed
    finally:
        stack.pop()


def layer_seed(layer_name: str = "a layer") -> SeedGenerator:
    """The innermost `scope`'s seed; raises when a layer draws outside every scope."""
    stack = getattr(_CURRENT, "stack", None)
    if not stack:
        raise RuntimeError(
            f"{layer_name} draws random numbers (training=True) outside mmt.backend.scope(seed): every draw "
            "must be a function of (seed, step, replica). The trainer opens the scope; elsewhere wrap the call "
            "in `with mmt.backend.scope(mmt.backend.FixedSeed([seed, 0])):`.")
    return stack[-1]


# -- draws --------------------------------------------------------------------------------


def _tf_seed(seed):
    """The int64 `[2]` seed tensor of an int / `SeedGenerator` under TensorFlow."""
    # Private Keras API: `draw_seed` is how keras.random turns its seed argument into a tensor.
    from keras.src.random.seed_generator import draw_seed

    return draw_seed(seed)


def _tf_uniform(shape, seed, minval, maxval, dtype):
    """TensorFlow's stateless uniform with the seed as a runtime input of XLA programs.

    Keras's TensorFlow backend casts the seed to int32 and lets TensorFlow pick the
    algorithm ("auto_select"); XLA then treats the seed as a compile-time constant and
    recompiles the whole step for every new seed (measured: an ITIT train step under
    `jit_compile=True` recompiled at every step, 25 s each on CPU). Calling TensorFlow
    with the int64 seed and `alg="philox"` keeps it a runtime input.
    """
    import tensorflow as tf  # TensorFlow backend only

    if dtype is not None and "int" in str(dtype):
        return tf.random.stateless_uniform(shape, seed=_tf_seed(seed), minval=minval, maxval=maxval, dtype=dtype,
                                           alg="philox")
    return tf.random.stateless_uniform(shape, seed=_tf_seed(seed), minval=tf.cast(minval, dtype),
                                       maxval=tf.cast(maxval, dtype), dtype=dtype, alg="philox")


def tf_data_uniform(shape, seed, index):
    """float32 uniform [0, 1) draws for tf.data-side randomness (BPE dropout), TensorFlow only.

    Stateless: the same int64 `[2]` `seed` (derived from the run's seed, the stream and
    the element's position, `mmt.data.pipeline`) and `index` (a loop counter) always give
    the same draws, so a resumed input pipeline redraws what the uninterrupted one drew.
    """
    import tensorflow as tf  # data code runs on TensorFlow whatever the Keras backend

    return tf.random.stateless_uniform(shape, seed=tf.random.experimental.stateless_fold_in(seed, index))


def _on_tensorflow() -> bool:
    return keras.backend.backend() == "tensorflow"


def uniform(shape, seed, minval=0.0, maxval=1.0, dtype="float32"):
    """`keras.random.uniform`, except that under TensorFlow it stays compiled under XLA
    (`_tf_uniform`). Other backends use `keras.random` unchanged."""
    if not _on_tensorflow():
        return krandom.uniform(shape, minval=minval, maxval=maxval, dtype=dtype, seed=seed)
    return _tf_uniform(shape, seed, minval, maxval, dtype)


def randint(shape, minval, maxval, seed, dtype="int32"):
    """`keras.random.randint` (int `[minval, maxval)`), XLA-safe as `uniform`."""
    if not _on_tensorflow():
        return krandom.randint(shape, minval, maxval, seed=seed, dtype=dtype)
    return _tf_uniform(shape, seed, minval, maxval, dtype)


def step_seeds(seed, num_steps: int):
    """int32 `[num_steps, 2]` independent seeds drawn from `seed` (one draw).

    Args:
      seed: anything `keras.random` accepts: an int or a `SeedGenerator` (including
        `StepSeed`).
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


# -- backend seams ------------------------------------------------------------------------


def compile_function(fn: Callable) -> Callable:
    """`fn` compiled with the active backend's XLA (TensorFlow / JAX imported lazily)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True, reduce_retracing=True)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn


def gradient(fn: Callable[[Any], Any], x):
    """d fn(x) / dx for a scalar-valued `fn`, with the active backend's autodiff.

    `keras.ops` has no gradient; a loss that needs one inside the forward pass (the
    VQGAN's adaptive GAN weight) calls this.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return tape.gradient(y, x)
    if backend == "jax":
        import jax

        return jax.grad(fn)(x)
    if backend == "torch":
        import torch

        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(fn(x), x)[0]
    raise ValueError(f"a gradient inside the forward pass (the VQGAN's adaptive GAN weight) needs autodiff, "
                     f"which the {backend!r} backend lacks; set VQGANTask.adaptive_weight = False")


def gradient_scale_entry(x, scale, dtype):
    """A residual branch's entry under per-resblock gradient scaling (DALL-E §2.4, Figure 4).

    Forward: `x` (float32, the identity path) cast to the branch's `dtype`.
    Backward: the branch's input gradient (scaled by `scale`, in `dtype`) has every
    non-finite value set to zero (the paper's "filter": an overflow in this block must
    not reach, and lower the scales of, the blocks before it), is cast to `x.dtype` and
    divided by `scale` before it joins the identity path's sum.

    The cotangent returned for `scale` is not a derivative (`scale` does not change the
    forward value): it is the number of non-finite values filtered, float32 scalar. The
    trainer reads it as `d loss / d scale` to lower that block's scale.

    Args:
      x: float `[...]`. scale: float32 scalar. dtype: the branch's compute dtype.
    """
    return _scale_ops()[0](x, scale, keras.backend.standardize_dtype(dtype))


def gradient_scale_exit(y, scale, dtype):
    """A residual branch's exit: forward `y` cast to `dtype` (float32, the identity
    path); backward the incoming gradient times `scale`, in float32, then cast to
    `y.dtype` (so a tiny gradient is scaled before 16-bit rounding could flush it). The
    cotangent of `scale` is zero. See `gradient_scale_entry`."""
    return _scale_ops()[1](y, scale, keras.backend.standardize_dtype(dtype))


def _scale_ops():
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tf_scale_ops()
    if backend == "jax":
        return _jax_scale_ops()
    raise ValueError(f"per-resblock gradient scaling needs a custom gradient, which mmt implements for "
                     f"TensorFlow and JAX, not {backend!r}; turn it off (Trainer.resblock_gradient_scaling)")


@functools.lru_cache(maxsize=None)
def _tf_scale_ops():
    import tensorflow as tf

    def entry(x, scale, dtype):
        @tf.custom_gradient
        def op(x, scale):
            def grad(g):
                bad = tf.logical_not(tf.math.is_finite(g))
                count = tf.reduce_sum(tf.cast(bad, tf.float32))
                g = tf.cast(tf.where(bad, tf.zeros_like(g), g), x.dtype)
                return g / tf.cast(scale, x.dtype), tf.cast(count, scale.dtype)

            return tf.cast(x, dtype), grad

        return op(x, tf.convert_to_tensor(scale))

    def exit_(y, scale, dtype):
        @tf.custom_gradient
        def op(y, scale):
            def grad(g):
                g = tf.cast(g, tf.float32) * tf.cast(scale, tf.float32)
                return tf.cast(g, y.dtype), tf.zeros_like(scale)

            return tf.cast(y, dtype), grad

        return op(y, tf.convert_to_tensor(scale))

    return entry, exit_


@functools.lru_cache(maxsize=None)
def _jax_scale_ops():
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def entry_op(x, scale, dtype, x_dtype):
        return x.astype(dtype)

    def entry_fwd(x, scale, dtype, x_dtype):
        return x.astype(dtype), scale

    def entry_bwd(dtype, x_dtype, scale, g):
        bad = ~jnp.isfinite(g)
        count = jnp.sum(bad).astype(scale.dtype).reshape(scale.shape)
        g = jnp.where(bad, jnp.zeros_like(g), g).astype(x_dtype)
        return g / scale.astype(x_dtype), count

    entry_op.defvjp(entry_fwd, entry_bwd)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def exit_op(y, scale, dtype, y_dtype):
        return y.astype(dtype)

    def exit_fwd(y, scale, dtype, y_dtype):
        return y.astype(dtype), scale

    def exit_bwd(dtype, y_dtype, scale, g):
        return (g.astype(jnp.float32) * scale.astype(jnp.float32)).astype(y_dtype), jnp.zeros_like(scale)

    exit_op.defvjp(exit_fwd, exit_bwd)

    def entry(x, scale, dtype):
        x = jnp.asarray(x)
        return entry_op(x, jnp.asarray(scale, jnp.float32), dtype, str(x.dtype))

    def exit_(y, scale, dtype):
        y = jnp.asarray(y)
        return exit_op(y, jnp.asarray(scale, jnp.float32), dtype, str(y.dtype))

    return entry, exit_


def keep_replica_gradients(optimizer) -> None:
    """Stops a Keras optimizer from summing gradients across replicas itself.

    mmt's trainer all-reduces gradients before clipping and the finiteness check; Keras's
    `apply` under a `tf.distribute` strategy would sum them a second time. Private Keras
    API: `_all_reduce_sum_gradients` is the hook Keras calls for that sum, and has no
    public switch.
    """
    optimizer._all_reduce_sum_gradients = lambda grads_and_vars: list(grads_and_vars)  # pylint: disable=protected-access


__all__ = ["FixedSeed", "StepSeed", "categorical", "compile_function", "for_step", "gradient",
           "gradient_scale_entry", "gradient_scale_exit", "gumbel",
           "keep_replica_gradients", "layer_seed", "randint", "scope", "seed_at", "seed_initial_weights",
           "step_seeds", "uniform"]
