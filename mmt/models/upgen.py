"""UPGen's network: one encoder-only transformer over [VQ image tokens; text tokens].

UPGen §3 and App. A. A sequence is built from whichever modalities an example has --
`("image", "text")` for paired data, `("image",)` or `("text",)` for unpaired data --
in that order:

    ids       [ image codes (K = h*w, row-major) ][ text ids + V_i (L: pieces, EOS, pad) ]
    type      [ 0 ... 0                          ][ 1 ... 1                            ]
    position  [ 2-D sin/cos (row, column)        ][ sin/cos 0 .. L-1                   ]

over one *union vocabulary*: image codes `[0, V_i)`, text ids shifted to
`[V_i, V_i + V_t)`, and one [MASK] id `V_i + V_t` shared by both modalities. Positions
are fixed sinusoids (UPGen App. A): 2-D over the image grid, half the channels for the
row and half for the column (MAE and M3AE's image patches), 1-D over the text; the
learned modality-type embedding (UPGen §3, from M3AE) tells the two apart. Text
padding is an ordinary token: the model attends to it and, when masked, predicts it,
which is how image-to-text decoding chooses the caption's length.

Scale: the sinusoids have unit amplitude (rms 0.71 per channel), so token and type
embeddings are drawn from N(0, 1/D) and multiplied by sqrt(D) (Vaswani et al., 2017,
§3.4), putting all three terms on the same scale. With BERT's N(0, 0.02) tables instead,
the position term is ~35x larger than the token and type terms, image and text position
p look almost alike, and at the tiny scale the model learned to read the caption hardly
at all (image-token CE with the image fully masked: 2.575 with the right caption, 2.625
with none; README, "UPGen"). A full bidirectional `TransformerStack` (no attention
mask) and a linear projection give logits over the whole union vocabulary.

The masked-token objective (`mmt/tasks/upgen.py`) and the MaskGIT decoding in both directions
(`upgen_inference.py`) are built from the pieces here.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from mmt.layers import (LogitsHead, ModalityEmbedding, TokenEmbedding, TransformerStack, sinusoidal_positions,
                        sinusoidal_positions_2d)
from mmt.models.variants import UPGenSize, upgen_size

IMAGE, TEXT = "image", "text"
#: The streams' layouts: which modalities a sequence holds, in order.
PAIRED, IMAGE_ONLY, TEXT_ONLY = (IMAGE, TEXT), (IMAGE,), (TEXT,)
#: Modality-type ids (rows of the modality embedding).
TYPE_IDS = {IMAGE: 0, TEXT: 1}


@keras.saving.register_keras_serializable(package="mmt")
class UPGen(keras.Model):
    """The UPGen network.

    Args:
      size: a name of `mmt.models.variants.UPGEN_SIZES` ("tiny", "B", "L").
      image_vocab_size: VQ codes `V_i` (MaskGIT's VQGAN: 1024).
      grid: the token grid (h, w) (16 x 16 for 256 x 256 images).
      text_vocab_size: text vocabulary `V_t`, its special ids (pad, EOS) included.
      text_length: static text length L.
      dropout: inside every transformer block and on the input embeddings (0.1, App. A).
      pad_id, eos_id: text conventions (mmt.tokenizers.text), in text ids.
      size_overrides: fields of `UPGenSize` to change.
    """

    def __init__(self, size: str = "tiny", image_vocab_size: int = 1024, grid=(16, 16), text_vocab_size: int = 256,
                 text_length: int = 64, dropout: float = 0.0, pad_id: int = 0, eos_id: int = 1,
                 size_overrides=None, **kwargs):
        super().__init__(**kwargs)
        self.size_name, self.size_overrides = size, dict(size_overrides or {})
        cfg: UPGenSize = upgen_size(size, **self.size_overrides)
        self.cfg = cfg
        self.image_vocab_size, self.text_vocab_size = int(image_vocab_size), int(text_vocab_size)
        self.grid = tuple(int(g) for g in grid)
        self.num_image_tokens = self.grid[0] * self.grid[1]
        self.text_length, self.dropout = int(text_length), float(dropout)
        self.pad_id, self.eos_id = int(pad_id), int(eos_id)
        # The union vocabulary: [image codes | text ids | MASK].
        self.text_offset = self.image_vocab_size
        self.mask_id = self.image_vocab_size + self.text_vocab_size
        self.vocab_size = self.mask_id + 1
        # Vaswani et al. §3.4: N(0, 1/D) tables scaled by sqrt(D) at the input (module docstring).
        init = keras.initializers.RandomNormal(stddev=cfg.width ** -0.5)
        self.embedding_scale = float(cfg.width) ** 0.5
        self.token_embedding = TokenEmbedding(self.vocab_size, cfg.width, embeddings_initializer=init,
                                              name="token_embedding")
        self.modality_embedding = ModalityEmbedding(len(TYPE_IDS), cfg.width, initializer=init,
                                                    name="modality_embedding")
        self.embedding_dropout = keras.layers.Dropout(dropout, name="embedding_dropout")
        self.encoder = TransformerStack(cfg.depth, cfg.heads, cfg.mlp_ratio * cfg.width, dropout=dropout,
                                        name="encoder")
        self.head = LogitsHead(self.vocab_size, name="head")  # UPGen §3: a final linear projection

    # -- the layout ----------------------------------------------------------------------

    def lengths(self, modalities: Sequence[str]) -> list[int]:
        """Static length of each modality's segment."""
        table = {IMAGE: self.num_image_tokens, TEXT: self.text_length}
        unknown = [m for m in modalities if m not in table]
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty sequence of {sorted(table)}, got {modalities!r}")
        return [table[m] for m in modalities]

    def type_ids(self, modalities: Sequence[str]):
        """int32 [N]: the modality-type id of every position."""
        return ops.concatenate([ops.full((n,), TYPE_IDS[m], "int32")
                                for m, n in zip(modalities, self.lengths(modalities))])

    def positions(self, modalities: Sequence[str]):
        """float32 [N, D]: fixed sinusoidal positions -- 2-D over the image grid (as M3AE's
        patches), 1-D over the text, each counted from 0."""
        table = {IMAGE: lambda: sinusoidal_positions_2d(*self.grid, self.cfg.width),
                 TEXT: lambda: sinusoidal_positions(self.text_length, self.cfg.width)}
        return ops.concatenate([table[m]() for m in modalities], axis=0)

    def token_range(self, modalities: Sequence[str]):
        """(lo, hi) int32 [N] each: ids a position may hold (image codes or text ids)."""
        bounds = {IMAGE: (0, self.text_offset), TEXT: (self.text_offset, self.mask_id)}
        lo = [ops.full((n,), bounds[m][0], "int32") for m, n in zip(modalities, self.lengths(modalities))]
        hi = [ops.full((n,), bounds[m][1], "int32") for m, n in zip(modalities, self.lengths(modalities))]
        return ops.concatenate(lo), ops.concatenate(hi)

    def sequence(self, image_tokens=None, text_ids=None):
        """Union-vocabulary ids of whichever modalities are given.

        Args:
          image_tokens: int [B, K] or [B, h, w] codes, or None.
          text_ids: int [B, L] text ids (pieces, EOS, padding), or None.

        Returns:
          (int32 [B, N] ids, modalities): [image; text + V_i] and e.g. ("image", "text").
        """
        parts, modalities = [], []
        if image_tokens is not None:
            tokens = ops.cast(image_tokens, "int32")
            parts.append(ops.reshape(tokens, (ops.shape(tokens)[0], self.num_image_tokens)))
            modalities.append(IMAGE)
        if text_ids is not None:
            if text_ids.shape[-1] is not None and text_ids.shape[-1] != self.text_length:
                raise ValueError(f"text_ids have length {text_ids.shape[-1]}, the model's text_length is "
                                 f"{self.text_length} (the streams' text_length must match it)")
            parts.append(ops.cast(text_ids, "int32") + self.text_offset)
            modalities.append(TEXT)
        if not parts:
            raise ValueError("sequence() needs image_tokens, text_ids or both")
        return (parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=1)), tuple(modalities)

    def split(self, x, modalities: Sequence[str]) -> dict:
        """modality -> its slice of `x` [B, N, ...] along axis 1."""
        out, start = {}, 0
        for m, n in zip(modalities, self.lengths(modalities)):
            out[m] = x[:, start:start + n]
            start += n
        return out

    def masked_empty(self, batch: int, modality: str):
        """int32 [B, n]: a fully masked segment of `modality` (what generation starts from)."""
        return ops.full((batch, self.lengths([modality])[0]), self.mask_id, "int32")

    # -- the network ---------------------------------------------------------------------

    def embed(self, ids, modalities: Sequence[str], training=False):
        """Token + sinusoidal position + modality-type embedding: int32 [B, N] -> float [B, N, D]."""
        x = self.modality_embedding(self.token_embedding(ids), self.type_ids(modalities)) * self.embedding_scale
        x = x + ops.cast(self.positions(modalities), x.dtype)[None]
        return self.embedding_dropout(x, training=training)

    def encode(self, ids, modalities: Sequence[str], training=False):
        """The transformer's output features: int32 [B, N] -> float [B, N, D] (after the final norm)."""
        return self.encoder(self.embed(ids, modalities, training=training), training=training)

    def layer_outputs(self, ids, modalities: Sequence[str]):
        """Every block's output, for probes (UPGen §4.2 concatenates all layers'): list of [B, N, D].

        The last entry is the final (normalised) output `encode` returns.
        """
        x = self.embed(ids, modalities)
        outputs = []
        for block in self.encoder.blocks:
            x = block(x)
            outputs.append(x)
        if self.encoder.norm is not None:
            outputs[-1] = self.encoder.norm(x)
        return outputs

    def logits(self, ids, modalities: Sequence[str], training=False):
        """Union-vocabulary logits: int32 [B, N] -> float32 [B, N, V_i + V_t + 1]."""
        return self.head(self.encode(ids, modalities, training=training))

    # -- Keras ---------------------------------------------------------------------------

    def call(self, inputs, training=False):
        """{"image_tokens": [B, K], "text_ids": [B, L]} (either or both) -> logits [B, N, V]."""
        ids, modalities = self.sequence(inputs.get("image_tokens"), inputs.get("text_ids"))
        return self.logits(ids, modalities, training=training)

    def build_all(self, batch_size: int = 1):
        self({"image_tokens": ops.zeros((batch_size, self.num_image_tokens), "int32"),
              "text_ids": ops.zeros((batch_size, self.text_length), "int32")})

    def get_config(self):
        return {**super().get_config(), "size": self.size_name, "image_vocab_size": self.image_vocab_size,
                "grid": list(self.grid), "text_vocab_size": self.text_vocab_size, "text_length": self.text_length,
                "dropout": self.dropout, "pad_id": self.pad_id, "eos_id": self.eos_id,
                "size_overrides": self.size_overrides}


__all__ = ["IMAGE", "IMAGE_ONLY", "PAIRED", "TEXT", "TEXT_ONLY", "TYPE_IDS", "UPGen"]
