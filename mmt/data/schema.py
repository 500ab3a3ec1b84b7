"""mmt's TFRecord schema: one `tf.train.Example` per record, in sharded files per split.

Every data directory holds sharded TFRecord files per split
(`{split}-{i:05d}-of-{n:05d}.tfrecord`) and one `manifest.json` (`mmt.data.manifests`).
A record carries:

| key             | type          | meaning                                                  |
|-----------------|---------------|----------------------------------------------------------|
| `key`           | bytes         | stable id of the example (UTF-8)                         |
| `image/tokens`  | int64 list    | VQ tokens of the image, row-major over the grid          |
| `image/grid`    | int64 [h, w]  | the token grid's shape                                   |
| `image/encoded` | bytes         | PNG or JPEG of the resized image (M3AE pixels, FID)      |
| `text/caption`  | bytes         | the caption, UTF-8                                       |
| `text/ids`      | int64 list    | SentencePiece piece ids of the caption, no EOS, no pad   |

A stream may lack a modality: image-only records have no `text/*` keys, text-only
records no `image/*` keys. Termination and padding of `text/ids` happen when reading
(`mmt.data.text_ids`, `mmt.data.pipeline`), so one data directory serves every text length.

Writing is deterministic: a record's shard is chosen by a hash of its key, so writing
the same records in the same order twice gives byte-identical files; each file is
written under a temporary name and renamed when complete. All file access goes through
`tf.io.gfile`, so data directories may live on GCS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow as tf


# Feature keys of a record.
KEY = "key"
IMAGE_TOKENS = "image/tokens"
IMAGE_GRID = "image/grid"
IMAGE_ENCODED = "image/encoded"
TEXT_CAPTION = "text/caption"
TEXT_IDS = "text/ids"
_SHARD_PATTERN = "{split}-{index:05d}-of-{num_shards:05d}.tfrecord"
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.]+$")
# Magic numbers of the image formats `image/encoded` may hold.
_IMAGE_MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}


def _int64_feature(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _bytes_feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int_array(value, key: str, field: str, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != ndim:
        raise ValueError(f"record {key!r}: {field} must have {ndim} dimension(s), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"record {key!r}: {field} is empty")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"record {key!r}: {field} must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.min() < 0:
        raise ValueError(f"record {key!r}: {field} holds negative ids (min {array.min()})")
    return array


def encode_example(
    key: str | bytes,
    *,
    image_tokens: np.ndarray | None = None,
    image_encoded: bytes | None = None,
    caption: str | bytes | None = None,
    text_ids: Sequence[int] | np.ndarray | None = None,
) -> bytes:
    """Builds and serializes one record.

    Args:
      key: the example's stable, non-empty id.
      image_tokens: int [h, w] VQ tokens of the image (non-negative).
      image_encoded: PNG or JPEG bytes of the resized image.
      caption: the caption (str, or UTF-8 bytes), non-empty.
      text_ids: int [n] SentencePiece ids of the caption, n >= 1, WITHOUT EOS or
        padding (added when reading, for whatever text length a run uses).

    Returns:
      The serialized `tf.train.Example`.

    Raises:
      ValueError: naming the key and the field, when an input is malformed or the record
        would carry neither an image nor a text.
    """
    if isinstance(key, bytes):
        try:
            key = key.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"record key {key!r} is not valid UTF-8: {e}") from None
    if not isinstance(key, str) or not key:
        raise ValueError(f"record key must be a non-empty str or bytes, got {key!r}")
    feature = {KEY: _bytes_feature(key.encode("utf-8"))}

    if image_tokens is not None:
        tokens = _int_array(image_tokens, key, "image_tokens", ndim=2)
        feature[IMAGE_TOKENS] = _int64_feature(tokens.reshape(-1))
        feature[IMAGE_GRID] = _int64_feature(list(tokens.shape))
    if image_encoded is not None:
        if not isinstance(image_encoded, (bytes, bytearray, memoryview)):
            raise ValueError(
                f"record {key!r}: image_encoded must be PNG or JPEG bytes, got {type(image_encoded).__name__}"
            )
        image_encoded = bytes(image_encoded)
        if not any(image_encoded.startswith(magic) for magic in _IMAGE_MAGIC.values()):
            raise ValueError(
                f"record {key!r}: image_encoded is neither PNG nor JPEG (starts with {image_encoded[:8]!r})"
            )
        feature[IMAGE_ENCODED] = _bytes_feature(image_encoded)
    if caption is not None:
        if isinstance(caption, bytes):
            try:
                caption.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"record {key!r}: caption is not valid UTF-8: {e}") from None
        elif isinstance(caption, str):
            caption = caption.encode("utf-8")
        else:
            raise ValueError(f"record {key!r}: caption must be str or bytes, got {type(caption).__name__}")
        if not caption.strip():
            raise ValueError(f"record {key!r}: caption is empty")
        feature[TEXT_CAPTION] = _bytes_feature(caption)
    if text_ids is not None:
        # Empty ids are refused so that "has text" and "has non-empty text/ids" are the
        # same thing: the pipeline then detects image-only records in a text stream.
        ids = _int_array(text_ids, key, "text_ids", ndim=1)
        feature[TEXT_IDS] = _int64_feature(ids)
    if len(feature) == 1:
        raise ValueError(
            f"record {key!r}: no image_tokens, image_encoded, caption or text_ids; a record "
            "needs at least one modality"
        )
    # deterministic=True: protobuf writes map fields (the feature map) in a per-process
    # hash order otherwise, so two runs over the same inputs would write different bytes.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def decode_example(serialized: bytes) -> dict[str, Any]:
    """Eagerly decodes one record (tools and tests; the pipeline parses in TensorFlow).

    Returns:
      A dict with the keys present in the record: `key` (str), `image/tokens` (int64
      [h, w]), `image/grid` ((h, w)), `image/encoded` (bytes), `text/caption` (str),
      `text/ids` (int64 [n]).
    """
    example = tf.train.Example.FromString(serialized)
    feature = example.features.feature
    out: dict[str, Any] = {}
    if KEY in feature:
        out[KEY] = feature[KEY].bytes_list.value[0].decode("utf-8")
    if IMAGE_GRID in feature:
        out[IMAGE_GRID] = tuple(int(v) for v in feature[IMAGE_GRID].int64_list.value)
    if IMAGE_TOKENS in feature:
        tokens = np.asarray(feature[IMAGE_TOKENS].int64_list.value, np.int64)
        grid = out.get(IMAGE_GRID)
        out[IMAGE_TOKENS] = tokens.reshape(grid) if grid and np.prod(grid) == tokens.size else tokens
    if IMAGE_ENCODED in feature:
        out[IMAGE_ENCODED] = feature[IMAGE_ENCODED].bytes_list.value[0]
    if TEXT_CAPTION in feature:
        out[TEXT_CAPTION] = feature[TEXT_CAPTION].bytes_list.value[0].decode("utf-8")
    if TEXT_IDS in feature:
        out[TEXT_IDS] = np.asarray(feature[TEXT_IDS].int64_list.value, np.int64)
    return out


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """One split's files in a data directory.

    Attributes:
      num_records: records in the split.
      shards: shard file names, relative to the data directory, in shard order.
      shard_records: records per shard (may be empty when another tool wrote the data).
      shard_bytes: byte size per shard (a different size on disk means the file was
        truncated or overwritten; may be empty).
    """

    num_records: int
    shards: tuple[str, ...]
    shard_records: tuple[int, ...] = ()
    shard_bytes: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("shard_records", "shard_bytes"):
            values = getattr(self, name)
            if values and len(values) != len(self.shards):
                raise ValueError(f"SplitInfo: {len(values)} {name} for {len(self.shards)} shards")


def shard_index(key: str | bytes, num_shards: int) -> int:
    """The shard of a record: a stable hash of its key (same on every machine and run)."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % num_shards


def shard_names(split: str, num_shards: int) -> list[str]:
    return [_SHARD_PATTERN.format(split=split, index=i, num_shards=num_shards) for i in range(num_shards)]


def write_split(
    output_dir: str | os.PathLike,
    split: str,
    records: Iterable[tuple[str | bytes, bytes]],
    num_shards: int,
) -> SplitInfo:
    """Writes one split's serialized records into `num_shards` TFRecord files.

    Args:
      output_dir: the data directory (created if needed).
      split: the split's name, e.g. `paired` (letters, digits, `_` and `.`).
      records: (key, serialized example) pairs, e.g. from `encode_example`. Keys must be
        unique within the split.
      num_shards: number of files; a record goes to `shard_index(key, num_shards)`.

    Returns:
      The split's `SplitInfo`, for `write_manifest`.

    Within a shard, records keep their input order, so the same records in the same
    order give byte-identical files. All shards are open at once, which suits up to a
    few hundred shards; bigger jobs belong in the Beam pipelines. Shards are written under temporary names and only
    renamed once every shard is complete: an interrupted run leaves no shard that looks
    finished.
    """
    if not _SPLIT_NAME.match(split):
        raise ValueError(f"split name {split!r} must match {_SPLIT_NAME.pattern}")
    if not 1 <= num_shards <= 99_999:
        raise ValueError(f"num_shards must be in [1, 99999], got {num_shards}")
    output_dir = os.fspath(output_dir)
    tf.io.gfile.makedirs(output_dir)
    names = shard_names(split, num_shards)
    final = [os.path.join(output_dir, name) for name in names]
    temporary = [f"{path}.tmp-{os.getpid()}" for path in final]
    counts = [0] * num_shards
    seen: set[bytes] = set()
    writers = [tf.io.TFRecordWriter(path) for path in temporary]
    try:
        for key, serialized in records:
            key_bytes = key.encode("utf-8") if isinstance(key, str) else bytes(key)
            if key_bytes in seen:
                raise ValueError(f"split {split!r}: duplicate record key {key!r}")
            seen.add(key_bytes)
            index = shard_index(key_bytes, num_shards)
            writers[index].write(serialized)
            counts[index] += 1
        for writer in writers:
            writer.close()
        sizes = [tf.io.gfile.stat(path).length for path in temporary]
        for tmp, path in zip(temporary, final):
            tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        for writer, tmp in zip(writers, temporary):
            writer.close()
            if tf.io.gfile.exists(tmp):
                tf.io.gfile.remove(tmp)
        raise
    return SplitInfo(
        num_records=sum(counts), shards=tuple(names), shard_records=tuple(counts), shard_bytes=tuple(sizes)
    )
