"""Reading `shapes` scenes back from pixels, and scoring predicted scenes.

Part of the `shapes` data set (`mmt.data.shapes` re-exports `detect`, `exact_match`,
`object_scores` and `attribute_accuracy`). The detector has no learned weights, so
text-to-image samples can be scored without any pretrained network:

1. every pixel takes the nearest of {background, palette colours}, or none when it is
   farther than half the palette's spacing from all of them (wrong colours, grey);
2. connected components per colour (4-connected); components smaller than 40% of the
   smallest object are noise;
3. a component's cell is the cell of its centroid; each cell keeps its largest one;
4. shape and size by analysis-by-synthesis: every (shape, size) template, rendered by
   the same code as the data set, at every half-pixel centre within 1 px of the
   component's box centre; the best IoU with the object's coverage (how much of its
   colour each pixel near it holds, so blurred edges count partly) wins, and below
   `min_iou` the component is dropped.

On rendered images this is exact: segmentation is exact, the true template sits on the
searched lattice with IoU 1, and every other template scores at most 0.92
(`mmt.data.shapes.scene`). On generated images it degrades gracefully and never raises
on a uint8 image. Exact match on 2,000 eval images at 32 / 64 / 128, from
`benchmarks/shapes_detector.py --robustness`: Gaussian blur sigma 0.7 px 100% at all
three; sigma 1 px 65% / 100% / 100% (at 32 it rounds off small shapes' corners);
Gaussian noise sigma 60 98.9% / 99.9% / 100%; 3% random pixels 99.95% / 100% / 100%;
colours dimmed to 70% 100%. Colours darker than half intensity read as background.
Uniform noise gives no objects at 64 and 128, but about one spurious small object per
image at 32, where the smallest objects are only 12 pixels; a higher `min_iou` trades
blurred objects for fewer of them.
"""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage, optimize

from mmt.data.shapes.scene import BACKGROUND, COLORS, SHAPES, SIZES, ShapeObject, cell_of, extent, shape_mask

_PALETTE = np.array([BACKGROUND] + list(COLORS.values()), np.int32)  # [1 + colours, 3]
_COLOR_NAMES = tuple(COLORS)
_TEMPLATES = tuple((shape, size) for shape in SHAPES for size in SIZES)
_SEARCH = np.arange(-2, 3) / 2  # candidate centre offsets (px) from the box centre, per axis
_MIN_AREA_FRACTION = 0.4


def _half_palette_spacing() -> float:
    d = np.sqrt(((_PALETTE[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(-1))
    return float(d[d > 0].min() / 2)


# Pixels farther than this from every palette entry are no colour at all.
_COLOUR_RADIUS = _half_palette_spacing()


@functools.lru_cache(maxsize=8)
def _template_bank(resolution: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Templates of every (shape, size) at each sub-pixel phase.

    Returns:
      half: H; a template lives in a (2H + 1)^2 window whose pixel (H, H) holds the
        centre's integer part.
      masks: bool [2 (x phase), 2 (y phase), T, 2H + 1, 2H + 1], T = len(_TEMPLATES).
      areas: int [2, 2, T].
    """
    half = int(np.ceil(max(extent(s, resolution) for s in SIZES))) + 2
    y, x = np.mgrid[0: 2 * half + 1, 0: 2 * half + 1] + 0.5
    masks = np.zeros((2, 2, len(_TEMPLATES), 2 * half + 1, 2 * half + 1), bool)
    for px in range(2):
        for py in range(2):
            dx, dy = x - (half + px / 2), y - (half + py / 2)
            for t, (shape, size) in enumerate(_TEMPLATES):
                masks[px, py, t] = shape_mask(shape, extent(size, resolution), dx, dy)
    masks.flags.writeable = False
    return half, masks, masks.sum((-1, -2))


def _classify_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 [R, R, 3] -> int [R, R]: palette index (0 background, 1.. colours), -1 none."""
    d2 = ((image[:, :, None, :].astype(np.int32) - _PALETTE) ** 2).sum(-1)  # [R, R, P]
    labels = d2.argmin(-1)
    labels[d2.min(-1) > _COLOUR_RADIUS**2] = -1
    return labels


def _coverage(image: np.ndarray, labels: np.ndarray, components: np.ndarray, k: int, color: int,
              box: tuple[slice, slice]) -> np.ndarray:
    """float [R, R]: how much of palette colour `color` each pixel near component k holds.

    A pixel of colour a * rgb on black holds a. Soft coverage instead of the component's
    hard mask lets blurred edges count by how much of the object they hold, which keeps
    sizes right on blurry samples; on rendered images both are the same 0/1 mask. Pixels
    of other components (other objects) count 0, as does everything more than 2 px
    outside the component's box.
    """
    rgb = _PALETTE[color]
    alpha = np.clip(image.astype(np.float32) @ rgb.astype(np.float32) / float(rgb @ rgb), 0, 1)
    keep = np.zeros(labels.shape, bool)
    keep[max(box[0].start - 2, 0): box[0].stop + 2, max(box[1].start - 2, 0): box[1].stop + 2] = True
    keep &= (components == k) | (labels <= 0)
    return np.where(keep, alpha, 0)


def _fit_template(coverage: np.ndarray, box: tuple[slice, slice], resolution: int) -> tuple[float, str, str]:
    """Best (IoU, shape, size) for an object's coverage map [R, R] (see `_coverage`).

    IoU is the soft one, sum(min(t, c)) / sum(max(t, c)) for template t and coverage c,
    which is the ordinary IoU when c is a 0/1 mask.
    """
    half, masks, areas = _template_bank(resolution)
    total = float(coverage.sum())
    ys, xs = box
    box_x, box_y = (xs.start + xs.stop) / 2, (ys.start + ys.stop) / 2
    pad = half + 2  # so that every searched window lies inside the array
    padded = np.pad(coverage, pad)
    best = (-1.0, 0)
    for cx in np.round(2 * box_x) / 2 + _SEARCH:
        for cy in np.round(2 * box_y) / 2 + _SEARCH:
            ix, iy = int(np.floor(cx)), int(np.floor(cy))
            px, py = int(2 * (cx - ix)), int(2 * (cy - iy))
            window = padded[iy - half + pad: iy + half + 1 + pad, ix - half + pad: ix + half + 1 + pad]
            inter = (masks[px, py] * window).sum((-1, -2))  # [T]
            iou = inter / (areas[px, py] + total - inter)
            t = int(iou.argmax())
            if iou[t] > best[0]:
                best = (float(iou[t]), t)
    return best[0], *_TEMPLATES[best[1]]


def detect(image: np.ndarray, min_iou: float = 0.3) -> tuple[ShapeObject, ...]:
    """Finds the objects of a shapes image.

    Args:
      image: uint8 [R, R, 3] (any integer dtype is clipped to 0..255), R >= 16; any
        content, e.g. a generated sample.
      min_iou: components whose best template fits worse than this are not objects.

    Returns:
      the detected objects, sorted; at most one per cell.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] != 3 or image.shape[0] < 16:
        raise ValueError(f"detect expects a square RGB image [R, R, 3] with R >= 16, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.integer):
        raise ValueError(f"detect expects uint8 pixels, got {image.dtype}; convert with "
                         "np.clip(np.round(x), 0, 255).astype(np.uint8)")
    image = np.clip(image, 0, 255)
    resolution = image.shape[0]
    _, _, areas = _template_bank(resolution)
    min_pixels = max(2, int(_MIN_AREA_FRACTION * areas.min()))
    labels = _classify_pixels(image)

    # cell -> (pixels, component labels, label, box, palette index) of its largest component
    best_per_cell: dict[int, tuple[int, np.ndarray, int, tuple[slice, slice], int]] = {}
    for index in range(1, len(_PALETTE)):
        components, count = ndimage.label(labels == index)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())
        boxes = ndimage.find_objects(components)
        for k in np.flatnonzero(sizes >= min_pixels):
            if k == 0:  # the unlabelled rest of the image
                continue
            box = boxes[k - 1]
            ys, xs = np.nonzero(components[box] == k)
            cell = cell_of(xs.mean() + box[1].start + 0.5, ys.mean() + box[0].start + 0.5, resolution)
            if cell not in best_per_cell or sizes[k] > best_per_cell[cell][0]:
                best_per_cell[cell] = (int(sizes[k]), components, int(k), box, index)

    objects = []
    for cell, (_, components, k, box, index) in best_per_cell.items():
        coverage = _coverage(image, labels, components, k, index, box)
        iou, shape, size = _fit_template(coverage, box, resolution)
        if iou >= min_iou:
            objects.append(ShapeObject(shape, _COLOR_NAMES[index - 1], size, cell))
    return tuple(sorted(objects))


def exact_match(a: Iterable[ShapeObject], b: Iterable[ShapeObject]) -> bool:
    """Whether two scenes hold the same objects with all attributes equal."""
    return sorted(a) == sorted(b)


_ATTRIBUTES = ("shape", "color", "size", "cell")


def object_scores(predicted: Sequence[ShapeObject], target: Sequence[ShapeObject]) -> dict[str, float]:
    """Per-attribute agreement of one predicted scene with the true one.

    Objects are paired one-to-one to maximise the number of equal attributes (Hungarian
    matching), so a right-coloured object in the wrong cell still counts for its colour.
    Each attribute's score is (matched pairs agreeing on it) / max(#predicted, #target),
    so missing and extra objects both cost.

    Returns:
      {"exact", "count", "shape", "color", "size", "cell", "object"}: floats in [0, 1];
      "exact" and "count" are 0/1, "object" counts pairs equal in every attribute.
    """
    predicted, target = list(predicted), list(target)
    n = max(len(predicted), len(target))
    scores = {"exact": float(exact_match(predicted, target)), "count": float(len(predicted) == len(target))}
    if n == 0:
        return scores | {a: 1.0 for a in _ATTRIBUTES} | {"object": 1.0}
    agree = np.array([[[getattr(p, a) == getattr(t, a) for a in _ATTRIBUTES] for t in target]
                      for p in predicted], float).reshape(len(predicted), len(target), len(_ATTRIBUTES))
    rows, cols = optimize.linear_sum_assignment(agree.sum(-1), maximize=True)
    matched = agree[rows, cols]  # [pairs, attributes]
    for i, a in enumerate(_ATTRIBUTES):
        scores[a] = float(matched[:, i].sum() / n)
    scores["object"] = float(matched.all(-1).sum() / n)
    return scores


def attribute_accuracy(predicted: Iterable[Sequence[ShapeObject]],
                       target: Iterable[Sequence[ShapeObject]]) -> dict[str, float]:
    """Mean of `object_scores` over pairs of scenes (e.g. detect(sample) vs parse(prompt)).

    Returns:
      {"exact", "count", "shape", "color", "size", "cell", "object"} averaged, and
      "num_examples".
    """
    totals: dict[str, float] = {}
    count = 0
    for p, t in zip(predicted, target, strict=True):
        for key, value in object_scores(p, t).items():
            totals[key] = totals.get(key, 0.0) + value
        count += 1
    if count == 0:
        raise ValueError("attribute_accuracy needs at least one pair of scenes")
    return {key: value / count for key, value in totals.items()} | {"num_examples": count}
