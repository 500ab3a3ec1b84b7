"""Reading corpora: every source becomes a PCollection of `Item`s plus `Drop`s.

| --source       | input                                        | key                     |
|----------------|----------------------------------------------|-------------------------|
| `tsv`, `csv`   | rows with caption and image URL/path columns | `file:line` or a column |
| `jsonl`        | one JSON object per line, same columns       | `file:line` or a column |
| `coco`         | COCO captions JSON + `--image_dir`           | `file:annotation_id`    |
| `webdataset`   | tar shards of `KEY.jpg` + `KEY.txt`/`.json`  | `file/KEY`              |
| `image_folder` | image files (image-only stream)              | the file's path         |
| `text`         | captions, one per line, or JSONL (text-only) | `file:line`             |
| `shapes`       | the embedded generator (`mmt.data.shapes`)   | the shapes key          |

File names in keys are relative to the glob's directory (the part before the first
wildcard), so a corpus moved to another bucket keeps its keys. Globs are matched on the
workers (`FileSystems`, so local paths and `gs://` alike) and every matched file is an
input. A header-less TSV (CC3M, CC12M) takes `--columns=caption,url`.

Image paths in rows are untrusted like URLs: relative paths resolve against
`--image_dir` (default: the corpus file's folder), and a path that leaves it
(`../../etc/passwd`, another bucket, a symlink to a file elsewhere) is refused
(`path_refused`); local paths are checked after resolving symlinks. URLs are kept for the
fetch stage, which applies the network policy.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import tarfile
from typing import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipelines import items
from beam_pipelines.config import TokenizeConfig
from beam_pipelines.items import Item, drop
from mmt.errors import UserError

_WILDCARDS = "*?[{"
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_URL_SCHEMES = ("http://", "https://")


def glob_base(glob: str) -> str:
    """The directory part of a glob before its first wildcard, with a trailing '/'."""
    cut = min([glob.index(c) for c in _WILDCARDS if c in glob] or [len(glob)])
    return glob[: glob.rfind("/", 0, cut) + 1]


def has_surrogates(text: str) -> bool:
    """True for text decoded with `surrogateescape` from bytes that were not UTF-8."""
    return any("\udc80" <= c <= "\udcff" for c in text)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def resolve_image_ref(ref: str, base: str) -> tuple[str | None, str, str]:
    """(URL or path, drop reason, detail) of a row's image reference; reason "" = accepted.

    `http(s)` URLs pass (the fetch stage checks them); anything else must resolve to a
    path inside `base`, the image directory.
    """
    ref = ref.strip()
    if not ref:
        return None, "missing_image", "empty image reference"
    if ref.lower().startswith(_URL_SCHEMES):
        return ref, "", ""
    if not base:
        return None, "path_refused", "no image directory to resolve paths against"
    base = base if base.endswith("/") else base + "/"
    if "://" in ref and not ref.startswith(base.split("://")[0] + "://"):
        return None, "url_refused", f"scheme of {ref[:60]!r} is not http, https or the image directory's"
    candidate = ref if "://" in ref or ref.startswith("/") else base + ref
    scheme, separator, rest = candidate.rpartition("://")
    # Normalise after the scheme, so `..` cannot climb out of the image directory.
    normal = scheme + separator + posixpath.normpath(rest)
    if not normal.startswith(base):
        return None, "path_refused", f"{ref[:120]!r} lies outside the image directory {base}"
    if not separator:
        return _resolve_local(normal, base, ref)
    return normal, "", ""


def _resolve_local(path: str, base: str, ref: str) -> tuple[str | None, str, str]:
    """`path` with its symlinks resolved, refused when that leaves the resolved `base`.

    A name inside the image directory may be a symlink to any file the worker can
    read (issue 17 item 8); only the resolved path says where a read would go. The
    resolved path is what the load stage reads, so the file checked is the file read.
    (Object stores have no symlinks: remote paths need only the check above.)
    """
    real_base = os.path.realpath(base)
    real = os.path.realpath(path)
    if os.path.commonpath([real_base, real]) != real_base:
        return None, "path_refused", (f"{ref[:120]!r} resolves (through a symlink) to {real[:120]!r}, "
                                      f"outside the image directory {base}")
    return real, "", ""


def _printable(text: str) -> str:
    """`text` with undecodable bytes (surrogate escapes) shown as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_inputs(config: TokenizeConfig) -> None:
    """Raises `UserError` unless every `--input` glob matches a file (and `--image_dir` exists).

    The launcher checks before anything is written, so a mistyped path costs one line
    instead of a failed pipeline (and, with `--overwrite`, never the previous output).
    """
    if config.source == "shapes":
        return
    for glob in (g.strip() for g in config.input.split(",") if g.strip()):
        try:
            matched = FileSystems.match([glob])[0].metadata_list
        except Exception as e:  # BeamIOError: e.g. a bucket that does not exist or may not be listed
            raise UserError(f"--input {glob!r} cannot be matched: {type(e).__name__}: {e}") from e
        if not matched:
            raise UserError(f"--input {glob!r} matches no file; check the path (globs: *, ?, [...])")
    if config.image_dir and "://" not in config.image_dir and not os.path.isdir(config.image_dir):
        raise UserError(f"--image_dir {config.image_dir} is not a directory")


class MatchGlobs(beam.DoFn):
    """glob -> (path, path relative to the glob's base), for every matched file.

    A file name that is not UTF-8 cannot be a key (nor pass Beam's string coder): it
    is dead-lettered here.
    """

    def process(self, glob: str):
        base = glob_base(glob)
        matched = FileSystems.match([glob])[0].metadata_list
        if not matched:
            raise FileNotFoundError(f"--input glob {glob!r} matches no file")
        for metadata in sorted(matched, key=lambda m: m.path):
            path = metadata.path
            rel = path[len(base):] if path.startswith(base) else path
            if has_surrogates(path):
                yield drop(_printable(rel), "read", "invalid_utf8", "file name is not valid UTF-8", _printable(path))
            else:
                yield path, rel


def _lines(handle) -> Iterator[bytes]:
    while True:
        line = handle.readline()
        if not line:
            return
        yield line


class _ReadFn(beam.DoFn):
    """Base: turns one matched file into Items and read-stage Drops."""

    def __init__(self, config: TokenizeConfig):
        self.config = config

    def make_item(self, key: str, source: str, fields: dict, base: str):
        """An Item from one row's fields, or a Drop naming what is wrong with it."""
        c = self.config
        if c.key_column:
            value = fields.get(c.key_column)
            if value is None or str(value).strip() == "":
                return drop(key, "read", "missing_column", f"no {c.key_column!r} column", source)
            if not _is_utf8(str(value)) or has_surrogates(str(value)):
                return drop(key, "read", "invalid_utf8", "key is not valid UTF-8", source)
            key = str(value).strip()
        caption = ref = None
        if "text" in c.modalities:
            caption = fields.get(c.caption_column)
            if caption is None:
                return drop(key, "read", "missing_column", f"no {c.caption_column!r} column", source)
            if not isinstance(caption, str):
                return drop(key, "read", "bad_row", f"caption is a {type(caption).__name__}", source)
            if has_surrogates(caption) or not _is_utf8(caption):
                return drop(key, "read", "invalid_utf8", "caption is not valid UTF-8", source)
        if "image" in c.modalities:
            raw = fields.get(c.image_column)
            if raw is None:
                return drop(key, "read", "missing_column", f"no {c.image_column!r} column", source)
            if not isinstance(raw, str):
                return drop(key, "read", "bad_row", f"image reference is a {type(raw).__name__}", source)
            if has_surrogates(raw) or not _is_utf8(raw):
                return drop(key, "read", "invalid_utf8", "image reference is not valid UTF-8", source)
            ref, reason, detail = resolve_image_ref(raw, base)
            if reason:
                return drop(key, "read", reason, detail, source)
        return Item(key=key, source=source, caption=caption, image_ref=ref)

    def _jsonl(self, handle, path, rel, base):
        for number, raw in enumerate(_lines(handle), 1):
            if not raw.strip():
                continue
            key, source = f"{rel}:{number}", f"{path}:{number}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield drop(key, "read", "invalid_utf8", "line is not valid UTF-8", source)
                continue
            except json.JSONDecodeError as e:
                yield drop(key, "read", "bad_row", f"not JSON: {e}", source)
                continue
            if not isinstance(row, dict):
                yield drop(key, "read", "bad_row", f"a JSON {type(row).__name__}, not an object", source)
                continue
            yield self.make_item(key, source, row, base)


class ReadRows(_ReadFn):
    """tsv / csv (header row, or --columns) and jsonl files of caption + image columns."""

    def process(self, element: tuple[str, str]):
        path, rel = element
        base = self.config.image_dir or path[: path.rfind("/") + 1]
        with FileSystems.open(path) as handle:
            if self.config.source == "jsonl":
                yield from self._jsonl(handle, path, rel, base)
            else:
                yield from self._delimited(handle, path, rel, base)

    def _delimited(self, handle, path, rel, base):
        lines = (raw.decode("utf-8", errors="surrogateescape") for raw in _lines(handle))
        if self.config.source == "tsv":
            reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(lines)
        header = list(self.config.columns)
        if not header:
            header = next(reader, [])
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                key = f"{rel}:{start}"
                yield drop(key, "read", "bad_row", f"CSV error: {e}", f"{path}:{start}")
                start = reader.line_num + 1
                continue
            key, source = f"{rel}:{start}", f"{path}:{start}"
            start = reader.line_num + 1
            if not row or row == [""]:
                continue  # a blank line is not an input
            if len(row) < len(header):
                yield drop(key, "read", "missing_column",
                           f"{len(row)} of {len(header)} columns ({', '.join(header[len(row):])} missing)", source)
            elif len(row) > len(header):
                yield drop(key, "read", "bad_row", f"{len(row)} fields, the header has {len(header)}", source)
            else:
                yield self.make_item(key, source, dict(zip(header, row)), base)


class ReadText(_ReadFn):
    """Text-only: one caption per line, or JSONL (`.jsonl`/`.json`, --caption_column)."""

    def process(self, element: tuple[str, str]):
        path, rel = element
        is_json = path.lower().removesuffix(".gz").endswith((".jsonl", ".json"))
        with FileSystems.open(path) as handle:
            if is_json:
                yield from self._jsonl(handle, path, rel, "")
                return
            for number, raw in enumerate(_lines(handle), 1):
                key, source = f"{rel}:{number}", f"{path}:{number}"
                line = raw.rstrip(b"\r\n")
                if not line.strip():
                    continue
                try:
                    caption = line.decode("utf-8")
                except UnicodeDecodeError:
                    yield drop(key, "read", "invalid_utf8", "line is not valid UTF-8", source)
                    continue
                yield Item(key=key, source=source, caption=caption)


class ReadCoco(_ReadFn):
    """COCO captions JSON (`images` + `annotations`): one Item per caption."""

    def process(self, element: tuple[str, str]):
        path, rel = element
        with FileSystems.open(path) as handle:
            data = json.loads(handle.read().decode("utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise ValueError(f"{path} is not a COCO captions file (no 'annotations' list)")
        files = {image.get("id"): image.get("file_name") for image in data.get("images", []) if isinstance(image, dict)}
        for index, annotation in enumerate(data["annotations"]):
            annotation = annotation if isinstance(annotation, dict) else {}
            ident = annotation.get("id", f"#{index}")
            key, source = f"{rel}:{ident}", f"{path}:annotation {ident}"
            if "image_id" not in annotation:
                yield drop(key, "read", "missing_column", "annotation without image_id", source)
                continue
            file_name = files.get(annotation["image_id"])
            if not isinstance(file_name, str):
                yield drop(key, "read", "missing_image", f"no image with id {annotation['image_id']!r}", source)
                continue
            fields = {self.config.caption_column: annotation.get("caption"), self.config.image_column: file_name}
            yield self.make_item(key, source, fields, self.config.image_dir)


class ReadWebDataset(_ReadFn):
    """WebDataset tar shards: members `KEY.EXT` grouped by KEY (contiguous, as written)."""

    def process(self, element: tuple[str, str]):
        path, rel = element
        sample_key, files, last = None, {}, "(start)"
        try:
            with FileSystems.open(path) as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
                for member in tar:
                    directory, name = posixpath.split(member.name)
                    if not member.isfile() or name.startswith(".") or "." not in name:
                        continue
                    stem, extension = name.split(".", 1)
                    key = posixpath.join(directory, stem)
                    if key != sample_key and sample_key is not None:
                        yield self._sample(path, rel, sample_key, files)
                        files = {}
                    sample_key, last = key, member.name
                    if member.size > self.config.max_image_bytes:
                        files[extension.lower()] = None  # too large; not read
                    else:
                        files[extension.lower()] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            # One drop stands for the rest of the shard, the sample in progress included.
            yield drop(f"{rel}/(unreadable after {last})", "read", "corrupt_archive",
                       f"{type(e).__name__}: {e}", f"{path}:{last}")
            return
        if sample_key is not None:
            yield self._sample(path, rel, sample_key, files)

    def _sample(self, path: str, rel: str, sample_key: str, files: dict):
        """One sample's members -> an Item with inline image bytes and a caption, or a Drop."""
        key, source = f"{rel}/{sample_key}", f"{path}:{sample_key}"
        caption = None
        if files.get("txt") is not None:
            try:
                caption = files["txt"].decode("utf-8")
            except UnicodeDecodeError:
                return drop(key, "read", "invalid_utf8", "caption is not valid UTF-8", source)
        elif files.get("json") is not None:
            try:
                meta = json.loads(files["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return drop(key, "read", "bad_row", f".json does not parse: {type(e).__name__}", source)
            caption = meta.get(self.config.caption_column) if isinstance(meta, dict) else None
        if caption is None:
            return drop(key, "read", "missing_column", f"no .txt or .json {self.config.caption_column!r}", source)
        if not isinstance(caption, str):
            return drop(key, "read", "bad_row", f"caption is a {type(caption).__name__}", source)
        if not _is_utf8(caption):
            return drop(key, "read", "invalid_utf8", "caption is not valid UTF-8", source)
        image = next((ext for ext in _IMAGE_EXTENSIONS if ext in files), None)
        if image is None:
            return drop(key, "read", "missing_image", f"no image member among {sorted(files)}", source)
        if files[image] is None:
            return drop(key, "read", "too_large", f"{sample_key}.{image} exceeds --max_image_bytes", source)
        return Item(key=key, source=source, caption=caption, image_bytes=files[image])


class ReadImageFiles(_ReadFn):
    """Image-only: every matched file is one image, keyed by its relative path."""

    def process(self, element: tuple[str, str]):
        path, rel = element
        yield Item(key=rel, source=path, image_ref=path)


def _shapes_items(chunk: tuple[int, int], config: TokenizeConfig) -> Iterator[Item]:
    from mmt.data import shapes

    start, count = chunk
    shapes_config = shapes.ShapesConfig(resolution=config.shapes_resolution, seed=config.shapes_seed)
    fields = config.modalities
    for offset, example in enumerate(shapes.generate(shapes_config, config.split_name, count, start=start)):
        yield Item(
            key=example.key,
            source=f"shapes:{config.split_name}:{start + offset}",
            caption=example.caption if "text" in fields else None,
            image_array=example.image if "image" in fields else None,
        )


class ReadCorpus(beam.PTransform):
    """`config.source` read from `config.input`: {"items": Items, "dropped": Drops}."""

    _READERS = {"tsv": ReadRows, "csv": ReadRows, "jsonl": ReadRows, "text": ReadText, "coco": ReadCoco,
                "webdataset": ReadWebDataset, "image_folder": ReadImageFiles}

    def __init__(self, config: TokenizeConfig, label: str | None = None):
        super().__init__(label)
        self.config = config

    def expand(self, pbegin):
        c = self.config
        if c.source == "shapes":
            chunks = [(start, min(256, c.num_examples - start)) for start in range(0, c.num_examples, 256)]
            found = (pbegin
                     | "Shapes chunks" >> beam.Create(chunks)
                     | "Spread chunks" >> beam.Reshuffle()
                     | "Generate shapes" >> beam.FlatMap(_shapes_items, config=c))
            return {"items": found, "dropped": pbegin | "No drops" >> beam.Create([])}
        matched = (pbegin
                   | "Globs" >> beam.Create([g for g in c.input.split(",") if g.strip()])
                   | "Match files" >> beam.ParDo(MatchGlobs()).with_outputs(items.DROPPED, main="files"))
        files = matched.files | "Spread files" >> beam.Reshuffle()
        read = files | f"Read {c.source}" >> beam.ParDo(self._READERS[c.source](c)).with_outputs(
            items.DROPPED, main="items")
        dropped = (matched[items.DROPPED], read[items.DROPPED]) | "Read drops" >> beam.Flatten()
        if c.source == "image_folder":  # one item per file: the files are spread already
            return {"items": read.items, "dropped": dropped}
        # One file yields many rows; without a shuffle here, everything downstream of a
        # file (fetching, decoding) would run fused on the one worker that read it.
        spread = read.items | "Spread rows" >> beam.Reshuffle()
        return {"items": spread, "dropped": dropped}
