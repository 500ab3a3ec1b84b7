"""Output heads (`keras.ops` only)."""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from mmt.layers.transformer import _gelu_or


@keras.saving.register_keras_serializable(package="mmt")
class LogitsHead(keras.layers.Layer):
    """Token logits, plain or MLM-style, returned in float32 by default.

    Plain: `[LayerNorm ->] Dense(V)`. MLM-style (`hidden_dim` set; BERT, MaskGIT's
    `MlmLayer`, MAGE): `Dense(hidden_dim) -> GELU -> LayerNorm -> output`, where the
    output is either an untied `Dense(V)` or, with `tie_embeddings=True`, the input
    embedding matrix `E [V, D]` plus the head's own per-token bias (MaskGIT ties them).

    Under mixed precision the matmuls run in the compute dtype (bf16) and the logits
    are cast to `output_dtype` so that softmax / cross-entropy see float32; build the
    layer with `dtype="float32"` to run the final matmul in float32 as well.

    Args:
      vocab_size: number of output classes `V`.
      hidden_dim: width of the MLM transform; None for a plain head.
      norm: LayerNorm the input first (plain head only; the MLM transform has its own).
      tie_embeddings: project with a `TokenEmbedding`'s matrix passed to `call`.
      norm_epsilon: LayerNorm epsilon.
      approximate_gelu: tanh GELU in the MLM transform.
      output_dtype: dtype of the returned logits; None keeps the compute dtype.
      kernel_initializer: for the Dense layers.

    Call args:
      x: float `[..., D]`.
      embedding: with `tie_embeddings`, a `TokenEmbedding` (or its float `[V, D]`
        matrix) whose width equals the head's output width.

    Returns:
      float `[..., V]` logits in `output_dtype`.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_dim: int | None = None,
        norm: bool = False,
        tie_embeddings: bool = False,
        norm_epsilon: float = 1e-6,
        approximate_gelu: bool = True,
        output_dtype: str | None = "float32",
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.hidden_dim = hidden_dim
        self.norm = norm
        self.tie_embeddings = tie_embeddings
        self.norm_epsilon = norm_epsilon
        self.approximate_gelu = approximate_gelu
        self.output_dtype = output_dtype
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        policy = self.dtype_policy
        self._act = _gelu_or("gelu", approximate_gelu)
        self.transform = None
        if hidden_dim is not None:
            self.transform = keras.layers.Dense(
                hidden_dim,
                kernel_initializer=self.kernel_initializer,
                name="transform",
                dtype=policy,
            )
        self.norm_layer = None
        if norm or hidden_dim is not None:
            self.norm_layer = keras.layers.LayerNormalization(
                epsilon=norm_epsilon, name="norm", dtype=policy
            )
        self.output_layer = None
        if not tie_embeddings:
            self.output_layer = keras.layers.Dense(
                vocab_size, kernel_initializer=self.kernel_initializer, name="logits", dtype=policy
            )

    def build(self, x_shape, embedding_shape=None):
        shape = tuple(x_shape)
        if self.transform is not None:
            self.transform.build(shape)
            shape = (*shape[:-1], self.hidden_dim)
        if self.norm_layer is not None:
            self.norm_layer.build(shape)
        if self.output_layer is not None:
            self.output_layer.build(shape)
        else:
            self.bias = self.add_weight(name="bias", shape=(self.vocab_size,), initializer="zeros")
        self.built = True

    def call(self, x, embedding=None):
        if self.transform is not None:
            x = self._act(self.transform(x))
        if self.norm_layer is not None:
            x = self.norm_layer(x)
        if self.output_layer is not None:
            logits = self.output_layer(x)
        else:
            if embedding is None:
                raise ValueError("tie_embeddings=True: pass embedding= to the head.")
            matrix = getattr(embedding, "embeddings", embedding)  # [V, D]
            matrix = ops.cast(matrix, self.compute_dtype)
            logits = ops.matmul(x, ops.transpose(matrix))
            logits = logits + ops.cast(self.bias, self.compute_dtype)
        return logits if self.output_dtype is None else ops.cast(logits, self.output_dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.vocab_size)

    def compute_output_spec(self, x, embedding=None):
        dtype = self.output_dtype or self.compute_dtype
        return keras.KerasTensor(self.compute_output_shape(x.shape), dtype=dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size,
            hidden_dim=self.hidden_dim,
            norm=self.norm,
            tie_embeddings=self.tie_embeddings,
            norm_epsilon=self.norm_epsilon,
            approximate_gelu=self.approximate_gelu,
            output_dtype=self.output_dtype,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


__all__: Sequence[str] = ("LogitsHead",)
