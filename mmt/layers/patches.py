"""Image patches and single learned tokens (ViT / MAE / M3AE), `keras.ops` only.

* `patchify` / `unpatchify`: images `[B, H, W, C]` <-> row-major patches
  `[B, (H/p)(W/p), p*p*C]` (ViT §3.1; MAE's pixel targets are these rows).
* `PatchEmbedding`: ViT's linear patch projection (a `p x p` stride-`p` convolution is
  the same map; a Dense over the flattened patch is what M3AE §3 describes).
* `LearnedToken`: one learned vector -- the CLS token the encoder prepends (ViT, M3AE
  §3) and the decoder's shared mask token (MAE §3, M3AE §3).
"""

from __future__ import annotations

import keras
from keras import ops

from mmt.layers.embeddings import _DEFAULT_EMBEDDING_INIT, _ShapeFreeLayer


def patchify(images, patch: int):
    """float [B, H, W, C] -> [B, (H/p) * (W/p), p * p * C], patches row-major, pixels (row, col, channel)."""
    b, h, w, c = images.shape
    b = ops.shape(images)[0] if b is None else b
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible into {patch}x{patch} patches")
    x = ops.reshape(images, (b, h // patch, patch, w // patch, patch, c))  # [B, gh, p, gw, p, C]
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))  # [B, gh, gw, p, p, C]
    return ops.reshape(x, (b, (h // patch) * (w // patch), patch * patch * c))


def unpatchify(patches, grid, patch: int, channels: int = 3):
    """[B, gh * gw, p * p * C] -> [B, gh * p, gw * p, C]: the inverse of `patchify`."""
    gh, gw = grid
    b = patches.shape[0]
    b = ops.shape(patches)[0] if b is None else b
    x = ops.reshape(patches, (b, gh, gw, patch, patch, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))  # [B, gh, p, gw, p, C]
    return ops.reshape(x, (b, gh * patch, gw * patch, channels))


@keras.saving.register_keras_serializable(package="mmt")
class PatchEmbedding(keras.layers.Layer):
    """Linear projection of flattened patches (ViT §3.1): float [B, N, p*p*C] -> [B, N, D].

    MAE initialises the projection like a Dense layer (xavier-uniform over the flattened
    kernel), which `glorot_uniform` is.
    """

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.projection = keras.layers.Dense(self.dim, kernel_initializer="glorot_uniform", name="projection",
                                             dtype=self.dtype_policy)

    def build(self, input_shape):
        self.projection.build(input_shape)
        self.built = True

    def call(self, patches):
        return self.projection(ops.cast(patches, self.compute_dtype))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.dim)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


@keras.saving.register_keras_serializable(package="mmt")
class LearnedToken(_ShapeFreeLayer):
    """One learned vector `[D]` (a CLS or mask token; MAE: N(0, 0.02)).

    Not called like a layer: `vector()` is the token in the compute dtype, `tile(batch)`
    a float `[batch, 1, D]` column of it (to prepend to a sequence).
    """

    def __init__(self, dim: int, initializer=_DEFAULT_EMBEDDING_INIT, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.initializer = keras.initializers.get(initializer)

    def _make_weights(self):
        self.token = self.add_weight(name="token", shape=(self.dim,), initializer=self.initializer)

    def vector(self, dtype=None):
        if not self.built:
            self.build()
        return ops.cast(self.token, dtype or self.compute_dtype)

    def tile(self, batch):
        return ops.broadcast_to(self.vector()[None, None], (batch, 1, self.dim))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim,
                "initializer": keras.initializers.serialize(self.initializer)}


__all__ = ["LearnedToken", "PatchEmbedding", "patchify", "unpatchify"]
