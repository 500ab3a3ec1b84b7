"""Loading a task's tokenizers by path: the saved image tokenizer and the text vocabulary.

`ImageTokenizer.load` instantiates only registered classes; `load_image_tokenizer`
imports mmt's tokenizer modules first so that any of them loads, whichever the
caller happened to import. Fingerprints let the trainer refuse data made with other
tokenizers without loading any weights (the image tokenizer's is in its config.json).
"""

from __future__ import annotations

import importlib
import os

from mmt.tokenizers.image import ImageTokenizer
from mmt.tokenizers.text import TextTokenizer

# Modules whose import registers an `ImageTokenizer` class.
_TOKENIZER_MODULES = ("mmt.tokenizers.vqgan", "mmt.tokenizers.dvae")


def _register_tokenizers() -> None:
    for module in _TOKENIZER_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:  # a checkout without that tokenizer
            pass


def load_image_tokenizer(path: str | os.PathLike) -> ImageTokenizer:
    """The image tokenizer saved in the directory `path` (`ImageTokenizer.save`)."""
    _register_tokenizers()
    return ImageTokenizer.load(path)


def image_tokenizer_fingerprint(path: str | os.PathLike | None) -> str | None:
    """The saved tokenizer's fingerprint (read from its config.json), or None without a path."""
    if not path:
        return None
    _register_tokenizers()
    return ImageTokenizer.read_config(path)["fingerprint"]


def text_vocab_fingerprint(path: str | os.PathLike | None) -> str | None:
    """The SentencePiece model's fingerprint, or None without a path."""
    return TextTokenizer.from_file(path).fingerprint() if path else None


__all__ = ["image_tokenizer_fingerprint", "load_image_tokenizer", "text_vocab_fingerprint"]
