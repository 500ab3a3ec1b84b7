"""Convolutional building blocks of the VQGAN encoder and decoder (`keras.ops` only).

MaskGIT's VQGAN (Chang et al., 2022; `maskgit/nets/vqgan_tokenizer.py`), which UPGen uses
as is and ITIT's tokenizer follows (ITIT App. B), is built from three pieces:

* `ResBlock`: GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> conv3x3, plus a
  1x1 projection of the shortcut when the width changes (no attention blocks: MaskGIT
  dropped the attention layers of Esser et al.'s VQGAN);
* `Downsample`: 2x2 average pooling (MaskGIT's default) or a 4x4 stride-2 convolution;
* `Upsample`: nearest-neighbour x2 then conv3x3.

Every layer creates its weights in `build(input_shape)`, so a model is built from shapes
alone (no forward pass: a 256px tokenizer builds in milliseconds for `--dry_run`).
Images are NHWC.
"""

from __future__ import annotations

import keras
from keras import ops


def group_norm(channels: int, num_groups: int, name: str, dtype=None) -> keras.layers.GroupNormalization:
    """GroupNorm with `num_groups` groups, or fewer when `channels` is not divisible.

    The largest divisor of `channels` not above `num_groups` keeps narrow tiny models
    valid with the MaskGIT default of 32 groups.
    """
    groups = max(g for g in range(1, min(num_groups, channels) + 1) if channels % g == 0)
    return keras.layers.GroupNormalization(groups=groups, epsilon=1e-6, name=name, dtype=dtype)


class LayerChain(keras.layers.Layer):
    """A layer holding a sequence of sub-layers, each as an attribute named after it.

    Not a Python list: Keras 3 tracks list-held layers itself, but `tf.train.Checkpoint`
    (the trainer's checkpoints) does not see into such lists, so their variables would
    reach a checkpoint only through the optimizer's references, and non-trainable ones
    not at all. Sub-layer names must be unique within the chain.
    """

    def _set_chain(self, layers) -> None:
        self.chain_names = tuple(layer.name for layer in layers)
        if len(set(self.chain_names)) != len(self.chain_names):
            raise ValueError(f"{type(self).__name__}: sub-layer names must be unique, got {self.chain_names}")
        for layer in layers:
            setattr(self, layer.name, layer)

    @property
    def chain(self) -> list:
        """The sub-layers, in order."""
        return [getattr(self, name) for name in self.chain_names]


def build_chain(layers, shape):
    """Builds `layers` in order from `shape`; returns the output shape."""
    for layer in layers:
        layer.build(shape)
        shape = layer.compute_output_shape(shape)
    return shape


def _conv(filters: int, kernel_size: int, name: str, dtype, strides: int = 1, padding: str = "same"):
    return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="mmt")
class ResBlock(keras.layers.Layer):
    """Pre-activation residual block with GroupNorm and swish (MaskGIT's `ResBlock`).

    Args:
      filters: output channels.
      num_groups: GroupNorm groups (MaskGIT: 32; see `group_norm`).
      shortcut_from: what the 1x1 shortcut projects when the width changes: "input"
        (the block's input, Esser et al.) or "branch" (the residual branch's output,
        as MaskGIT's released `vqgan_tokenizer.ResBlock` does: `x + conv1x1(x)`;
        needed to import its checkpoint).

    Call: float `[B, H, W, C]` -> float `[B, H, W, filters]`.
    """

    SHORTCUTS = ("input", "branch")

    def __init__(self, filters: int, num_groups: int = 32, shortcut_from: str = "input", **kwargs):
        super().__init__(**kwargs)
        if shortcut_from not in self.SHORTCUTS:
            raise ValueError(f"ResBlock.shortcut_from must be one of {self.SHORTCUTS}, got {shortcut_from!r}")
        self.filters = int(filters)
        self.num_groups = int(num_groups)
        self.shortcut_from = shortcut_from
        policy = self.dtype_policy
        self.norm1 = None  # built with the input width
        self.conv1 = _conv(self.filters, 3, "conv1", policy)
        self.norm2 = group_norm(self.filters, self.num_groups, "norm2", policy)
        self.conv2 = _conv(self.filters, 3, "conv2", policy)
        self.shortcut = None

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.norm1 = group_norm(channels, self.num_groups, "norm1", self.dtype_policy)
        self.norm1.build(input_shape)
        self.conv1.build(input_shape)
        out_shape = (*input_shape[:-1], self.filters)
        self.norm2.build(out_shape)
        self.conv2.build(out_shape)
        if channels != self.filters:
            self.shortcut = _conv(self.filters, 1, "shortcut", self.dtype_policy)
            self.shortcut.build(input_shape if self.shortcut_from == "input" else out_shape)
        self.built = True

    def call(self, x):
        h = self.conv1(ops.silu(self.norm1(x)))
        h = self.conv2(ops.silu(self.norm2(h)))
        if self.shortcut is None:
            return h + x
        return h + self.shortcut(x if self.shortcut_from == "input" else h)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        config = {**super().get_config(), "filters": self.filters, "num_groups": self.num_groups}
        if self.shortcut_from != "input":  # configs saved before the option stay unchanged
            config["shortcut_from"] = self.shortcut_from
        return config


@keras.saving.register_keras_serializable(package="mmt")
class Downsample(keras.layers.Layer):
    """Halves height and width.

    Args:
      mode: "avg_pool" (2x2 average pooling, MaskGIT's `conv_downsample=False`) or
        "conv" (4x4 convolution with stride 2, keeping the width).

    Call: float `[B, H, W, C]` -> float `[B, H/2, W/2, C]` (H, W even).
    """

    MODES = ("avg_pool", "conv")

    def __init__(self, mode: str = "avg_pool", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"Downsample.mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.conv = None

    def build(self, input_shape):
        if self.mode == "conv":
            self.conv = _conv(int(input_shape[-1]), 4, "conv", self.dtype_policy, strides=2)
            self.conv.build(input_shape)
        self.built = True

    def call(self, x):
        if self.conv is not None:
            return self.conv(x)
        return ops.average_pool(x, pool_size=2, strides=2, padding="valid")

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        return (b, None if h is None else h // 2, None if w is None else w // 2, c)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="mmt")
class Upsample(keras.layers.Layer):
    """Doubles height and width: nearest-neighbour repeat, then conv3x3 (MaskGIT).

    Call: float `[B, H, W, C]` -> float `[B, 2H, 2W, C]`.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = None

    def build(self, input_shape):
        self.conv = _conv(int(input_shape[-1]), 3, "conv", self.dtype_policy)
        b, h, w, c = input_shape
        self.conv.build((b, None if h is None else 2 * h, None if w is None else 2 * w, c))
        self.built = True

    def call(self, x):
        x = ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
        return self.conv(x)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        return (b, None if h is None else 2 * h, None if w is None else 2 * w, c)


__all__ = ["Downsample", "LayerChain", "ResBlock", "Upsample", "build_chain", "group_norm"]
