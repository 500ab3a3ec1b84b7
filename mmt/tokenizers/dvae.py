"""DALL-E's discrete VAE (Ramesh et al. 2021, §2.1 and Appendix A) as an image tokenizer.

    images uint8 [B, H, W, 3] --φ--> encoder --> logits float32 [B, H/f, W/f, K]
        encode: argmax                      -> codes int32 [B, H/f, W/f]
        train:  Gumbel-softmax sample       -> soft one-hot [B, H/f, W/f, K]
    one-hot --> decoder --> (mu, ln b) float32 [B, H, W, 3] each
        decode: φ⁻¹(sigmoid(mu))            -> images

Architecture (A.1, and the released `dall_e/encoder.py`, `decoder.py`): convolutional
ResNets of bottleneck resblocks whose residual branch is multiplied by a small
`post_gain = 1 / n_layers²` ("to ensure stable training at initialization", §2.1).
The encoder opens with a 7x7 convolution, has `len(width_multipliers)` groups of
`blocks_per_group` resblocks (widths `width * multiplier`) with a 2x2 max-pool after
every group but the last, and ends with ReLU and a 1x1 convolution to the K logits.
The decoder mirrors it: a 1x1 convolution from the one-hot codes, groups in reverse
order with nearest-neighbour upsampling, ReLU and a 1x1 convolution to the 6 channels
of the logit-Laplace statistics. The 1x1 convolutions around the relaxation keep its
receptive field small, which "led to it generalizing better to the true ELB" (§2.1).

The defaults are the paper's: width 256, multipliers (1, 2, 4, 8) -> downsampling 8
(256x256 images -> a 32x32 grid), 2 blocks per group, 8192 codes, decoder input
width 128. Training (the ELB, its schedules) lives in `mmt.tasks.dvae`.

`keras.ops` only: importing this module does not import TensorFlow.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from mmt.layers.conv import LayerChain
from mmt.losses import likelihoods
from mmt.tokenizers.image import ImageTokenizer, register_tokenizer


def _conv(filters: int, kernel_size: int, name: str, dtype=None, gain: float = 1.0) -> keras.layers.Conv2D:
    # The release's init: N(0, gain^2 / fan_in) weights with gain 1, zero biases (dall_e/utils.py).
    return keras.layers.Conv2D(
        filters, kernel_size, padding="same", name=name, dtype=dtype,
        kernel_initializer=keras.initializers.VarianceScaling(gain**2, "fan_in", "untruncated_normal"),
    )


def _upsample_nearest(h):
    """float [B, h, w, C] -> [B, 2h, 2w, C], each pixel repeated 2x2."""
    _, height, width, channels = ops.shape(h)
    h = h[:, :, None, :, None, :] * ops.ones((1, 1, 2, 1, 2, 1), h.dtype)  # (B, h, 2, w, 2, C)
    return ops.reshape(h, (-1, 2 * height, 2 * width, channels))


class DVAEResBlock(LayerChain):
    """A bottleneck resblock: `id(x) + post_gain * res(x)`.

    `res` is four (ReLU, conv) pairs through `width // 4` hidden channels; `id` is the
    identity, or a 1x1 convolution when the channel count changes.

    Args:
      width: output channels (a multiple of 4).
      post_gain: multiplies the residual branch (DALL-E: 1 / (total resblocks)²).
      kernel_sizes: the four convolutions' kernels: (3, 3, 3, 1) in the encoder,
        (1, 3, 3, 3) in the decoder.
    """

    def __init__(self, width: int, post_gain: float, kernel_sizes: Sequence[int] = (3, 3, 3, 1), **kwargs):
        super().__init__(**kwargs)
        if width % 4:
            raise ValueError(f"DVAEResBlock width must be a multiple of 4, got {width}")
        if len(kernel_sizes) != 4:
            raise ValueError(f"DVAEResBlock takes 4 kernel sizes, got {kernel_sizes}")
        self.width = int(width)
        self.post_gain = float(post_gain)
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        hidden = self.width // 4
        self._set_chain([_conv(hidden if i < 3 else self.width, k, f"conv_{i + 1}")
                         for i, k in enumerate(self.kernel_sizes)])
        self.id_path = None

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels != self.width:
            self.id_path = _conv(self.width, 1, "id_path")
            self.id_path.build(input_shape)
        shape = tuple(input_shape)
        for conv in self.chain:
            conv.build(shape)
            shape = shape[:-1] + (conv.filters,)

    def call(self, x):
        h = x
        for conv in self.chain:
            h = conv(ops.relu(h))
        skip = x if self.id_path is None else self.id_path(x)
        return skip + self.post_gain * h

    def get_config(self):
        return {**super().get_config(), "width": self.width, "post_gain": self.post_gain,
                "kernel_sizes": list(self.kernel_sizes)}


class DVAEEncoder(LayerChain):
    """float [B, H, W, 3] (pixels mapped by φ) -> float32 logits [B, H/f, W/f, K], f = 2^(groups - 1)."""

    def __init__(self, vocab_size: int, width: int, width_multipliers: Sequence[int], blocks_per_group: int,
                 logits_init_gain: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        n_layers = len(width_multipliers) * blocks_per_group
        self.input_conv = _conv(width, 7, "input")
        self.groups = len(width_multipliers)
        self._set_chain([DVAEResBlock(width * m, 1.0 / n_layers**2, (3, 3, 3, 1), name=f"group_{g + 1}_block_{b + 1}")
                         for g, m in enumerate(width_multipliers) for b in range(blocks_per_group)])
        # Logits in float32 under mixed precision (the release keeps this conv in fp32).
        self.output_conv = _conv(vocab_size, 1, "output", dtype="float32", gain=logits_init_gain)

    def call(self, x):
        h = self.input_conv(x)  # (B, H, W, width)
        blocks = self.chain
        per_group = len(blocks) // self.groups
        for i, block in enumerate(blocks):
            h = block(h)
            if (i + 1) % per_group == 0 and i + 1 < len(blocks):
                h = ops.max_pool(h, 2, 2)  # (B, H/2, W/2, C) per pooled group; A.1: max-pooling
        return self.output_conv(ops.cast(ops.relu(h), "float32"))  # (B, h, w, K)


class DVAEDecoder(LayerChain):
    """float [B, h, w, K] (one-hot or relaxed codes) -> float32 [B, h*f, w*f, 6]: mu (3), ln b (3)."""

    def __init__(self, width: int, width_multipliers: Sequence[int], blocks_per_group: int, input_width: int,
                 embedding_init_gain: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        n_layers = len(width_multipliers) * blocks_per_group
        self.input_conv = _conv(input_width, 1, "input", dtype="float32", gain=embedding_init_gain)
        self.groups = len(width_multipliers)
        self._set_chain([DVAEResBlock(width * m, 1.0 / n_layers**2, (1, 3, 3, 3), name=f"group_{g + 1}_block_{b + 1}")
                         for g, m in enumerate(reversed(tuple(width_multipliers))) for b in range(blocks_per_group)])
        self.output_conv = _conv(6, 1, "output", dtype="float32")

    def call(self, z):
        h = self.input_conv(ops.cast(z, "float32"))  # (B, h, w, input_width)
        h = ops.cast(h, self.compute_dtype)
        blocks = self.chain
        per_group = len(blocks) // self.groups
        for i, block in enumerate(blocks):
            h = block(h)
            if (i + 1) % per_group == 0 and i + 1 < len(blocks):
                h = _upsample_nearest(h)  # (B, 2h, 2w, C); A.1: nearest-neighbour upsampling
        return self.output_conv(ops.cast(ops.relu(h), "float32"))  # (B, H, W, 6)


@register_tokenizer
class DVAE(ImageTokenizer):
    """DALL-E's dVAE tokenizer: 8192 codes on a grid 8x smaller than the image by default.

    Args:
      image_size: side of the square images.
      vocab_size: K, the number of codes (DALL-E: 8192).
      width: channels of the first group (DALL-E `n_hid`: 256).
      width_multipliers: one per group; downsampling is 2^(groups - 1) (DALL-E: (1, 2, 4, 8)).
      blocks_per_group: resblocks per group (DALL-E: 2).
      decoder_input_width: channels of the decoder's first 1x1 convolution (DALL-E `n_init`: 128).
      epsilon: ε of the pixel map φ (DALL-E: 0.1).
      logits_init_gain, embedding_init_gain: multiply the initial weights of the two 1x1
        convolutions around the relaxation -- the encoder's logits and the decoder's code
        embeddings (its input convolution on the one-hot codes). DALL-E: 1, i.e. the
        release's N(0, 1 / fan_in), which gives code embeddings of std 1 / sqrt(K). Short
        runs need larger ones: the decoder then tells codes apart from the first step, and
        the logits vary with the image by more than the Gumbel noise (`gin/dvae_tiny.gin`).
    """

    def __init__(self, image_size: int = 256, vocab_size: int = 8192, width: int = 256,
                 width_multipliers: Sequence[int] = (1, 2, 4, 8), blocks_per_group: int = 2,
                 decoder_input_width: int = 128, epsilon: float = likelihoods.LOGIT_LAPLACE_EPSILON,
                 logits_init_gain: float = 1.0, embedding_init_gain: float = 1.0, **kwargs):
        width_multipliers = tuple(int(m) for m in width_multipliers)
        if not width_multipliers or blocks_per_group < 1:
            raise ValueError(f"DVAE needs at least one group and one block per group, got "
                             f"width_multipliers={width_multipliers}, blocks_per_group={blocks_per_group}")
        if vocab_size < 2 or not 0.0 < epsilon < 0.5:
            raise ValueError(f"DVAE needs vocab_size >= 2 and 0 < epsilon < 0.5, got {vocab_size}, {epsilon}")
        super().__init__(image_size=image_size, downsample=2 ** (len(width_multipliers) - 1),
                         vocab_size=vocab_size, **kwargs)
        self.width = int(width)
        self.width_multipliers = width_multipliers
        self.blocks_per_group = int(blocks_per_group)
        self.decoder_input_width = int(decoder_input_width)
        self.epsilon = float(epsilon)
        self.logits_init_gain = float(logits_init_gain)
        self.embedding_init_gain = float(embedding_init_gain)
        self.encoder = DVAEEncoder(self.vocab_size, self.width, width_multipliers, self.blocks_per_group,
                                   self.logits_init_gain, name="encoder")
        self.decoder = DVAEDecoder(self.width, width_multipliers, self.blocks_per_group, self.decoder_input_width,
                                   self.embedding_init_gain, name="decoder")

    # -- the two halves -----------------------------------------------------------

    def encoder_logits(self, images):
        """float [B, H, W, 3] in [-1, 1] -> float32 logits [B, h, w, K]."""
        pixels = likelihoods.map_pixels((ops.cast(images, "float32") + 1.0) / 2.0, self.epsilon)  # φ (A.3)
        return self.encoder(ops.cast(pixels, self.compute_dtype))

    def decoder_statistics(self, codes_one_hot):
        """float [B, h, w, K] (one-hot or relaxed) -> (mu, ln b), float32 [B, H, W, 3] each."""
        stats = self.decoder(codes_one_hot)
        return stats[..., :3], stats[..., 3:]

    def reconstruction(self, mu):
        """Decoder `mu` -> image float32 [B, H, W, 3] in [-1, 1]: φ⁻¹(sigmoid(mu)) (A.3)."""
        return likelihoods.logit_laplace_reconstruction(mu, self.epsilon) * 2.0 - 1.0

    # -- the tokenizer interface --------------------------------------------------

    def encode_codes(self, images):
        """float [B, H, W, 3] in [-1, 1] -> int32 [B, h, w]: argmax of the logits (§2.2, no Gumbel noise)."""
        return ops.cast(ops.argmax(self.encoder_logits(images), axis=-1), "int32")

    def decode_codes(self, codes):
        """int32 [B, h, w] -> float32 [B, H, W, 3] in [-1, 1]."""
        one_hot = ops.one_hot(ops.cast(codes, "int32"), self.vocab_size, dtype="float32")  # (B, h, w, K)
        mu, _ = self.decoder_statistics(one_hot)
        return self.reconstruction(mu)

    def build_for_images(self) -> None:
        """Creates the variables on a one-code image: no weight depends on the resolution."""
        zeros = ops.zeros((1, self.downsample, self.downsample, 3))
        self.decode_codes(self.encode_codes(zeros))
        self.built = True  # Keras refuses to save the weights of a model not marked built

    def call(self, images):
        """float [B, H, W, 3] in [-1, 1] -> its reconstruction through the argmax codes."""
        return self.decode_codes(self.encode_codes(images))

    def get_config(self):
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "vocab_size": self.vocab_size,
            "width": self.width,
            "width_multipliers": list(self.width_multipliers),
            "blocks_per_group": self.blocks_per_group,
            "decoder_input_width": self.decoder_input_width,
            "epsilon": self.epsilon,
            "logits_init_gain": self.logits_init_gain,
            "embedding_init_gain": self.embedding_init_gain,
        }


__all__ = ["DVAE", "DVAEDecoder", "DVAEEncoder", "DVAEResBlock"]
