"""A data directory's `manifest.json`: what was written, by which tokenizers, with which options.

The manifest records the record counts, the shard files (with their record counts and
byte sizes, which is how truncated shards are found without reading them:
`mmt.data.integrity`), the fingerprints of the image tokenizer and text vocabulary that
made the ids, and the options of the run that wrote them. Training refuses data whose
fingerprints differ from its tokenizers' (`check_fingerprints`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Mapping

import tensorflow as tf

from mmt.data.schema import SplitInfo
from mmt.errors import UserError


MANIFEST_FILE = "manifest.json"
# Bumped when the record schema or the manifest layout changes incompatibly.
FORMAT_VERSION = 1


class FingerprintMismatchError(UserError, ValueError):
    """The data was made with another image tokenizer or text vocabulary than configured."""


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
            "mmt's data tools (beam_pipelines.tokenize, or mmt.data.schema.write_split + "
            "mmt.data.manifests.write_manifest)"
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
