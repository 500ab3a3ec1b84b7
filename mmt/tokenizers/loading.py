"""Loading a task's tokenizers by path: the saved image tokenizer and the text vocabulary.

The one place that loads them: the ITIT and UPGen tasks (`mmt.tasks.base.TokenizerFiles`),
the Beam pipelines (`beam_pipelines.resources`, which adds remote paths, a per-process
cache and flag-naming errors) and the benchmarks.

`ImageTokenizer.load` instantiates only registered classes; `load_image_tokenizer`
imports mmt's own tokenizer modules when the saved class is not registered yet, so that
any of them loads, whichever the caller happened to import. Fingerprints let the trainer
refuse data made with other tokenizers without loading any weights (the image
tokenizer's is in its config.json).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Sequence

from mmt.tokenizers.image import CONFIG_FILE, TOKENIZER_CLASSES, ImageTokenizer
from mmt.tokenizers.text import TextTokenizer

#: Modules whose import registers mmt's `ImageTokenizer` classes.
TOKENIZER_MODULES = ("mmt.tokenizers.vqgan", "mmt.tokenizers.dvae")


def import_modules(names: Sequence[str] = ()) -> None:
    """Imports `names` (modules that register tokenizer classes: plugins, tests); ImportError passes."""
    for name in names:
        importlib.import_module(name)


def register_tokenizer_class(class_name: str | None = None) -> None:
    """Imports mmt's own tokenizer modules unless `class_name` is registered already."""
    if class_name in TOKENIZER_CLASSES:
        return
    for name in TOKENIZER_MODULES:
        if importlib.util.find_spec(name) is not None:  # a checkout may lack one
            importlib.import_module(name)


def _saved_class(path: str | os.PathLike) -> str | None:
    """The class a saved tokenizer names, or None where its config does not read (`load` says why)."""
    try:
        return str(json.loads((Path(path) / CONFIG_FILE).read_text()).get("class"))
    except (OSError, ValueError, AttributeError):
        return None


def load_image_tokenizer(path: str | os.PathLike, modules: Sequence[str] = ()) -> ImageTokenizer:
    """The image tokenizer saved in the directory `path` (`ImageTokenizer.save`).

    `modules` are imported first (tokenizer classes of the caller's own).
    """
    import_modules(modules)
    register_tokenizer_class(_saved_class(path))
    return ImageTokenizer.load(path)


def load_text_vocab(path: str | os.PathLike) -> TextTokenizer:
    """The SentencePiece `TextTokenizer` of `path` (a .model file or a directory holding one)."""
    return TextTokenizer.from_file(path)


def image_tokenizer_fingerprint(path: str | os.PathLike | None) -> str | None:
    """The saved tokenizer's fingerprint (read from its config.json), or None without a path."""
    if not path:
        return None
    register_tokenizer_class(_saved_class(path))
    return ImageTokenizer.read_config(path)["fingerprint"]


def text_vocab_fingerprint(path: str | os.PathLike | None) -> str | None:
    """The SentencePiece model's fingerprint, or None without a path."""
    return load_text_vocab(path).fingerprint() if path else None


__all__ = ["TOKENIZER_MODULES", "image_tokenizer_fingerprint", "import_modules", "load_image_tokenizer",
           "load_text_vocab", "register_tokenizer_class", "text_vocab_fingerprint"]
