"""The processing stages between reading and writing, each a labelled PTransform.

Every stage returns {"items": what goes on, "dropped": `Drop`s}; see `items` for the
drop bookkeeping. In pipeline order:

    FilterCaptions -> LoadImages -> DecodeImages -> FilterImages -> resize_item
      -> TokenizeImages -> DedupeImages -> TokenizeText -> EncodeRecords

Determinism: every stage is a function of its element alone, except `DedupeImages`
(which keeps, of the examples sharing image bytes, those whose image reference sorts
first) and `TokenizeImages` (which pads every batch to `batch_size`, so the compiled
tokenizer always sees one shape and an image's tokens do not depend on which other
images shared its batch).
"""

from __future__ import annotations

import io

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from beam_pipelines import decode, resources
from beam_pipelines.config import TokenizeConfig
from beam_pipelines.fetch import FetchError, Fetcher
from beam_pipelines.items import DROPPED, Item, count, drop
from beam_pipelines.resources import TokenizerInfo
from mmt.data import schema


class Stage(beam.PTransform):
    """A DoFn whose `Drop`s go to a side output: {"items": ..., "dropped": ...}."""

    def __init__(self, fn: beam.DoFn, label: str | None = None):
        super().__init__(label)
        self.fn = fn

    def expand(self, pcoll):
        out = pcoll | type(self.fn).__name__ >> beam.ParDo(self.fn).with_outputs(DROPPED, main="items")
        return {"items": out.items, "dropped": out[DROPPED]}


class FilterCaptionsFn(beam.DoFn):
    def __init__(self, max_chars: int):
        self.max_chars = max_chars

    def process(self, item: Item):
        if item.caption is None:
            yield item
        elif not item.caption.strip():
            yield drop(item, "filter_caption", "empty_caption")
        elif len(item.caption) > self.max_chars:
            yield drop(item, "filter_caption", "caption_too_long",
                       f"{len(item.caption)} characters > {self.max_chars}")
        else:
            yield item.replace(caption=item.caption.strip())


class LoadImagesFn(beam.DoFn):
    """Gets the image bytes (URL, file, or inline) and their content hash."""

    def __init__(self, config: TokenizeConfig):
        self.config = config

    def setup(self):
        self.fetcher = Fetcher(self.config.fetch_config())

    def process(self, item: Item):
        if item.image_array is not None:
            yield item.replace(content_hash=decode.content_hash(item.image_array))
            return
        data = item.image_bytes
        if data is None:
            ref = item.image_ref
            if ref.lower().startswith(("http://", "https://")):
                try:
                    data = self.fetcher.fetch(ref).data
                except FetchError as e:
                    yield drop(item, "fetch", e.reason, e.detail)
                    return
            else:
                data, reason, detail = self._read_file(ref)
                if reason:
                    yield drop(item, "load", reason, detail)
                    return
        yield item.replace(image_bytes=data, content_hash=decode.content_hash(data))

    def _read_file(self, path: str) -> tuple[bytes | None, str, str]:
        limit = self.config.max_image_bytes
        try:
            with FileSystems.open(path, compression_type="uncompressed") as handle:
                data = handle.read(limit + 1)
        except Exception as e:  # FileSystems raises IOError, BeamIOError or backend errors
            if not FileSystems.exists(path):
                return None, "missing_file", "file does not exist"
            return None, "read_error", f"{type(e).__name__}: {e}"
        if len(data) > limit:
            return None, "too_large", f"file exceeds {limit} bytes"
        return data, "", ""


class DecodeImagesFn(beam.DoFn):
    def __init__(self, config: TokenizeConfig, image_size: int):
        self.max_pixels = config.max_image_pixels
        self.image_size = image_size

    def setup(self):
        decode.ignore_pillow_bomb_warnings()

    def process(self, item: Item):
        if item.image_array is not None:
            array = item.image_array
            yield item.replace(pixels=array, original_size=(array.shape[1], array.shape[0]), image_array=None)
            return
        try:
            pixels, size = decode.decode_image(item.image_bytes, max_pixels=self.max_pixels,
                                               draft_side=self.image_size)
        except decode.DecodeError as e:
            yield drop(item, "decode", e.reason, e.detail)
            return
        yield item.replace(pixels=pixels, original_size=size, image_bytes=None)


class FilterImagesFn(beam.DoFn):
    def __init__(self, config: TokenizeConfig):
        self.min_side = config.min_image_side
        self.max_aspect = config.max_aspect_ratio

    def process(self, item: Item):
        width, height = item.original_size
        if min(width, height) < self.min_side:
            yield drop(item, "filter_image", "too_small", f"{width}x{height}, shorter side < {self.min_side}")
        elif max(width, height) / min(width, height) > self.max_aspect:
            yield drop(item, "filter_image", "bad_aspect_ratio",
                       f"{width}x{height}, aspect ratio {max(width, height) / min(width, height):.2f} "
                       f"> {self.max_aspect:g}")
        else:
            yield item


def resize_item(item: Item, image_size: int) -> Item:
    """The item with `pixels` resized and centre-cropped to image_size x image_size."""
    return item.replace(pixels=decode.resize_and_crop(item.pixels, image_size))


def compress_image(pixels: np.ndarray, store_image: str) -> bytes:
    """uint8 [S, S, 3] -> PNG or JPEG (quality 95) bytes, as `image/encoded` stores them."""
    buffer = io.BytesIO()
    if store_image == "png":
        Image.fromarray(pixels).save(buffer, format="PNG")
    else:
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def compress_item(item: Item, store_image: str) -> Item:
    """The item with `image_encoded` in place of `pixels` (runs without an image tokenizer)."""
    return item.replace(image_encoded=compress_image(item.pixels, store_image), pixels=None)


class KeepFirstImageFn(beam.DoFn):
    """(content hash, items) -> the items whose image reference sorts first; others dropped.

    Examples naming the same image file or URL (COCO's five captions per image) all
    stay; the same bytes under another name are duplicates.
    """

    def process(self, element):
        _, group = element
        group = sorted(group, key=lambda it: (it.image_ref or it.key, it.key))
        winner = group[0].image_ref or group[0].key
        for item in group:
            if (item.image_ref or item.key) == winner:
                yield item
            else:
                yield drop(item, "dedupe", "duplicate_image", f"same image bytes as {group[0].key}")


class DedupeImages(beam.PTransform):
    def expand(self, pcoll):
        out = (pcoll
               | "Key by content hash" >> beam.Map(lambda item: (item.content_hash, item))
               | "Group by content hash" >> beam.GroupByKey()
               | "Keep first" >> beam.ParDo(KeepFirstImageFn()).with_outputs(DROPPED, main="items"))
        return {"items": out.items, "dropped": out[DROPPED]}


class TokenizeImagesFn(beam.DoFn):
    """A batch of items -> the same items with `tokens`; the tokenizer loads in `setup`."""

    def __init__(self, config: TokenizeConfig, info: TokenizerInfo):
        self.path = config.image_tokenizer
        self.modules = config.import_modules
        self.batch_size = config.batch_size
        self.keep_pixels = config.store_image != "none"
        self.info = info

    def setup(self):
        self.tokenizer = resources.load_image_tokenizer(self.path, self.modules)
        fingerprint = self.tokenizer.fingerprint()
        if fingerprint != self.info.image_fingerprint:
            raise RuntimeError(f"the image tokenizer at {self.path} changed since the pipeline was launched "
                               f"(fingerprint {fingerprint}, launched with {self.info.image_fingerprint})")

    def process(self, batch: list[Item]):
        pixels = np.stack([item.pixels for item in batch])  # uint8 [n, S, S, 3]
        padded = np.zeros((self.batch_size, *pixels.shape[1:]), np.uint8)
        padded[: len(batch)] = pixels
        tokens = self.tokenizer.encode(padded)[: len(batch)]  # int32 [n, h, w]
        if tokens.min() < 0 or tokens.max() >= self.info.image_vocab_size:
            raise RuntimeError(f"the image tokenizer returned ids outside [0, {self.info.image_vocab_size})")
        for item, item_tokens in zip(batch, tokens):
            yield item.replace(tokens=item_tokens, pixels=item.pixels if self.keep_pixels else None)


class TokenizeImages(beam.PTransform):
    def __init__(self, config: TokenizeConfig, info: TokenizerInfo, label: str | None = None):
        super().__init__(label)
        self.config = config
        self.info = info

    def expand(self, pcoll):
        size = self.config.batch_size
        return (pcoll
                | "Batch" >> beam.BatchElements(min_batch_size=size, max_batch_size=size)
                | "Encode" >> beam.ParDo(TokenizeImagesFn(self.config, self.info)))


class TokenizeTextFn(beam.DoFn):
    """A batch of items -> the same items with `text_ids`; the vocabulary loads in `setup`.

    Batched because SentencePiece encodes a list of captions in one call far faster
    than the same captions one call each.
    """

    def __init__(self, path: str):
        self.path = path

    def setup(self):
        self.vocab = resources.load_text_vocab(self.path)

    def process(self, batch: list[Item]):
        for item, ids in zip(batch, self.vocab.tokenize([item.caption for item in batch])):
            if not ids:
                yield drop(item, "tokenize_text", "no_text_ids")
            else:
                yield item.replace(text_ids=tuple(int(i) for i in ids))


class TokenizeText(beam.PTransform):
    """Items -> {"items": with text ids, "dropped": captions without any}."""

    def __init__(self, path: str, label: str | None = None):
        super().__init__(label)
        self.path = path

    def expand(self, pcoll):
        out = (pcoll
               | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=512)
               | "Encode" >> beam.ParDo(TokenizeTextFn(self.path)).with_outputs(DROPPED, main="items"))
        return {"items": out.items, "dropped": out[DROPPED]}


class EncodeRecordsFn(beam.DoFn):
    """Item -> (key, source, serialized tf.train.Example) in the schema of DESIGN.md §4."""

    def __init__(self, store_image: str):
        self.store_image = store_image

    def process(self, item: Item):
        encoded = item.image_encoded
        if encoded is None and self.store_image != "none" and item.pixels is not None:
            encoded = compress_image(item.pixels, self.store_image)
        try:
            serialized = schema.encode_example(
                item.key, image_tokens=item.tokens, image_encoded=encoded, caption=item.caption,
                text_ids=None if item.text_ids is None else np.asarray(item.text_ids, np.int64))
        except ValueError as e:
            yield drop(item, "encode", "encode_error", str(e))
            return
        count("encoded")
        yield item.key, item.source, serialized
