"""Loading the tokenizers (once per worker process) and preparing the output directory.

Tokenizers may live on GCS: an image tokenizer directory is copied to a local
temporary directory first (Keras reads weights from local files), a SentencePiece
model is read as bytes. Within one worker process every DoFn instance shares one
loaded tokenizer (`shared_image_tokenizer`), so the multi-threaded runners do not hold
a copy per thread.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import tempfile
import threading
from typing import Sequence

from apache_beam.io.filesystems import FileSystems

#: Modules that register mmt's image tokenizer classes, imported when a saved tokenizer
#: names a class not registered yet.
TOKENIZER_MODULES = ("mmt.tokenizers.vqgan", "mmt.tokenizers.dvae")

COMPLETED = "COMPLETED"
STATS = "stats.json"
DEAD_LETTER_DIR = "dead_letter"
#: What a run writes, removed before a new run writes anything (COMPLETED first).
OUTPUT_PATTERNS = (COMPLETED, "manifest.json", STATS, "*-?????-of-?????.tfrecord", "*.tmp-*",
                   f"{DEAD_LETTER_DIR}/*")

_lock = threading.Lock()
_image_tokenizers: dict[str, object] = {}
_text_vocabs: dict[str, object] = {}


class OutputExistsError(RuntimeError):
    """The output directory holds a completed run and --overwrite was not given."""


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """What the launcher learned about the tokenizers; travels to the workers."""

    image_fingerprint: str = ""
    image_grid: tuple[int, int] = (0, 0)
    image_vocab_size: int = 0
    image_size: int = 0
    text_fingerprint: str = ""
    text_vocab_size: int = 0


def import_modules(names: Sequence[str] = ()) -> None:
    """Imports `names` (modules that register tokenizer classes, e.g. plugins or tests)."""
    for name in names:
        importlib.import_module(name)


def _register(class_name: str) -> None:
    """Imports mmt's own tokenizer modules when `class_name` is not registered yet."""
    from mmt.tokenizers.image import TOKENIZER_CLASSES

    if class_name not in TOKENIZER_CLASSES:
        for name in TOKENIZER_MODULES:
            if importlib.util.find_spec(name) is not None:
                importlib.import_module(name)


def is_remote(path: str) -> bool:
    return "://" in path


def _local_copy(directory: str) -> str:
    """A local copy of a remote directory's files (not recursive)."""
    target = tempfile.mkdtemp(prefix="mmt_tokenizer_")
    pattern = FileSystems.join(directory, "*")
    for metadata in FileSystems.match([pattern])[0].metadata_list:
        name = metadata.path.rstrip("/").rsplit("/", 1)[-1]
        with FileSystems.open(metadata.path) as source, open(os.path.join(target, name), "wb") as out:
            out.write(source.read())
    return target


def load_image_tokenizer(path: str, modules: Sequence[str] = ()):
    """The saved `ImageTokenizer` at `path` (local or remote), loaded once per process."""
    with _lock:
        if path not in _image_tokenizers:
            import_modules(modules)
            from mmt.tokenizers.image import CONFIG_FILE, ImageTokenizer

            local = _local_copy(path) if is_remote(path) else path
            config_file = os.path.join(local, CONFIG_FILE)
            if os.path.isfile(config_file):
                with open(config_file) as handle:
                    _register(str(json.load(handle).get("class")))
            _image_tokenizers[path] = ImageTokenizer.load(local)
        return _image_tokenizers[path]


def load_text_vocab(path: str):
    """The SentencePiece `TextTokenizer` at `path` (a .model file, local or remote)."""
    with _lock:
        if path not in _text_vocabs:
            from mmt.tokenizers.text import TextTokenizer

            if is_remote(path):
                with FileSystems.open(path) as handle:
                    _text_vocabs[path] = TextTokenizer(handle.read(), source=path)
            else:
                _text_vocabs[path] = TextTokenizer.from_file(path)
        return _text_vocabs[path]


def tokenizer_info(config) -> TokenizerInfo:
    """Loads the configured tokenizers in the launcher; checks --image_size against them."""
    info = {}
    if "image" in config.modalities:
        tokenizer = load_image_tokenizer(config.image_tokenizer, config.import_modules)
        if config.image_size and config.image_size != tokenizer.image_size:
            raise ValueError(f"--image_size={config.image_size} but the tokenizer in {config.image_tokenizer} "
                             f"takes {tokenizer.image_size}x{tokenizer.image_size} images")
        info.update(image_fingerprint=tokenizer.fingerprint(), image_grid=tuple(tokenizer.grid_size),
                    image_vocab_size=int(tokenizer.vocab_size), image_size=int(tokenizer.image_size))
    if "text" in config.modalities:
        vocab = load_text_vocab(config.text_vocab)
        info.update(text_fingerprint=vocab.fingerprint(), text_vocab_size=vocab.vocab_size)
    return TokenizerInfo(**info)


def prepare_output_dir(output_dir: str, overwrite: bool) -> list[str]:
    """Refuses a completed directory (unless `overwrite`); removes a previous run's files.

    Returns:
      The paths removed (leftovers of a crashed run, or the replaced run).
    """
    completed = FileSystems.join(output_dir, COMPLETED)
    if FileSystems.exists(completed) and not overwrite:
        raise OutputExistsError(f"{output_dir} already holds a completed run ({COMPLETED} exists); "
                                "pass --overwrite to replace it, or choose another --output_dir")
    removed = []
    for pattern in OUTPUT_PATTERNS:  # COMPLETED first: a crash mid-cleanup leaves no marker
        matched = FileSystems.match([FileSystems.join(output_dir, pattern)])[0].metadata_list
        paths = sorted(m.path for m in matched)
        if paths:
            FileSystems.delete(paths)
            removed += paths
    return removed
