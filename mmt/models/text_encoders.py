"""Text features for ITIT: a frozen T5 encoder (keras-hub) or a small trainable encoder.

Both take int ids `[B, L]` and return `(features float [B, L, D], valid bool [B, L])`, and
both also accept a (straight-through) one-hot distribution over the vocabulary
`[B, L, V]` through `call_soft`, which the I2T2I cycle needs to pass gradients from the
image loss back into predicted text (ITIT §3.2).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings

import keras
from keras import ops

from mmt.layers import LearnedPositionEmbedding, TokenEmbedding, TransformerStack


_SHAPE_ONLY = contextvars.ContextVar("mmt_frozen_encoders_shape_only", default=False)


@contextlib.contextmanager
def shape_only_frozen_encoders():
    """Inside, frozen preset encoders are built as shape-only stand-ins (`--dry_run`)."""
    token = _SHAPE_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPE_ONLY.reset(token)


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
    network access); nothing is fetched here. Only the encoder is built and read from
    the preset's weights file (`mmt.models.t5_preset`): no decoder weight is ever in
    memory. Its SentencePiece vocabulary (`assets/tokenizer/vocabulary.spm`) is the
    text vocabulary of the whole run: `mmt.tokenizers.text.TextTokenizer.from_file(preset)`
    finds it.

    Args:
      preset: the preset directory.
      pad_id: the padding id (padding keys are masked out).
      weights_dtype: dtype of the frozen weights and their compute (e.g. "bfloat16":
        half the memory of float32); None keeps the layer's policy.
      materialize: False builds a shape-only stand-in (no weights, zero features) whose
        sizes come from `config.json`: `--dry_run` reports a T5-XXL-sized run on a
        machine that cannot hold T5-XXL. None: False inside `shape_only_frozen_encoders()`.

    Attributes:
      fingerprint: sha256 of the config and of every encoder tensor read (None until
        the weights are loaded, and for a stand-in); checkpoints record it in place of
        the frozen weights.
    """

    def __init__(self, preset: str, pad_id: int = 0, weights_dtype: str | None = None,
                 materialize: bool | None = None, **kwargs):
        if weights_dtype:
            kwargs["dtype"] = weights_dtype
        super().__init__(**kwargs)
        from mmt.models import t5_preset

        self.preset, self.pad_id, self.weights_dtype = str(preset), pad_id, weights_dtype
        self.materialize = not _SHAPE_ONLY.get() if materialize is None else bool(materialize)
        self.config_values = t5_preset.read_config(preset)
        self.vocab_size = int(self.config_values["vocabulary_size"])
        self.fingerprint: str | None = None
        if self.materialize:
            self._create_layers()
        self.trainable = False

    def _create_layers(self):
        # keras-hub's own T5 layers, so the numerics are T5Backbone's; created with the
        # arguments T5Backbone gives its encoder.
        from keras_hub.layers import ReversibleEmbedding
        from keras_hub.src.models.t5.t5_layer_norm import T5LayerNorm  # no public alias
        from keras_hub.src.models.t5.t5_transformer_layer import T5TransformerLayer  # no public alias

        c = self.config_values
        policy = self.dtype_policy
        self.token_embedding = ReversibleEmbedding(self.vocab_size, c["hidden_dim"], tie_weights=True,
                                                   dtype=policy, name="token_embedding")
        self.encoder_layers = [
            T5TransformerLayer(
                is_decoder=False, hidden_dim=c["hidden_dim"], intermediate_dim=c["intermediate_dim"],
                key_value_dim=c.get("key_value_dim") or c["hidden_dim"] // c["num_heads"], dropout=0.0,
                activation=c.get("activation", "relu"), layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-6),
                num_heads=c["num_heads"], use_gated_activation=c.get("use_gated_activation", True),
                use_relative_attention_bias=i == 0, dtype=policy, name=f"layer_{i}")
            for i in range(int(c["num_layers"]))
        ]
        self.final_norm = T5LayerNorm(epsilon=c.get("layer_norm_epsilon", 1e-6), dtype=policy, name="final_norm")

    @property
    def output_dim(self) -> int:
        return int(self.config_values["hidden_dim"])

    @property
    def source(self) -> str:
        """Where the frozen weights come from (see `mmt.tasks.base.Task.frozen_parts`)."""
        return self.preset

    def parameter_count(self) -> int:
        """The encoder's parameters (counted from the config: no weights needed)."""
        from mmt.models import t5_preset

        return t5_preset.encoder_parameter_count(self.config_values)

    def build(self, input_shape=None):
        if self.materialize and not self.built:
            ids = ops.zeros((1, 2), "int32")
            self._encode(self.token_embedding(ids), ops.ones((1, 2), "bool"), training=False)  # creates variables
            self.load_preset_weights()
        self.built = True

    def load_preset_weights(self) -> None:
        """Reads the encoder's tensors from the preset (the decoder's are never read)."""
        from mmt.models import t5_preset

        digest = t5_preset.new_digest(self.preset)
        parts = {"token_embedding": self.token_embedding, "final_norm": self.final_norm,
                 **{f"layer_{i}": layer for i, layer in enumerate(self.encoder_layers)}}
        with t5_preset.open_weights(self.preset) as weights:
            for part, group in t5_preset.encoder_groups(len(self.encoder_layers)).items():
                if group not in weights:
                    raise t5_preset.PresetError(f"{self.preset}: {t5_preset.WEIGHTS_FILE} has no {group} ({part})")
                t5_preset.load_layer(parts[part], weights[group], digest)
        self.fingerprint = "sha256:" + digest.hexdigest()

    def _encode(self, x, valid, training):
        mask = ops.expand_dims(ops.cast(valid, "int32"), 1)
        bias = None
        with warnings.catch_warnings():
            # keras-hub's T5 attention warns that it drops Keras masks; padding reaches it
            # as `attention_mask` instead, so nothing is lost.
            warnings.filterwarnings("ignore", message=".*does not support masking", category=UserWarning)
            for layer in self.encoder_layers:
                x, bias = layer(x, attention_mask=mask, position_bias=bias, use_causal_mask=False, training=False)
        return self.final_norm(x), valid

    def _stand_in(self, shape, valid):
        return ops.zeros((*shape, self.output_dim), self.compute_dtype), valid

    def call(self, ids, training=False):
        valid = ops.not_equal(ids, self.pad_id)
        if not self.materialize:
            return self._stand_in(ops.shape(ids), valid)
        return self._encode(self.token_embedding(ids), valid, training)

    def call_soft(self, one_hot, valid, training=False):
        if not self.materialize:
            return self._stand_in(ops.shape(one_hot)[:-1], valid)
        table = ops.cast(self.token_embedding.embeddings, one_hot.dtype)
        return self._encode(ops.cast(ops.matmul(one_hot, table), self.compute_dtype), valid, training)

    def get_config(self):
        return {**super().get_config(), "preset": self.preset, "pad_id": self.pad_id,
                "weights_dtype": self.weights_dtype, "materialize": self.materialize}
