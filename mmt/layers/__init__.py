"""Transformer building blocks shared by every mmt model.

`keras.ops` / `keras.layers` / `mmt.backend` only: importing this package imports
neither TensorFlow nor gin, so models built from it run under any Keras backend
(`KERAS_BACKEND=jax` included).
"""

from mmt.layers.attention import (
    MultiHeadAttention,
    causal_mask,
    combine_masks,
    dalle_column_mask,
    dalle_conv_mask,
    dalle_row_mask,
    full_mask,
    mask_value,
    masked_softmax,
    padding_mask,
    prefix_mask,
)
from mmt.layers.dropout import Dropout
from mmt.layers.embeddings import (
    LearnedPositionEmbedding,
    ModalityEmbedding,
    TokenEmbedding,
    sinusoidal_positions,
    sinusoidal_positions_2d,
)
from mmt.layers.heads import LogitsHead
from mmt.layers.transformer import Mlp, TransformerBlock, TransformerStack

__all__ = [
    "Dropout",
    "LearnedPositionEmbedding",
    "LogitsHead",
    "Mlp",
    "ModalityEmbedding",
    "MultiHeadAttention",
    "TokenEmbedding",
    "TransformerBlock",
    "TransformerStack",
    "causal_mask",
    "combine_masks",
    "dalle_column_mask",
    "dalle_conv_mask",
    "dalle_row_mask",
    "full_mask",
    "mask_value",
    "masked_softmax",
    "padding_mask",
    "prefix_mask",
    "sinusoidal_positions",
    "sinusoidal_positions_2d",
]
