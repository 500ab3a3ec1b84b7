"""What flows through the tokenize pipeline: `Item`s, and `Drop`s for everything not written.

An `Item` is one input example on its way to a record; each stage fills in more of it
(`image_bytes` -> `pixels` -> `tokens`, `caption` -> `text_ids`). An input that a stage
cannot or will not pass on becomes a `Drop`, emitted on the `DROPPED` output of that
stage, counted in a Beam counter named after its outcome, stage and reason, and written
to `dead_letter/*.jsonl`. Nothing else may make an element disappear: the final stage
checks that inputs = written + filtered + dead-lettered and refuses to mark the output
complete otherwise.

Two outcomes:

* `filtered` -- a deliberate choice (too small, duplicate, empty caption);
* `dead_letter` -- an error (unreadable row, 404, truncated JPEG, refused URL).

`REASONS` lists every reason with its outcome; a stage can only drop for a listed reason.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import apache_beam as beam
import numpy as np

#: Tag of every stage's side output of `Drop`s.
DROPPED = "dropped"
#: Namespace of the pipeline's Beam counters.
COUNTER_NAMESPACE = "mmt_tokenize"

FILTERED = "filtered"
DEAD_LETTER = "dead_letter"

#: reason -> (outcome, what it means).
REASONS: dict[str, tuple[str, str]] = {
    # reading the corpus
    "bad_row": (DEAD_LETTER, "a row that does not parse (JSON, CSV, a value of the wrong type)"),
    "missing_column": (DEAD_LETTER, "a row without the caption, image or key column"),
    "invalid_utf8": (DEAD_LETTER, "a caption, path or line that is not valid UTF-8"),
    "missing_image": (DEAD_LETTER, "a paired example without an image reference"),
    "corrupt_archive": (DEAD_LETTER, "a tar shard that cannot be read to its end"),
    # captions
    "empty_caption": (FILTERED, "a caption that is empty or only whitespace"),
    "caption_too_long": (FILTERED, "a caption longer than --max_caption_chars"),
    # getting the image bytes
    "path_refused": (DEAD_LETTER, "an image path outside the image directory"),
    "url_refused": (DEAD_LETTER, "a URL refused by the fetch policy (scheme, private address)"),
    "bad_url": (DEAD_LETTER, "a URL that does not parse"),
    "dns_error": (DEAD_LETTER, "a host name that does not resolve"),
    "connection_error": (DEAD_LETTER, "the server could not be reached or broke the connection"),
    "timeout": (DEAD_LETTER, "the request did not complete in time"),
    "http_error": (DEAD_LETTER, "an HTTP status other than 200"),
    "too_many_redirects": (DEAD_LETTER, "more redirects than allowed"),
    "bad_content_type": (DEAD_LETTER, "a response whose Content-Type is not an image"),
    "too_large": (DEAD_LETTER, "an image file larger than --max_image_bytes"),
    "missing_file": (DEAD_LETTER, "an image file that does not exist"),
    "read_error": (DEAD_LETTER, "an image file that exists but cannot be read"),
    # decoding
    "empty_file": (DEAD_LETTER, "a zero-byte image"),
    "not_an_image": (DEAD_LETTER, "bytes that are not an image of an accepted format"),
    "truncated_image": (DEAD_LETTER, "an image file cut short"),
    "decompression_bomb": (DEAD_LETTER, "an image with more pixels than --max_image_pixels"),
    "decode_error": (DEAD_LETTER, "an image that fails to decode for another reason"),
    # filtering images
    "too_small": (FILTERED, "an image whose shorter side is below --min_image_side"),
    "bad_aspect_ratio": (FILTERED, "an image more elongated than --max_aspect_ratio"),
    "duplicate_image": (FILTERED, "the same image bytes as an earlier-sorting example"),
    # text, records, writing
    "no_text_ids": (DEAD_LETTER, "a caption that tokenizes to no ids"),
    "encode_error": (DEAD_LETTER, "a record that the schema refuses"),
    "duplicate_key": (DEAD_LETTER, "a second example with the same key"),
}


@dataclasses.dataclass(frozen=True)
class Item:
    """One example between stages.

    Attributes:
      key: stable, unique id (`train.tsv:17`, `00012.tar/000123`, `cats/001.jpg`).
      source: where it was read (`/data/train.tsv:17`), for dead letters.
      caption: the caption (text streams).
      image_ref: a URL or a file path of the image.
      image_bytes: the encoded image, once loaded (or read inline from a tar).
      image_array: uint8 [H, W, 3] pixels of an already decoded image (shapes).
      content_hash: sha256 of the image bytes (or array), for deduplication.
      original_size: (width, height) of the image as stored, EXIF-rotated.
      pixels: uint8 [S, S, 3], the resized and centre-cropped image.
      tokens: int32 [h, w] VQ tokens of `pixels`.
      image_encoded: `pixels` as PNG or JPEG (`--store_image`), once compressed.
      text_ids: SentencePiece ids of `caption`, without EOS.
    """

    key: str
    source: str
    caption: str | None = None
    image_ref: str | None = None
    image_bytes: bytes | None = None
    image_array: np.ndarray | None = None
    content_hash: str | None = None
    original_size: tuple[int, int] | None = None
    pixels: np.ndarray | None = None
    tokens: np.ndarray | None = None
    image_encoded: bytes | None = None
    text_ids: tuple[int, ...] | None = None

    def replace(self, **changes: Any) -> "Item":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, order=True)
class Drop:
    """An input that was not written: which, where from, at which stage, and why.

    `detail` is a short human-readable explanation made by the pipeline (a status code,
    a size, an exception's message); it never holds a response body or file contents.
    """

    key: str
    source: str
    stage: str
    reason: str
    outcome: str
    detail: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False)


def counter_name(outcome: str, stage: str, reason: str) -> str:
    return f"{outcome}/{stage}/{reason}"


def drop(item_or_key: Item | str, stage: str, reason: str, detail: str = "", source: str = "") -> beam.pvalue.TaggedOutput:
    """A `Drop` on the `DROPPED` output, counted under `outcome/stage/reason`.

    Args:
      item_or_key: the item dropped, or its key (with `source`) when no item exists yet.
      stage: the stage's short name (`read`, `fetch`, `decode`, ...).
      reason: one of `REASONS`.
      detail: a short explanation; never response bodies or file contents.
    """
    if reason not in REASONS:
        raise KeyError(f"unknown drop reason {reason!r}; add it to REASONS")
    outcome = REASONS[reason][0]
    if isinstance(item_or_key, Item):
        key, source = item_or_key.key, item_or_key.source
    else:
        key = item_or_key
    beam.metrics.Metrics.counter(COUNTER_NAMESPACE, counter_name(outcome, stage, reason)).inc()
    return beam.pvalue.TaggedOutput(DROPPED, Drop(key, source, stage, reason, outcome, _short(detail)))


def count(name: str, value: int = 1) -> None:
    """Increments the pipeline counter `name` (e.g. `inputs`, `written`)."""
    beam.metrics.Metrics.counter(COUNTER_NAMESPACE, name).inc(value)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
