"""M3AE's network: a ViT encoder over visible image patches and text tokens, an MAE decoder.

M3AE §3, App. A.3 (following MAE, He et al. 2021, §3). An image `[B, H, W, 3]` is cut
into K = (H/p)(W/p) patches of p x p pixels (row-major); a caption is L text ids
(pieces, EOS, padding).

* **Encoder** (ViT of the named size): `[CLS; kept patches; kept text]`. Patches enter
  by a linear projection plus fixed 2-D sin-cos positions, text by a learned embedding
  plus fixed 1-D sin-cos positions; a learned modality-type vector tells them apart
  (M3AE §3, "modality type encodings"). Each modality keeps a random subset of
  static size (`image_kept`, `text_kept`: K - round(0.75 K), L - round(0.75 L) by
  default), so the masked tokens never reach the encoder and XLA compiles one program.
  Text padding is excluded from attention; a short caption's surplus slots are too.
* **Decoder** (MAE: 8 x 512 at paper scale): the encoder's output projected to the
  decoder width and put back in position order, one shared learned mask token at every
  dropped position, then the decoder's own fixed positions and type embeddings
  (M3AE §3: "a different set of modality type embeddings"); CLS stays in front.
* **Heads**: a linear map from each image position to its p*p*3 pixels, and one to
  text logits (M3AE §3: "two linear projection output heads").

`use_text=False` is MAE (the same network with no text parts; the paper's baseline).
The optional contrastive loss's learnable temperature lives here (`contrastive=True`).
Losses and pixel normalisation are the task's (`mmt/tasks/m3ae.py`).
"""

from __future__ import annotations

import math

import keras
from keras import ops

from mmt.layers import ModalityEmbedding, TokenEmbedding, TransformerStack, padding_mask
from mmt.layers import masking
from mmt.layers.embeddings import sinusoidal_positions, sinusoidal_positions_2d
from mmt.layers.patches import LearnedToken, PatchEmbedding, patchify, unpatchify
from mmt.models.variants import M3AESize, m3ae_size

IMAGE, TEXT = 0, 1  # modality-type ids


@keras.saving.register_keras_serializable(package="mmt")
class M3AE(keras.Model):
    """The M3AE network (MAE with `use_text=False`).

    Args:
      size: a name of `mmt.models.variants.M3AE_SIZES` ("tiny", "S", "B", "L").
      image_size: side of the (square) input images (256 in the paper).
      text_vocab_size: text vocabulary, special ids included.
      text_length: static text length L.
      use_text: False builds MAE: no text embedding, head or type.
      image_mask_ratio, text_mask_ratio: fraction of patches / of each caption's real
        tokens dropped (M3AE §4.2: 0.75 and 0.75).
      contrastive: add the learnable temperature of the optional contrastive loss
        (M3AE §4.2: initialised at 0.01).
      dropout, drop_path: inside the transformer stacks (0 in MAE).
      pad_id: text padding id (never a target, never attended to).
      size_overrides: fields of `M3AESize` to change.
    """

    def __init__(self, size: str = "tiny", image_size: int = 256, text_vocab_size: int = 256,
                 text_length: int = 64, use_text: bool = True, image_mask_ratio: float = 0.75,
                 text_mask_ratio: float = 0.75, contrastive: bool = False, dropout: float = 0.0,
                 drop_path: float = 0.0, pad_id: int = 0, size_overrides=None, **kwargs):
        super().__init__(**kwargs)
        self.size_name, self.size_overrides = size, dict(size_overrides or {})
        cfg: M3AESize = m3ae_size(size, **self.size_overrides)
        self.cfg = cfg
        self.image_size, self.patch_size = int(image_size), cfg.patch_size
        if self.image_size % cfg.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {cfg.patch_size}")
        for name, ratio in (("image_mask_ratio", image_mask_ratio), ("text_mask_ratio", text_mask_ratio)):
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {ratio}")
        self.grid = (self.image_size // cfg.patch_size,) * 2
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_dim = cfg.patch_size * cfg.patch_size * 3
        self.text_vocab_size, self.text_length = int(text_vocab_size), int(text_length)
        self.use_text, self.contrastive = bool(use_text), bool(contrastive) and bool(use_text)
        self.image_mask_ratio, self.text_mask_ratio = float(image_mask_ratio), float(text_mask_ratio)
        # Static slot counts (python round, as `masking.masked_count` rounds per row).
        self.image_kept = self.num_patches - round(self.image_mask_ratio * self.num_patches)
        self.text_kept = self.text_length - round(self.text_mask_ratio * self.text_length)
        self.dropout, self.drop_path, self.pad_id = float(dropout), float(drop_path), int(pad_id)
        width, dec = cfg.width, cfg.decoder_width
        # Encoder.
        # The fixed sin-cos positions have unit amplitude and the patch projection of
        # normalised pixels gives ~unit features; BERT's N(0, 0.02) text and type tables
        # would be ~50x smaller and the input mostly position (UPGen measured this: its
        # model barely read the caption, mmt/models/upgen.py). N(0, 1) puts all on one scale.
        unit = keras.initializers.RandomNormal(stddev=1.0)
        self.patch_embedding = PatchEmbedding(width, name="patch_embedding")
        self.cls_token = LearnedToken(width, name="cls_token")
        self.modality_embedding = ModalityEmbedding(2, width, initializer=unit, name="modality_embedding")
        self.text_embedding = TokenEmbedding(self.text_vocab_size, width, embeddings_initializer=unit,
                                             name="text_embedding") if use_text else None
        self.encoder = TransformerStack(cfg.depth, cfg.heads, cfg.mlp_ratio * width, dropout=dropout,
                                        drop_path=drop_path, name="encoder")
        # Decoder (MAE §3: a linear projection to its width first).
        self.decoder_projection = keras.layers.Dense(dec, name="decoder_projection")
        self.mask_token = LearnedToken(dec, name="mask_token")
        self.decoder_modality_embedding = ModalityEmbedding(2, dec, initializer=unit,
                                                            name="decoder_modality_embedding")
        self.decoder = TransformerStack(cfg.decoder_depth, cfg.decoder_heads, cfg.mlp_ratio * dec,
                                        dropout=dropout, drop_path=drop_path, name="decoder")
        self.image_head = keras.layers.Dense(self.patch_dim, dtype="float32", name="image_head")
        self.text_head = keras.layers.Dense(self.text_vocab_size, dtype="float32",
                                            name="text_head") if use_text else None

    def build(self, input_shape=None):
        if self.contrastive:
            # M3AE §4.2: tau initialised at 0.01; learned as log(tau) so it stays positive.
            self.log_temperature = self.add_weight(
                shape=(), initializer=keras.initializers.Constant(math.log(0.01)), name="log_temperature")
        super().build(input_shape)

    # -- inputs ------------------------------------------------------------------------

    def patchify(self, images):
        """float [B, H, W, 3] -> [B, K, p*p*3]."""
        return patchify(images, self.patch_size)

    def unpatchify(self, patches):
        """[B, K, p*p*3] -> float [B, H, W, 3]."""
        return unpatchify(patches, self.grid, self.patch_size)

    def text_valid(self, text_ids):
        """bool [B, L]: True for pieces and EOS, False for padding."""
        return ops.not_equal(ops.cast(text_ids, "int32"), self.pad_id)

    def random_keeps(self, text_ids=None, batch_size=None, seed=None, image=True):
        """(image Keep or None, text Keep or None): which tokens the encoder sees (M3AE §3).

        `seed` None gives the fixed golden-ratio order (inference, summaries).
        """
        image_keep = text_keep = None
        if image:
            valid = ops.ones((batch_size, self.num_patches), "bool")
            image_keep = masking.random_keep(valid, self.image_mask_ratio, self.image_kept, seed)
        if text_ids is not None:
            text_keep = masking.random_keep(self.text_valid(text_ids), self.text_mask_ratio, self.text_kept, seed)
        return image_keep, text_keep

    # -- the network -------------------------------------------------------------------

    def _embed(self, x, type_id, positions):
        x = self.modality_embedding(x, ops.full((ops.shape(x)[1],), type_id, "int32"))
        return x + ops.cast(positions, x.dtype)[None]

    def encode(self, patches=None, text_ids=None, image_keep=None, text_keep=None, training=False):
        """The encoder over [CLS; (kept) patches; (kept) text].

        Args:
          patches: float [B, K, p*p*3] (normalised pixels), or None.
          text_ids: int [B, L], or None.
          image_keep, text_keep: `masking.Keep`s; None feeds that modality whole, in place.

        Returns:
          (z float [B, 1 + K_in + L_in, D], valid bool [B, 1 + K_in + L_in]).
        """
        width = self.cfg.width
        parts, valid = [], []
        if patches is not None:
            x = self._embed(self.patch_embedding(patches), IMAGE, sinusoidal_positions_2d(*self.grid, width))
            if image_keep is not None:
                x = masking.gather_kept(x, image_keep.order, self.image_kept)
            parts.append(x)
            valid.append(ops.ones(ops.shape(x)[:2], "bool") if image_keep is None else image_keep.kept_valid)
        if text_ids is not None:
            if not self.use_text:
                raise ValueError("this network was built with use_text=False (MAE): it takes no text")
            x = self._embed(self.text_embedding(text_ids), TEXT, sinusoidal_positions(self.text_length, width))
            text_valid = self.text_valid(text_ids)
            if text_keep is not None:
                x = masking.gather_kept(x, text_keep.order, self.text_kept)
                text_valid = text_keep.kept_valid
            parts.append(x)
            valid.append(text_valid)
        if not parts:
            raise ValueError("encode() needs patches, text_ids or both")
        batch = ops.shape(parts[0])[0]
        x = ops.concatenate([ops.cast(self.cls_token.tile(batch), parts[0].dtype), *parts], axis=1)
        valid = ops.concatenate([ops.ones((batch, 1), "bool"), *valid], axis=1)
        return self.encoder(x, mask=padding_mask(valid), training=training), valid

    def decode(self, z, image=True, text_ids=None, image_keep=None, text_keep=None, training=False):
        """The decoder and heads: z from `encode` (the same modalities and keeps).

        Returns:
          (pixels float32 [B, K, p*p*3] or None, text logits float32 [B, L, V] or None).
        """
        dec = self.cfg.decoder_width
        x = self.decoder_projection(z)
        batch = ops.shape(x)[0]
        mask_token = self.mask_token.vector(x.dtype)
        parts, valid, start = [x[:, :1]], [ops.ones((batch, 1), "bool")], 1

        def restore(keep, full, kept):
            nonlocal start
            n = full if keep is None else kept
            seg = x[:, start:start + n]
            start += n
            if keep is None:
                return seg
            # Empty slots (padding, surplus) carry their own token's embedding: never let them through.
            seg = ops.where(keep.kept_valid[..., None], seg, mask_token[None, None])
            return masking.restore_order(seg, keep.order, mask_token)

        if image:
            seg = restore(image_keep, self.num_patches, self.image_kept)
            seg = self.decoder_modality_embedding(seg, ops.full((self.num_patches,), IMAGE, "int32"))
            parts.append(seg + ops.cast(sinusoidal_positions_2d(*self.grid, dec), seg.dtype)[None])
            valid.append(ops.ones((batch, self.num_patches), "bool"))
        if text_ids is not None:
            seg = restore(text_keep, self.text_length, self.text_kept)
            seg = self.decoder_modality_embedding(seg, ops.full((self.text_length,), TEXT, "int32"))
            parts.append(seg + ops.cast(sinusoidal_positions(self.text_length, dec), seg.dtype)[None])
            valid.append(self.text_valid(text_ids))
        y = self.decoder(ops.concatenate(parts, axis=1), mask=padding_mask(ops.concatenate(valid, axis=1)),
                         training=training)
        pixels = self.image_head(y[:, 1:1 + self.num_patches]) if image else None
        logits = None
        if text_ids is not None:
            offset = 1 + (self.num_patches if image else 0)
            logits = self.text_head(y[:, offset:offset + self.text_length])
        return pixels, logits

    def layer_outputs(self, patches):
        """Every encoder block's output over [CLS; all patches] (probes): list of [B, 1 + K, D].

        The last entry is the final (normalised) output `encode` returns.
        """
        x = self._embed(self.patch_embedding(patches), IMAGE, sinusoidal_positions_2d(*self.grid, self.cfg.width))
        x = ops.concatenate([ops.cast(self.cls_token.tile(ops.shape(x)[0]), x.dtype), x], axis=1)
        outputs = []
        for block in self.encoder.blocks:
            x = block(x)
            outputs.append(x)
        outputs[-1] = self.encoder.norm(x)
        return outputs

    def temperature(self):
        """The contrastive loss's learned temperature tau (float32 scalar)."""
        return ops.exp(ops.cast(self.log_temperature, "float32"))

    # -- Keras ---------------------------------------------------------------------------

    def call(self, inputs, training=False):
        """Nothing masked: {"image": float [B, H, W, 3], "text_ids": [B, L]} (either) -> (pixels, logits)."""
        images, text_ids = inputs.get("image"), inputs.get("text_ids") if self.use_text else None
        patches = None if images is None else self.patchify(ops.cast(images, self.compute_dtype))
        z, _ = self.encode(patches, text_ids, training=training)
        return self.decode(z, image=patches is not None, text_ids=text_ids, training=training)

    def build_all(self, batch_size: int = 1):
        inputs = {"image": ops.zeros((batch_size, self.image_size, self.image_size, 3))}
        if self.use_text:
            inputs["text_ids"] = ops.ones((batch_size, self.text_length), "int32")
        self(inputs)

    def build_from_config(self, config):
        # A restored model builds every part (Keras' default would only mark it built).
        self.build_all()

    def get_config(self):
        return {**super().get_config(), "size": self.size_name, "image_size": self.image_size,
                "text_vocab_size": self.text_vocab_size, "text_length": self.text_length,
                "use_text": self.use_text, "image_mask_ratio": self.image_mask_ratio,
                "text_mask_ratio": self.text_mask_ratio, "contrastive": self.contrastive, "dropout": self.dropout,
                "drop_path": self.drop_path, "pad_id": self.pad_id, "size_overrides": self.size_overrides}


__all__ = ["IMAGE", "M3AE", "TEXT"]
