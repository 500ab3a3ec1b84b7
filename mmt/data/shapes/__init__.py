"""`shapes`: mmt's embedded, download-free image-caption data set.

Each example is an R x R image (R = 32, 64 or 128) of 1 to 3 coloured objects on black,
with an English caption that names all of them:

    "a large red circle in the top left and a small blue square at the bottom"

An object has a shape (`SHAPES`), a colour (`COLORS`), a size (`SIZES`) and a cell of a
3x3 grid (`POSITIONS`); a scene is the sorted tuple of its objects, in distinct cells.
Captions are paraphrased (words, word order, sentence frame, object order), and images
are jittered (each centre moves on a half-pixel lattice inside its cell), so one scene
has many images and many captions.

Because both directions can be read back without a network -- `parse_caption` (text ->
objects, exact on every generated caption) and `detect` (image -> objects, exact on
every rendered image) -- text-to-image and captioning are measurable by exact match or
per-attribute accuracy (`attribute_accuracy`). This is the data behind the quickstart,
the tests, the Colab demos and the small-scale reproductions of the papers.

Splits (`SPLITS`) are disjoint in scenes, not just in examples: a stable hash of a
scene's canonical key (`scene_key`) assigns it to exactly one of paired / image_only /
text_only / eval, in the proportions of `ShapesConfig.split_fractions`. A scene with a
held-out (shape, colour) pair always goes to eval, so a model can be tested on
combinations it never saw (compositional generalisation). The assignment depends only
on the scene, the fractions and the held-out pairs, NOT on the seed: eval scenes stay
eval scenes under every seed.

Generation is deterministic and random-access: example i of a split depends only on
(config, split, i), through its own `np.random.SeedSequence([seed, split, i])`, so
`generate(c, s, n, start=k)` yields items k.. of a longer run, and shards can be made
in parallel. The scene and the caption do not depend on the resolution either, only
the pixels do.

Modules: `scene` (vocabulary, geometry, renderer), `text` (caption
grammar and parser), `detect` (detector and scores); everything public is
importable from here. This module imports numpy, scipy and PIL only, never TensorFlow;
`mmt.data.shapes.tfds` wraps it as a tensorflow-datasets builder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmt.data.shapes.detect import attribute_accuracy, detect, exact_match, object_scores
from mmt.data.shapes.scene import COLORS, POSITIONS, SHAPES, SIZES, ShapeObject, render, scene_key
from mmt.data.shapes.text import make_caption, parse_caption

__all__ = [
    "COLORS", "POSITIONS", "RESOLUTIONS", "SHAPES", "SIZES", "SPLITS", "Example", "ShapeObject",
    "ShapesConfig", "attribute_accuracy", "detect", "exact_match", "generate", "make_caption",
    "object_scores", "parse_caption", "render", "sample_objects", "save_grid", "scene_key", "split_of",
]  # fmt: skip

SPLITS: tuple[str, ...] = ("paired", "image_only", "text_only", "eval")
RESOLUTIONS: tuple[int, ...] = (32, 64, 128)
MAX_OBJECTS = 3
# Rejection sampling gives up after this many scenes without one of the split: a split
# of fraction f needs 1 / f tries on average, so this only trips on (near-)empty splits.
_MAX_TRIES = 20_000


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """What a `shapes` data set looks like.

    Attributes:
      resolution: image side R in pixels: 32, 64 or 128.
      min_objects: fewest objects in a scene (>= 1).
      max_objects: most objects in a scene (<= 3).
      held_out_combinations: (shape, colour) pairs kept out of paired, image_only and
        text_only; every scene containing one belongs to eval.
      split_fractions: (split, fraction) for each of SPLITS, fractions summing to 1:
        the share of all possible scenes that belongs to each split.
      seed: changes images and captions (not which split a scene belongs to).
    """

    resolution: int = 64
    min_objects: int = 1
    max_objects: int = 3
    held_out_combinations: tuple[tuple[str, str], ...] = ()
    split_fractions: tuple[tuple[str, float], ...] = (("paired", 0.2), ("image_only", 0.35),
                                                      ("text_only", 0.35), ("eval", 0.1))
    seed: int = 0

    def __post_init__(self):
        # Normalise lists (from gin or JSON) to tuples, so configs compare and hash.
        held_out = tuple(tuple(pair) for pair in self.held_out_combinations)
        fractions = tuple((str(name), float(f)) for name, f in self.split_fractions)
        object.__setattr__(self, "held_out_combinations", held_out)
        object.__setattr__(self, "split_fractions", fractions)
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"ShapesConfig.resolution must be one of {RESOLUTIONS}, got {self.resolution!r}")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(f"ShapesConfig needs 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got "
                             f"min_objects={self.min_objects!r}, max_objects={self.max_objects!r}")
        for pair in held_out:
            if len(pair) != 2 or pair[0] not in SHAPES or pair[1] not in COLORS:
                raise ValueError(f"ShapesConfig.held_out_combinations: {pair!r} is not a (shape, colour) pair "
                                 f"with shape in {SHAPES} and colour in {tuple(COLORS)}")
        names = [name for name, _ in fractions]
        if sorted(names) != sorted(SPLITS) or any(f < 0 for _, f in fractions) or \
                not math.isclose(sum(f for _, f in fractions), 1.0, abs_tol=1e-6):
            raise ValueError(f"ShapesConfig.split_fractions must give each of {SPLITS} once, non-negative, "
                             f"summing to 1; got {fractions!r}")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"ShapesConfig.seed must be a non-negative integer, got {self.seed!r}")


@dataclasses.dataclass(frozen=True)
class Example:
    """One generated example. Every split has both modalities here; which ones a stream
    uses is up to the writer (`mmt.data.shapes.records`)."""

    key: str  # "shapes/{split}/{seed}/{index:08d}", stable across runs and versions
    image: np.ndarray  # uint8 [R, R, 3]
    caption: str
    objects: tuple[ShapeObject, ...]  # sorted


def sample_objects(rng: np.random.Generator, config: ShapesConfig) -> tuple[ShapeObject, ...]:
    """A random scene: min..max objects in distinct cells, attributes uniform. Sorted."""
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    objects = (ShapeObject(SHAPES[rng.integers(len(SHAPES))], tuple(COLORS)[rng.integers(len(COLORS))],
                           SIZES[rng.integers(len(SIZES))], int(cell)) for cell in cells)
    return tuple(sorted(objects))


def _unit_hash(text: str) -> float:
    """A stable pseudo-random number in [0, 1) for `text` (unlike hash(), same in every process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def split_of(objects: Sequence[ShapeObject], config: ShapesConfig) -> str:
    """The one split a scene belongs to: eval if it holds a held-out (shape, colour) pair,
    else by a hash of its canonical key (`scene_key`) and `config.split_fractions`."""
    held_out = set(config.held_out_combinations)
    if any((o.shape, o.color) in held_out for o in objects):
        return "eval"
    u = _unit_hash(scene_key(objects))
    cumulative = 0.0
    for name, fraction in config.split_fractions:
        cumulative += fraction
        if u < cumulative:
            return name
    return next(name for name, f in reversed(config.split_fractions) if f > 0)  # u within rounding of 1


def _example_rng(config: ShapesConfig, split: str, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([config.seed, SPLITS.index(split), index])))


def generate(config: ShapesConfig, split: str, num_examples: int, start: int = 0) -> Iterator[Example]:
    """Examples start .. start + num_examples - 1 of a split, lazily.

    Example i draws scenes from its own generator until one belongs to `split` (cheap:
    nothing is rendered until then), then its caption, then the jitter of its image.

    Args:
      config: the data set.
      split: one of SPLITS.
      num_examples: how many to yield (>= 0).
      start: index of the first one; generate(c, s, n, start=k) equals items k..k+n-1
        of generate(c, s, k + n).

    Yields:
      Example with key f"shapes/{split}/{seed}/{i:08d}".

    Raises:
      ValueError: unknown split, negative counts.
      RuntimeError: the split holds (almost) no scenes under this config.
    """
    # Checked here, not when iteration starts, so that mistakes surface at the call.
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {SPLITS}")
    if num_examples < 0 or start < 0:
        raise ValueError(f"generate needs num_examples >= 0 and start >= 0, got {num_examples}, {start}")
    return _generate(config, split, range(start, start + num_examples))


def _generate(config: ShapesConfig, split: str, indices: range) -> Iterator[Example]:
    for index in indices:
        rng = _example_rng(config, split, index)
        for _ in range(_MAX_TRIES):
            objects = sample_objects(rng, config)
            if split_of(objects, config) == split:
                break
        else:
            raise RuntimeError(f"no scene of split {split!r} in {_MAX_TRIES} tries: is its fraction 0 in "
                               f"{config.split_fractions}?")
        caption = make_caption(objects, rng)
        yield Example(key=f"shapes/{split}/{config.seed}/{index:08d}", image=render(objects, config.resolution, rng),
                      caption=caption, objects=objects)


_GRID_GAP = 4  # px around and between tiles
_TEXT_COLOR, _GRID_BACKGROUND = (230, 230, 230), (40, 40, 40)


def _wrap(text: str, width: float, length) -> list[str]:
    """Greedy word wrap to lines of at most `width` pixels (by `length(str)`), or [""].

    A single word wider than a line gets a line of its own.
    """
    lines: list[str] = []
    for word in text.split():
        if lines and length(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def save_grid(images: Sequence[np.ndarray], captions: Sequence[str], path, columns: int = 4,
              scale: int = 2) -> None:
    """Writes a PNG contact sheet: each image upscaled (nearest) with its caption below.

    Tiles are R * scale pixels wide (R of the largest image), _GRID_GAP apart; the sheet
    is min(columns, n) tiles wide and ceil(n / columns) rows high, every row as tall as
    the tile plus the longest word-wrapped caption.

    Args:
      images: uint8 [R, R, 3] each.
      captions: one per image.
      path: where to write the PNG; parent folders are created.
      columns: tiles per row.
      scale: integer upscaling factor.
    """
    if len(images) != len(captions) or len(images) == 0:
        raise ValueError(f"save_grid needs as many captions as images, and at least one: "
                         f"{len(images)} images, {len(captions)} captions")
    if columns < 1 or scale < 1:
        raise ValueError(f"save_grid needs columns >= 1 and scale >= 1, got {columns}, {scale}")
    font = ImageFont.load_default()
    tile = max(int(np.asarray(im).shape[0]) for im in images) * scale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, top, _, bottom = font.getbbox("Ag")
    line_height = bottom - top + 2
    wrapped = [_wrap(c, tile, lambda text: measure.textlength(text, font=font)) for c in captions]
    row_height = tile + _GRID_GAP + line_height * max(len(lines) for lines in wrapped)
    cols, rows = min(columns, len(images)), math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (_GRID_GAP + cols * (tile + _GRID_GAP), _GRID_GAP + rows * (row_height + _GRID_GAP)),
                      _GRID_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x = _GRID_GAP + (i % columns) * (tile + _GRID_GAP)
        y = _GRID_GAP + (i // columns) * (row_height + _GRID_GAP)
        picture = Image.fromarray(np.asarray(image, np.uint8))
        sheet.paste(picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + tile + _GRID_GAP + j * line_height - top), line, fill=_TEXT_COLOR, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
