"""DALL-E's stage-two prior: a decoder-only sparse transformer over [text; image tokens].

Ramesh et al. (2021), §2.2 and App. B.1. One stream of `L + N` positions,

    position  [ 0 .. L-1: caption slot              ][ L .. L+N-1: image, raster order ]
    token     [ BPE ids, a learned pad per position ][ dVAE codes                       ]
    embedding [ token + learned position, or pad_p  ][ code + row_r + column_c          ]

modelled left to right: the output at position `p` predicts the token at `p + 1`.

* **Per-position padding** (§2.2): where the caption is shorter than its slot (the id
  is `pad_id`) position `p` holds its own learned pad vector `pad_p` instead of a
  token; "an empty position still carries information", and every image token sees
  a full slot.
* **Start of image**: the caption slot's last position (a pad, or the caption's last
  token) predicts the first image token, so image token 0 is generated from the
  whole text alone; no extra position is needed (the paper's 256 + 1024 = 1280).
  The first text token is not predicted (nothing precedes it); the text loss covers
  tokens 1 .. L-1 that are not padding, EOS included.
* **Image embeddings** (App. B.1, Fig. 10): each code embedding is summed with a
  learned row and column embedding (broadcast over the grid).
* **Attention** (§2.2, App. B.1, Fig. 11): one joint softmax over text and image keys
  (footnote 7); text-to-text causal, every image token sees all text, and
  image-to-image by the layer's kind. Layer pattern, App. B.1 (arXiv:2102.12092,
  Fig. 11 and its paragraph): "The convolutional attention mask is only used in the last self-attention
  layer. Otherwise, given the index i of a self-attention layer (with i in [1, 63]),
  we use the column attention mask if i - 2 mod 4 = 0, and row attention otherwise.
  E.g., the first four self-attention layers use row, column, row, row" --
  `layer_kinds`. The masks are `mmt.layers.attention.dalle_{row,column,conv}_mask`,
  built once per kind as static numpy booleans.
* Separate output layers for text (`V_t`) and image (`V_i`) logits: each loss is a
  softmax over its own vocabulary (§2.2 weighs the two cross-entropies separately).

Decoding (`sample_image_tokens`) runs `mmt.sampling.sample_decode` over the
`[L + N]` buffer with the caption as start tokens: KV-cached (one position per step,
that position's row of each layer's mask), or recomputing the whole buffer each step
(`use_cache=False`, the reference the cache is tested and timed against).
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
from keras import ops

from mmt.layers import LearnedPositionEmbedding, LogitsHead, TokenEmbedding, TransformerStack
from mmt.layers.attention import dalle_column_mask, dalle_conv_mask, dalle_row_mask
from mmt.models.variants import DALLESize, dalle_size
from mmt.sampling.autoregressive import sample_decode

ROW, COLUMN, CONV = "row", "column", "conv"
LAYER_KINDS = (ROW, COLUMN, CONV)


def layer_kinds(depth: int) -> list[str]:
    """The image-to-image mask of each layer, App. B.1: conv last, column where (i - 2) % 4 == 0.

    `i` counts layers from 1; the paper's 64 layers give row, column, row, row, row,
    column, ..., and conv at layer 64. Returns a list of `depth` kinds.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    kinds = [COLUMN if (i - 2) % 4 == 0 else ROW for i in range(1, depth)]
    return kinds + [CONV]


def kind_masks(text_length: int, grid, kernel: int = 11, wraparound: bool = True) -> dict[str, np.ndarray]:
    """kind -> bool `[L + N, L + N]` numpy mask (True = may attend), App. B.1 Fig. 11."""
    return {
        ROW: np.asarray(ops.convert_to_numpy(dalle_row_mask(text_length, grid)), bool),
        COLUMN: np.asarray(ops.convert_to_numpy(dalle_column_mask(text_length, grid)), bool),
        CONV: np.asarray(ops.convert_to_numpy(dalle_conv_mask(text_length, grid, kernel, wraparound)), bool),
    }


@keras.saving.register_keras_serializable(package="mmt")
class DALLE(keras.Model):
    """The DALL-E transformer.

    Args:
      size: a name of `mmt.models.variants.DALLE_SIZES` ("tiny", "B", "12B").
      text_vocab_size: BPE vocabulary `V_t` (paper 16,384), special ids included.
      text_length: caption slot `L` (paper 256).
      image_vocab_size: dVAE codes `V_i` (paper 8,192).
      grid: image-token grid (h, w) (paper 32 x 32).
      pad_id: the text padding id: positions holding it get their learned pad vector.
      conv_kernel: side of the last layer's causal convolutional mask (paper 11).
      conv_wraparound: measure the convolutional window in raster offsets, wrapping
        across row ends like the row mask (Fig. 11d); False clips it at the border.
      layer_pattern: None for App. B.1's `layer_kinds(depth)`, or a sequence of
        `depth` kinds ("row", "column", "conv") for ablations.
      dropout: inside the blocks and on the input embeddings.
      size_overrides: fields of `DALLESize` to change.

    Call: `{"text_ids": int [B, L], "image_tokens": int [B, N] or [B, h, w]}` ->
    `(text_logits float32 [B, L - 1, V_t], image_logits float32 [B, N, V_i])`: the
    predictions of text tokens 1 .. L-1 and of image tokens 0 .. N-1.
    """

    def __init__(self, size: str = "tiny", text_vocab_size: int = 16384, text_length: int = 256,
                 image_vocab_size: int = 8192, grid=(32, 32), pad_id: int = 0, conv_kernel: int = 11,
                 conv_wraparound: bool = True, layer_pattern: Sequence[str] | None = None, dropout: float = 0.0,
                 size_overrides=None, **kwargs):
        super().__init__(**kwargs)
        self.size_name, self.size_overrides = size, dict(size_overrides or {})
        cfg: DALLESize = dalle_size(size, **self.size_overrides)
        self.cfg = cfg
        self.text_vocab_size, self.text_length = int(text_vocab_size), int(text_length)
        self.image_vocab_size = int(image_vocab_size)
        self.grid = tuple(int(g) for g in grid)
        self.num_image_tokens = self.grid[0] * self.grid[1]
        self.sequence_length = self.text_length + self.num_image_tokens
        self.pad_id, self.dropout = int(pad_id), float(dropout)
        self.conv_kernel, self.conv_wraparound = int(conv_kernel), bool(conv_wraparound)
        if self.text_length < 1:
            raise ValueError(f"text_length must be >= 1, got {text_length}")
        pattern = list(layer_pattern) if layer_pattern is not None else layer_kinds(cfg.depth)
        if len(pattern) != cfg.depth or set(pattern) - set(LAYER_KINDS):
            raise ValueError(f"layer_pattern must list {cfg.depth} kinds of {LAYER_KINDS}, got {pattern}")
        self.layer_pattern = pattern
        # Static masks, built once (one per kind; layers share them).
        self.masks = kind_masks(self.text_length, self.grid, self.conv_kernel, self.conv_wraparound)

        d = cfg.width
        self.text_embedding = TokenEmbedding(self.text_vocab_size, d, name="text_embedding")
        self.text_position = LearnedPositionEmbedding(self.text_length, d, name="text_position")
        # §2.2: "a special padding token separately for each of the 256 text positions".
        self.pad_embedding = LearnedPositionEmbedding(self.text_length, d, name="pad_embedding")
        self.image_embedding = TokenEmbedding(self.image_vocab_size, d, name="image_embedding")
        # App. B.1: "broadcasted row and column embeddings" for the image tokens.
        self.row_embedding = LearnedPositionEmbedding(self.grid[0], d, name="row_embedding")
        self.column_embedding = LearnedPositionEmbedding(self.grid[1], d, name="column_embedding")
        self.embedding_dropout = keras.layers.Dropout(dropout, name="embedding_dropout")
        self.transformer = TransformerStack(cfg.depth, cfg.heads, cfg.mlp_ratio * d, dropout=dropout,
                                            name="transformer")
        self.text_head = LogitsHead(self.text_vocab_size, name="text_head")
        self.image_head = LogitsHead(self.image_vocab_size, name="image_head")

    # -- layout --------------------------------------------------------------------------

    def sequence(self, text_ids, image_tokens=None):
        """int32 `[B, L + N]`: the caption slot then the image codes (zeros when None)."""
        text_ids = ops.cast(text_ids, "int32")
        if text_ids.shape[-1] is not None and text_ids.shape[-1] != self.text_length:
            raise ValueError(f"text_ids have length {text_ids.shape[-1]}, the model's text_length is "
                             f"{self.text_length} (the streams' text_length must match it)")
        batch = ops.shape(text_ids)[0]
        if image_tokens is None:
            image = ops.zeros((batch, self.num_image_tokens), "int32")
        else:
            image = ops.reshape(ops.cast(image_tokens, "int32"), (batch, self.num_image_tokens))
        return ops.concatenate([text_ids, image], axis=1)

    def layer_masks(self, rows=None) -> list:
        """One bool mask per layer: `[L + N, L + N]`, or with `rows` (int scalar, may be traced)
        that query row only, `[1, L + N]` (one decoding step)."""
        by_kind = {}
        for kind in set(self.layer_pattern):
            mask = ops.convert_to_tensor(self.masks[kind])
            by_kind[kind] = mask if rows is None else ops.take(mask, ops.reshape(rows, (1,)), axis=0)
        return [by_kind[kind] for kind in self.layer_pattern]

    # -- the network ---------------------------------------------------------------------

    def embed(self, tokens, offset=0, training=False):
        """Embeds tokens at absolute positions `offset .. offset + T - 1`.

        Args:
          tokens: int `[B, T]`: text ids at positions < L, image codes at the others.
          offset: int scalar (Python or traced): the position of `tokens[:, 0]`.

        Returns:
          float `[B, T, D]`.
        """
        tokens = ops.cast(tokens, "int32")
        length = tokens.shape[1]
        positions = ops.cast(offset, "int32") + ops.arange(length, dtype="int32")  # [T]
        is_text = positions < self.text_length
        text_pos = ops.minimum(positions, self.text_length - 1)
        image_pos = ops.clip(positions - self.text_length, 0, self.num_image_tokens - 1)
        text_ids = ops.where(is_text[None], ops.clip(tokens, 0, self.text_vocab_size - 1), 0)
        codes = ops.where(is_text[None], 0, ops.clip(tokens, 0, self.image_vocab_size - 1))
        # Text: token + position, or the position's own pad vector (§2.2).
        text = self.text_position(self.text_embedding(text_ids), positions=text_pos)
        zeros = ops.zeros_like(text[:1])
        pads = self.pad_embedding(zeros, positions=text_pos)  # [1, T, D]
        is_pad = ops.logical_and(is_text[None], ops.equal(tokens, self.pad_id))[..., None]
        text = ops.where(is_pad, pads, text)
        # Image: code + row + column (App. B.1, Fig. 10).
        image = self.image_embedding(codes)
        image = self.row_embedding(image, positions=image_pos // self.grid[1])
        image = self.column_embedding(image, positions=image_pos % self.grid[1])
        x = ops.where(is_text[None, :, None], text, image)
        return self.embedding_dropout(x, training=training)

    def hidden(self, tokens, training=False):
        """Final (normalised) features of the whole stream: int `[B, L + N]` -> float `[B, L + N, D]`."""
        return self.transformer(self.embed(tokens, training=training), mask=self.layer_masks(), training=training)

    def logits(self, tokens, training=False):
        """`(text float32 [B, L - 1, V_t], image float32 [B, N, V_i])` for a whole stream.

        Text logits at positions 0 .. L-2 predict text tokens 1 .. L-1; image logits at
        positions L-1 .. L+N-2 predict image tokens 0 .. N-1.
        """
        h = self.hidden(tokens, training=training)
        lt = self.text_length
        return self.text_head(h[:, :lt - 1]), self.image_head(h[:, lt - 1:lt - 1 + self.num_image_tokens])

    def step_logits(self, token, index, cache):
        """One cached decoding step (the `logits_fn` of `mmt.sampling.sample_decode`).

        Args:
          token: int32 `[B, 1]`, the token at position `index`.
          index: int32 scalar, its position.
          cache: float `[depth, B, 2, L + N, H, Dh]` (`init_cache`).

        Returns:
          (float32 `[B, V_i]` image logits of position `index + 1`, the updated cache).
        """
        x = self.embed(token, offset=index)
        h, cache = self.transformer(x, mask=self.layer_masks(rows=index), cache=cache, cache_index=index)
        return self.image_head(h[:, 0]), cache

    def buffer_logits(self, tokens, index):
        """One uncached decoding step: the whole `[B, L + N]` buffer recomputed, the image logits
        float32 `[B, V_i]` of position `index + 1` returned (fixed-buffer `logits_fn`)."""
        h = self.hidden(tokens)
        return self.image_head(ops.take(h, ops.reshape(index, (1,)), axis=1)[:, 0])

    def init_cache(self, batch_size: int, dtype=None):
        """Zeros float `[depth, B, 2, L + N, H, Dh]`."""
        return self.transformer.init_cache(batch_size, self.sequence_length, dtype)

    # -- Keras ---------------------------------------------------------------------------

    def call(self, inputs, training=False):
        return self.logits(self.sequence(inputs["text_ids"], inputs.get("image_tokens")), training=training)

    def build_all(self, batch_size: int = 1):
        self({"text_ids": ops.zeros((batch_size, self.text_length), "int32"),
              "image_tokens": ops.zeros((batch_size, self.num_image_tokens), "int32")})

    def get_config(self):
        return {**super().get_config(), "size": self.size_name, "text_vocab_size": self.text_vocab_size,
                "text_length": self.text_length, "image_vocab_size": self.image_vocab_size, "grid": list(self.grid),
                "pad_id": self.pad_id, "conv_kernel": self.conv_kernel, "conv_wraparound": self.conv_wraparound,
                "layer_pattern": list(self.layer_pattern), "dropout": self.dropout,
                "size_overrides": self.size_overrides}


def sample_image_tokens(model: DALLE, text_ids, seed, *, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, use_cache: bool = True):
    """Draws image tokens given captions, left to right (DALL-E §2.2; samples at temperature 1, §2.6).

    Args:
      model: a built `DALLE`.
      text_ids: int `[B, L]` caption slots (pieces, EOS, `pad_id`).
      seed: an int or a `keras.random.SeedGenerator` (`mmt.backend.FixedSeed`); the
        draws do not depend on `use_cache`, so both paths sample the same tokens.
      temperature: softmax temperature; 0 is greedy.
      top_k: sample among the `top_k` most likely codes only.
      top_p: nucleus sampling: among the smallest set of codes whose probability
        reaches `top_p`.
      use_cache: True: KV-cached decoding, one position per step with each layer's
        mask row of that position. False: every step recomputes the whole buffer (the
        reference; `N` full forward passes).

    Returns:
      int32 `[B, h, w]` image codes.
    """
    text_ids = ops.cast(text_ids, "int32")
    batch = text_ids.shape[0]
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if use_cache:
        tokens = sample_decode(model.step_logits, text_ids, model.sequence_length, None, 0,
                               cache=model.init_cache(batch), **kwargs)
    else:
        tokens = sample_decode(model.buffer_logits, text_ids, model.sequence_length, None, 0, **kwargs)
    return ops.reshape(tokens[:, model.text_length:], (batch, *model.grid))


__all__ = ["COLUMN", "CONV", "DALLE", "LAYER_KINDS", "ROW", "kind_masks", "layer_kinds", "sample_image_tokens"]
