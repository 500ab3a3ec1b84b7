"""Checks a data directory written by `beam_pipelines.tokenize`; exits non-zero on the first problem.

    python -m beam_pipelines.verify DIR [--image_tokenizer=PATH] [--text_vocab=PATH]

In order: the `COMPLETED` marker; `manifest.json`; `stats.json` (inputs = written +
filtered + dead-lettered, written = the manifest's count, dead-letter lines = filtered
+ dead-lettered); the fingerprints against the given tokenizer and vocabulary; every
shard's size and checksums; then every record: it parses, its key is unique and hashes
to the shard it is in, it carries the modalities of its split (image tokens when the
manifest records an image tokenizer, `image/encoded` when the run stored images), its
token grid is the manifest's, its image tokens and text ids lie inside the
vocabularies; and each shard's record count is the manifest's.

A problem ends the program with one line, `error: ...`, and exit status 2
(`mmt.errors`); `--verbose` adds the traceback and TensorFlow's start-up logging.
A directory in the middle of an `--overwrite` swap has no `COMPLETED` (it is deleted
first and written last, see `beam_pipelines.output`), so it is never verified as complete.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from apache_beam.io.filesystems import FileSystems

from beam_pipelines import resources
from beam_pipelines.config import UserErrorParser
from mmt.errors import VERBOSE_FLAG, UserError, run_main


class VerifyError(UserError):
    """The first problem found in a data directory."""


def _read_json(path: str, what: str) -> dict:
    if not FileSystems.exists(path):
        raise VerifyError(f"{what} missing: {path}")
    with FileSystems.open(path) as handle:
        try:
            return json.loads(handle.read())
        except json.JSONDecodeError as e:
            raise VerifyError(f"{what} {path} is not valid JSON: {e}") from None


def _check_stats(data_dir: str, manifest) -> dict:
    stats = _read_json(FileSystems.join(data_dir, resources.STATS), "stats.json")
    try:
        inputs, written = stats["inputs"], stats["written"]
        filtered, dead = stats["filtered"], stats["dead_lettered"]
    except KeyError as e:
        raise VerifyError(f"stats.json lacks {e}") from None
    if inputs != written + filtered + dead:
        raise VerifyError(f"stats.json: inputs {inputs} != written {written} + filtered {filtered} "
                          f"+ dead-lettered {dead}")
    recorded = sum(info.num_records for info in manifest.splits.values())
    if written != recorded:
        raise VerifyError(f"stats.json says {written} records written, the manifest {recorded}")
    lines = 0
    for name in stats.get("dead_letter_files", []):
        path = FileSystems.join(data_dir, name)
        if not FileSystems.exists(path):
            raise VerifyError(f"dead-letter file missing: {path}")
        with FileSystems.open(path) as handle:
            lines += sum(1 for line in handle.read().splitlines() if line.strip())
    if lines != filtered + dead:
        raise VerifyError(f"dead-letter files hold {lines} lines, stats.json {filtered} filtered "
                          f"+ {dead} dead-lettered")
    return stats


def _check_fingerprints(manifest, image_tokenizer: str, text_vocab: str, modules: Sequence[str]) -> None:
    from mmt.data import manifests

    image = text = None
    if image_tokenizer:
        image = resources.load_image_tokenizer(image_tokenizer, modules).fingerprint()
    if text_vocab:
        text = resources.load_text_vocab(text_vocab).fingerprint()
    try:
        manifests.check_fingerprints(manifest, image_tokenizer=image, text_vocab=text)
    except manifests.FingerprintMismatchError as e:
        raise VerifyError(str(e)) from None


def _check_record(record: dict, split: str, manifest, modalities: tuple[str, ...]) -> None:
    key = record.get("key")
    where = f"split {split!r}, record {key!r}"
    stored = manifest.options.get("store_image", "none") != "none"
    if "image" in modalities and stored and not record.get("image/encoded"):
        raise VerifyError(f"{where}: no image/encoded, though the run stored images "
                          f"(--store_image={manifest.options.get('store_image')})")
    if "image" not in modalities and "image/encoded" in record:
        raise VerifyError(f"{where}: image/encoded in a split without images")
    if "image" in modalities and manifest.image_tokenizer is not None:
        info = manifest.image_tokenizer
        if "image/tokens" not in record:
            raise VerifyError(f"{where}: no image/tokens")
        if tuple(record["image/grid"]) != tuple(info.grid):
            raise VerifyError(f"{where}: grid {record['image/grid']} is not the manifest's {tuple(info.grid)}")
        tokens = record["image/tokens"]
        if tokens.size != info.grid[0] * info.grid[1]:
            raise VerifyError(f"{where}: {tokens.size} image tokens for a {tuple(info.grid)} grid")
        if tokens.min() < 0 or tokens.max() >= info.vocab_size:
            raise VerifyError(f"{where}: image tokens in [{tokens.min()}, {tokens.max()}], outside "
                              f"[0, {info.vocab_size})")
    elif "image/tokens" in record:
        raise VerifyError(f"{where}: image tokens in a split without an image tokenizer")
    if "text" in modalities:
        ids = record.get("text/ids")
        if ids is None or ids.size == 0 or not record.get("text/caption"):
            raise VerifyError(f"{where}: no caption or text/ids")
        if ids.min() < 0 or ids.max() >= manifest.text_vocab.vocab_size:
            raise VerifyError(f"{where}: text ids in [{ids.min()}, {ids.max()}], outside "
                              f"[0, {manifest.text_vocab.vocab_size})")
    elif "text/ids" in record:
        raise VerifyError(f"{where}: text ids in a split without text")


def _check_split(data_dir: str, split: str, manifest) -> int:
    import tensorflow as tf

    from mmt.data import integrity, schema

    info = manifest.split(split)
    paths = manifest.shard_paths(split)
    expected = dict(zip(paths, info.shard_bytes)) if info.shard_bytes else None
    problems = integrity.find_corrupt_shards(paths, expected_bytes=expected)
    if problems:
        path, problem = problems[0]
        raise VerifyError(f"corrupt shard {path}: {problem}")
    # Recorded since pixels-only runs (no image tokenizer); older manifests imply it.
    modalities = tuple(manifest.options.get("modalities") or (
        m for m, present in (("image", manifest.image_tokenizer), ("text", manifest.text_vocab)) if present))
    seen: set[str] = set()
    total = 0
    for index, path in enumerate(paths):
        count = 0
        for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
            try:
                record = schema.decode_example(serialized)
            except Exception as e:  # a protobuf DecodeError, or a malformed feature
                raise VerifyError(f"{path}: record {count} does not parse: {e}") from None
            key = record.get("key")
            if not key:
                raise VerifyError(f"{path}: record {count} has no key")
            if key in seen:
                raise VerifyError(f"{path}: duplicate key {key!r}")
            seen.add(key)
            if schema.shard_index(key, len(paths)) != index:
                raise VerifyError(f"{path}: record {key!r} belongs in shard {schema.shard_index(key, len(paths))}")
            _check_record(record, split, manifest, modalities)
            count += 1
        if info.shard_records and count != info.shard_records[index]:
            raise VerifyError(f"{path}: {count} records, the manifest says {info.shard_records[index]}")
        total += count
    if total != info.num_records:
        raise VerifyError(f"split {split!r}: {total} records, the manifest says {info.num_records}")
    return total


def verify(data_dir: str, *, image_tokenizer: str = "", text_vocab: str = "", modules: Sequence[str] = ()) -> dict:
    """Checks `data_dir`; returns {split: records} or raises `VerifyError`."""
    data_dir = data_dir.rstrip("/")
    if not FileSystems.exists(FileSystems.join(data_dir, resources.COMPLETED)):
        what = ("does not exist" if not FileSystems.exists(data_dir) else
                f"has no {resources.COMPLETED} marker: the run did not finish (or an --overwrite is swapping it)")
        raise VerifyError(f"{data_dir} {what}")
    from mmt.data import manifests  # imports TensorFlow: not needed for the checks above

    try:
        manifest = manifests.read_manifest(data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise VerifyError(str(e)) from None
    _check_stats(data_dir, manifest)
    resources.import_modules(modules)
    _check_fingerprints(manifest, image_tokenizer, text_vocab, modules)
    return {split: _check_split(data_dir, split, manifest) for split in sorted(manifest.splits)}


def _main(argv: Sequence[str] | None) -> int:
    parser = UserErrorParser(prog="python -m beam_pipelines.verify", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--image_tokenizer", default="", help="check the manifest's fingerprint against it")
    parser.add_argument("--text_vocab", default="", help="check the manifest's fingerprint against it")
    parser.add_argument("--import_modules", default="", help="comma-separated modules registering tokenizers")
    parser.add_argument(VERBOSE_FLAG, action="store_true", help="print tracebacks and TensorFlow's start-up logging")
    args = parser.parse_args(argv)
    modules = tuple(m.strip() for m in args.import_modules.split(",") if m.strip())
    counts = verify(args.data_dir, image_tokenizer=args.image_tokenizer, text_vocab=args.text_vocab,
                    modules=modules)
    print(f"verify OK: {args.data_dir}: " + ", ".join(f"{split} {n} records" for split, n in counts.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point: a failed check is `error: ...` and exit status 2 (`mmt.errors`)."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
