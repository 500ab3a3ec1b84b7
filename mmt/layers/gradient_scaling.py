"""Per-resblock gradient scaling (DALL-E §2.4, Figure 4, App. D), `keras.ops` only.

Under float16 mixed precision one global loss scale must keep the largest gradients
finite, and then the small activation gradients of a deep transformer's later resblocks
can fall below float16's smallest exponent and round to zero (underflow). DALL-E gives
every residual block its own dynamic scale instead:

* the identity path (the residual stream, its activations and gradients) stays in
  float32; each residual branch runs in the 16-bit compute dtype;
* at a branch's exit the incoming float32 gradient is multiplied by the block's scale
  before it is cast to 16 bits, so the whole branch back-propagates scaled;
* at the branch's entry the outgoing gradient is "filtered" (inf / NaN set to zero),
  cast to float32 and divided by the scale before it joins the identity path's sum; a
  non-finite event in one block then lowers that block's scale only;
* the branch's parameter gradients come out multiplied by the scale: the trainer
  divides them (`scaled_blocks` tells it which variables belong to which scale);
* each scale halves after a step with a non-finite value in its block and doubles
  after `growth_interval` finite steps in a row (`next_scale`).

The custom gradients live in `mmt.backend` (`tf.custom_gradient` / `jax.custom_vjp`);
this module and the layers using it stay backend-neutral. `TransformerBlock` /
`TransformerStack` take `gradient_scaling=`; left at None they follow `active(...)`,
which the trainer opens while it builds the task (`Trainer.resblock_gradient_scaling`),
so any model built on `TransformerStack` gets it from gin without a change of its own.

Scales are relative to the trainer's global loss scale: block `i` back-propagates with
`loss_scale * scale_i`. Powers of two keep every scale and unscale exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any

import keras
from keras import ops

from mmt import backend


@dataclasses.dataclass(frozen=True)
class GradientScaling:
    """Settings of every resblock's scale.

    Attributes:
      initial_scale: each block's scale at step 0, relative to the global loss scale
        (1.0: the first steps behave as a single global scale; the blocks that need more
        grow out of it).
      growth_interval: finite steps in a row after which a block's scale doubles.
      min_scale, max_scale: bounds of a scale.
    """

    initial_scale: float = 1.0
    growth_interval: int = 1000
    min_scale: float = 2.0**-24
    max_scale: float = 2.0**64

    @classmethod
    def of(cls, value) -> "GradientScaling | None":
        """None / False -> off; True -> defaults; a dict or `GradientScaling` -> those settings."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        return cls(**dict(value))


_ACTIVE = threading.local()


@contextlib.contextmanager
def active(settings: GradientScaling | None):
    """Layers built inside the block with `gradient_scaling=None` use `settings`."""
    previous = getattr(_ACTIVE, "settings", None)
    _ACTIVE.settings = settings
    try:
        yield
    finally:
        _ACTIVE.settings = previous


def resolve(value) -> GradientScaling | None:
    """A layer's `gradient_scaling` argument: None follows `active`, else `GradientScaling.of`."""
    return getattr(_ACTIVE, "settings", None) if value is None else GradientScaling.of(value)


@keras.saving.register_keras_serializable(package="mmt")
class ResblockGradientScale(keras.layers.Layer):
    """One residual block's dynamic gradient scale (two non-trainable float32 weights).

    Weights: `scale` (float32 scalar) and `good_steps` (finite steps since the last
    change, float32 scalar: exact up to 2^24). Both checkpoint with the model.

    `entry(x, dtype)`: a branch's input, float32 `[...]` -> `dtype` `[...]`.
    `exit(y)`: a branch's output `[...]` -> float32 `[...]`. Identities forward.
    """

    def __init__(self, settings: GradientScaling | dict | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.settings = GradientScaling.of(settings or True)

    def build(self, input_shape=None):
        # autocast=False: a mixed-precision block reading the scale must not get it in 16 bits.
        self.scale = self.add_weight(shape=(), initializer=keras.initializers.Constant(self.settings.initial_scale),
                                     dtype="float32", trainable=False, autocast=False, name="scale")
        self.good_steps = self.add_weight(shape=(), initializer="zeros", dtype="float32", trainable=False,
                                          autocast=False, name="good_steps")
        self.built = True

    def entry(self, x, dtype):
        if not self.built:
            self.build()
        return backend.gradient_scale_entry(x, self.scale.value, dtype)

    def exit(self, y, dtype="float32"):
        if not self.built:
            self.build()
        return backend.gradient_scale_exit(y, self.scale.value, dtype)

    def call(self, x):  # a Keras layer needs one; the block calls `entry` / `exit`
        return x

    def update(self, nonfinite) -> None:
        """After a step: `nonfinite` (bool scalar) says whether this block saw inf / NaN."""
        scale, good = next_scale(self.scale.value, self.good_steps.value, nonfinite, self.settings.growth_interval,
                                 self.settings.min_scale, self.settings.max_scale)
        self.scale.assign(scale)
        self.good_steps.assign(good)

    def get_config(self):
        config = super().get_config()
        config.update(settings=dataclasses.asdict(self.settings))
        return config


def next_scale(scale, good_steps, nonfinite, growth_interval: int, min_scale: float, max_scale: float):
    """Dynamic loss-scale rule (Micikevicius et al., 2018): (new scale, new good_steps).

    A non-finite step halves the scale (not below `min_scale`) and restarts the count;
    `growth_interval` finite steps in a row double it (not above `max_scale`).

    Args:
      scale: float32 scalar. good_steps: float scalar (same dtype as returned).
      nonfinite: bool scalar.
    """
    good = ops.where(nonfinite, ops.zeros_like(good_steps), good_steps + 1)
    grow = good >= growth_interval
    scale = ops.where(nonfinite, ops.maximum(scale * 0.5, min_scale),
                      ops.where(grow, ops.minimum(scale * 2.0, max_scale), scale))
    return scale, ops.where(grow, ops.zeros_like(good), good)


def scaled_blocks(model) -> list[tuple[ResblockGradientScale, list[Any]]]:
    """(scale, trainable variables it scales) for each layer of `model` holding a
    `gradient_scale` (a `ResblockGradientScale`): every weight inside such a block sits
    in one of its scaled branches."""
    found = []
    for layer in _layers(model):
        scaler = getattr(layer, "gradient_scale", None)
        if isinstance(scaler, ResblockGradientScale):
            found.append((scaler, list(layer.trainable_variables)))
    return found


def _layers(model):
    # Private Keras API: `_flatten_layers` is how Keras walks a layer tree (public
    # `layers` lists only the top level of a Model).
    return list(model._flatten_layers(include_self=True, recursive=True))  # pylint: disable=protected-access


__all__ = ["GradientScaling", "ResblockGradientScale", "active", "next_scale", "resolve", "scaled_blocks"]
