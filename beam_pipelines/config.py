"""The tokenize pipeline's settings: one frozen dataclass, and the flags that fill it.

Flags that are not ours (`--runner`, `--project`, `--direct_running_mode`, ...) are
left for Beam's `PipelineOptions`. A bad flag is a `mmt.errors.UserError` (one
`error: ...` line from the entry point, not argparse's usage block). Importing this
module does not import TensorFlow, so a bad flag fails fast and TensorFlow's start-up
logging can still be configured after parsing.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any, Sequence

from beam_pipelines import fetch
from mmt.errors import VERBOSE_FLAG, UserError

# The split names `mmt.data.schema.write_split` accepts.
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.]+$")

def _shapes_split_fields() -> dict[str, tuple[str, ...]]:
    # Imported when needed: `mmt.data.shapes.records` imports TensorFlow.
    from mmt.data.shapes import records as shapes_records

    return shapes_records.SPLIT_FIELDS


#: source -> which modalities its records carry (shapes: decided by --split).
SOURCES = {
    "tsv": ("image", "text"),
    "csv": ("image", "text"),
    "jsonl": ("image", "text"),
    "coco": ("image", "text"),
    "webdataset": ("image", "text"),
    "image_folder": ("image",),
    "text": ("text",),
    "shapes": None,
}
_DEFAULT_SPLIT = {("image", "text"): "paired", ("image",): "image_only", ("text",): "text_only"}
STORE_IMAGE = ("none", "png", "jpeg")


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """Everything that decides what the pipeline writes (all of it goes into the manifest).

    See `python -m beam_pipelines.tokenize --help` for each field's meaning.
    """

    source: str
    output_dir: str
    input: str = ""
    image_tokenizer: str = ""
    text_vocab: str = ""
    split: str = ""
    image_size: int = 0
    # columns
    caption_column: str = "caption"
    image_column: str = "url"
    key_column: str = ""
    columns: tuple[str, ...] = ()
    image_dir: str = ""
    # filters
    min_image_side: int = 32
    max_aspect_ratio: float = 3.0
    max_caption_chars: int = 1000
    dedupe: bool = True
    max_image_pixels: int = 89_478_485
    max_image_bytes: int = 20 * 1024 * 1024
    # output
    num_shards: int = 16
    dead_letter_shards: int = 4
    batch_size: int = 32
    store_image: str = "none"
    # fetching
    fetch_connect_timeout: float = 5.0
    fetch_read_timeout: float = 10.0
    fetch_timeout: float = 30.0
    fetch_retries: int = 2
    fetch_backoff: float = 0.5
    allow_private_urls: bool = False
    allowed_url_networks: tuple[str, ...] = ()
    # shapes
    num_examples: int = 1000
    shapes_resolution: int = 64
    shapes_seed: int = 0
    # running
    overwrite: bool = False
    import_modules: tuple[str, ...] = ()

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"--source must be one of {sorted(SOURCES)}, got {self.source!r}")
        if self.source != "shapes" and not self.input:
            raise ValueError(f"--source={self.source} needs --input")
        if self.source == "coco" and not self.image_dir:
            raise ValueError("--source=coco needs --image_dir (the folder of the COCO images)")
        if self.source == "shapes" and self.split_name not in _shapes_split_fields():
            raise ValueError(f"--source=shapes: --split must be one of {list(_shapes_split_fields())}")
        if not _SPLIT_NAME.match(self.split_name):
            raise ValueError(f"--split {self.split_name!r} must match {_SPLIT_NAME.pattern}")
        if "image" in self.modalities and not self.image_tokenizer and self.store_image == "none":
            raise ValueError(
                f"split {self.split_name!r} carries images, but neither --image_tokenizer (to store VQ tokens) "
                "nor --store_image=png|jpeg (to store the pixels, which M3AE reads) is given; give one or both")
        if self.pixels_only and self.source != "shapes" and not self.image_size:
            raise ValueError(
                f"--store_image={self.store_image} without --image_tokenizer needs --image_size, the side of "
                "the stored square images (M3AE: 256)")
        if self.image_size < 0:
            raise ValueError(f"--image_size must be positive, got {self.image_size}")
        if "text" in self.modalities and not self.text_vocab:
            raise ValueError(f"split {self.split_name!r} carries text: --text_vocab is required")
        if self.store_image not in STORE_IMAGE:
            raise ValueError(f"--store_image must be one of {STORE_IMAGE}, got {self.store_image!r}")
        for name in ("num_shards", "dead_letter_shards", "batch_size", "max_image_pixels", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if not 1 <= self.num_shards <= 99_999:
            raise ValueError(f"--num_shards must be in [1, 99999], got {self.num_shards}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"--max_aspect_ratio must be at least 1, got {self.max_aspect_ratio}")
        self.fetch_config()  # validates the networks

    @property
    def modalities(self) -> tuple[str, ...]:
        """("image", "text"), ("image",) or ("text",): what every record carries."""
        fields = SOURCES[self.source]
        if fields is None:
            return _shapes_split_fields()[self.split or "paired"]
        return fields

    @property
    def pixels_only(self) -> bool:
        """The split's images are stored as pixels only (`image/encoded`), without VQ tokens."""
        return "image" in self.modalities and not self.image_tokenizer

    @property
    def split_name(self) -> str:
        if self.split:
            return self.split
        if self.source == "shapes":
            return "paired"
        return _DEFAULT_SPLIT[SOURCES[self.source]]

    def fetch_config(self) -> fetch.FetchConfig:
        return fetch.FetchConfig(
            connect_timeout=self.fetch_connect_timeout,
            read_timeout=self.fetch_read_timeout,
            total_timeout=self.fetch_timeout,
            retries=self.fetch_retries,
            backoff=self.fetch_backoff,
            max_bytes=self.max_image_bytes,
            allow_private=self.allow_private_urls,
            allowed_networks=self.allowed_url_networks,
        )

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["split"] = self.split_name
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


class UserErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are `UserError`s (one line, exit 2, via `mmt.errors.run_main`)."""

    def error(self, message: str):
        raise UserError(f"{message} (`{self.prog} --help` lists the flags)")


def build_parser() -> argparse.ArgumentParser:
    d = TokenizeConfig.__dataclass_fields__
    p = UserErrorParser(
        prog="python -m beam_pipelines.tokenize",
        description="Pre-tokenize an image-caption corpus into mmt TFRecords (DESIGN.md §4). "
        "Flags not listed here are Beam pipeline options (--runner, --project, ...).",
    )
    p.add_argument("--source", required=True, choices=sorted(SOURCES))
    p.add_argument("--input", default="", help="comma-separated file globs (local or gs://)")
    p.add_argument("--output_dir", required=True, help="the data directory to write (one split per run)")
    p.add_argument("--image_tokenizer", default="",
                   help="a saved mmt image tokenizer directory (optional with --store_image: pixels only)")
    p.add_argument("--text_vocab", default="", help="a SentencePiece .model file")
    p.add_argument("--split", default="", help="split name (default: paired / image_only / text_only)")
    p.add_argument("--image_size", type=int, default=0,
                   help="crop side; must equal the tokenizer's (default); required without a tokenizer "
                   "(shapes: --shapes_resolution)")
    g = p.add_argument_group("columns (tsv, csv, jsonl, text, webdataset .json)")
    g.add_argument("--caption_column", default=d["caption_column"].default)
    g.add_argument("--image_column", default=d["image_column"].default, help="URL or path column")
    g.add_argument("--key_column", default="", help="column holding a stable id (default: file:line)")
    g.add_argument("--columns", type=_csv, default=(), help="names of a header-less file's columns")
    g.add_argument("--image_dir", default="", help="base of relative image paths (required for coco); "
                   "paths outside it are refused")
    g = p.add_argument_group("filters")
    g.add_argument("--min_image_side", type=int, default=d["min_image_side"].default)
    g.add_argument("--max_aspect_ratio", type=float, default=d["max_aspect_ratio"].default)
    g.add_argument("--max_caption_chars", type=int, default=d["max_caption_chars"].default)
    g.add_argument("--no_dedupe", dest="dedupe", action="store_false", help="keep exact-duplicate images")
    g.add_argument("--max_image_pixels", type=int, default=d["max_image_pixels"].default,
                   help="decompression-bomb limit")
    g.add_argument("--max_image_bytes", type=int, default=d["max_image_bytes"].default)
    g = p.add_argument_group("output")
    g.add_argument("--num_shards", type=int, default=d["num_shards"].default)
    g.add_argument("--dead_letter_shards", type=int, default=d["dead_letter_shards"].default)
    g.add_argument("--batch_size", type=int, default=d["batch_size"].default, help="images per tokenizer call")
    g.add_argument("--store_image", choices=STORE_IMAGE, default="none",
                   help="also store the resized image as image/encoded")
    g.add_argument("--overwrite", action="store_true", help="replace a COMPLETED output directory")
    g.add_argument("--import_modules", type=_csv, default=(),
                   help="modules to import on every worker, e.g. ones registering tokenizer classes")
    g = p.add_argument_group("fetching URLs")
    g.add_argument("--fetch_connect_timeout", type=float, default=d["fetch_connect_timeout"].default)
    g.add_argument("--fetch_read_timeout", type=float, default=d["fetch_read_timeout"].default)
    g.add_argument("--fetch_timeout", type=float, default=d["fetch_timeout"].default,
                   help="seconds per attempt, all redirects included")
    g.add_argument("--fetch_retries", type=int, default=d["fetch_retries"].default)
    g.add_argument("--fetch_backoff", type=float, default=d["fetch_backoff"].default)
    g.add_argument("--allow_private_urls", action="store_true",
                   help="allow loopback / private / link-local addresses (trusted local corpora only)")
    g.add_argument("--allowed_url_networks", type=fetch.parse_networks, default=(),
                   help="comma-separated CIDR networks: the only ones admitted, public or not "
                   "(not with --allow_private_urls)")
    p.add_argument(VERBOSE_FLAG, action="store_true", help="print tracebacks and TensorFlow's start-up logging")
    g = p.add_argument_group("shapes")
    g.add_argument("--num_examples", type=int, default=d["num_examples"].default)
    g.add_argument("--shapes_resolution", type=int, default=d["shapes_resolution"].default)
    g.add_argument("--shapes_seed", type=int, default=d["shapes_seed"].default)
    return p


def parse_args(argv: Sequence[str] | None) -> tuple[TokenizeConfig, list[str]]:
    """(config, the remaining arguments for Beam's PipelineOptions)."""
    parser = build_parser()
    known, rest = parser.parse_known_args(argv)
    settings = {k: v for k, v in vars(known).items() if k != "verbose"}
    unknown = unknown_beam_flags(rest)
    if unknown:
        raise UserError(f"unknown argument {' '.join(unknown)}: neither a tokenize flag nor a Beam pipeline "
                        f"option (`{parser.prog} --help` lists the flags)")
    try:
        return TokenizeConfig(**settings), rest
    except ValueError as e:
        raise UserError(str(e)) from e


def unknown_beam_flags(args: Sequence[str]) -> list[str]:
    """The arguments in `args` that Beam's `PipelineOptions` would discard (a misspelt flag, a stray word).

    Beam only logs a warning and drops them, so `--num_shardz=3` would silently run with
    the default shard count.
    """
    import logging

    from apache_beam.options.pipeline_options import PipelineOptions

    parsers = []  # Beam's own parser of every registered option, caught as it is built
    beam_logger = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_logger.level
    beam_logger.setLevel(logging.ERROR)  # its "Discarding unparseable args" warning; we say it better
    try:
        PipelineOptions(list(args)).get_all_options(add_extra_args_fn=parsers.append)
    finally:
        beam_logger.setLevel(level)
    return parsers[0].parse_known_args(list(args))[1]
