"""Accuracy and speed of the `shapes` detector on ground-truth images.

Generates `--count` eval images per resolution, detects their objects and prints the
exact-match accuracy (every object, every attribute), the per-attribute accuracy
(`mmt.data.shapes.attribute_accuracy`) and images per second, headed by the command
that produced it. The detector should be exact at every resolution; a drop means the
renderer or the templates changed.

    python benchmarks/shapes_detector.py                       # 2,000 images at 32, 64, 128
    python benchmarks/shapes_detector.py --count=200 --resolutions=32

Measured (2 cores, Python 3.11, `python benchmarks/shapes_detector.py --robustness`):

    resolution  exact    shape    color    size     cell     count    images/s
    32          100.00%  100.00%  100.00%  100.00%  100.00%  100.00%  1,465
    64          100.00%  100.00%  100.00%  100.00%  100.00%  100.00%  813
    128         100.00%  100.00%  100.00%  100.00%  100.00%  100.00%  293

and, with `--robustness`, exact match on perturbed copies (32 / 64 / 128): blur sigma
0.7 px 100 / 100 / 100%, blur sigma 1 px 65.0 / 100 / 100%, noise sigma 30 100%,
noise sigma 60 98.85 / 99.85 / 100%, 3% random pixels 99.95 / 100 / 100%, colours at
70% 100%; uniform noise images give 1.27 / 0 / 0 objects each.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from mmt.data import shapes

import common

_COLUMNS = ("exact", "shape", "color", "size", "cell", "count")


def _blur(sigma):
    return lambda image, rng: ndimage.gaussian_filter(image.astype(np.float64), (sigma, sigma, 0))


def _noise(sigma):
    return lambda image, rng: image + rng.normal(0, sigma, image.shape)


def _random_pixels(image, rng):
    image = image.astype(np.float64)
    hit = rng.random(image.shape[:2]) < 0.03
    image[hit] = rng.integers(0, 256, (int(hit.sum()), 3))
    return image


# Stand-ins for what generated samples get wrong: soft edges, noise, stray pixels, dim colours.
PERTURBATIONS = {
    "blur sigma 0.7 px": _blur(0.7),
    "blur sigma 1 px": _blur(1.0),
    "noise sigma 30": _noise(30),
    "noise sigma 60": _noise(60),
    "3% random pixels": _random_pixels,
    "colours at 70%": lambda image, rng: image * 0.7,
}


def robustness(examples: list, seed: int) -> None:
    """Prints exact-match / count accuracy under each perturbation, and what noise gives."""
    rng = np.random.default_rng(seed)
    truth = [e.objects for e in examples]
    for name, perturb in PERTURBATIONS.items():
        images = [np.clip(np.round(perturb(e.image, rng)), 0, 255).astype(np.uint8) for e in examples]
        scores = shapes.attribute_accuracy([shapes.detect(x) for x in images], truth)
        print(f"  {name:<20} exact {scores['exact']:7.2%}  count {scores['count']:7.2%}  "
              f"shape {scores['shape']:7.2%}  size {scores['size']:7.2%}")
    resolution = examples[0].image.shape[0]
    noise = [rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8) for _ in range(len(examples))]
    spurious = sum(len(shapes.detect(x)) for x in noise) / len(noise)
    print(f"  {'uniform noise':<20} {spurious:.2f} objects found per image (it holds none)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="images per resolution")
    parser.add_argument("--resolutions", default="32,64,128", help="comma-separated, each 32, 64 or 128")
    parser.add_argument("--seed", type=int, default=0, help="ShapesConfig.seed of the images")
    parser.add_argument("--split", default="eval", choices=shapes.SPLITS)
    parser.add_argument("--robustness", action="store_true",
                        help="also detect on blurred / noisy / dimmed copies of the images")
    args = parser.parse_args(argv)

    common.print_command(argv)
    print(f"{args.count} {args.split} images per resolution, seed {args.seed}")
    print(f"{'resolution':<12}" + "".join(f"{c:<9}" for c in _COLUMNS) + "images/s  (detect only)")
    figures = {}
    for resolution in (int(r) for r in args.resolutions.split(",")):
        config = shapes.ShapesConfig(resolution=resolution, seed=args.seed)
        examples = list(shapes.generate(config, args.split, args.count))
        start = time.perf_counter()
        predicted = [shapes.detect(e.image) for e in examples]
        seconds = time.perf_counter() - start
        scores = shapes.attribute_accuracy(predicted, [e.objects for e in examples])
        print(f"{resolution:<12}" + "".join(f"{scores[c]:<9.2%}" for c in _COLUMNS) + f"{len(examples) / seconds:,.0f}")
        figures[str(resolution)] = {**{c: round(scores[c], 4) for c in _COLUMNS},
                                    "images_per_s": round(len(examples) / seconds, 1)}
        misses = [(e, p) for e, p in zip(examples, predicted) if p != e.objects]
        for example, found in misses[:3]:
            print(f"  {example.key}: true {[o.describe() for o in example.objects]}, "
                  f"detected {[o.describe() for o in found]}")
        if args.robustness:
            robustness(examples, args.seed)
    common.report("shapes_detector", figures, argv)


if __name__ == "__main__":
    main()
