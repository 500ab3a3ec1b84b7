"""mmt's TFRecord schema: one `tf.train.Example` per record, sharded, with a manifest.

Every data directory holds sharded TFRecord files per split
(`{split}-{i:05d}-of-{n:05d}.tfrecord`) and one `manifest.json`. A record carries:

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
(`mmt.data.pipeline`), so one data directory serves every text length.

The manifest records the record counts, the shard files (with their record counts and
byte sizes, which is how truncated shards are found without reading them), the
fingerprints of the image tokenizer and text vocabulary that made the ids, and the
options of the run that wrote them. Training refuses data whose fingerprints differ
from its tokenizers' (`check_fingerprints`).

Writing is deterministic: a record's shard is chosen by a hash of its key, so writing
the same records in the same order twice gives byte-identical files; each file is
written under a temporary name and renamed when complete. All file access goes through
`tf.io.gfile`, so data directories may live on GCS.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from mmt.errors import UserError

# Feature keys of a record.
KEY = "key"
IMAGE_TOKENS = "image/tokens"
IMAGE_GRID = "image/grid"
IMAGE_ENCODED = "image/encoded"
TEXT_CAPTION = "text/caption"
TEXT_IDS = "text/ids"

MANIFEST_FILE = "manifest.json"
# Bumped when the record schema or the manifest layout changes incompatibly.
FORMAT_VERSION = 1

_SHARD_PATTERN = "{split}-{index:05d}-of-{num_shards:05d}.tfrecord"
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.]+$")
# A TFRecord frames each record as: uint64 length, uint32 CRC of the length, the data,
# uint32 CRC of the data.
_TFRECORD_OVERHEAD = 16
# Magic numbers of the image formats `image/encoded` may hold.
_IMAGE_MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}


class FingerprintMismatchError(UserError, ValueError):
    """The data was made with another image tokenizer or text vocabulary than configured."""


class CorruptShardError(UserError, ValueError):
    """A TFRecord shard is damaged (bad checksum, truncated, missing).

    Attributes:
      shards: list of (file, what is wrong with it).
    """

    def __init__(self, shards: Sequence[tuple[str, str]], context: str = ""):
        self.shards = list(shards)
        lines = "\n".join(f"  {path}: {problem}" for path, problem in self.shards)
        prefix = f"{context}: " if context else ""
        super().__init__(
            f"{prefix}{len(self.shards)} corrupt TFRecord shard(s); re-create or remove them "
            f"(and their manifest entries):\n{lines}"
        )


# -- records -------------------------------------------------------------------------


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


# -- writing ---------------------------------------------------------------------------


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


# -- manifest --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageTokenizerInfo:
    """The image tokenizer that made `image/tokens`: fingerprint, grid (h, w), vocab size."""

    fingerprint: str
    grid: tuple[int, int]
    vocab_size: int


@dataclasses.dataclass(frozen=True)
class TextVocabInfo:
    """The text vocabulary that made `text/ids`: fingerprint and vocab size."""

    fingerprint: str
    vocab_size: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The contents of a data directory's `manifest.json`.

    Attributes:
      data_dir: where the manifest was read from or written to (not stored in the file,
        so a data directory can be moved or copied).
      splits: split name -> its files and counts.
      image_tokenizer: None when the records carry no image tokens.
      text_vocab: None when the records carry no text ids.
      options: free-form options of the run that wrote the data (JSON-serializable).
      created: ISO-8601 UTC time of writing.
      format_version: the schema version the data was written with.
    """

    data_dir: str
    splits: dict[str, SplitInfo]
    image_tokenizer: ImageTokenizerInfo | None
    text_vocab: TextVocabInfo | None
    options: dict[str, Any]
    created: str
    format_version: int = FORMAT_VERSION

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ValueError(
                f"data directory {self.data_dir} has no split {name!r}; it has {sorted(self.splits)}"
            )
        return self.splits[name]

    def shard_paths(self, split: str) -> list[str]:
        """Full paths of a split's shards, in shard order."""
        return [os.path.join(self.data_dir, name) for name in self.split(split).shards]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "created": self.created,
            "splits": {name: dataclasses.asdict(info) for name, info in self.splits.items()},
            "image_tokenizer": None if self.image_tokenizer is None else dataclasses.asdict(self.image_tokenizer),
            "text_vocab": None if self.text_vocab is None else dataclasses.asdict(self.text_vocab),
            "options": self.options,
        }


def write_manifest(
    output_dir: str | os.PathLike,
    *,
    splits: Mapping[str, SplitInfo],
    image_tokenizer: ImageTokenizerInfo | None = None,
    text_vocab: TextVocabInfo | None = None,
    options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Writes `manifest.json` into `output_dir` (atomically) and returns it.

    Args:
      output_dir: the data directory.
      splits: split name -> `SplitInfo` from `write_split`.
      image_tokenizer: fingerprint / grid / vocab size of the image tokenizer, or None
        when no record carries image tokens.
      text_vocab: fingerprint / vocab size of the text vocabulary, or None when no
        record carries text ids.
      options: options of the run that made the data (must be JSON-serializable).
    """
    output_dir = os.fspath(output_dir)
    manifest = Manifest(
        data_dir=output_dir,
        splits=dict(splits),
        image_tokenizer=image_tokenizer,
        text_vocab=text_vocab,
        options=dict(options or {}),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    try:
        text = json.dumps(manifest.to_json(), indent=2, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"manifest options for {output_dir} are not JSON-serializable: {e}") from e
    tf.io.gfile.makedirs(output_dir)
    path = os.path.join(output_dir, MANIFEST_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text + "\n")
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return manifest


def read_manifest(data_dir: str | os.PathLike) -> Manifest:
    """Reads `data_dir/manifest.json`.

    Raises:
      FileNotFoundError: the directory has no manifest.
      ValueError: the manifest is unreadable or from a newer format version.
    """
    data_dir = os.fspath(data_dir)
    path = os.path.join(data_dir, MANIFEST_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"data directory {data_dir} has no {MANIFEST_FILE}; mmt only reads data written with "
            "mmt.data.features (write_split + write_manifest)"
        )
    with tf.io.gfile.GFile(path, "r") as f:
        try:
            raw = json.loads(f.read())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this mmt reads up to {FORMAT_VERSION}")
    try:
        splits = {
            name: SplitInfo(
                num_records=int(info["num_records"]),
                shards=tuple(info["shards"]),
                shard_records=tuple(info.get("shard_records", ())),
                shard_bytes=tuple(info.get("shard_bytes", ())),
            )
            for name, info in raw["splits"].items()
        }
        image = raw.get("image_tokenizer")
        text = raw.get("text_vocab")
        return Manifest(
            data_dir=data_dir,
            splits=splits,
            image_tokenizer=None if image is None else ImageTokenizerInfo(
                fingerprint=image["fingerprint"], grid=tuple(image["grid"]), vocab_size=int(image["vocab_size"])
            ),
            text_vocab=None if text is None else TextVocabInfo(
                fingerprint=text["fingerprint"], vocab_size=int(text["vocab_size"])
            ),
            options=raw.get("options") or {},
            created=raw.get("created", ""),
            format_version=version,
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is malformed: missing or wrong field {e}") from e


def check_fingerprints(
    manifest_or_dir: Manifest | str | os.PathLike,
    *,
    image_tokenizer: str | None = None,
    text_vocab: str | None = None,
) -> Manifest:
    """Refuses data made with another tokenizer than the run's.

    Args:
      manifest_or_dir: a `Manifest` or a data directory.
      image_tokenizer: the configured image tokenizer's fingerprint; None skips the check.
      text_vocab: the configured text vocabulary's fingerprint; None skips the check.

    Returns:
      The manifest.

    Raises:
      FingerprintMismatchError: naming the data directory, which fingerprint, the
        manifest's value and the configured one. A manifest that records no tokenizer
        of a kind does not match a configured one.
    """
    manifest = manifest_or_dir if isinstance(manifest_or_dir, Manifest) else read_manifest(manifest_or_dir)
    checks = (
        ("image tokenizer", image_tokenizer, manifest.image_tokenizer),
        ("text vocabulary", text_vocab, manifest.text_vocab),
    )
    for what, expected, info in checks:
        if expected is None:
            continue
        recorded = None if info is None else info.fingerprint
        if recorded != expected:
            raise FingerprintMismatchError(
                f"data directory {manifest.data_dir} was made with another {what}: "
                f"manifest fingerprint {recorded!r}, configured {what} fingerprint {expected!r}. "
                f"Re-create the data with the configured {what}, or configure the one the data "
                "was made with."
            )
    return manifest


# -- corrupt shards ---------------------------------------------------------------------


def _size_problem(path: str, expected_bytes: int | None) -> str | None:
    if not tf.io.gfile.exists(path):
        return "file does not exist"
    size = tf.io.gfile.stat(path).length
    if expected_bytes is not None and size != expected_bytes:
        return f"file has {size} bytes, the manifest says {expected_bytes} (truncated or overwritten)"
    return None


def error_summary(error: tf.errors.OpError) -> str:
    """An OpError's message without TensorFlow's function-node and op decorations."""
    message = error.message.split("}} ")[-1]
    return message.split(" [Op:")[0].strip()


@tf.autograph.experimental.do_not_convert
def _add_record_bytes(total: tf.Tensor, record: tf.Tensor) -> tf.Tensor:
    return total + tf.cast(tf.strings.length(record), tf.int64) + _TFRECORD_OVERHEAD


def _shard_problem(path: str, expected_bytes: int | None) -> str | None:
    problem = _size_problem(path, expected_bytes)
    if problem is not None:
        return problem
    # Read every record in C++ (which checks both CRCs of each record) and sum the bytes
    # the records span. TensorFlow reports a record cut inside its data as DataLossError
    # but one cut inside its 12-byte header as a normal end of file; only the byte count
    # shows the latter.
    dataset = tf.data.TFRecordDataset(path, buffer_size=1 << 20)
    try:
        consumed = int(dataset.reduce(tf.constant(0, tf.int64), _add_record_bytes))
    except tf.errors.OpError as e:
        return f"{type(e).__name__}: {error_summary(e)}"
    size = tf.io.gfile.stat(path).length
    if consumed != size:
        return f"truncated: {size - consumed} bytes after the last complete record (which ends at byte {consumed})"
    return None


def find_corrupt_shards(
    files: Iterable[str | os.PathLike],
    *,
    expected_bytes: Mapping[str, int] | None = None,
    max_workers: int = 8,
) -> list[tuple[str, str]]:
    """Reads each TFRecord file fully and returns the damaged ones.

    TensorFlow's `DataLossError` ("corrupted record at 12") does not name the file;
    this does. A file is damaged when a record fails its checksum, when it ends inside
    a record (truncated), when it is missing, or when its size differs from
    `expected_bytes[file]` (the manifest's `shard_bytes`).

    Args:
      files: TFRecord paths.
      expected_bytes: optional path -> expected byte size.
      max_workers: files read concurrently (reading releases the GIL).

    Returns:
      (file, problem) for each damaged file, in the order of `files`.
    """
    paths = [os.fspath(f) for f in files]
    expected_bytes = expected_bytes or {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(paths) or 1))) as pool:
        problems = list(pool.map(lambda p: _shard_problem(p, expected_bytes.get(p)), paths))
    return [(path, problem) for path, problem in zip(paths, problems) if problem is not None]


def find_corrupt_shards_by_size(files: Sequence[str], expected_bytes: Sequence[int]) -> list[tuple[str, str]]:
    """Missing shards and shards whose size differs from the manifest's, without reading them."""
    problems = [(path, _size_problem(path, size)) for path, size in zip(files, expected_bytes)]
    return [(path, problem) for path, problem in problems if problem is not None]
