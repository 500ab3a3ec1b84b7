"""Text-to-image and image-to-text accuracy on `shapes`, read back by the detector and parser.

T2I: generate an image per caption, `shapes.detect` it, compare with the caption's parsed
objects. I2T: caption each image, `shapes.parse_caption` the caption, compare with the
image's true objects. Both report `shapes.attribute_accuracy` (Hungarian-matched
per-attribute agreement, exact match, count) plus `attribute`: the mean of the shape,
colour, size and cell scores -- the one number the quickstart and benchmarks quote.
A generated caption the parser cannot read counts as an empty scene (all attributes
wrong), never as an error.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from mmt.data import shapes

ATTRIBUTES = ("shape", "color", "size", "cell")


def _summary(predicted, target) -> dict[str, float]:
    """Aggregate scores, plus `attribute_ci95`: the half-width of a 95% interval of `attribute`.

    `attribute` is the mean over examples of each example's mean attribute score, so its
    standard error is the per-example scores' standard deviation over sqrt(n) (normal
    approximation; at the quickstart's 400 examples and scores near 0.6, +-4 to 5 points).
    """
    predicted, target = list(predicted), list(target)
    scores = shapes.attribute_accuracy(predicted, target)
    scores["attribute"] = float(np.mean([scores[a] for a in ATTRIBUTES]))
    per_example = [np.mean([shapes.object_scores(p, t)[a] for a in ATTRIBUTES]) for p, t in zip(predicted, target)]
    n = len(per_example)
    scores["attribute_ci95"] = float(1.96 * np.std(per_example, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return scores


def _batches(items, size: int):
    """(batch, count) of `items` (a list or an array) in `size` chunks, the last one padded
    to `size` by repeating its final item: every call of a compiled sampler has one shape,
    so it compiles once. Only the first `count` results of a batch are real."""
    for start in range(0, len(items), size):
        batch = items[start:start + size]
        count = len(batch)
        if count < size:
            pad = size - count
            batch = (np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)]) if isinstance(batch, np.ndarray)
                     else list(batch) + [batch[-1]] * pad)
        yield batch, count


def t2i_accuracy(text_to_image: Callable[[list[str]], np.ndarray], captions: Sequence[str],
                 batch_size: int = 32) -> dict[str, float]:
    """`text_to_image(list of captions) -> uint8 [N, H, W, 3]`, scored on `captions`."""
    images = []
    for batch, count in _batches(list(captions), batch_size):
        images.extend(text_to_image(batch)[:count])
    return image_scores(images, captions)


def image_scores(images: Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """T2I scores of images already generated, one per caption."""
    return _summary([shapes.detect(image) for image in images], [shapes.parse_caption(c) for c in captions])


def parse_or_empty(caption: str) -> tuple:
    try:
        return shapes.parse_caption(caption)
    except ValueError:
        return ()


def i2t_accuracy(image_to_text: Callable[[np.ndarray], list[str]], images: np.ndarray,
                 objects: Sequence[Sequence], batch_size: int = 32) -> tuple[dict[str, float], list[str]]:
    """`image_to_text(uint8 [N, H, W, 3]) -> captions`, scored against the true `objects`.

    Returns the scores and the generated captions.
    """
    captions = []
    for batch, count in _batches(np.asarray(images), batch_size):
        captions.extend(image_to_text(batch)[:count])
    return _summary([parse_or_empty(c) for c in captions], list(objects)), captions


def evaluate_generation(task, examples: Sequence, *, seed: int = 0, batch_size: int = 32, grid_path=None,
                        grid_samples: int = 16) -> dict:
    """Scores a trained model's `text_to_image` / `image_to_text` hooks on shapes examples.

    Args:
      task: anything with `text_to_image(captions, seed=) -> (uint8 [N,H,W,3], tokens)` and
        `image_to_text(uint8 [N,H,W,3]) -> captions` (ITITTask, UPGen's task).
      examples: `shapes.Example`s (eval split): their captions are the prompts, their
        images are captioned.
      seed: the image sampler's seed (batch i uses seed + i).
      grid_path: if set, a PNG of the first `grid_samples // 2` prompts with their
        generated images, then as many eval images with their generated captions.

    Returns:
      {"t2i": scores, "i2t": scores, "samples": [...]} with `scores` as `t2i_accuracy`.
    """
    examples = list(examples)
    captions = [e.caption for e in examples]
    generated = []

    def text_to_image(batch):
        images, _ = task.text_to_image(batch, seed=seed + len(generated))
        generated.append(images)  # the last batch is padded (`_batches`)
        return images

    t2i = t2i_accuracy(text_to_image, captions, batch_size)
    images = np.stack([e.image for e in examples])
    i2t, written = i2t_accuracy(task.image_to_text, images, [e.objects for e in examples], batch_size)
    half = max(1, grid_samples // 2)
    samples = ([{"prompt": c} for c in captions[:half]] + [{"key": e.key, "caption": c}
                                                          for e, c in zip(examples[:half], written)])
    if grid_path is not None:
        generated_images = np.concatenate(generated)[:len(examples)][:half]  # no padding
        shapes.save_grid(list(generated_images) + list(images[:half]),
                         [f"prompt: {c}" for c in captions[:half]] + [f"generated: {c}" for c in written[:half]],
                         grid_path)
    return {"t2i": t2i, "i2t": i2t, "samples": samples}
