"""Writes the `shapes` data set as TFRecords in mmt's schema (`mmt.data.manifests`).

Each split gets the fields its stream carries: `paired` and `eval` have image and
text, `image_only` only the image, `text_only` only the text. Images are stored PNG
encoded (`image/encoded`) and, when an image tokenizer is given, as VQ tokens
(`image/tokens`); captions as text and as SentencePiece ids. The manifest records the
fingerprints of both tokenizers, so training refuses data made with other ones.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol

import numpy as np
from PIL import Image

from mmt.data import manifests, schema, shapes

# Which modalities each split's records carry.
SPLIT_FIELDS = {
    "paired": ("image", "text"),
    "image_only": ("image",),
    "text_only": ("text",),
    "eval": ("image", "text"),
}


class TextTokenizer(Protocol):
    """What a text vocabulary must offer to encode captions (see `mmt.tokenizers.text`)."""

    vocab_size: int

    def tokenize(self, texts: list[str]) -> list[list[int]]:  # pieces without EOS, one list per text
        ...

    def fingerprint(self) -> str:
        ...


class ImageTokenizer(Protocol):
    """What an image tokenizer must offer to tokenize records (see mmt.tokenizers)."""

    grid_size: tuple[int, int]
    vocab_size: int

    def encode(self, images: np.ndarray) -> np.ndarray:  # uint8 [B,H,W,3] -> int [B,h,w]
        ...

    def fingerprint(self) -> str:
        ...


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG file bytes (lossless, so pixels round-trip exactly)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _serialized_examples(
    examples: list[shapes.Example],
    fields: tuple[str, ...],
    text_tokenizer: TextTokenizer | None,
    image_tokenizer: ImageTokenizer | None,
    batch_size: int,
) -> Iterator[tuple[str, bytes]]:
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        tokens = text_ids = None
        if "image" in fields and image_tokenizer is not None:
            tokens = np.asarray(image_tokenizer.encode(np.stack([e.image for e in batch])))
        if "text" in fields and text_tokenizer is not None:
            text_ids = text_tokenizer.tokenize([e.caption for e in batch])
        for i, example in enumerate(batch):
            yield example.key, schema.encode_example(
                example.key,
                image_tokens=None if tokens is None else tokens[i],
                image_encoded=png_bytes(example.image) if "image" in fields else None,
                caption=example.caption if "text" in fields else None,
                text_ids=None if text_ids is None else text_ids[i],
            )


def write_shapes_records(
    output_dir: str | os.PathLike,
    config: shapes.ShapesConfig,
    examples: Mapping[str, list[shapes.Example]],
    *,
    text_tokenizer: TextTokenizer | None,
    image_tokenizer: ImageTokenizer | None = None,
    num_shards: int = 4,
    batch_size: int = 64,
    progress: Callable[[str, int], None] | None = None,
) -> manifests.Manifest:
    """Writes one set of sharded TFRecords per split, then `manifest.json`.

    Args:
      output_dir: the data directory (created).
      config: the shapes configuration the examples came from (kept in the manifest).
      examples: split name -> generated examples.
      text_tokenizer: gives `text/ids`; None stores captions only.
      image_tokenizer: gives `image/tokens`; None stores PNGs only.
      num_shards: shards per split.
      batch_size: images per image-tokenizer call.
      progress: called as `progress(split, records_written_so_far)`.

    Returns:
      The manifest that was written.
    """
    output_dir = Path(output_dir)
    splits = {}
    for split, split_examples in examples.items():
        if split not in SPLIT_FIELDS:
            raise ValueError(f"unknown shapes split {split!r}; expected one of {list(SPLIT_FIELDS)}")
        records = _serialized_examples(
            split_examples, SPLIT_FIELDS[split], text_tokenizer, image_tokenizer, batch_size
        )
        if progress is not None:
            records = _report(records, lambda n, s=split: progress(s, n))
        splits[split] = schema.write_split(output_dir, split, records, num_shards=num_shards)
    image_info = text_info = None
    if image_tokenizer is not None:
        image_info = manifests.ImageTokenizerInfo(
            fingerprint=image_tokenizer.fingerprint(),
            grid=tuple(image_tokenizer.grid_size),
            vocab_size=int(image_tokenizer.vocab_size),
        )
    if text_tokenizer is not None:
        text_info = manifests.TextVocabInfo(
            fingerprint=text_tokenizer.fingerprint(), vocab_size=text_tokenizer.vocab_size
        )
    options = {"source": "shapes", "shapes": shapes_config_dict(config), "image_size": config.resolution}
    vocab_file = getattr(text_tokenizer, "source", None)
    if vocab_file and os.path.isfile(vocab_file):
        # Where streams that re-tokenize captions (StreamSpec.bpe_dropout) find the vocabulary.
        options["text_vocab"] = os.path.abspath(vocab_file)
    return manifests.write_manifest(
        output_dir,
        splits=splits,
        image_tokenizer=image_info,
        text_vocab=text_info,
        options=options,
    )


def shapes_config_dict(config: shapes.ShapesConfig) -> dict:
    import dataclasses

    return {k: (list(map(list, v)) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def _report(records: Iterator, callback: Callable[[int], None]) -> Iterator:
    count = 0
    for record in records:
        yield record
        count += 1
        callback(count)
