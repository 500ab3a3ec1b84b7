"""The vocabulary and geometry of `shapes` scenes, and their renderer.

Part of the `shapes` data set (`mmt.data.shapes`, which re-exports the public names).
A scene is a sorted tuple of `ShapeObject`s in distinct cells of a 3x3 grid.

Geometry, for an image of R x R pixels:

* pixel (x, y) covers [x, x+1) x [y, y+1); its centre is (x + 0.5, y + 0.5);
* cell boundaries are round(k * R / 3), k = 0..3 (at R = 32: widths 11, 10, 11);
* an object has a centre (cx, cy) on the half-pixel lattice, both coordinates with the
  same sub-pixel phase where the cell allows (`object_centre`), and a half-extent `e`
  that depends only on its size and R (`extent`); a pixel belongs to it iff its centre
  satisfies the shape's inequality in (dx, dy) = (x + 0.5 - cx, y + 0.5 - cy):

  | shape    | inside when                          | area      |
  |----------|--------------------------------------|-----------|
  | circle   | dx^2 + dy^2 <= (0.97 e)^2            | 2.96 e^2  |
  | square   | max(|dx|, |dy|) <= 0.75 e            | 2.25 e^2  |
  | triangle | dy <= e and dy + e >= 2 |dx|         | 2 e^2     |
  | diamond  | |dx| + |dy| <= e                     | 2 e^2     |

  (the circle's 0.97 keeps single-pixel spikes off its top, bottom and sides when e is
  a whole number of pixels);
* the extent box [c - e, c + e] stays at least 1 px inside the cell, so objects in
  neighbouring cells are at least 2 px apart and never touch.

Masks are hard (no anti-aliasing). Offsets are multiples of 1/2, and every inequality
is decided either exactly (binary fractions) or by a margin far above rounding error,
so masks are the same on every platform. The extents and shape constants were tuned so
that no two (shape, size) pairs give the same mask at any sub-pixel offset, even at
32x32 (the most alike, a large circle and a large square at 32x32, overlap with IoU
0.92 at best; `tests/test_shapes.py` checks that all differ), which is what lets
`detect` be exact on rendered images.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# The six saturated corners of the RGB cube: every pair, and every colour and the black
# background, are at least 255 apart, so colour segmentation survives heavy noise.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SIZES: tuple[str, ...] = ("small", "large")
# Canonical names of the 3x3 cells; index = row * 3 + col.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
BACKGROUND = (0, 0, 0)

# Half-extent in pixels at 32x32, scaled by R / 32: about 1/4 and 3/8 of a cell. Large
# objects at 32x32 fill the 10 px cell but for the 1 px margins.
_EXTENT_AT_32 = {"small": 2.7, "large": 4.0}
_CIRCLE_RADIUS = 0.97  # x extent
_SQUARE_HALF_SIDE = 0.75  # x extent: between the circle's area and the diamond's


@dataclasses.dataclass(frozen=True, order=True)
class ShapeObject:
    """One object of a scene. Ordering (shape, color, size, cell) sorts scenes canonically."""

    shape: str
    color: str
    size: str
    cell: int  # row * 3 + col, see POSITIONS

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def describe(self) -> str:
        """E.g. 'large red circle (top left)'; for logs and error messages."""
        return f"{self.size} {self.color} {self.shape} ({self.position})"


def scene_key(objects) -> str:
    """Canonical text key of a scene: its sorted objects, ignoring jitter and wording."""
    return ";".join(f"{o.shape},{o.color},{o.size},{o.cell}" for o in sorted(objects))


def cell_bounds(resolution: int) -> tuple[int, int, int, int]:
    """Pixel boundaries of the grid's rows and columns: (0, b1, b2, R)."""
    return tuple(int(round(k * resolution / 3)) for k in range(4))


def cell_of(x: float, y: float, resolution: int) -> int:
    """Cell index of a continuous image position (x, y), clamped to the grid."""
    bounds = cell_bounds(resolution)
    col = min(max(int(np.searchsorted(bounds, x, side="right")) - 1, 0), 2)
    row = min(max(int(np.searchsorted(bounds, y, side="right")) - 1, 0), 2)
    return row * 3 + col


def extent(size: str, resolution: int) -> float:
    """Half-extent e (pixels) of an object of `size` in an R x R image."""
    return _EXTENT_AT_32[size] * resolution / 32


def shape_mask(shape: str, e: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """bool mask, same shape as dx / dy: which offsets from the centre lie inside the shape."""
    if shape == "circle":
        return dx * dx + dy * dy <= (_CIRCLE_RADIUS * e) ** 2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= _SQUARE_HALF_SIDE * e
    if shape == "triangle":  # apex up, base down; its box is [-e, e]^2 like the others
        return (dy <= e) & (dy + e >= 2 * np.abs(dx))
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= e
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def centre_choices(cell: int, size: str, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Allowed object centres along x and along y: float arrays on the half-pixel lattice.

    The extent box [c - e, c + e] must stay 1 px inside the cell. When no lattice point
    allows that (never at the supported resolutions), the cell's centre is the only choice.
    """
    bounds = cell_bounds(resolution)
    e = extent(size, resolution)
    choices = []
    for index in (cell % 3, cell // 3):  # x from the column, y from the row
        lo, hi = bounds[index] + 1 + e, bounds[index + 1] - 1 - e
        lattice = np.arange(np.ceil(2 * lo), np.floor(2 * hi) + 1) / 2
        if lattice.size == 0:
            lattice = np.array([(bounds[index] + bounds[index + 1]) / 2])
        choices.append(lattice)
    return choices[0], choices[1]


def object_centre(obj: ShapeObject, resolution: int, rng: np.random.Generator | None) -> tuple[float, float]:
    """The object's centre among `centre_choices`: random with `rng`, the middlemost without.

    Both coordinates get the same sub-pixel phase (both integers or both half-integers)
    where the cell allows, so a square comes out square (4x4 or 5x5 pixels, not 4x5)
    and the other shapes symmetric.
    """
    xs, ys = centre_choices(obj.cell, obj.size, resolution)
    phases = [p for p in (0.0, 0.5) if np.any(xs % 1 == p) and np.any(ys % 1 == p)]
    if phases:
        if rng is not None:
            phase = phases[rng.integers(len(phases))]
        else:  # the phase whose points lie nearest the middle
            phase = min(phases, key=lambda p: sum(np.abs(v[v % 1 == p] - v.mean()).min() for v in (xs, ys)))
        xs, ys = xs[xs % 1 == phase], ys[ys % 1 == phase]
    if rng is None:
        return float(xs[np.abs(xs - xs.mean()).argmin()]), float(ys[np.abs(ys - ys.mean()).argmin()])
    return float(xs[rng.integers(len(xs))]), float(ys[rng.integers(len(ys))])


@functools.lru_cache(maxsize=8)
def _pixel_centres(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:resolution, 0:resolution].astype(np.float64) + 0.5
    x.flags.writeable = y.flags.writeable = False
    return x, y


def render(objects, resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draws a scene.

    Args:
      objects: ShapeObjects in distinct cells.
      resolution: R; the image is R x R.
      rng: jitters each centre over the half-pixel lattice inside its cell (a few draws
        per object, in the order given); None centres every object in its cell (to
        within half a pixel).

    Returns:
      uint8 [R, R, 3]: the objects in their colours on black.
    """
    x, y = _pixel_centres(resolution)
    image = np.zeros((resolution, resolution, 3), np.uint8)
    for obj in objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown colour {obj.color!r}; expected one of {tuple(COLORS)}")
        cx, cy = object_centre(obj, resolution, rng)
        image[shape_mask(obj.shape, extent(obj.size, resolution), x - cx, y - cy)] = COLORS[obj.color]
    return image
