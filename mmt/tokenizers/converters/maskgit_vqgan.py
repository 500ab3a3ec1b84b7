"""MaskGIT's public ImageNet VQGAN (google-research/maskgit, Flax) -> an mmt `VQGAN` directory.

    python -m mmt.tokenizers.converters maskgit_vqgan \
        --checkpoint=checkpoints/tokenizer_imagenet256_checkpoint --output=/tokenizers/maskgit_vqgan

The file is the `tokenizer_imagenet256_checkpoint` that maskgit's README links (a Flax
msgpack checkpoint; read by `flax_msgpack`, no flax needed). Its parameter tree
(`maskgit/nets/vqgan_tokenizer.py`, Flax compact-module names):

    params/encoder/Conv_0/kernel                  conv3x3, no bias
    params/encoder/ResBlock_<k>/{GroupNorm_0, Conv_0, GroupNorm_1, Conv_1, [Conv_2]}
        k over (levels x num_res_blocks, then num_res_blocks middle blocks); convs
        without bias; Conv_2 the 1x1 shortcut when the width changes
    params/encoder/{GroupNorm_0, Conv_1}          norm_out, conv_out (1x1, bias)
    params/quantizer/codebook                     [1024, 256]
    params/decoder/Conv_0                         conv_in (bias)
    params/decoder/ResBlock_<k>                   middle blocks, then levels last to first
    params/decoder/Conv_1..Conv_<L-1>             the conv3x3 after each nearest upsampling
    params/decoder/{GroupNorm_0, Conv_<L>}        norm_out, conv_out (3x3, 3 channels)

GroupNorm: 32 groups, ε 1e-6 (Flax's default), `scale`/`bias` -> `gamma`/`beta`.
Flax kernels are HWIO like Keras's. The architecture is mmt's VQGAN with two options
(see `VQGAN`): `shortcut_from="branch"` (MaskGIT's ResBlock projects the residual
branch's output, `x + conv1x1(x)`) and `encoder_input_range="unit"` (MaskGIT's images
are in [0, 1]: the encoder maps mmt's [-1, 1] first, so its zero padding is MaskGIT's;
the decoder's [0, 1] output becomes [-1, 1] by scaling the last convolution, exactly).
Its bias-free convolutions get zero biases.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmt.layers.conv import ResBlock, Upsample
from mmt.tokenizers.converters import flax_msgpack
from mmt.tokenizers.converters.common import Assigner, ConversionError

#: MaskGIT's tokenizer (`maskgit/configs/vqgan_config`, gin/vqgan_maskgit.gin) as mmt's VQGAN.
MASKGIT_CONFIG: dict[str, Any] = dict(
    image_size=256, filters=128, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=2, embedding_dim=256,
    codebook_size=1024, num_groups=32, downsample_mode="avg_pool", commitment_cost=0.25, entropy_weight=0.1,
    entropy_temperature=0.01, shortcut_from="branch", encoder_input_range="unit",
)


def _params(tree: dict, source: str) -> dict:
    for key in ("params", "ema_params", "target"):
        if isinstance(tree.get(key), dict) and "encoder" in tree[key]:
            return tree[key]
    if "encoder" in tree:
        return tree
    raise ConversionError(f"{source}: no 'params/encoder' in the checkpoint (top-level keys {sorted(tree)[:8]}): "
                          f"not a MaskGIT VQGAN checkpoint")


def _resblock(assigner: Assigner, block: ResBlock, prefix: str) -> None:
    assigner.assign(block.norm1.gamma, f"{prefix}/GroupNorm_0/scale")
    assigner.assign(block.norm1.beta, f"{prefix}/GroupNorm_0/bias")
    assigner.assign(block.conv1.kernel, f"{prefix}/Conv_0/kernel")
    assigner.zero(block.conv1.bias)
    assigner.assign(block.norm2.gamma, f"{prefix}/GroupNorm_1/scale")
    assigner.assign(block.norm2.beta, f"{prefix}/GroupNorm_1/bias")
    assigner.assign(block.conv2.kernel, f"{prefix}/Conv_1/kernel")
    assigner.zero(block.conv2.bias)
    if block.shortcut is not None:
        assigner.assign(block.shortcut.kernel, f"{prefix}/Conv_2/kernel")
        assigner.zero(block.shortcut.bias)


def _conv(assigner: Assigner, conv, prefix: str, bias: bool = True) -> None:
    assigner.assign(conv.kernel, f"{prefix}/kernel")
    if bias:
        assigner.assign(conv.bias, f"{prefix}/bias")
    else:
        assigner.zero(conv.bias)


def load_into(vqgan, checkpoint: str | os.PathLike) -> None:
    """Assigns a MaskGIT VQGAN checkpoint to the built `vqgan`, checking every shape."""
    source = str(checkpoint)
    try:
        tree = flax_msgpack.load(checkpoint)
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read MaskGIT checkpoint {source}: {e}") from e
    assigner = Assigner(source, flax_msgpack.flatten(_params(tree, source)))
    if vqgan.shortcut_from != "branch" or vqgan.encoder_input_range != "unit":
        raise ConversionError("a MaskGIT VQGAN needs VQGAN(shortcut_from='branch', encoder_input_range='unit')")
    encoder, decoder = vqgan.encoder, vqgan.decoder

    _conv(assigner, encoder.chain[0], "encoder/Conv_0", bias=False)
    for k, block in enumerate(b for b in encoder.chain if isinstance(b, ResBlock)):
        _resblock(assigner, block, f"encoder/ResBlock_{k}")
    assigner.assign(encoder.norm_out.gamma, "encoder/GroupNorm_0/scale")
    assigner.assign(encoder.norm_out.beta, "encoder/GroupNorm_0/bias")
    _conv(assigner, encoder.conv_out, "encoder/Conv_1")

    assigner.assign(vqgan.quantizer.codebook, "quantizer/codebook")

    _conv(assigner, decoder.chain[0], "decoder/Conv_0")
    for k, block in enumerate(b for b in decoder.chain if isinstance(b, ResBlock)):
        _resblock(assigner, block, f"decoder/ResBlock_{k}")
    ups = [layer for layer in decoder.chain if isinstance(layer, Upsample)]
    for k, up in enumerate(ups, 1):
        _conv(assigner, up.conv, f"decoder/Conv_{k}")
    assigner.assign(decoder.norm_out.gamma, "decoder/GroupNorm_0/scale")
    assigner.assign(decoder.norm_out.beta, "decoder/GroupNorm_0/bias")
    # MaskGIT decodes to [0, 1]; y' = 2 y - 1 folded into the last (linear) convolution is exact.
    out = f"decoder/Conv_{len(ups) + 1}"
    assigner.assign(decoder.conv_out.kernel, f"{out}/kernel", lambda w: 2.0 * w)
    assigner.assign(decoder.conv_out.bias, f"{out}/bias", lambda b: 2.0 * b - 1.0)
    assigner.check_all_used()


def convert(checkpoint: str | os.PathLike, output: str | os.PathLike | None = None, **overrides):
    """Builds mmt's VQGAN with MaskGIT's config (plus `overrides`), loads the checkpoint,
    and saves an ordinary `ImageTokenizer` directory to `output` (when given).

    Returns:
      the `VQGAN`.
    """
    from mmt.tokenizers.vqgan import VQGAN

    if not Path(checkpoint).exists():
        raise ConversionError(f"MaskGIT checkpoint {checkpoint} not found")
    vqgan = VQGAN(**{**MASKGIT_CONFIG, **overrides})
    vqgan.build_for_images()
    load_into(vqgan, checkpoint)
    if output is not None:
        vqgan.save(output)
    return vqgan


__all__ = ["MASKGIT_CONFIG", "convert", "load_into"]
