"""OpenAI's DALL-E dVAE (`encoder.pkl`, `decoder.pkl`) -> an mmt `DVAE` directory.

    python -m mmt.tokenizers.converters dalle_dvae --encoder=encoder.pkl --decoder=decoder.pkl \
        --output=/tokenizers/dalle_dvae [--image_size=256]

The files are the `cdn.openai.com/dall-e/{encoder,decoder}.pkl` that the `dall_e`
package loads with `torch.load`: whole pickled modules (`dall_e.encoder.Encoder`,
`dall_e.decoder.Decoder`), not state dicts. They are read by `torch_pickle` without
torch and without running pickle code: only tensor storage and the class names below
are allowed, and those classes are never imported (rebuilt as plain records). Their
layout (`dall_e/encoder.py`, `decoder.py`, `utils.py`):

    blocks.input                       Conv2d(3 -> n_hid, 7x7) | (vocab -> n_init, 1x1)
    blocks.group_<g>.block_<b>.id_path Conv2d 1x1 when the width changes, else Identity
    blocks.group_<g>.block_<b>.res_path.conv_<1..4>
                                       encoder kernels 3,3,3,1, decoder 1,3,3,3;
                                       width/4 hidden; post_gain 1 / (4 * n_blk_per_group)^2
    blocks.output.conv                 Conv2d(8 n_hid -> vocab, 1x1) | (n_hid -> 6, 1x1)

`dall_e.utils.Conv2d` keeps `w` [out, in, k, k] (OIHW) and `b`; mmt's kernels are HWIO.
The encoder groups widen 1, 2, 4, 8 x n_hid with a 2x2 max-pool between groups; the
decoder mirrors them with nearest upsampling; its 6 output channels are the
logit-Laplace (mu, ln b) of `map_pixels` ε 0.1 -- mmt's `DVAE` defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmt.tokenizers.converters import torch_pickle
from mmt.tokenizers.converters.common import Assigner, ConversionError, oihw_to_hwio

#: The classes `encoder.pkl` / `decoder.pkl` may contain (rebuilt as data, never imported).
DALL_E_CLASSES = (
    "dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock", "dall_e.decoder.Decoder", "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d", "torch.nn.modules.container.Sequential", "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.linear.Identity", "torch.nn.modules.upsampling.Upsample",
    "torch.device",
)


def read_module(path: str | os.PathLike, expected: str) -> tuple[dict, dict]:
    """(state dict, the top module's fields) of a pickled dall_e module, read safely."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"DALL-E dVAE file {path} not found")
    try:
        module = torch_pickle.load(path, DALL_E_CLASSES)
    except torch_pickle.UnsafePickleError as e:
        raise ConversionError(str(e)) from e
    except (ValueError, OSError, EOFError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e
    if not isinstance(module, torch_pickle.ModuleRecord) or module.qualified_name != expected:
        got = module.qualified_name if isinstance(module, torch_pickle.ModuleRecord) else type(module).__name__
        raise ConversionError(f"{path} holds a {got}, expected a pickled {expected}")
    fields = {k: v for k, v in module.state.items() if isinstance(v, (int, float, bool, str))}
    return torch_pickle.state_dict(module), fields


def config_from_files(encoder_fields: dict, decoder_fields: dict) -> dict[str, Any]:
    """mmt DVAE config from the pickled modules' attrs fields (defaults: the release's)."""
    group_count = int(encoder_fields.get("group_count", 4))
    if group_count != 4 or int(decoder_fields.get("group_count", 4)) != 4:
        raise ConversionError(f"dall_e modules have 4 groups (widths 1, 2, 4, 8 x n_hid), got {group_count}")
    for name in ("n_hid", "n_blk_per_group", "vocab_size"):
        if name in encoder_fields and name in decoder_fields and encoder_fields[name] != decoder_fields[name]:
            raise ConversionError(f"encoder and decoder disagree on {name}: {encoder_fields[name]} vs "
                                  f"{decoder_fields[name]}")
    if int(encoder_fields.get("input_channels", 3)) != 3 or int(decoder_fields.get("output_channels", 3)) != 3:
        raise ConversionError("only RGB dVAEs (3 input channels, 2 x 3 output channels) convert")
    return dict(vocab_size=int(encoder_fields.get("vocab_size", 8192)), width=int(encoder_fields.get("n_hid", 256)),
                width_multipliers=(1, 2, 4, 8), blocks_per_group=int(encoder_fields.get("n_blk_per_group", 2)),
                decoder_input_width=int(decoder_fields.get("n_init", 128)), epsilon=0.1)


def _conv(assigner: Assigner, conv, key: str) -> None:
    assigner.assign(conv.kernel, f"{key}.w", oihw_to_hwio)
    assigner.assign(conv.bias, f"{key}.b")


def _half(assigner: Assigner, half) -> None:
    _conv(assigner, half.input_conv, "blocks.input")
    blocks = half.chain
    per_group = len(blocks) // half.groups
    for i, block in enumerate(blocks):
        prefix = f"blocks.group_{i // per_group + 1}.block_{i % per_group + 1}"
        if block.id_path is not None:
            _conv(assigner, block.id_path, f"{prefix}.id_path")
        for j, conv in enumerate(block.chain, 1):
            _conv(assigner, conv, f"{prefix}.res_path.conv_{j}")
    _conv(assigner, half.output_conv, "blocks.output.conv")
    assigner.check_all_used()


def convert(encoder_path: str | os.PathLike, decoder_path: str | os.PathLike,
            output: str | os.PathLike | None = None, image_size: int = 256, **overrides):
    """Reads both files, builds mmt's DVAE (config from the files, then `overrides`),
    assigns every tensor (shapes checked, the first differing one named) and saves an
    ordinary `ImageTokenizer` directory to `output` when given.

    Returns:
      the `DVAE`.
    """
    from mmt.tokenizers.dvae import DVAE

    enc_state, enc_fields = read_module(encoder_path, "dall_e.encoder.Encoder")
    dec_state, dec_fields = read_module(decoder_path, "dall_e.decoder.Decoder")
    config = {**config_from_files(enc_fields, dec_fields), **overrides}
    dvae = DVAE(image_size=image_size, **config)
    dvae.build_for_images()
    _half(Assigner(str(encoder_path), enc_state), dvae.encoder)
    _half(Assigner(str(decoder_path), dec_state), dvae.decoder)
    if output is not None:
        dvae.save(output)
    return dvae


__all__ = ["DALL_E_CLASSES", "config_from_files", "convert", "read_module"]
