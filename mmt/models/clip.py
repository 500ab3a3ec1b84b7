"""A small CLIP-style dual encoder: the contrastive reranker of DALL-E §2.6.

DALL-E reranks the transformer's samples with a pretrained contrastive model (Radford
et al., 2021): given a caption and a candidate image it scores how well they match, and
generation keeps the top k of N samples. mmt trains its own on the same paired data
(`mmt/tasks/clip.py`), so nothing is downloaded and any tokenizer's codes can be scored:

    image  --encode_image-->  [B, E] unit vectors  \
                                                     cosine x logit_scale  ->  score
    text   --encode_text--->  [B, E] unit vectors  /

* **Image encoder** over either image *tokens* (dVAE or VQ codes, `image_input="tokens"`:
  code embedding + learned positions, so a DALL-E or UPGen sample is scored without
  decoding it) or *pixels* (`image_input="pixels"`: ViT patches, `mmt/layers/patches.py`,
  which scores the decoded images of any text-to-image model whatever its tokenizer).
  A CLS token is prepended and its final feature is the image's (CLIP's ViT, §2.4);
  `image_pooling="mean"` averages the token features instead.
* **Text encoder** over text ids: a bidirectional transformer whose attention ignores
  padding keys, mean-pooled over the non-padding positions (EOS included). CLIP's text
  transformer is causal and reads the EOS position; a padding-aware mean is the
  bidirectional equivalent, and a caption's score does not depend on its padded length.
* **Projections** (no bias) to a shared `embed_dim`, then L2 normalisation (CLIP §2.3).
* **Temperature**: a learnable log-scale `log_logit_scale`, initialised to log(1 / 0.07)
  and clipped so the logits are never scaled by more than 100 (CLIP §2.5).

Sizes (`CLIP_SIZES`): "tiny" for shapes on 2 CPU cores; "B" is CLIP's ViT-B/32 (Radford
et al., 2021, Table 20: vision 12 x 768 with 12 heads, text 12 x 512 with 8 heads,
embedding 512).
"""

from __future__ import annotations

import dataclasses
import math

import keras
from keras import ops

from mmt.layers import LearnedPositionEmbedding, TokenEmbedding, TransformerStack, padding_mask
from mmt.layers.patches import LearnedToken, PatchEmbedding, patchify

IMAGE_INPUTS = ("tokens", "pixels")
IMAGE_POOLINGS = ("cls", "mean")
#: CLIP §2.5: temperature initialised to 0.07, logits scaled by at most 100.
INITIAL_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


@dataclasses.dataclass(frozen=True)
class CLIPSize:
    """Widths and depths of the two encoders and the shared embedding."""

    width: int
    depth: int
    heads: int
    text_width: int
    text_depth: int
    text_heads: int
    embed_dim: int
    mlp_ratio: int = 4


CLIP_SIZES = {
    "tiny": CLIPSize(width=128, depth=2, heads=4, text_width=128, text_depth=2, text_heads=4, embed_dim=128),
    # CLIP ViT-B/32 (Radford et al., 2021, Table 20).
    "B": CLIPSize(width=768, depth=12, heads=12, text_width=512, text_depth=12, text_heads=8, embed_dim=512),
}


def clip_size(name: str, **overrides) -> CLIPSize:
    """The named size with `overrides` applied (unknown names and fields fail with the choices)."""
    if name not in CLIP_SIZES:
        raise ValueError(f"unknown CLIP size {name!r}; choose one of {sorted(CLIP_SIZES)}")
    fields = {f.name for f in dataclasses.fields(CLIPSize)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown CLIP size fields {sorted(unknown)}; fields are {sorted(fields)}")
    return dataclasses.replace(CLIP_SIZES[name], **overrides)


def _unit(x):
    """float [B, E] -> float32 [B, E] of unit L2 norm (normalised in float32)."""
    x = ops.cast(x, "float32")
    return x / ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True) + 1e-12)


@keras.saving.register_keras_serializable(package="mmt")
class CLIP(keras.Model):
    """The dual encoder.

    Args:
      size: a name of `CLIP_SIZES` ("tiny", "B").
      image_input: "tokens" (int codes of an image tokenizer) or "pixels" (uint8 / float images).
      image_vocab_size, grid: the codes' vocabulary and (h, w) grid ("tokens").
      image_size, patch_size: square image side and ViT patch side ("pixels").
      text_vocab_size: text vocabulary, its special ids included.
      text_length: static text length T.
      pad_id: the text padding id (ignored by attention and pooling).
      image_pooling: "cls" (CLIP) or "mean" over the image tokens / patches.
      dropout: inside every transformer block.
      size_overrides: fields of `CLIPSize` to change.

    Call: `{"image_tokens" | "image": ..., "text_ids": int [B, T]}` -> (image, text)
    embeddings, float32 [B, E] each, unit norm.
    """

    def __init__(self, size: str = "tiny", image_input: str = "tokens", image_vocab_size: int = 512,
                 grid=(16, 16), image_size: int = 64, patch_size: int = 8, text_vocab_size: int = 256,
                 text_length: int = 32, pad_id: int = 0, image_pooling: str = "cls", dropout: float = 0.0,
                 size_overrides=None, **kwargs):
        super().__init__(**kwargs)
        if image_input not in IMAGE_INPUTS:
            raise ValueError(f"CLIP image_input must be one of {IMAGE_INPUTS}, got {image_input!r}")
        if image_pooling not in IMAGE_POOLINGS:
            raise ValueError(f"CLIP image_pooling must be one of {IMAGE_POOLINGS}, got {image_pooling!r}")
        self.size_name, self.size_overrides = size, dict(size_overrides or {})
        cfg = clip_size(size, **self.size_overrides)
        self.cfg = cfg
        self.image_input, self.image_pooling = image_input, image_pooling
        self.image_vocab_size, self.grid = int(image_vocab_size), tuple(int(g) for g in grid)
        self.image_size, self.patch_size = int(image_size), int(patch_size)
        self.text_vocab_size, self.text_length = int(text_vocab_size), int(text_length)
        self.pad_id, self.dropout = int(pad_id), float(dropout)
        if image_input == "tokens":
            self.num_image_positions = self.grid[0] * self.grid[1]
            self.image_embedding = TokenEmbedding(self.image_vocab_size, cfg.width, name="image_embedding")
        else:
            if self.image_size % self.patch_size:
                raise ValueError(f"CLIP image_size {self.image_size} is not a multiple of patch_size "
                                 f"{self.patch_size}")
            self.num_image_positions = (self.image_size // self.patch_size) ** 2
            self.image_embedding = PatchEmbedding(cfg.width, name="patch_embedding")
        self.image_positions = LearnedPositionEmbedding(self.num_image_positions, cfg.width, name="image_positions")
        self.cls_token = LearnedToken(cfg.width, name="cls_token") if image_pooling == "cls" else None
        self.image_encoder = TransformerStack(cfg.depth, cfg.heads, cfg.mlp_ratio * cfg.width, dropout=dropout,
                                              name="image_encoder")
        self.text_embedding = TokenEmbedding(self.text_vocab_size, cfg.text_width, name="text_embedding")
        self.text_positions = LearnedPositionEmbedding(self.text_length, cfg.text_width, name="text_positions")
        self.text_encoder = TransformerStack(cfg.text_depth, cfg.text_heads, cfg.mlp_ratio * cfg.text_width,
                                             dropout=dropout, name="text_encoder")
        # CLIP §2.3: linear projections (no bias) into the shared embedding space.
        self.image_projection = keras.layers.Dense(cfg.embed_dim, use_bias=False, name="image_projection")
        self.text_projection = keras.layers.Dense(cfg.embed_dim, use_bias=False, name="text_projection")
        # CLIP §2.5: "a learned temperature ... directly optimized as a log-parameterized
        # multiplicative scalar", initialised to 0.07 and clipped at a logit scale of 100.
        self.log_logit_scale = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(math.log(1.0 / INITIAL_TEMPERATURE)),
            name="log_logit_scale")

    # -- encoders ------------------------------------------------------------------------

    def image_features(self, images, training=False):
        """float [B, P, width]: the image embedded (codes or patches) with its positions.

        `images`: int [B, h, w] or [B, K] codes ("tokens"); uint8 or float in [0, 255]
        [B, H, W, 3] ("pixels", scaled to [-1, 1]).
        """
        if self.image_input == "tokens":
            tokens = ops.cast(images, "int32")
            tokens = ops.reshape(tokens, (ops.shape(tokens)[0], self.num_image_positions))  # [B, K]
            x = self.image_embedding(tokens)
        else:
            pixels = ops.cast(images, "float32") / 127.5 - 1.0
            x = self.image_embedding(patchify(pixels, self.patch_size))  # [B, (H/p)(W/p), width]
        return self.image_positions(x)

    def encode_image(self, images, training=False):
        """Images (see `image_features`) -> float32 [B, E] unit embeddings."""
        x = self.image_features(images, training=training)
        if self.cls_token is not None:
            cls = ops.cast(self.cls_token.tile(ops.shape(x)[0]), x.dtype)  # [B, 1, width]
            x = self.image_encoder(ops.concatenate([cls, x], axis=1), training=training)
            pooled = x[:, 0]
        else:
            pooled = ops.mean(self.image_encoder(x, training=training), axis=1)
        return _unit(self.image_projection(pooled))

    def text_valid(self, text_ids):
        """bool [B, T]: True at real text positions (pieces and EOS), False at padding."""
        return ops.not_equal(ops.cast(text_ids, "int32"), self.pad_id)

    def encode_text(self, text_ids, training=False):
        """int [B, T] text ids -> float32 [B, E] unit embeddings (padding-aware mean pooling)."""
        if text_ids.shape[-1] is not None and text_ids.shape[-1] != self.text_length:
            raise ValueError(f"text_ids have length {text_ids.shape[-1]}, the CLIP's text_length is "
                             f"{self.text_length} (the streams' text_length must match it)")
        valid = self.text_valid(text_ids)  # [B, T]
        x = self.text_positions(self.text_embedding(text_ids))
        x = self.text_encoder(x, mask=padding_mask(valid), training=training)  # keys: real tokens only
        weights = ops.cast(valid, x.dtype)[..., None]  # [B, T, 1]
        pooled = ops.sum(x * weights, axis=1) / ops.maximum(ops.sum(weights, axis=1), 1.0)  # [B, width]
        return _unit(self.text_projection(pooled))

    def logit_scale(self):
        """float32 scalar exp(log_logit_scale), at most `MAX_LOGIT_SCALE` (1 / temperature)."""
        return ops.exp(ops.minimum(ops.cast(self.log_logit_scale, "float32"), math.log(MAX_LOGIT_SCALE)))

    def similarity(self, image_embeddings, text_embeddings):
        """float32 [Nt, Ni]: logit_scale x cosine of every caption with every image."""
        return self.logit_scale() * ops.matmul(text_embeddings, ops.transpose(image_embeddings))

    def pair_scores(self, images, text_ids):
        """float32 [B]: logit_scale x cosine of each (image, caption) pair, row by row."""
        zi, zt = self.encode_image(images), self.encode_text(text_ids)
        return self.logit_scale() * ops.sum(zi * zt, axis=-1)

    # -- Keras ---------------------------------------------------------------------------

    @property
    def image_key(self) -> str:
        """The batch field the image encoder reads: "image_tokens" or "image"."""
        return "image_tokens" if self.image_input == "tokens" else "image"

    def call(self, inputs, training=False):
        return (self.encode_image(inputs[self.image_key], training=training),
                self.encode_text(inputs["text_ids"], training=training))

    def dummy_images(self, batch_size: int = 1):
        if self.image_input == "tokens":
            return ops.zeros((batch_size, *self.grid), "int32")
        return ops.zeros((batch_size, self.image_size, self.image_size, 3), "uint8")

    def build_all(self, batch_size: int = 1):
        self({self.image_key: self.dummy_images(batch_size),
              "text_ids": ops.zeros((batch_size, self.text_length), "int32")})

    def get_config(self):
        return {**super().get_config(), "size": self.size_name, "image_input": self.image_input,
                "image_vocab_size": self.image_vocab_size, "grid": list(self.grid), "image_size": self.image_size,
                "patch_size": self.patch_size, "text_vocab_size": self.text_vocab_size,
                "text_length": self.text_length, "pad_id": self.pad_id, "image_pooling": self.image_pooling,
                "dropout": self.dropout, "size_overrides": self.size_overrides}


__all__ = ["CLIP", "CLIPSize", "CLIP_SIZES", "IMAGE_INPUTS", "INITIAL_TEMPERATURE", "MAX_LOGIT_SCALE", "clip_size"]
