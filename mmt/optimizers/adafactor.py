"""Adafactor (Shazeer & Stern, 2018) with momentum, fixed beta2 and decoupled weight decay.

`keras.optimizers.Adafactor` has neither momentum nor a fixed beta2, both of which ITIT
(Table 3: beta1 0.9, beta2 0.96, weight decay 0.045) needs. This one follows the paper
and t5x/optax; `keras.ops` only, so it runs under every Keras backend.

One step at iteration `t` (1-based: `t = optimizer.iterations + 1`), for a variable `x`
with gradient `g` and learning rate `lr` (the schedule evaluated at the 0-based
`optimizer.iterations`):

    x    <- x - lr * weight_decay * x                      decoupled, unless excluded
    b_t   = beta_2 * (1 - beta_2^(t-1)) / (1 - beta_2^t)   if beta_2 is set (paper §7)
          = 1 - t^(-decay_rate)                            otherwise (paper §7)
    g2    = g^2 + epsilon_1                                (Alg. 4, 5)
    factored ([..., n, m], both >= min_dim_size_to_factor):
      r   = b_t * r + (1 - b_t) * mean(g2, axis=-1)        [..., n]   (Alg. 4)
      c   = b_t * c + (1 - b_t) * mean(g2, axis=-2)        [..., m]   (Alg. 4)
      v   = r[..., :, None] * c[..., None, :] / mean(r, -1)[..., None, None]
    otherwise:
      v   = b_t * v + (1 - b_t) * g2                       same shape as x   (Alg. 5)
    u     = g / sqrt(v)
    u     = u / max(1, rms(u) / clip_threshold)            update clipping (§6)
    a_t   = lr * max(epsilon_2, rms(x))  if multiply_by_parameter_scale else lr  (§8)
    m     = beta_1 * m + (1 - beta_1) * a_t * u            if beta_1 (t5x; no debiasing)
    x    <- x - m   (or  x - a_t * u  without momentum)

`r`, `c` hold means rather than the paper's sums; `r c / mean(r)` equals the paper's
`R C / (1^T R)`. `rms(.)` is over the whole variable.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

# Substrings of a variable's path (e.g. "encoder/layer_norm/gamma") that keep it out of
# weight decay: normalisation scales/offsets and biases.
DEFAULT_WEIGHT_DECAY_EXCLUDE = ("norm", "bias", "gamma", "beta")


def _rms(x):
    return ops.sqrt(ops.mean(ops.square(x)))


@keras.saving.register_keras_serializable(package="mmt")
class Adafactor(keras.optimizers.Optimizer):
    """Adafactor with factored second moments, optional momentum and weight decay.

    Defaults are the paper's/t5x's (step-dependent beta2, no momentum, relative step
    size). ITIT (Table 3) uses
    `Adafactor(WarmupCosine(1e-4, 5_000, ...), beta_1=0.9, beta_2=0.96,
    weight_decay=0.045, multiply_by_parameter_scale=False)` with gradient clipping by
    global norm 3.0 in the trainer (or `global_clipnorm=3.0` here).

    Slots per variable `x` of shape `[..., n, m]`:
      * factored: row `[..., n]` and column `[..., m]` accumulators, i.e. O(n + m);
      * unfactored (rank < 2, or `min(n, m) < min_dim_size_to_factor`): `v` like `x`;
      * `beta_1` set: a first moment `m` like `x` (none when `beta_1=None`).

    Args:
      learning_rate: float, `LearningRateSchedule` or callable. With
        `multiply_by_parameter_scale=True` it is the *relative* step size (T5 used
        `Rsqrt(1e-2, 10_000)`, i.e. `min(1e-2, 1/sqrt(step))`).
      beta_1: momentum of the (scaled, clipped) update, or `None` for no first moment.
      beta_2: fixed second-moment decay, bias-corrected as in the paper's §7
        (`b_t = beta_2 (1 - beta_2^(t-1)) / (1 - beta_2^t)`, so `b_1 = 0` like Adam's
        debiasing). `None` uses the step-dependent `b_t = 1 - t^(-decay_rate)`.
      decay_rate: exponent of the step-dependent decay; ignored when `beta_2` is set.
      epsilon_1: added to squared gradients (paper's eps1).
      epsilon_2: floor of the parameter scale `rms(x)` (paper's eps2).
      clip_threshold: update clipping threshold `d` on `rms(u)`; `None` disables.
        Independent of `clipnorm`/`global_clipnorm`, which clip gradients.
      multiply_by_parameter_scale: scale the step by `max(epsilon_2, rms(x))`.
      min_dim_size_to_factor: a variable of rank >= 2 is factored over its last two
        dims only if both are at least this large (default 128, as t5x/optax; smaller
        kernels keep a full `v`, which costs little).
      weight_decay: decoupled decay rate, applied as `x <- x - lr * weight_decay * x`
        before the Adafactor update (Keras' convention, as AdamW). It is scaled by the
        learning rate (schedule included) but NOT by the parameter scale. `None` or 0
        disables it.
      weight_decay_exclude: substrings of `variable.path` (or `name`) that exempt a
        variable from weight decay. Keras' `exclude_from_weight_decay()` also works.
      **kwargs: the base optimizer's arguments (`global_clipnorm`, `clipnorm`,
        `use_ema`, `loss_scale_factor`, `gradient_accumulation_steps`, `name`, ...).
    """

    def __init__(
        self,
        learning_rate=1e-3,
        beta_1: float | None = None,
        beta_2: float | None = None,
        decay_rate: float = 0.8,
        epsilon_1: float = 1e-30,
        epsilon_2: float = 1e-3,
        clip_threshold: float | None = 1.0,
        multiply_by_parameter_scale: bool = True,
        min_dim_size_to_factor: int = 128,
        weight_decay: float | None = None,
        weight_decay_exclude: Sequence[str] = DEFAULT_WEIGHT_DECAY_EXCLUDE,
        name: str | None = None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay or None, name=name,
            **kwargs,
        )
        if beta_1 is not None and not 0.0 <= beta_1 < 1.0:
            raise ValueError(f"beta_1 must be in [0, 1) or None, got {beta_1}.")
        if beta_2 is not None and not 0.0 < beta_2 < 1.0:
            raise ValueError(f"beta_2 must be in (0, 1) or None, got {beta_2}.")
        if min_dim_size_to_factor < 1:
            raise ValueError(
                f"min_dim_size_to_factor must be >= 1, got {min_dim_size_to_factor}."
            )
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.decay_rate = decay_rate
        self.epsilon_1 = epsilon_1
        self.epsilon_2 = epsilon_2
        self.clip_threshold = clip_threshold
        self.multiply_by_parameter_scale = multiply_by_parameter_scale
        self.min_dim_size_to_factor = int(min_dim_size_to_factor)
        self.weight_decay_exclude = tuple(weight_decay_exclude or ())

    def _factored(self, shape) -> bool:
        return len(shape) >= 2 and min(shape[-2:]) >= self.min_dim_size_to_factor

    def build(self, var_list):
        """Creates the slots; `None` marks a slot a variable does not have."""
        if self.built:
            return
        super().build(var_list)
        self._rows, self._cols, self._second_moments, self._momentums = [], [], [], []
        for var in var_list:
            skip = self._overwrite_variable_with_gradient(var)
            if not skip and self._factored(var.shape):
                prefix = getattr(var, "path", var.name).replace("/", "_").replace(":", "_")
                shape = tuple(var.shape)
                row_shape, col_shape = shape[:-1], shape[:-2] + shape[-1:]  # [..., n], [..., m]
                self._rows.append(
                    self.add_variable(row_shape, dtype=var.dtype, name=f"{prefix}_row")
                )
                self._cols.append(
                    self.add_variable(col_shape, dtype=var.dtype, name=f"{prefix}_col")
                )
                self._second_moments.append(None)
            else:
                self._rows.append(None)
                self._cols.append(None)
                self._second_moments.append(
                    None if skip else self.add_variable_from_reference(var, "velocity")
                )
            self._momentums.append(
                None if skip or self.beta_1 is None
                else self.add_variable_from_reference(var, "momentum")
            )

    def _beta_2_t(self, t):
        """Second-moment decay at 1-based step `t` (a float tensor)."""
        if self.beta_2 is None:
            return 1.0 - ops.power(t, -self.decay_rate)  # paper §7: 1 - t^-c
        beta_2 = ops.cast(self.beta_2, t.dtype)
        # Paper §7: Adam's bias correction folded into the decay; b_1 = 0.
        return beta_2 * (1.0 - ops.power(beta_2, t - 1.0)) / (1.0 - ops.power(beta_2, t))

    def update_step(self, gradient, variable, learning_rate):
        """Applies one Adafactor update to `variable` (formulas in the module docstring)."""
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        grad = ops.cast(gradient, dtype)
        t = ops.cast(self.iterations + 1, dtype)
        beta_2_t = self._beta_2_t(t)
        index = self._get_variable_index(variable)
        row, col = self._rows[index], self._cols[index]

        grad_sq = ops.square(grad) + ops.cast(self.epsilon_1, dtype)
        if row is not None:
            # Alg. 4: factored second moment, rows [..., n] and columns [..., m].
            new_row = beta_2_t * row + (1.0 - beta_2_t) * ops.mean(grad_sq, axis=-1)
            new_col = beta_2_t * col + (1.0 - beta_2_t) * ops.mean(grad_sq, axis=-2)
            self.assign(row, new_row)
            self.assign(col, new_col)
            row_factor = new_row / ops.mean(new_row, axis=-1, keepdims=True)
            v = ops.expand_dims(row_factor, -1) * ops.expand_dims(new_col, -2)  # [..., n, m]
        else:
            # Alg. 5: unfactored second moment.
            second_moment = self._second_moments[index]
            v = beta_2_t * second_moment + (1.0 - beta_2_t) * grad_sq
            self.assign(second_moment, v)

        update = grad / ops.sqrt(v)
        if self.clip_threshold is not None:
            # §6 update clipping: u / max(1, RMS(u) / d).
            update = update / ops.maximum(1.0, _rms(update) / self.clip_threshold)

        step_size = lr
        if self.multiply_by_parameter_scale:
            # §8 relative step size: alpha_t = max(eps2, RMS(x_{t-1})) * rho_t, where
            # x_{t-1} already carries this step's weight decay (applied by the base class).
            step_size = lr * ops.maximum(ops.cast(self.epsilon_2, dtype), _rms(variable))
        update = step_size * update

        momentum = self._momentums[index]
        if momentum is not None:
            # First moment of the scaled update, without debiasing (t5x, optax).
            update = self.beta_1 * momentum + (1.0 - self.beta_1) * update
            self.assign(momentum, update)
        self.assign_sub(variable, update)

    def _use_weight_decay(self, variable):
        path = getattr(variable, "path", None) or variable.name
        if any(s in path for s in self.weight_decay_exclude):
            return False
        return super()._use_weight_decay(variable)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "decay_rate": self.decay_rate,
                "epsilon_1": self.epsilon_1,
                "epsilon_2": self.epsilon_2,
                "clip_threshold": self.clip_threshold,
                "multiply_by_parameter_scale": self.multiply_by_parameter_scale,
                "min_dim_size_to_factor": self.min_dim_size_to_factor,
                "weight_decay_exclude": list(self.weight_decay_exclude),
            }
        )
        return config
