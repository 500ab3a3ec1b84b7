"""Captions of `shapes` scenes: a small paraphrasing grammar and its exact parser.

Part of the `shapes` data set (`mmt.data.shapes` re-exports `make_caption` and
`parse_caption`). A caption lists every object once, in random order, as a noun phrase
("a large red circle") with a position phrase ("in the top left"), e.g.

    a large red circle in the top left and a small blue square at the bottom
    there are a big red disk in the upper left, a little cyan diamond on the right and ...
    in the center is a small yellow triangle
    an image of a large purple rhombus in the lower right on a black background

Every attribute value has one to three words (`_SIZE_WORDS`, ...), every cell three or
four phrases, and sentences come in six frames, so a three-object scene has about 10^5
captions. The words are chosen so that each caption names each attribute of each object
with exactly one keyword, which is how `parse_caption` reads them back exactly.
"""

from __future__ import annotations

import re

import numpy as np

from mmt.data.shapes.scene import COLORS, POSITIONS, SHAPES, SIZES, ShapeObject

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_COLOR_WORDS = {name: (name,) for name in COLORS} | {"purple": ("purple", "magenta")}
_SHAPE_WORDS = {"circle": ("circle", "disk"), "square": ("square",), "triangle": ("triangle",),
                "diamond": ("diamond", "rhombus")}
_ROW_WORDS = {0: ("top", "upper"), 2: ("bottom", "lower")}  # row 1 names no row word
_COL_WORDS = {0: ("left",), 2: ("right",)}


def _position_phrases(cell: int) -> tuple[str, ...]:
    row, col = divmod(cell, 3)
    if row != 1 and col != 1:  # a corner
        # ("in the top left corner" would push three-object captions past 30 words.)
        return tuple(f"in the {r} {c}" for r in _ROW_WORDS[row] for c in _COL_WORDS[col]) + (
            f"at the {_ROW_WORDS[row][0]} {_COL_WORDS[col][0]}",)
    if row != 1:  # top or bottom edge
        word = _ROW_WORDS[row][0]
        return (f"at the {word}", f"in the {word} middle", f"at the {word} center", f"along the {word}")
    if col != 1:  # left or right edge
        word = _COL_WORDS[col][0]
        return (f"on the {word}", f"at the {word}", f"on the {word} side", f"in the middle {word}")
    return ("in the center", "in the middle", "at the center")


_POSITION_PHRASES = tuple(_position_phrases(cell) for cell in range(9))

# Sentence frames; {objects} is the joined list of object phrases, {be} agrees with it.
_FRAMES = ("{objects}", "there {be} {objects}", "an image of {objects}", "a picture of {objects}",
           "{objects} on a black background")
# Share of the sixth frame, "in the top left is a red circle and ..." (position first).
_INVERTED_FRAME_WEIGHT = 1 / 6


def _choose(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _join(parts: list[str], rng: np.random.Generator) -> str:
    if len(parts) == 1:
        return parts[0]
    last_separator = _choose(rng, (" and ", ", and ")) if len(parts) > 2 else " and "
    return ", ".join(parts[:-1]) + last_separator + parts[-1]


def make_caption(objects, rng: np.random.Generator) -> str:
    """A random English caption naming every object's size, colour, shape and position.

    Args:
      objects: the scene's ShapeObjects (1 to 3 keeps captions under 30 words).
      rng: picks the order of the objects, the frame and every word.

    Returns:
      lower-case caption without a final full stop.
    """
    if not objects:
        raise ValueError("make_caption needs at least one object")
    order = rng.permutation(len(objects))
    # The position-first frame joins "{where} is {noun}" clauses; the others hold a list
    # of "{noun} {where}" phrases.
    frame = None if rng.random() < _INVERTED_FRAME_WEIGHT else _choose(rng, _FRAMES)
    parts = []
    for index in order:
        obj = objects[index]
        noun = (f"a {_choose(rng, _SIZE_WORDS[obj.size])} {_choose(rng, _COLOR_WORDS[obj.color])} "
                f"{_choose(rng, _SHAPE_WORDS[obj.shape])}")
        where = _choose(rng, _POSITION_PHRASES[obj.cell])
        parts.append(f"{where} is {noun}" if frame is None else f"{noun} {where}")
    if frame is None:
        return _join(parts, rng)
    return frame.format(objects=_join(parts, rng), be="is" if len(parts) == 1 else "are")


def _keyword_pattern(words_by_value: dict) -> re.Pattern:
    words = sorted((w for ws in words_by_value.values() for w in ws), key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(words) + r")\b")


def _inverse(words_by_value: dict) -> dict[str, object]:
    return {w: value for value, ws in words_by_value.items() for w in ws}


_SIZE_RE, _SIZE_OF = _keyword_pattern(_SIZE_WORDS), _inverse(_SIZE_WORDS)
_COLOR_RE, _COLOR_OF = _keyword_pattern(_COLOR_WORDS), _inverse(_COLOR_WORDS)
_SHAPE_RE, _SHAPE_OF = _keyword_pattern(_SHAPE_WORDS), _inverse(_SHAPE_WORDS)
_ROW_RE, _ROW_OF = _keyword_pattern(_ROW_WORDS), _inverse(_ROW_WORDS)
_COL_RE, _COL_OF = _keyword_pattern(_COL_WORDS), _inverse(_COL_WORDS)
_CENTER_RE = re.compile(r"\b(center|centre|middle)\b")
# Object phrases are separated by commas and "and"; nothing else in the grammar uses them.
_SEPARATOR_RE = re.compile(r"\s*(?:,\s*(?:\band\b)?|\band\b)\s*")


def _one(pattern: re.Pattern, value_of: dict, clause: str, what: str, text: str):
    values = {value_of[m] for m in pattern.findall(clause)}
    if len(values) != 1:
        problem = f"no {what}" if not values else f"several {what}s {sorted(values)}"
        raise ValueError(f"cannot parse caption {text!r}: {problem} in {clause!r}")
    return values.pop()


def parse_caption(text: str) -> tuple[ShapeObject, ...]:
    """Reads the objects back from a caption of `make_caption`'s grammar.

    Each object phrase (between commas / "and") must name exactly one size, colour and
    shape, and a position: a row word (top/upper, bottom/lower), a column word (left,
    right), either, or "center"/"middle" alone. Words outside the grammar are ignored,
    so paraphrases that keep the keywords ("a big red disk up in the top left") parse too.

    Args:
      text: the caption; case, surrounding spaces and a final full stop are ignored.

    Returns:
      the objects, sorted.

    Raises:
      ValueError: naming the text, if any object phrase lacks an attribute or names two.
    """
    clean = text.strip().lower().rstrip(".").strip()
    clauses = _SEPARATOR_RE.split(clean)
    if not all(clauses):  # "", or a dangling separator as in a truncated caption
        raise ValueError(f"cannot parse caption {text!r}: an object phrase is empty")
    objects = []
    for clause in clauses:
        size = _one(_SIZE_RE, _SIZE_OF, clause, "size", text)
        color = _one(_COLOR_RE, _COLOR_OF, clause, "colour", text)
        shape = _one(_SHAPE_RE, _SHAPE_OF, clause, "shape", text)
        rows = {_ROW_OF[m] for m in _ROW_RE.findall(clause)}
        cols = {_COL_OF[m] for m in _COL_RE.findall(clause)}
        if len(rows) > 1 or len(cols) > 1 or not (rows or cols or _CENTER_RE.search(clause)):
            raise ValueError(f"cannot parse caption {text!r}: no single position in {clause!r}")
        row, col = rows.pop() if rows else 1, cols.pop() if cols else 1
        objects.append(ShapeObject(shape, color, size, row * 3 + col))
    return tuple(sorted(objects))


# The grammar must cover the vocabulary (a new shape or colour needs words here).
assert set(_SIZE_WORDS) == set(SIZES) and set(_COLOR_WORDS) == set(COLORS) and set(_SHAPE_WORDS) == set(SHAPES)
assert len(_POSITION_PHRASES) == len(POSITIONS)
