"""Token, position and modality-type embeddings (`keras.ops` only)."""

from __future__ import annotations

import math
from typing import Sequence

import keras
from keras import ops

# BERT / MaskGIT / MAGE initialise embeddings with N(0, 0.02) (truncated in MaskGIT).
_DEFAULT_EMBEDDING_INIT = {"class_name": "TruncatedNormal", "config": {"stddev": 0.02}}


class _ShapeFreeLayer(keras.layers.Layer):
    """A layer whose weights depend only on its constructor arguments.

    Keras rebuilds a loaded layer from the shapes of *all* tensor call arguments
    (`x_shape`, `positions_shape`, ...); these layers need none of them.
    """

    def build(self, input_shape=None):
        self._make_weights()
        self.built = True

    def build_from_config(self, config):
        self.build()


def sinusoidal_positions(length: int, dim: int, max_timescale: float = 10_000.0):
    """Fixed sinusoidal positions (Vaswani et al., 2017, §3.5; UPGen App. A).

    `P[p, 2i] = sin(p / max_timescale^(2i / dim))`, `P[p, 2i + 1] = cos(...)`.

    Returns:
      float32 `[length, dim]` (`dim` must be even).
    """
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}.")
    position = ops.arange(length, dtype="float32")[:, None]  # [L, 1]
    inv_freq = ops.exp(
        ops.arange(0, dim, 2, dtype="float32") * (-math.log(max_timescale) / dim)
    )  # [dim / 2]
    angles = position * inv_freq[None, :]  # [L, dim / 2]
    # Interleave sin/cos: [L, dim/2, 2] -> [L, dim].
    return ops.reshape(ops.stack([ops.sin(angles), ops.cos(angles)], axis=-1), (length, dim))


def sinusoidal_positions_2d(height: int, width: int, dim: int, max_timescale: float = 10_000.0):
    """Fixed 2-D sinusoidal positions of a row-major grid (MAE / M3AE's image patches).

    The first `dim / 2` channels are `sinusoidal_positions` of the row, the rest of the
    column, so neighbours in either direction have similar codes.

    Returns:
      float32 `[height * width, dim]` (`dim` must be divisible by 4).
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4, got {dim}.")
    rows = sinusoidal_positions(height, dim // 2, max_timescale)  # [h, D/2]
    cols = sinusoidal_positions(width, dim // 2, max_timescale)  # [w, D/2]
    rows = ops.repeat(rows, width, axis=0)  # [h*w, D/2]: row r for positions r*w .. r*w + w-1
    cols = ops.tile(cols, (height, 1))  # [h*w, D/2]
    return ops.concatenate([rows, cols], axis=-1)


@keras.saving.register_keras_serializable(package="mmt")
class TokenEmbedding(_ShapeFreeLayer):
    """Token lookup with an `attend` method for weight-tied output logits.

    MaskGIT and MAGE tie the output layer to the input embedding
    (`logits = h @ E^T + b`, with a per-token bias), which `attend` implements.

    Args:
      vocab_size: number of tokens `V`.
      dim: embedding width `D`.
      use_bias: give `attend` a learned per-token bias `[V]`.
      embeddings_initializer: defaults to truncated N(0, 0.02).
      logits_dtype: dtype `attend` returns its logits in ("float32" keeps the softmax
        and cross-entropy in full precision under mixed precision; None keeps the
        compute dtype).

    Call: int `[...]` ids -> float `[..., D]` (compute dtype).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        use_bias: bool = False,
        embeddings_initializer=_DEFAULT_EMBEDDING_INIT,
        logits_dtype: str | None = "float32",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.dim = dim
        self.use_bias = use_bias
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.logits_dtype = logits_dtype

    def _make_weights(self):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.vocab_size, self.dim),
            initializer=self.embeddings_initializer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.vocab_size,), initializer="zeros")

    def call(self, ids):
        table = ops.cast(self.embeddings, self.compute_dtype)
        return ops.take(table, ops.cast(ids, "int32"), axis=0)

    def attend(self, x):
        """Logits against the embedding matrix: float `[..., D]` -> `[..., V]`."""
        if not self.built:
            self.build()
        dtype = self.compute_dtype
        logits = ops.matmul(ops.cast(x, dtype), ops.transpose(ops.cast(self.embeddings, dtype)))
        if self.bias is not None:
            logits = logits + ops.cast(self.bias, dtype)
        return logits if self.logits_dtype is None else ops.cast(logits, self.logits_dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size,
            dim=self.dim,
            use_bias=self.use_bias,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
            logits_dtype=self.logits_dtype,
        )
        return config


@keras.saving.register_keras_serializable(package="mmt")
class LearnedPositionEmbedding(_ShapeFreeLayer):
    """Adds a learned position embedding `[1, T, D]` (ViT, GIT, DALL-E).

    Args:
      length: maximum number of positions.
      dim: width `D`.
      initializer: defaults to truncated N(0, 0.02).

    Call args:
      x: float `[B, T, D]`, `T <= length`.
      offset: optional int scalar (Python or tensor): use positions
        `offset .. offset + T - 1` (incremental decoding with a KV cache).
      positions: optional int `[T]` or `[B, T]` explicit positions (e.g. the visible
        patches of MAE/M3AE); overrides `offset`.

    Returns:
      float `[B, T, D]`, `x` plus the embeddings.
    """

    def __init__(self, length: int, dim: int, initializer=_DEFAULT_EMBEDDING_INIT, **kwargs):
        super().__init__(**kwargs)
        self.length = length
        self.dim = dim
        self.initializer = keras.initializers.get(initializer)

    def _make_weights(self):
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self.length, self.dim), initializer=self.initializer
        )

    def call(self, x, offset=None, positions=None):
        table = ops.cast(self.embeddings, x.dtype)
        t = x.shape[-2]
        if positions is not None:
            pos = ops.take(table, ops.cast(positions, "int32"), axis=0)
        elif offset is not None:
            start = (ops.cast(offset, "int32"), ops.zeros((), "int32"))
            pos = ops.slice(table, start, (t, self.dim))
        else:
            pos = table[:t]
        return x + pos

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            length=self.length,
            dim=self.dim,
            initializer=keras.initializers.serialize(self.initializer),
        )
        return config


@keras.saving.register_keras_serializable(package="mmt")
class ModalityEmbedding(_ShapeFreeLayer):
    """Adds a learned modality-type embedding per position (UPGen §3, from M3AE).

    Args:
      num_modalities: number of type ids (2 for image / text).
      dim: width `D`.
      initializer: defaults to truncated N(0, 0.02).

    Call args:
      x: float `[B, T, D]`.
      type_ids: int `[T]` (same layout for the batch) or `[B, T]`.

    Returns:
      float `[B, T, D]`.
    """

    def __init__(
        self, num_modalities: int, dim: int, initializer=_DEFAULT_EMBEDDING_INIT, **kwargs
    ):
        super().__init__(**kwargs)
        self.num_modalities = num_modalities
        self.dim = dim
        self.initializer = keras.initializers.get(initializer)

    def _make_weights(self):
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self.num_modalities, self.dim), initializer=self.initializer
        )

    def call(self, x, type_ids):
        table = ops.cast(self.embeddings, x.dtype)
        return x + ops.take(table, ops.cast(type_ids, "int32"), axis=0)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_modalities=self.num_modalities,
            dim=self.dim,
            initializer=keras.initializers.serialize(self.initializer),
        )
        return config


__all__: Sequence[str] = (
    "LearnedPositionEmbedding",
    "ModalityEmbedding",
    "TokenEmbedding",
    "sinusoidal_positions",
    "sinusoidal_positions_2d",
)
