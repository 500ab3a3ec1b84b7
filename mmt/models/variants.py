"""Named model sizes: one table per model family (STYLE.md: name sizes, don't repeat numbers).

Gin files pick a size by name (`ITITTask.size = "B"`) and override single fields only
where an experiment needs it (`ITITTask.size_overrides = {"encoder_depth": 2}`).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ITITSize:
    """Widths and depths of ITIT's three transformers (ITIT App. B).

    The image-text encoder is a ViT of the named size; the text decoder has GIT's 6
    blocks, the image decoder MAGE's 8. Decoders of the L and H models are narrower
    than their encoders (the paper does not give their width); with the T5
    vocabulary (32,128 pieces, tied input/output text embeddings) and 8,192 image codes
    this gives 226M / 488M / 866M trainable parameters against the paper's 221M / 487M /
    868M (Table 1), excluding T5 and the VQ tokenizer — `python -m mmt.train --dry_run` prints it.
    """

    encoder_width: int
    encoder_depth: int
    encoder_heads: int
    decoder_width: int
    text_decoder_depth: int = 6
    image_decoder_depth: int = 8
    decoder_heads: int = 12
    mlp_ratio: int = 4
    # The small trainable text encoder of tiny configs (T5 replaces it at scale).
    text_encoder_width: int = 0
    text_encoder_depth: int = 0


ITIT_SIZES = {
    "tiny": ITITSize(encoder_width=128, encoder_depth=3, encoder_heads=4, decoder_width=128,
                     text_decoder_depth=2, image_decoder_depth=2, decoder_heads=4,
                     text_encoder_width=128, text_encoder_depth=1),
    "B": ITITSize(encoder_width=768, encoder_depth=12, encoder_heads=12, decoder_width=768),
    # The paper gives no decoder width; 896 (14 heads of 64) is the width at which the L
    # total matches Table 1 (768 gives 447M, 1024 gives 532M).
    "L": ITITSize(encoder_width=1024, encoder_depth=24, encoder_heads=16, decoder_width=896, decoder_heads=14),
    "H": ITITSize(encoder_width=1280, encoder_depth=32, encoder_heads=16, decoder_width=1024, decoder_heads=16),
}


def _variant(family: str, table: dict, name: str, overrides: dict):
    """`table[name]` with `overrides` applied (unknown names and fields fail with the choices)."""
    if name not in table:
        raise ValueError(f"unknown {family} size {name!r}; choose one of {sorted(table)}")
    fields = {f.name for f in dataclasses.fields(next(iter(table.values())))}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown {family} size fields {sorted(unknown)}; fields are {sorted(fields)}")
    return dataclasses.replace(table[name], **overrides)


def itit_size(name: str, **overrides) -> ITITSize:
    """The named ITIT size with `overrides` applied (unknown names fail with the choices)."""
    return _variant("ITIT", ITIT_SIZES, name, overrides)


@dataclasses.dataclass(frozen=True)
class UPGenSize:
    """UPGen's one encoder-only transformer (UPGen §4.1, App. A: ViT-L by default).

    B and L are ViT-B/L (Dosovitskiy et al., 2021, Table 1): 12 x 768 / 24 x 1024,
    heads of 64, MLP 4x. With MaskGIT's 1,024 VQ codes, a 32,128-piece text vocabulary
    and an untied output layer, L has 370M parameters, B 136M (`--dry_run`).
    """

    width: int
    depth: int
    heads: int
    mlp_ratio: int = 4


UPGEN_SIZES = {
    "tiny": UPGenSize(width=128, depth=4, heads=4),
    "B": UPGenSize(width=768, depth=12, heads=12),
    "L": UPGenSize(width=1024, depth=24, heads=16),
}


def upgen_size(name: str, **overrides) -> UPGenSize:
    """The named UPGen size with `overrides` applied (unknown names fail with the choices)."""
    return _variant("UPGen", UPGEN_SIZES, name, overrides)


@dataclasses.dataclass(frozen=True)
class M3AESize:
    """M3AE's ViT encoder and its light MAE decoder (M3AE §4.2, App. A.3).

    S / B / L are ViT-S/16 (Touvron et al., 2021: 12 x 384, 6 heads), ViT-B/16 and
    ViT-L/16 (Dosovitskiy et al., 2021, Table 1: 12 x 768 / 24 x 1024, heads of 64,
    MLP 4x); every decoder has MAE's 8 blocks of width 512 with 16 heads (MAE §3, App.
    A.1). The encoders have 21.7M / 85.6M / 303.1M parameters with their patch
    projection and CLS token (`--dry_run`: "vit_encoder").

    tiny (our choice, for 64x64 shapes on 2 CPU cores): 8x8 patches, a 4-block 128-wide
    encoder and a 2-block 128-wide decoder.
    """

    width: int
    depth: int
    heads: int
    patch_size: int = 16
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mlp_ratio: int = 4


M3AE_SIZES = {
    "tiny": M3AESize(width=128, depth=4, heads=4, patch_size=8, decoder_width=128, decoder_depth=2, decoder_heads=4),
    "S": M3AESize(width=384, depth=12, heads=6),
    "B": M3AESize(width=768, depth=12, heads=12),
    "L": M3AESize(width=1024, depth=24, heads=16),
}


def m3ae_size(name: str, **overrides) -> M3AESize:
    """The named M3AE size with `overrides` applied (unknown names fail with the choices)."""
    return _variant("M3AE", M3AE_SIZES, name, overrides)


@dataclasses.dataclass(frozen=True)
class DALLESize:
    """DALL-E's decoder-only sparse transformer (DALL-E §2.2, App. B.1).

    12B is the paper's: 64 attention layers of 62 heads with a per-head state of 64
    (width 3,968), MLP 4x. With the paper's vocabularies (16,384 BPE, 8,192 dVAE codes),
    256 text and 32 x 32 image positions and untied text / image output layers it has
    12.3B trainable parameters (`python -m mmt.train --gin_file=gin/dalle_12b.gin --dry_run`).
    B (GPT-2 small's shape) is a middle size for benchmarks, not from the paper; tiny is
    for 64x64 shapes on 2 CPU cores.
    """

    width: int
    depth: int
    heads: int
    mlp_ratio: int = 4


DALLE_SIZES = {
    "tiny": DALLESize(width=128, depth=4, heads=4),
    "B": DALLESize(width=768, depth=12, heads=12),
    "12B": DALLESize(width=3968, depth=64, heads=62),
}


def dalle_size(name: str, **overrides) -> DALLESize:
    """The named DALL-E size with `overrides` applied (unknown names fail with the choices)."""
    return _variant("DALL-E", DALLE_SIZES, name, overrides)
