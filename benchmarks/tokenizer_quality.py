"""Reconstruction quality of any saved mmt image tokenizer on `shapes` eval images.

Encodes and decodes `--count` eval images (rendered at the tokenizer's resolution, so
their true objects are known) and prints, headed by the command that produced it:

* PSNR (dB, mean over images of 10 log10(255^2 / MSE)) and MSE;
* codebook usage over all eval tokens: the fraction of codes used at least once and
  the perplexity exp(H) of the code histogram (1 = one code, K = all codes equally);
* the codes of all-black patches: how many synonyms the background is spread over
  (few is what a text-to-image model on these tokens wants);
* the shapes detector's exact-match agreement between each image and its
  reconstruction (every object with every attribute), and per-attribute agreement
  (`mmt.data.shapes.attribute_accuracy`, detect(reconstruction) vs detect(image));
* encode + decode throughput.

It writes `reconstructions.png` (16 original | reconstruction pairs, mismatches
first, each captioned with the detector's verdict) and `quality.json` (the figures and the
command) into `--output_dir` (default `<tokenizer>/quality`).

    python benchmarks/tokenizer_quality.py --tokenizer=/tmp/vqgan_tiny/export
    python benchmarks/tokenizer_quality.py --tokenizer=/tmp/dvae_tiny/export --count=200

Targets on 500 images: tiny VQGAN agreement >= 95% and usage >= 50% of codes; tiny
dVAE agreement >= 90%.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mmt.data import shapes
from mmt.evaluation.tokenizer_quality import ATTRIBUTES, evaluate
from mmt.tokenizers.image import ImageTokenizer
from mmt.tokenizers.loading import load_image_tokenizer


def save_grid(images, decoded, matches, found, path: Path, count: int = 16, columns: int = 4, scale: int = 3) -> None:
    """original | reconstruction pairs (mismatches first), each captioned with the detector's verdict."""
    from PIL import Image, ImageDraw, ImageFont

    order = ([i for i, ok in enumerate(matches) if not ok] + [i for i, ok in enumerate(matches) if ok])[:count]
    size, gap, text = images.shape[1] * scale, 6, 24
    pair_width = 2 * size + gap // 2
    rows = -(-len(order) // columns)
    sheet = Image.new("RGB", (gap + columns * (pair_width + gap), gap + rows * (size + text + gap)), (40, 40, 40))
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for n, i in enumerate(order):
        x, y = gap + (n % columns) * (pair_width + gap), gap + (n // columns) * (size + text + gap)
        for k, picture in enumerate((images[i], decoded[i])):
            tile = Image.fromarray(picture).resize((size, size), Image.NEAREST)
            sheet.paste(tile, (x + k * (size + gap // 2), y))
        verdict = "same objects" if matches[i] else "read back: " + (", ".join(o.describe() for o in found[i]) or "nothing")
        draw.text((x, y + size + 2), verdict[:2 * size // 6], fill=(230, 230, 230) if matches[i] else (255, 120, 120),
                  font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a directory written by ImageTokenizer.save")
    parser.add_argument("--count", type=int, default=500, help="eval images")
    parser.add_argument("--seed", type=int, default=0, help="ShapesConfig.seed of the images")
    parser.add_argument("--split", default="eval", choices=shapes.SPLITS)
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--output_dir", default=None, help="default: <tokenizer>/quality")
    args = parser.parse_args(argv)

    import common  # here, not at the top: the tests load this file by path, without benchmarks/ on sys.path

    command = common.print_command(argv)
    tokenizer = load_image_tokenizer(args.tokenizer)
    resolution = tokenizer.image_size
    if resolution not in shapes.RESOLUTIONS:
        raise SystemExit(f"error: the tokenizer takes {resolution}x{resolution} images; shapes renders "
                         f"{shapes.RESOLUTIONS} only")
    meta = ImageTokenizer.read_config(args.tokenizer)
    print(f"{meta['class']} {tokenizer.fingerprint()[:19]}...: {resolution}x{resolution} -> "
          f"{tokenizer.grid_size[0]}x{tokenizer.grid_size[1]} codes of {tokenizer.vocab_size}")
    examples = list(shapes.generate(shapes.ShapesConfig(resolution=resolution, seed=args.seed), args.split, args.count))
    images = np.stack([e.image for e in examples])
    result = evaluate(tokenizer, images, args.batch_size)

    print(f"{result['images']} {args.split} images (seed {args.seed})")
    print(f"  PSNR          {result['psnr_db']:.2f} dB   (MSE {result['mse']:.1f})")
    print(f"  code usage    {result['code_usage']:.1%} of codes ({result['codes_used']} of {result['vocab_size']}), "
          f"perplexity {result['perplexity']:.1f}")
    print(f"  black patches {result['black_patch_codes']} distinct codes, perplexity "
          f"{result['black_patch_perplexity']:.1f} (1 is ideal for a generator; see background_synonyms)")
    print(f"  agreement     {result['agreement']:.1%} exact match, detect(reconstruction) == detect(image)")
    print("  per attribute " + "  ".join(f"{a} {result['attributes'][a]:.1%}" for a in ATTRIBUTES[1:]))
    print(f"  throughput    {result['images_per_s']:.0f} images/s (encode + decode, batch {args.batch_size})")

    output = Path(args.output_dir) if args.output_dir else Path(args.tokenizer) / "quality"
    output.mkdir(parents=True, exist_ok=True)
    save_grid(images, result["_decoded"], result["_matches"], result["_found"], output / "reconstructions.png")
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    public.update(command=command, tokenizer=str(args.tokenizer), fingerprint=tokenizer.fingerprint(),
                  split=args.split, seed=args.seed)
    (output / "quality.json").write_text(json.dumps(public, indent=2, sort_keys=True) + "\n")
    print(f"wrote {output / 'reconstructions.png'} and {output / 'quality.json'}")
    common.report("tokenizer_quality", {k: v for k, v in public.items() if k != "command"}, argv)
    return public


if __name__ == "__main__":
    main()
