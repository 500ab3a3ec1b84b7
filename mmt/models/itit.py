"""ITIT's network: image-text encoder, MAGE-style image decoder, GIT-style text decoder.

ITIT §3.1 and App. B. Images are VQ token grids `int32 [B, K]` (K = h*w, row-major);
text is ids `int32 [B, L]` (pieces, EOS, padding) turned into features by a text encoder
(frozen T5 at scale, a small trainable one in tiny configs).

* **Encoder** (a ViT): [embeddings of the kept image tokens; projected text features].
  The masking ratio is always >= 0.5, so a fixed number `K_drop` of *masked* tokens is
  dropped from its input (128 of 256 in the paper), as in MAE: static shapes, half the
  cost. The rest of the masked tokens enter as the [MASK] embedding.
* **Image decoder** (MAGE, 8 blocks): the encoder's image features padded back to K with
  a learned mask token at the dropped positions, plus the text features; predicts every
  image token.
* **Text decoder** (GIT, 6 blocks): [encoder features; text embeddings] under GIT's mask
  (features attend to each other; each text token to all features and earlier text);
  predicts the next token, logits tied to the text embedding.

A "soft" image (`[B, K, V]` one-hot-like distribution from a straight-through or
Gumbel estimator) can replace integer tokens wherever the cycles need gradients
through a synthesized image (ITIT §3.2).
"""

from __future__ import annotations

import keras
from keras import ops

from mmt.layers import (
    LearnedPositionEmbedding,
    TokenEmbedding,
    TransformerStack,
    combine_masks,
    padding_mask,
    prefix_mask,
)
from mmt.layers import masking
from mmt.models.text_encoders import T5TextEncoder, TrainableTextEncoder
from mmt.models.variants import ITITSize, itit_size


@keras.saving.register_keras_serializable(package="mmt")
class ITIT(keras.Model):
    """The ITIT network.

    Args:
      size: a name of `mmt.models.variants.ITIT_SIZES` ("tiny", "B", "L", "H").
      image_vocab_size: VQ codes `V_i` (8192 in the paper); id `V_i` is [MASK].
      grid: the token grid (h, w) (16 x 16 in the paper).
      text_vocab_size: text vocabulary `V_t` (ignored with a T5 preset: T5's).
      text_length: static text length L (64 in the paper).
      text_encoder: "trainable", or the path of a local keras-hub T5 preset.
      text_encoder_dtype: dtype of a preset's frozen weights (e.g. "bfloat16"); None:
        the model's policy.
      drop_ratio: fraction of image tokens dropped from the encoder input (0.5).
      dropout: inside every transformer block (0.1 in Table 3).
      drop_path: stochastic depth of every stack, rising linearly to this rate over its
        blocks (not in the paper; 0 by default).
      bos_id, eos_id, pad_id: text conventions (mmt.tokenizers.text).
      size_overrides: fields of `ITITSize` to change.
    """

    def __init__(self, size: str = "tiny", image_vocab_size: int = 1024, grid=(16, 16),
                 text_vocab_size: int = 256, text_length: int = 64, text_encoder: str = "trainable",
                 text_encoder_dtype: str | None = None,
                 drop_ratio: float = 0.5, dropout: float = 0.0, drop_path: float = 0.0, bos_id: int = 3, eos_id: int = 1,
                 pad_id: int = 0, size_overrides=None, **kwargs):
        super().__init__(**kwargs)
        self.size_name, self.size_overrides = size, dict(size_overrides or {})
        cfg: ITITSize = itit_size(size, **self.size_overrides)
        self.cfg = cfg
        self.image_vocab_size, self.grid = int(image_vocab_size), tuple(int(g) for g in grid)
        self.num_image_tokens = self.grid[0] * self.grid[1]
        if not 0.0 <= drop_ratio <= 0.5:
            raise ValueError(f"drop_ratio must be in [0, 0.5] (masking ratio is >= 0.5), got {drop_ratio}")
        self.drop_ratio = float(drop_ratio)
        self.num_dropped = int(self.num_image_tokens * drop_ratio)
        self.text_length, self.dropout, self.drop_path = int(text_length), float(dropout), float(drop_path)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.mask_id = self.image_vocab_size
        self.text_encoder_spec, self.text_encoder_dtype = text_encoder, text_encoder_dtype
        if text_encoder == "trainable":
            self.text_encoder = TrainableTextEncoder(
                text_vocab_size, text_length, cfg.text_encoder_width or cfg.encoder_width,
                cfg.text_encoder_depth, cfg.encoder_heads, pad_id=pad_id, dropout=dropout, name="text_encoder")
            self.text_vocab_size = int(text_vocab_size)
        else:
            self.text_encoder = T5TextEncoder(text_encoder, pad_id=pad_id, weights_dtype=text_encoder_dtype,
                                              name="text_encoder")
            self.text_vocab_size = self.text_encoder.vocab_size
        width, dec = cfg.encoder_width, cfg.decoder_width
        # Encoder.
        self.image_embedding = TokenEmbedding(self.image_vocab_size + 1, width, use_bias=False, name="image_embedding")
        self.image_position = LearnedPositionEmbedding(self.num_image_tokens, width, name="image_position")
        self.text_projection = keras.layers.Dense(width, name="text_projection")
        self.encoder = TransformerStack(cfg.encoder_depth, cfg.encoder_heads, cfg.mlp_ratio * width,
                                        dropout=dropout, drop_path=drop_path, name="encoder")
        # Image decoder (MAGE).
        self.image_decoder_projection = keras.layers.Dense(dec, name="image_decoder_projection")
        self.image_decoder_position = LearnedPositionEmbedding(self.num_image_tokens, dec, name="image_decoder_position")
        self.image_decoder = TransformerStack(cfg.image_decoder_depth, cfg.decoder_heads, cfg.mlp_ratio * dec,
                                              dropout=dropout, drop_path=drop_path, name="image_decoder")
        self.image_head = keras.layers.Dense(self.image_vocab_size, dtype="float32", name="image_head")
        # Text decoder (GIT).
        self.text_decoder_projection = keras.layers.Dense(dec, name="text_decoder_projection")
        self.text_embedding = TokenEmbedding(self.text_vocab_size, dec, use_bias=True, logits_dtype="float32",
                                             name="text_embedding")
        self.text_decoder_position = LearnedPositionEmbedding(self.text_length, dec, name="text_decoder_position")
        self.text_decoder = TransformerStack(cfg.text_decoder_depth, cfg.decoder_heads, cfg.mlp_ratio * dec,
                                             dropout=dropout, drop_path=drop_path, name="text_decoder")

    def build(self, input_shape=None):
        self.image_decoder_mask_token = self.add_weight(
            shape=(self.cfg.decoder_width,), initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="image_decoder_mask_token")
        super().build(input_shape)

    # -- pieces ------------------------------------------------------------------------

    def encode_text(self, ids, training=False):
        """int32 [B, L] -> (features [B, L, Dt], valid bool [B, L])."""
        return self.text_encoder(ids, training=training)

    def encode_soft_text(self, one_hot, valid, training=False):
        """float [B, L, V_t] (straight-through one-hot), bool [B, L] -> features, valid."""
        return self.text_encoder.call_soft(one_hot, valid, training=training)

    #: Text positions of the empty caption: its one valid position (EOS).
    empty_text_length = 1

    def empty_text(self, batch_size: int):
        """The empty caption (I2T, I2I and guidance, App. B): [EOS] int32 [B, 1].

        Its padding is left out rather than carried as `text_length - 1` masked slots:
        padded positions are masked as keys everywhere (text encoder, encoder, both
        decoders) and their outputs are never read, so they would change nothing but the
        cost -- a third of the encoder's tokens at the paper's 128 + 64.
        """
        return ops.full((batch_size, self.empty_text_length), self.eos_id, "int32")

    def keep_order(self, mask, seed=None):
        """Which image positions enter the encoder, masked ones dropped first.

        Args:
          mask: bool [B, K], True where the token is masked; at least `num_dropped`
            per row (masking ratio >= drop_ratio).
          seed: for the random order among masked tokens; None (inference) uses a
            fixed order that spreads the dropped positions over the grid.

        Returns:
          int32 [B, K]: a permutation of positions -- unmasked first, then masked in
          random order; the first `K - num_dropped` are kept.
        """
        return masking.keep_order(mask, seed)

    def embed_image(self, tokens=None, soft=None, mask=None, order=None):
        """Encoder input for the image: float [B, K_in, D] in `order`'s first K_in positions.

        Args:
          tokens: int32 [B, K] ids, or
          soft: float [B, K, V_i] distributions over codes (a synthesized image).
          mask: bool [B, K]; masked positions get the [MASK] embedding. None: none.
          order: int32 [B, K] from `keep_order` (drop `num_dropped`); None keeps all K
            positions in place (inference).
        """
        if not self.image_embedding.built:
            self.image_embedding.build()
        table = ops.cast(self.image_embedding.embeddings, self.compute_dtype)  # [V_i + 1, D]
        if soft is not None:
            x = ops.matmul(ops.cast(soft, table.dtype), table[: self.image_vocab_size])
            if mask is not None:
                x = ops.where(mask[..., None], table[self.mask_id][None, None], x)
        else:
            ids = tokens if mask is None else ops.where(mask, self.mask_id, tokens)
            x = self.image_embedding(ids)
        x = self.image_position(x)
        if order is None:
            return x
        return masking.gather_kept(x, order, self.num_image_tokens - self.num_dropped)

    def encode(self, image_input, text_features, text_valid, training=False):
        """[image_input; projected text] through the encoder.

        Returns:
          z float [B, K_in + L, D] and valid bool [B, K_in + L].
        """
        text = self.text_projection(ops.cast(text_features, self.compute_dtype))
        x = ops.concatenate([ops.cast(image_input, self.compute_dtype), text], axis=1)
        batch, kept = ops.shape(image_input)[0], ops.shape(image_input)[1]
        valid = ops.concatenate([ops.ones((batch, kept), "bool"), ops.cast(text_valid, "bool")], axis=1)
        return self.encoder(x, mask=padding_mask(valid), training=training), valid

    def image_logits(self, z, valid, order=None, training=False):
        """Image decoder: z [B, K_in + L, D] -> logits float32 [B, K, V_i].

        `order` restores the dropped positions (with the learned mask token); None when
        the encoder saw all K positions in place.
        """
        k = self.num_image_tokens
        x = self.image_decoder_projection(z)
        kept = k if order is None else k - self.num_dropped  # then the text, of any length
        image, text = x[:, :kept], x[:, kept:]
        if order is not None:
            image = masking.restore_order(image, order, self.image_decoder_mask_token)
        image = self.image_decoder_position(image)
        x = ops.concatenate([image, text], axis=1)
        full_valid = ops.concatenate([ops.ones((ops.shape(x)[0], k), "bool"), valid[:, kept:]], axis=1)
        x = self.image_decoder(x, mask=padding_mask(full_valid), training=training)
        return self.image_head(x[:, :k])

    def text_decoder_inputs(self, text_ids):
        """[BOS] + ids[:, :-1]: int32 [B, L] (teacher forcing)."""
        bos = ops.full((ops.shape(text_ids)[0], 1), self.bos_id, "int32")
        return ops.concatenate([bos, ops.cast(text_ids[:, :-1], "int32")], axis=1)

    def text_logits(self, z, valid, decoder_input, training=False):
        """Text decoder (GIT): features [B, P, D] + input ids [B, L] -> logits float32 [B, L, V_t].

        Logits at position l predict token l (the input is shifted by BOS).
        """
        prefix = self.text_decoder_projection(z)
        p, length = ops.shape(prefix)[1], ops.shape(decoder_input)[1]
        text = self.text_decoder_position(self.text_embedding(decoder_input))
        x = ops.concatenate([prefix, ops.cast(text, prefix.dtype)], axis=1)
        key_valid = ops.concatenate([valid, ops.ones((ops.shape(x)[0], length), "bool")], axis=1)
        mask = combine_masks(prefix_mask(p, p + length)[None], padding_mask(key_valid))
        x = self.text_decoder(x, mask=mask, training=training)
        return self.text_embedding.attend(x[:, p:])

    # -- Keras ---------------------------------------------------------------------------

    def call(self, inputs, training=False):
        """Builds every part: {"image_tokens": [B, K], "text_ids": [B, L]} -> (image, text logits)."""
        tokens, ids = inputs["image_tokens"], inputs["text_ids"]
        features, text_valid = self.encode_text(ids, training=training)
        z, valid = self.encode(self.embed_image(tokens), features, text_valid, training=training)
        return (self.image_logits(z, valid, training=training),
                self.text_logits(z, valid, self.text_decoder_inputs(ids), training=training))

    def build_all(self, batch_size: int = 1):
        self(
            {"image_tokens": ops.zeros((batch_size, self.num_image_tokens), "int32"),
             "text_ids": ops.zeros((batch_size, self.text_length), "int32")}
        )

    def get_config(self):
        return {**super().get_config(), "size": self.size_name, "image_vocab_size": self.image_vocab_size,
                "grid": list(self.grid), "text_vocab_size": self.text_vocab_size, "text_length": self.text_length,
                "text_encoder": self.text_encoder_spec, "text_encoder_dtype": self.text_encoder_dtype,
                "drop_ratio": self.drop_ratio, "dropout": self.dropout, "drop_path": self.drop_path,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "size_overrides": self.size_overrides}
