"""AdamW whose weight decay can skip one-dimensional variables (biases, norms, tokens)."""

from __future__ import annotations

import keras


class AdamW(keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` plus MAE's rule for what weight decay applies to.

    MAE (He et al. 2021, App. A.1, via timm's `param_groups_weight_decay`) and M3AE
    (App. A.4, same optimizer) decay only weight matrices: every variable with one
    dimension — biases, LayerNorm scales and offsets, and in mmt the CLS and mask
    tokens, which are `[dim]` vectors — is left undecayed. Keras can only exclude
    variables by name pattern, so this rule needs the shape test below.

    Args:
      exclude_one_dimensional: skip weight decay for every variable of rank <= 1.
        False (default) decays everything, exactly as `keras.optimizers.AdamW`.
      exclude_names: regular expressions; a variable whose name matches one is not
        decayed either (Keras' `exclude_from_weight_decay(var_names=...)`).
      **kwargs: `keras.optimizers.AdamW` arguments.
    """

    def __init__(self, *args, exclude_one_dimensional: bool = False, exclude_names=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.exclude_one_dimensional = bool(exclude_one_dimensional)
        self.exclude_names = tuple(exclude_names)
        if self.exclude_names:
            self.exclude_from_weight_decay(var_names=list(self.exclude_names))

    def _use_weight_decay(self, variable):
        if self.exclude_one_dimensional and len(variable.shape) <= 1:
            return False
        return super()._use_weight_decay(variable)

    def get_config(self):
        config = super().get_config()
        config.update(exclude_one_dimensional=self.exclude_one_dimensional, exclude_names=list(self.exclude_names))
        return config
