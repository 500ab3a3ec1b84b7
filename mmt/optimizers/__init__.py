"""Optimizers and learning-rate schedules (`keras.ops` only; no TensorFlow, no gin)."""

from mmt.optimizers.adafactor import Adafactor
from mmt.optimizers.adamw import AdamW
from mmt.optimizers.schedules import Constant, Rsqrt, WarmupCosine

__all__ = ["Adafactor", "AdamW", "Constant", "Rsqrt", "WarmupCosine"]
