"""Text features for ITIT: a frozen T5 encoder (keras-hub) or a small trainable encoder.

Both take int ids `[B, L]` and return `(features float [B, L, D], valid bool [B, L])`, and
both also accept a (straight-through) one-hot distribution over the vocabulary
`[B, L, V]` through `call_soft`, which the I2T2I cycle needs to pass gradients from the
image loss back into predicted text (ITIT §3.2).
"""

from __future__ import annotations

import keras
from keras import ops

from mmt.layers import LearnedPositionEmbedding, TokenEmbedding, TransformerStack


@keras.saving.register_keras_serializable(package="mmt")
class TrainableTextEncoder(keras.layers.Layer):
    """Token + position embeddings and a few bidirectional blocks (tiny configs).

    Args:
      vocab_size, max_length: the text vocabulary and the static text length.
      width, depth, num_heads: the encoder's size; depth 0 is embeddings + LayerNorm.
      pad_id: the padding id (padding keys are masked out).
      dropout: inside the blocks.
    """

    def __init__(self, vocab_size: int, max_length: int, width: int, depth: int, num_heads: int,
                 pad_id: int = 0, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.max_length, self.width = vocab_size, max_length, width
        self.depth, self.num_heads, self.pad_id, self.dropout = depth, num_heads, pad_id, dropout
        self.embedding = TokenEmbedding(vocab_size, width, name="embedding")
        self.position = LearnedPositionEmbedding(max_length, width, name="position")
        if depth:
            self.blocks = TransformerStack(depth, num_heads, 4 * width, dropout=dropout, name="blocks")
        else:
            self.norm = keras.layers.LayerNormalization(epsilon=1e-6, name="norm")

    @property
    def output_dim(self) -> int:
        return self.width

    def _encode(self, x, valid, training):
        x = self.position(x)
        if self.depth:
            x = self.blocks(x, mask=ops.expand_dims(valid, 1), training=training)
        else:
            x = self.norm(x)
        return x, valid

    def call(self, ids, training=False):
        valid = ops.not_equal(ids, self.pad_id)
        return self._encode(self.embedding(ids), valid, training)

    def call_soft(self, one_hot, valid, training=False):
        """one_hot float `[B, L, V]`, valid bool `[B, L]` -> features, valid."""
        if not self.embedding.built:
            self.embedding.build()
        table = ops.cast(self.embedding.embeddings, one_hot.dtype)
        return self._encode(ops.matmul(one_hot, table), valid, training)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "max_length": self.max_length,
                "width": self.width, "depth": self.depth, "num_heads": self.num_heads,
                "pad_id": self.pad_id, "dropout": self.dropout}


@keras.saving.register_keras_serializable(package="mmt")
class T5TextEncoder(keras.layers.Layer):
    """The encoder of a keras-hub T5 preset from a local directory, frozen (ITIT §4.1).

    ITIT embeds text with T5-XXL (length 64). `preset` is a directory written by
    `keras_hub.models.T5Backbone.save_to_preset` (or downloaded on a machine with
    network access); nothing is fetched here. Its SentencePiece vocabulary
    (`assets/tokenizer/vocabulary.spm`) is the text vocabulary of the whole run:
    `mmt.tokenizers.text.TextTokenizer.from_file(preset)` finds it.
    """

    def __init__(self, preset: str, pad_id: int = 0, **kwargs):
        super().__init__(**kwargs)
        import keras_hub  # imported here: tiny configs never need it

        self.preset, self.pad_id = preset, pad_id
        self.backbone = keras_hub.models.T5Backbone.from_preset(preset)
        self.backbone.trainable = False
        self.vocab_size = int(self.backbone.vocabulary_size)

    @property
    def output_dim(self) -> int:
        return int(self.backbone.hidden_dim)

    def _encode(self, x, valid, training):
        backbone = self.backbone
        mask = ops.expand_dims(ops.cast(valid, "int32"), 1)
        bias = None
        for layer in backbone.encoder_transformer_layers:
            x, bias = layer(x, attention_mask=mask, position_bias=bias, use_causal_mask=False, training=False)
        return backbone.encoder_layer_norm(x), valid

    def call(self, ids, training=False):
        valid = ops.not_equal(ids, self.pad_id)
        return self._encode(self.backbone.token_embedding(ids), valid, training)

    def call_soft(self, one_hot, valid, training=False):
        table = ops.cast(self.backbone.token_embedding.embeddings, one_hot.dtype)
        return self._encode(ops.matmul(one_hot, table), valid, training)

    def get_config(self):
        return {**super().get_config(), "preset": self.preset, "pad_id": self.pad_id}
