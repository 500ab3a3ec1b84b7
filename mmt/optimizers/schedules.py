"""Learning-rate schedules (`keras.ops` only, serializable).

Every schedule maps the optimizer's 0-based iteration `step` (Keras evaluates the
schedule at `optimizer.iterations` *before* incrementing it, so the first update uses
`step = 0`) to a float32 learning rate. With a linear warmup the first update therefore
has learning rate 0.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from mmt.errors import UserError


def _linear_warmup(step, value, warmup_steps: int):
    """`value * step / warmup_steps` for `step < warmup_steps`, else `value`."""
    if warmup_steps <= 0:
        return ops.convert_to_tensor(value, "float32")
    return value * ops.minimum(step / float(warmup_steps), 1.0)


class ScheduleError(UserError, ValueError):
    """A schedule's settings are inconsistent; the message names the settings."""


def _binding(name: str) -> str:
    """The gin binding (and the macro behind it) that set a schedule argument, if any."""
    from mmt.errors import describe_binding  # nothing bound means `name` itself

    return describe_binding(name)


def _check_steps(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ScheduleError(f"{name} must be >= {minimum}, got {value}.")


@keras.saving.register_keras_serializable(package="mmt")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `peak_value`, then cosine decay to `end_value`.

    With `W = warmup_steps`, `D = decay_steps`, `s = step` (0-based):

        s <  W:  lr = peak_value * s / W
        s >= W:  p  = min((s - W) / D, 1)
                 lr = end_value + (peak_value - end_value) * (1 + cos(pi * p)) / 2

    so the schedule lasts `W + D` steps and stays at `end_value` afterwards (Keras'
    `CosineDecay(warmup_steps=...)` convention: `decay_steps` excludes the warmup).
    ITIT (Table 3): peak 1e-4, 5,000 warmup steps, cosine decay over the rest of 1.5M.
    """

    def __init__(self, peak_value: float, warmup_steps: int, decay_steps: int | None = None,
                 end_value: float = 0.0, total_steps: int | None = None):
        """Give `decay_steps`, or `total_steps` (decay over what the warmup leaves)."""
        if (decay_steps is None) == (total_steps is None):
            raise ValueError("WarmupCosine needs exactly one of decay_steps and total_steps, "
                             f"got decay_steps={decay_steps}, total_steps={total_steps}")
        if total_steps is not None:
            decay_steps = int(total_steps) - int(warmup_steps)
            if decay_steps < 1:
                raise ScheduleError(
                    f"WarmupCosine: decay_steps = total_steps - warmup_steps = {total_steps} - {warmup_steps} = "
                    f"{decay_steps}, must be >= 1 (total_steps from {_binding('WarmupCosine.total_steps')}, "
                    f"warmup_steps from {_binding('WarmupCosine.warmup_steps')}); train for more steps than "
                    "the warmup, or shorten the warmup")
        _check_steps("warmup_steps", warmup_steps, 0)
        _check_steps("decay_steps", decay_steps, 1)
        self.peak_value = float(peak_value)
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = int(decay_steps)
        self.end_value = float(end_value)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = _linear_warmup(step, self.peak_value, self.warmup_steps)
        progress = ops.clip((step - self.warmup_steps) / self.decay_steps, 0.0, 1.0)
        cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
        decay = self.end_value + (self.peak_value - self.end_value) * cosine
        return ops.where(step < self.warmup_steps, warmup, decay)

    def get_config(self):
        return {
            "peak_value": self.peak_value,
            "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps,
            "end_value": self.end_value,
        }


@keras.saving.register_keras_serializable(package="mmt")
class Constant(keras.optimizers.schedules.LearningRateSchedule):
    """A constant `value`, optionally reached by a linear warmup from 0.

        lr = value * min(step / warmup_steps, 1)     (lr = value when warmup_steps = 0)
    """

    def __init__(self, value: float, warmup_steps: int = 0):
        _check_steps("warmup_steps", warmup_steps, 0)
        self.value = float(value)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        return _linear_warmup(ops.cast(step, "float32"), self.value, self.warmup_steps)

    def get_config(self):
        return {"value": self.value, "warmup_steps": self.warmup_steps}


@keras.saving.register_keras_serializable(package="mmt")
class Rsqrt(keras.optimizers.schedules.LearningRateSchedule):
    """T5's inverse-square-root decay: constant `peak_value` for `warmup_steps`, then
    decaying as `1 / sqrt(step)`:

        lr = peak_value * rsqrt(max(step, W)) / rsqrt(W) = peak_value * sqrt(W / max(step, W))

    `Rsqrt(1e-2, 10_000)` is T5's `min(1e-2, 1 / sqrt(step))`, the relative step size of
    Adafactor's paper (§8) when used with `multiply_by_parameter_scale=True`.
    """

    def __init__(self, peak_value: float, warmup_steps: int):
        _check_steps("warmup_steps", warmup_steps, 1)
        self.peak_value = float(peak_value)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = float(self.warmup_steps)
        return self.peak_value * ops.sqrt(warmup / ops.maximum(step, warmup))

    def get_config(self):
        return {"peak_value": self.peak_value, "warmup_steps": self.warmup_steps}
