"""A tiny deterministic image tokenizer for the Beam pipeline tests and benchmark.

encode: average-pool each `downsample` x `downsample` patch, project the mean colour
with a fixed random matrix, add a per-position bias, take the argmax over the codes.
It has real weights, so save / load / fingerprint behave as for VQGAN or dVAE.

Importing this module registers `BeamTestTokenizer` with `ImageTokenizer.load`; Beam
workers import it through `--import_modules=beam_test_tokenizer` (with tests/ on the
Python path).
"""

from __future__ import annotations

import keras
from keras import ops

from mmt.tokenizers.image import ImageTokenizer, register_tokenizer


@register_tokenizer
class BeamTestTokenizer(ImageTokenizer):
    def __init__(self, image_size: int = 32, downsample: int = 8, vocab_size: int = 64, seed: int = 0, **kwargs):
        super().__init__(image_size, downsample, vocab_size, **kwargs)
        self.seed = int(seed)
        grid = image_size // downsample
        self.projection = self.add_weight(
            shape=(3, vocab_size), initializer=keras.initializers.RandomNormal(stddev=1.0, seed=seed),
            name="projection")
        self.position = self.add_weight(
            shape=(grid, grid, vocab_size), initializer=keras.initializers.RandomNormal(stddev=0.1, seed=seed + 1),
            name="position")
        self.codebook = self.add_weight(
            shape=(vocab_size, 3), initializer=keras.initializers.RandomUniform(-1.0, 1.0, seed=seed + 2),
            name="codebook")
        self.built = True

    def encode_codes(self, images):
        b = ops.shape(images)[0]
        h, w = self.grid_size
        d = self.downsample
        patches = ops.reshape(images, (b, h, d, w, d, 3))
        pooled = ops.mean(patches, axis=(2, 4))  # (B, h, w, 3)
        logits = ops.einsum("bhwc,cv->bhwv", pooled, self.projection) + self.position
        return ops.cast(ops.argmax(logits, axis=-1), "int32")  # (B, h, w)

    def decode_codes(self, codes):
        colours = ops.take(self.codebook, codes, axis=0)  # (B, h, w, 3)
        d = self.downsample
        return ops.repeat(ops.repeat(colours, d, axis=1), d, axis=2)

    def get_config(self):
        return {"image_size": self.image_size, "downsample": self.downsample, "vocab_size": self.vocab_size,
                "seed": self.seed}
