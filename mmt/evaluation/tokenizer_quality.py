"""How well an image tokenizer reconstructs `shapes` images, and how it spends its codes.

The scores behind `benchmarks/tokenizer_quality.py` (and the tokenizer rows of the
README's table): PSNR, codebook usage and perplexity, the codes given to all-black
patches, the shapes detector's agreement between an image and its reconstruction, and
encode + decode throughput.
"""

from __future__ import annotations

import time

import numpy as np

from mmt.data import shapes
from mmt.tokenizers.image import ImageTokenizer

ATTRIBUTES = ("exact", "shape", "color", "size", "cell", "count")


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
        "attributes": {a: scores[a] for a in ATTRIBUTES},
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


__all__ = ["ATTRIBUTES", "background_synonyms", "code_usage", "evaluate", "psnr"]
