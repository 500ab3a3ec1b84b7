"""The VQGAN image tokenizer (Esser et al., 2021), in MaskGIT's convolutional form.

UPGen uses MaskGIT's public VQGAN unchanged (UPGen §3.1, App. A: 256x256 images ->
16x16 tokens, 1024 codes); ITIT trains its own (ITIT App. B: 256x256 -> 16x16, 8192
codes, batch 256 on WebLI). Both follow MaskGIT's `vqgan_tokenizer.py` (Chang et al.,
2022): a residual CNN without attention,

    encoder: conv3x3 -> per level i: num_res_blocks x ResBlock(filters * mult[i]),
             then Downsample (all levels but the last) -> num_res_blocks x ResBlock
             -> GroupNorm -> swish -> conv1x1 (embedding_dim)
    quantizer: nearest of codebook_size codes, straight-through (mmt.layers.quantizers)
    decoder: conv3x3 -> num_res_blocks x ResBlock -> per level, last to first:
             num_res_blocks x ResBlock(filters * mult[i]), then Upsample (all levels
             but the first) -> GroupNorm -> swish -> conv3x3 (3)

so the downsampling factor is 2^(len(channel_multipliers) - 1): MaskGIT's
(1, 1, 2, 2, 4) gives f = 16. Images are float in [-1, 1] inside, uint8 outside (the
`ImageTokenizer` interface). Training (losses, discriminator, summaries) lives in
`mmt.tasks.vqgan`; this module imports `keras.ops` only, never TensorFlow.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from mmt.layers.conv import Downsample, LayerChain, ResBlock, Upsample, build_chain, group_norm
from mmt.layers.quantizers import VectorQuantizer
from mmt.tokenizers.image import ImageTokenizer, register_tokenizer

INPUT_RANGES = ("symmetric", "unit")


@keras.saving.register_keras_serializable(package="mmt")
class Encoder(LayerChain):
    """MaskGIT's VQGAN encoder: float `[B, H, W, 3]` -> float `[B, H/f, W/f, embedding_dim]`.

    Args:
      filters: base width.
      channel_multipliers: width of level i is `filters * channel_multipliers[i]`;
        there are len - 1 downsamplings.
      num_res_blocks: residual blocks per level (and in the middle).
      embedding_dim: output width.
      num_groups: GroupNorm groups.
      downsample_mode: `Downsample.mode` ("avg_pool" as MaskGIT, or "conv").
      shortcut_from: `ResBlock.shortcut_from` ("branch" as MaskGIT's release).
      input_range: "symmetric" (images in [-1, 1] go in as they are) or "unit" (mapped
        to [0, 1] first, MaskGIT's release: its zero padding is black in that range).
    """

    def __init__(self, filters: int, channel_multipliers: Sequence[int], num_res_blocks: int, embedding_dim: int,
                 num_groups: int = 32, downsample_mode: str = "avg_pool", shortcut_from: str = "input",
                 input_range: str = "symmetric", **kwargs):
        super().__init__(**kwargs)
        self.filters, self.channel_multipliers = int(filters), tuple(int(m) for m in channel_multipliers)
        self.num_res_blocks, self.embedding_dim = int(num_res_blocks), int(embedding_dim)
        self.num_groups, self.downsample_mode = int(num_groups), downsample_mode
        if input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {INPUT_RANGES}, got {input_range!r}")
        self.shortcut_from, self.input_range = shortcut_from, input_range
        policy = self.dtype_policy
        layers = [keras.layers.Conv2D(self.filters, 3, padding="same", name="conv_in", dtype=policy)]
        levels = len(self.channel_multipliers)
        for i, multiplier in enumerate(self.channel_multipliers):
            width = self.filters * multiplier
            layers += [ResBlock(width, self.num_groups, shortcut_from, name=f"level_{i}_block_{j}", dtype=policy)
                       for j in range(self.num_res_blocks)]
            if i < levels - 1:
                layers.append(Downsample(downsample_mode, name=f"level_{i}_down", dtype=policy))
        width = self.filters * self.channel_multipliers[-1]
        layers += [ResBlock(width, self.num_groups, shortcut_from, name=f"middle_block_{j}", dtype=policy)
                   for j in range(self.num_res_blocks)]
        self._set_chain(layers)
        self.norm_out = group_norm(width, self.num_groups, "norm_out", policy)
        self.conv_out = keras.layers.Conv2D(self.embedding_dim, 1, name="conv_out", dtype=policy)

    def build(self, input_shape):
        shape = build_chain(self.chain, tuple(input_shape))
        self.norm_out.build(shape)
        self.conv_out.build(shape)
        self.built = True

    def call(self, images):
        x = (images + 1.0) * 0.5 if self.input_range == "unit" else images  # [-1, 1] -> [0, 1]
        for layer in self.chain:
            x = layer(x)
        return self.conv_out(ops.silu(self.norm_out(x)))

    def compute_output_shape(self, input_shape):
        f = 2 ** (len(self.channel_multipliers) - 1)
        b, h, w, _ = input_shape
        return (b, None if h is None else h // f, None if w is None else w // f, self.embedding_dim)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "channel_multipliers": list(self.channel_multipliers),
                "num_res_blocks": self.num_res_blocks, "embedding_dim": self.embedding_dim,
                "num_groups": self.num_groups, "downsample_mode": self.downsample_mode,
                "shortcut_from": self.shortcut_from, "input_range": self.input_range}


@keras.saving.register_keras_serializable(package="mmt")
class Decoder(LayerChain):
    """MaskGIT's VQGAN decoder: float `[B, h, w, C]` -> float `[B, h*f, w*f, 3]`.

    Args as `Encoder` (mirrored). `features` returns the input of the last convolution
    `conv_out`, which the adaptive GAN weight differentiates against (Esser et al. eq. 7).
    """

    def __init__(self, filters: int, channel_multipliers: Sequence[int], num_res_blocks: int,
                 num_groups: int = 32, shortcut_from: str = "input", **kwargs):
        super().__init__(**kwargs)
        self.filters, self.channel_multipliers = int(filters), tuple(int(m) for m in channel_multipliers)
        self.num_res_blocks, self.num_groups = int(num_res_blocks), int(num_groups)
        self.shortcut_from = shortcut_from
        policy = self.dtype_policy
        width = self.filters * self.channel_multipliers[-1]
        layers = [keras.layers.Conv2D(width, 3, padding="same", name="conv_in", dtype=policy)]
        layers += [ResBlock(width, self.num_groups, shortcut_from, name=f"middle_block_{j}", dtype=policy)
                   for j in range(self.num_res_blocks)]
        for i in reversed(range(len(self.channel_multipliers))):
            width = self.filters * self.channel_multipliers[i]
            layers += [ResBlock(width, self.num_groups, shortcut_from, name=f"level_{i}_block_{j}", dtype=policy)
                       for j in range(self.num_res_blocks)]
            if i > 0:
                layers.append(Upsample(name=f"level_{i}_up", dtype=policy))
        self._set_chain(layers)
        self.norm_out = group_norm(width, self.num_groups, "norm_out", policy)
        self.conv_out = keras.layers.Conv2D(3, 3, padding="same", name="conv_out", dtype=policy)

    def build(self, input_shape):
        shape = build_chain(self.chain, tuple(input_shape))
        self.norm_out.build(shape)
        self.conv_out.build(shape)
        self.built = True

    def features(self, z):
        """float `[B, h, w, C]` -> float `[B, H, W, filters * mult[0]]`: `conv_out`'s input."""
        x = z
        for layer in self.chain:
            x = layer(x)
        return ops.silu(self.norm_out(x))

    def call(self, z):
        return self.conv_out(self.features(z))

    def compute_output_shape(self, input_shape):
        f = 2 ** (len(self.channel_multipliers) - 1)
        b, h, w, _ = input_shape
        return (b, None if h is None else h * f, None if w is None else w * f, 3)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "channel_multipliers": list(self.channel_multipliers),
                "num_res_blocks": self.num_res_blocks, "num_groups": self.num_groups,
                "shortcut_from": self.shortcut_from}


@register_tokenizer
@keras.saving.register_keras_serializable(package="mmt")
class VQGAN(ImageTokenizer):
    """Encoder -> vector quantizer -> decoder. Defaults are MaskGIT's tokenizer (UPGen's).

    Args:
      image_size: side of the square images (MaskGIT, ITIT: 256).
      filters: base width (MaskGIT: 128).
      channel_multipliers: per-level width multipliers; f = 2^(len - 1)
        (MaskGIT: (1, 1, 2, 2, 4), f = 16).
      num_res_blocks: residual blocks per level (MaskGIT: 2).
      embedding_dim: width of the encoder output and decoder input (MaskGIT: 256).
      codebook_size: number of codes (MaskGIT / UPGen: 1024; ITIT: 8192).
      code_dim: lookup width; None looks up in `embedding_dim` (MaskGIT), a small value
        (ViT-VQGAN: 32) factorises the lookup.
      l2_normalize: cosine-similarity lookup (ViT-VQGAN §3.2).
      commitment_cost: beta of the commitment loss (MaskGIT: 0.25).
      entropy_weight, entropy_temperature: MaskGIT's entropy penalty (0.1, 0.01 there).
      restart_dead_codes, restart_threshold, usage_decay, buffer_size, restart_sampling:
        dead-code restarts from recent encoder outputs (see `VectorQuantizer`).
      num_groups: GroupNorm groups (MaskGIT: 32).
      downsample_mode: "avg_pool" (MaskGIT) or "conv".
      shortcut_from: `ResBlock.shortcut_from`: "input", or "branch" as MaskGIT's released
        checkpoint (`mmt.tokenizers.converters.maskgit_vqgan`).
      encoder_input_range: the range the encoder sees: "symmetric" ([-1, 1]) or "unit"
        ([0, 1], MaskGIT's release: its zero padding is black in that range, so imported
        weights see exactly their own inputs). The decoder always outputs [-1, 1] (the
        importer folds MaskGIT's [0, 1] output into its last convolution, exactly).
    """

    def __init__(
        self,
        image_size: int = 256,
        filters: int = 128,
        channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        embedding_dim: int = 256,
        codebook_size: int = 1024,
        code_dim: int | None = None,
        l2_normalize: bool = False,
        commitment_cost: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        restart_dead_codes: bool = False,
        restart_threshold: float = 0.03,
        usage_decay: float = 0.99,
        buffer_size: int = 4096,
        restart_sampling: str = "error",
        num_groups: int = 32,
        downsample_mode: str = "avg_pool",
        shortcut_from: str = "input",
        encoder_input_range: str = "symmetric",
        **kwargs,
    ):
        channel_multipliers = tuple(int(m) for m in channel_multipliers)
        if not channel_multipliers:
            raise ValueError("channel_multipliers must name at least one level")
        kwargs.setdefault("name", "vqgan")  # stable variable paths ("vqgan/encoder/...")
        super().__init__(image_size, 2 ** (len(channel_multipliers) - 1), codebook_size, **kwargs)
        self.filters = int(filters)
        self.channel_multipliers = channel_multipliers
        self.num_res_blocks = int(num_res_blocks)
        self.embedding_dim = int(embedding_dim)
        self.num_groups = int(num_groups)
        self.downsample_mode = downsample_mode
        self.shortcut_from, self.encoder_input_range = shortcut_from, encoder_input_range
        self.encoder = Encoder(self.filters, channel_multipliers, self.num_res_blocks, self.embedding_dim,
                               self.num_groups, downsample_mode, shortcut_from, encoder_input_range,
                               name="encoder", dtype=self.dtype_policy)
        # The lookup runs in float32 whatever the policy: distances between nearby codes
        # are too fine for bfloat16.
        self.quantizer = VectorQuantizer(
            codebook_size, code_dim=code_dim, l2_normalize=l2_normalize, commitment_cost=commitment_cost,
            entropy_weight=entropy_weight, entropy_temperature=entropy_temperature,
            restart_dead_codes=restart_dead_codes, restart_threshold=restart_threshold, usage_decay=usage_decay,
            buffer_size=buffer_size, restart_sampling=restart_sampling, name="quantizer", dtype="float32")
        self.decoder = Decoder(self.filters, channel_multipliers, self.num_res_blocks, self.num_groups,
                               shortcut_from, name="decoder", dtype=self.dtype_policy)

    # -- building ------------------------------------------------------------------

    def build(self, input_shape=None):
        shape = (None, self.image_size, self.image_size, 3)
        self.encoder.build(shape)
        latent = self.encoder.compute_output_shape(shape)
        self.quantizer.build(latent)
        self.decoder.build(latent)
        self.built = True

    def build_for_images(self) -> None:
        """Creates every variable from shapes alone (no forward pass)."""
        if not self.built:
            self.build()

    # -- the ImageTokenizer interface ----------------------------------------------------

    def encode_codes(self, images):
        """float [B, H, W, 3] in [-1, 1] -> int32 [B, h, w]."""
        return self.quantizer.nearest_codes(self.encoder(images))

    def decode_codes(self, codes):
        """int32 [B, h, w] -> float32 [B, H, W, 3], roughly in [-1, 1]."""
        return ops.cast(self.decoder(self.quantizer.lookup(codes)), "float32")

    def call(self, images, training=False, seed=None):
        """Reconstruction through the quantizer (what training sees).

        Args:
          images: float [B, H, W, 3] in [-1, 1].
          training: update the quantizer's usage statistics (and restart dead codes).
          seed: for dead-code restarts.

        Returns:
          (reconstruction float32 [B, H, W, 3], codes int32 [B, h, w], quantizer aux dict).
        """
        z_q, codes, aux = self.quantizer(self.encoder(images), training=training, seed=seed)
        return ops.cast(self.decoder(z_q), "float32"), codes, aux

    def get_config(self):
        q = self.quantizer
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "filters": self.filters,
            "channel_multipliers": list(self.channel_multipliers),
            "num_res_blocks": self.num_res_blocks,
            "embedding_dim": self.embedding_dim,
            "codebook_size": q.codebook_size,
            "code_dim": q.code_dim,
            "l2_normalize": q.l2_normalize,
            "commitment_cost": q.commitment_cost,
            "entropy_weight": q.entropy_weight,
            "entropy_temperature": q.entropy_temperature,
            "restart_dead_codes": q.restart_dead_codes,
            "restart_threshold": q.restart_threshold,
            "usage_decay": q.usage_decay,
            "buffer_size": q.buffer_size,
            "restart_sampling": q.restart_sampling,
            "num_groups": self.num_groups,
            "downsample_mode": self.downsample_mode,
            # Only when not the default: configs (and fingerprints) saved before these options stay valid.
            **({"shortcut_from": self.shortcut_from} if self.shortcut_from != "input" else {}),
            **({"encoder_input_range": self.encoder_input_range} if self.encoder_input_range != "symmetric" else {}),
        }


__all__ = ["Decoder", "Encoder", "VQGAN"]
