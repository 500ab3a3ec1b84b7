"""Writing: deterministic TFRecord shards, dead-letter files, then stats, manifest, COMPLETED.

A record's shard is `schema.shard_index(key, num_shards)` (a hash of its key), and
each shard's records are sorted by key before writing, so the same inputs give
byte-identical shards whatever the runner, the number of workers or the order in which
elements arrived. Every shard exists, empty or not. Each file is written under a unique
temporary name and renamed when complete, so a retried or crashed bundle never leaves
a half-written file under a final name.

`Finalize` runs last -- its side inputs are the written shards and dead-letter files,
so it cannot start before them -- and checks that inputs = written + filtered +
dead-lettered before writing `stats.json`, `manifest.json` and, last, `COMPLETED`.
Everything goes to `write_dir`: the output directory itself, or the staging directory
of an `--overwrite` (see `beam_pipelines.output`); the manifest still records the
configured `--output_dir`.
"""

from __future__ import annotations

import datetime
import json
import os
import struct
import sys
import time
import uuid
from typing import Iterable

import apache_beam as beam
import crcmod.predefined
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_pipelines import output, resources
from beam_pipelines.config import TokenizeConfig
from beam_pipelines.items import DEAD_LETTER, DROPPED, FILTERED, count, drop
from beam_pipelines.resources import TokenizerInfo
from mmt.data import manifests, schema

_crc32c = crcmod.predefined.mkPredefinedCrcFun("crc-32c")


def _masked_crc(data: bytes) -> bytes:
    crc = _crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord_frame(data: bytes) -> bytes:
    """One TFRecord: length, CRC of the length, data, CRC of the data (masked CRC-32C)."""
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


def _write_atomically(path: str, chunks: Iterable[bytes]) -> int:
    """Writes `chunks` to `path` via a unique temporary name; returns the byte count."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    size = 0
    with FileSystems.create(temporary, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        for chunk in chunks:
            handle.write(chunk)
            size += len(chunk)
    FileSystems.rename([temporary], [path])
    return size


def _with_empty_shards(keyed, num_shards: int, label: str):
    """Adds (i, None) for every shard i, so empty shards are written too."""
    empty = keyed.pipeline | f"{label} indices" >> beam.Create([(i, None) for i in range(num_shards)])
    return (keyed, empty) | f"{label} with empty" >> beam.Flatten()


class WriteShardFn(beam.DoFn):
    """(shard index, records) -> the shard file; yields (index, name, records, bytes)."""

    def __init__(self, output_dir: str, split: str, num_shards: int):
        self.output_dir = output_dir
        self.names = schema.shard_names(split, num_shards)

    def process(self, element):
        index, values = element
        records = sorted(v for v in values if v is not None)  # (key, source, serialized)
        kept = []
        for key, source, serialized in records:
            if kept and kept[-1][0] == key:
                yield drop(key, "write", "duplicate_key", f"key also read from {kept[-1][1]}", source)
            else:
                kept.append((key, source, serialized))
        name = self.names[index]
        size = _write_atomically(FileSystems.join(self.output_dir, name),
                                 (tfrecord_frame(serialized) for _, _, serialized in kept))
        count("written", len(kept))
        yield index, name, len(kept), size


class WriteShards(beam.PTransform):
    """(key, source, serialized) records -> {"shards": shard infos, "dropped": duplicate keys}."""

    def __init__(self, output_dir: str, split: str, num_shards: int, label: str | None = None):
        super().__init__(label)
        self.output_dir, self.split, self.num_shards = output_dir, split, num_shards

    def expand(self, records):
        keyed = records | "Key by shard" >> beam.Map(lambda r: (schema.shard_index(r[0], self.num_shards), r))
        out = (_with_empty_shards(keyed, self.num_shards, "Shard")
               | "Group by shard" >> beam.GroupByKey()
               | "Write shard" >> beam.ParDo(WriteShardFn(self.output_dir, self.split, self.num_shards))
               .with_outputs(DROPPED, main="shards"))
        return {"shards": out.shards, "dropped": out[DROPPED]}


def dead_letter_names(num_files: int) -> list[str]:
    return [f"{resources.DEAD_LETTER_DIR}/dead_letter-{i:05d}-of-{num_files:05d}.jsonl" for i in range(num_files)]


class WriteDeadLettersFn(beam.DoFn):
    def __init__(self, output_dir: str, num_files: int):
        self.output_dir = output_dir
        self.names = dead_letter_names(num_files)

    def process(self, element):
        index, values = element
        drops = sorted(v for v in values if v is not None)
        name = self.names[index]
        _write_atomically(FileSystems.join(self.output_dir, name),
                          # A file name that is not UTF-8 stays readable, escaped.
                          ((d.to_json() + "\n").encode("utf-8", "backslashreplace") for d in drops))
        yield name, len(drops)


class WriteDeadLetters(beam.PTransform):
    """Drops -> `dead_letter/*.jsonl` (sorted, sharded by key); yields (name, lines)."""

    def __init__(self, output_dir: str, num_files: int, label: str | None = None):
        super().__init__(label)
        self.output_dir, self.num_files = output_dir, num_files

    def expand(self, drops):
        keyed = drops | "Key by file" >> beam.Map(
            lambda d: (schema.shard_index(d.key.encode("utf-8", "surrogateescape"), self.num_files), d))
        return (_with_empty_shards(keyed, self.num_files, "Dead letter")
                | "Group by file" >> beam.GroupByKey()
                | "Write file" >> beam.ParDo(WriteDeadLettersFn(self.output_dir, self.num_files)))


class CountDrops(beam.PTransform):
    """Drops -> ((outcome, stage, reason), n)."""

    def expand(self, drops):
        return (drops
                | "Reason" >> beam.Map(lambda d: ((d.outcome, d.stage, d.reason), 1))
                | "Count per reason" >> beam.CombinePerKey(sum))


def accounting(read: int, shards, dead_files, drop_counts, split: str) -> dict:
    """The stats of a run; raises RuntimeError when something got lost."""
    by_outcome: dict[str, dict[str, int]] = {FILTERED: {}, DEAD_LETTER: {}}
    for (outcome, stage, reason), n in sorted(drop_counts):
        by_outcome[outcome][f"{stage}/{reason}"] = n
    read_drops = sum(n for (_, stage, _), n in drop_counts if stage == "read")
    stats = {
        "split": split,
        "inputs": read + read_drops,
        "written": sum(records for _, _, records, _ in shards),
        "filtered": sum(by_outcome[FILTERED].values()),
        "dead_lettered": sum(by_outcome[DEAD_LETTER].values()),
        "filtered_by_reason": by_outcome[FILTERED],
        "dead_lettered_by_reason": by_outcome[DEAD_LETTER],
        "dead_letter_lines": sum(n for _, n in dead_files),
    }
    accounted = stats["written"] + stats["filtered"] + stats["dead_lettered"]
    if accounted != stats["inputs"] or stats["dead_letter_lines"] != stats["filtered"] + stats["dead_lettered"]:
        raise RuntimeError(
            f"records were lost: {stats['inputs']} inputs but {stats['written']} written + {stats['filtered']} "
            f"filtered + {stats['dead_lettered']} dead-lettered = {accounted} "
            f"({stats['dead_letter_lines']} dead-letter lines); not marking the output COMPLETED")
    return stats


def _pause_for_tests(write_dir: str) -> None:
    """The `output.PAUSE_ENV` hook: a test SIGKILLs the run while it sleeps here."""
    seconds = os.environ.get(output.PAUSE_ENV)
    if seconds:
        print(f"shards written to {write_dir}; pausing before finalize", file=sys.stderr, flush=True)
        time.sleep(float(seconds))


class FinalizeFn(beam.DoFn):
    """Writes stats.json, manifest.json, then COMPLETED (the side inputs are complete)."""

    def __init__(self, config: TokenizeConfig, info: TokenizerInfo, write_dir: str):
        self.config = config
        self.info = info
        self.write_dir = write_dir

    def process(self, _, read: int, shards, dead_files, drop_counts):
        c, info = self.config, self.info
        _pause_for_tests(self.write_dir)
        shards = sorted(shards)
        stats = accounting(read, shards, sorted(dead_files), list(drop_counts), c.split_name)
        stats["shards"] = [name for _, name, _, _ in shards]
        stats["dead_letter_files"] = sorted(name for name, _ in dead_files)
        with FileSystems.create(FileSystems.join(self.write_dir, resources.STATS)) as handle:
            handle.write((json.dumps(stats, indent=2, sort_keys=True) + "\n").encode())
        split = schema.SplitInfo(
            num_records=stats["written"], shards=tuple(name for _, name, _, _ in shards),
            shard_records=tuple(n for _, _, n, _ in shards), shard_bytes=tuple(b for _, _, _, b in shards))
        image = text = None
        if "image" in c.modalities and not c.pixels_only:
            image = manifests.ImageTokenizerInfo(info.image_fingerprint, info.image_grid, info.image_vocab_size)
        if "text" in c.modalities:
            text = manifests.TextVocabInfo(info.text_fingerprint, info.text_vocab_size)
        # `modalities`: what every record carries, which `verify` checks (a split of
        # pixels only records no image tokenizer to tell it that it has images).
        options = {**c.to_json(), "pipeline": "beam_pipelines.tokenize", "image_size": info.image_size or None,
                   "modalities": list(c.modalities),
                   "stats": {k: stats[k] for k in ("inputs", "written", "filtered", "dead_lettered")}}
        manifests.write_manifest(self.write_dir, splits={c.split_name: split}, image_tokenizer=image,
                                text_vocab=text, options=options)
        marker = {"completed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "records": stats["written"]}
        with FileSystems.create(FileSystems.join(self.write_dir, resources.COMPLETED)) as handle:
            handle.write((json.dumps(marker) + "\n").encode())
        yield stats


class Finalize(beam.PTransform):
    def __init__(self, config: TokenizeConfig, info: TokenizerInfo, read_count, shards, dead_files, drop_counts,
                 write_dir: str | None = None, label: str | None = None):
        super().__init__(label)
        self.config, self.info = config, info
        self.write_dir = write_dir or config.output_dir
        self.sides = (read_count, shards, dead_files, drop_counts)

    def expand(self, pbegin):
        read_count, shards, dead_files, drop_counts = self.sides
        return (pbegin
                | "Once" >> beam.Create([None])
                | "Stats, manifest, COMPLETED" >> beam.ParDo(
                    FinalizeFn(self.config, self.info, self.write_dir), beam.pvalue.AsSingleton(read_count),
                    beam.pvalue.AsList(shards), beam.pvalue.AsList(dead_files), beam.pvalue.AsList(drop_counts)))

