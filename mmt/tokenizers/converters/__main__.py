"""`python -m mmt.tokenizers.converters {maskgit_vqgan,dalle_dvae} ...`: see the package docstring."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmt.tokenizers.converters",
                                     description="public tokenizer weights -> an mmt ImageTokenizer directory")
    commands = parser.add_subparsers(dest="command", required=True)
    maskgit = commands.add_parser("maskgit_vqgan", help="MaskGIT's ImageNet VQGAN (Flax checkpoint)")
    maskgit.add_argument("--checkpoint", required=True, help="tokenizer_imagenet256_checkpoint (file or directory)")
    maskgit.add_argument("--image_size", type=int, default=256)
    dalle = commands.add_parser("dalle_dvae", help="OpenAI's DALL-E dVAE (encoder.pkl, decoder.pkl)")
    dalle.add_argument("--encoder", required=True)
    dalle.add_argument("--decoder", required=True)
    dalle.add_argument("--image_size", type=int, default=256)
    for sub in (maskgit, dalle):
        sub.add_argument("--output", required=True, help="the tokenizer directory to write")
        sub.add_argument("--verbose", action="store_true", help="a traceback on errors")
    args = parser.parse_args(argv)
    if args.command == "maskgit_vqgan":
        from mmt.tokenizers.converters import maskgit_vqgan

        tokenizer = maskgit_vqgan.convert(args.checkpoint, args.output, image_size=args.image_size)
    else:
        from mmt.tokenizers.converters import dalle_dvae

        tokenizer = dalle_dvae.convert(args.encoder, args.decoder, args.output, image_size=args.image_size)
    print(f"wrote {type(tokenizer).__name__} ({tokenizer.vocab_size} codes, grid {tokenizer.grid_size}) to "
          f"{args.output}: {tokenizer.fingerprint()}")
    return 0


if __name__ == "__main__":
    from mmt.errors import run_main

    sys.exit(run_main(main))
