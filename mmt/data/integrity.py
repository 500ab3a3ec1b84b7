"""Damaged shards, found and named: checksums, truncation, sizes against the manifest.

TensorFlow reports a damaged TFRecord as `DataLossError: corrupted record at 12`,
without the file; everything here names the file and what is wrong with it, and
`CorruptShardError` is the one error that reaches the user.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
from typing import Iterable, Iterator, Mapping, Sequence

import tensorflow as tf

from mmt.errors import UserError


# A TFRecord frames each record as: uint64 length, uint32 CRC of the length, the data,
# uint32 CRC of the data.
_TFRECORD_OVERHEAD = 16

_log = logging.getLogger(__name__)


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


# -- while reading ------------------------------------------------------------------------


def corrupt_shard_error(files: Sequence[str], error: tf.errors.DataLossError) -> CorruptShardError:
    """The `CorruptShardError` for a `DataLossError` met while reading `files`.

    TensorFlow's message ("corrupted record at 12") does not say which file; this
    re-reads `files` (concurrently) to find out.
    """
    summary = error_summary(error)
    _log.warning("%s while reading; checking %d shards to find the corrupt one", summary, len(files))
    problems = find_corrupt_shards(files)
    if not problems:
        problems = [(", ".join(files) or "<no files given>", f"not located by re-reading ({summary})")]
    return CorruptShardError(problems, context=f"reading failed with {summary!r}")


@contextlib.contextmanager
def translate_data_loss(files: Sequence[str]) -> Iterator[None]:
    """Turns a `DataLossError` raised inside the block into a `CorruptShardError`.

    For a training step that pulls its batch inside a `tf.function`; `InputIterator`
    does the same for `next()`.
    """
    try:
        yield
    except tf.errors.DataLossError as e:
        raise corrupt_shard_error(files, e) from e
