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
import time
from pathlib import Path

import numpy as np

from mmt.data import shapes
from mmt.tokenizers.image import ImageTokenizer
from mmt.tokenizers.loading import load_image_tokenizer

_ATTRIBUTES = ("exact", "shape", "color", "size", "cell", "count")


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 [N, H, W, 3] pairs (capped at 100 dB for equal images)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return np.where(mse > 0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)), 100.0)


def code_usage(codes: np.ndarray, vocab_size: int) -> tuple[float, float, int]:
    """(fraction of codes used, perplexity of the code histogram, codes used)."""
    counts = np.bincount(codes.reshape(-1), minlength=vocab_size).astype(np.float64)
    p = counts / counts.sum()
    nonzero = p[p > 0]
    return float((counts > 0).mean()), float(np.exp(-(nonzero * np.log(nonzero)).sum())), int((counts > 0).sum())


def background_synonyms(images: np.ndarray, codes: np.ndarray) -> tuple[int, float]:
    """(distinct codes, perplexity) of the codes given to all-black patches.

    Each code covers an (H/h x W/w) patch of its image. A black patch is one of the most
    predictable things a generator must produce; spread over many synonymous codes it
    becomes a guess among them at every background position (and speckles sampled images
    with whatever the stray codes decode to). (0, 0.0) when no patch is all black.
    """
    n, h, w = codes.shape
    fh, fw = images.shape[1] // h, images.shape[2] // w
    patch_max = images.reshape(n, h, fh, w, fw, 3).max(axis=(2, 4, 5))  # [N, h, w]
    black = codes[patch_max == 0]
    if black.size == 0:
        return 0, 0.0
    counts = np.bincount(black).astype(np.float64)
    p = counts[counts > 0] / black.size
    return int((counts > 0).sum()), float(np.exp(-(p * np.log(p)).sum()))


def evaluate(tokenizer: ImageTokenizer, images: np.ndarray, batch_size: int) -> dict:
    """Runs the tokenizer over `images` (uint8 [N, R, R, 3]) and scores the reconstructions."""
    codes, decoded = [], []
    tokenizer.decode(tokenizer.encode(images[:batch_size]))  # compile outside the timing
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        chunk = images[i: i + batch_size]
        c = tokenizer.encode(chunk)
        codes.append(c)
        decoded.append(tokenizer.decode(c))
    seconds = time.perf_counter() - start
    codes, decoded = np.concatenate(codes), np.concatenate(decoded)
    truth = [shapes.detect(x) for x in images]
    found = [shapes.detect(x) for x in decoded]
    scores = shapes.attribute_accuracy(found, truth)
    usage, perplexity, used = code_usage(codes, tokenizer.vocab_size)
    black_codes, black_perplexity = background_synonyms(images, codes)
    per_image = psnr(images, decoded)
    mse = ((images.astype(np.float64) - decoded.astype(np.float64)) ** 2).mean()
    return {
        "images": len(images),
        "psnr_db": float(per_image.mean()),
        "mse": float(mse),
        "agreement": scores["exact"],
        "attributes": {a: scores[a] for a in _ATTRIBUTES},
        "code_usage": usage,
        "codes_used": used,
        "perplexity": perplexity,
        "black_patch_codes": black_codes,
        "black_patch_perplexity": black_perplexity,
        "vocab_size": tokenizer.vocab_size,
        "grid": list(tokenizer.grid_size),
        "images_per_s": len(images) / seconds,
        "_decoded": decoded,
        "_matches": [shapes.exact_match(f, t) for f, t in zip(found, truth)],
        "_found": found,
    }


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
    print("  per attribute " + "  ".join(f"{a} {result['attributes'][a]:.1%}" for a in _ATTRIBUTES[1:]))
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
