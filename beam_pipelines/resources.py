"""Loading the tokenizers (once per worker process); the output directory's names.

Tokenizers may live on GCS: an image tokenizer directory is copied to a local
temporary directory first (Keras reads weights from local files), a SentencePiece
model is read as bytes. Within one worker process every DoFn instance shares one
loaded tokenizer (`shared_image_tokenizer`), so the multi-threaded runners do not hold
a copy per thread. A tokenizer or vocabulary that does not load is the user's to fix
(a wrong path, a file of another kind): `TokenizerLoadError`, naming the flag and path.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
from typing import Sequence

from apache_beam.io.filesystems import FileSystems

# The output directory's names live in `output`; re-exported for the writers and verify.
from beam_pipelines.output import COMPLETED, DEAD_LETTER_DIR, OUTPUT_PATTERNS, STATS, OutputExistsError  # noqa: F401
from mmt.errors import UserError

_lock = threading.Lock()
_image_tokenizers: dict[str, object] = {}
_text_vocabs: dict[str, object] = {}


class TokenizerLoadError(UserError):
    """--image_tokenizer, --text_vocab or --import_modules names something that does not load."""


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
    from mmt.tokenizers import loading

    for name in names:
        try:
            loading.import_modules([name])
        except ImportError as e:
            raise TokenizerLoadError(f"--import_modules: cannot import {name!r} ({e}); is it on PYTHONPATH?") from e


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
            _image_tokenizers[path] = _load_image_tokenizer(path)
        return _image_tokenizers[path]


def _load_image_tokenizer(path: str):
    from mmt.tokenizers import loading
    from mmt.tokenizers.image import CONFIG_FILE

    fix = f"expected a directory written by ImageTokenizer.save, with {CONFIG_FILE} and the weights"
    if not FileSystems.exists(FileSystems.join(path, CONFIG_FILE)):
        what = "does not exist" if not FileSystems.exists(path) else f"holds no {CONFIG_FILE}"
        raise TokenizerLoadError(f"--image_tokenizer {path} {what}; {fix}")
    local = _local_copy(path) if is_remote(path) else path
    try:
        return loading.load_image_tokenizer(local)
    except (OSError, ValueError, KeyError, TypeError) as e:
        # A damaged or foreign directory: its config does not parse, names an unknown
        # class (then --import_modules is missing) or its weights do not fit.
        raise TokenizerLoadError(f"--image_tokenizer {path} does not load: {type(e).__name__}: {e}; {fix} "
                                 "(a tokenizer class of your own needs --import_modules)") from e


def load_text_vocab(path: str):
    """The SentencePiece `TextTokenizer` at `path` (a .model file, local or remote)."""
    with _lock:
        if path not in _text_vocabs:
            from mmt.tokenizers import loading
            from mmt.tokenizers.text import TextTokenizer

            try:
                if is_remote(path):
                    with FileSystems.open(path, compression_type="uncompressed") as handle:
                        _text_vocabs[path] = TextTokenizer(handle.read(), source=path)
                else:
                    _text_vocabs[path] = loading.load_text_vocab(path)
            except (OSError, ValueError) as e:  # missing, or not a SentencePiece model
                raise TokenizerLoadError(f"--text_vocab {path}: {e}; expected a SentencePiece .model "
                                         "file (mmt.tokenizers.text.train_sentencepiece writes one)") from e
        return _text_vocabs[path]


def tokenizer_info(config) -> TokenizerInfo:
    """Loads the configured tokenizers in the launcher; checks --image_size against them.

    Without an image tokenizer (`--store_image` alone) the images are stored at
    `--image_size` (shapes: its own resolution) and no image fingerprint is recorded.
    """
    info = {}
    if config.pixels_only:
        info.update(image_size=int(config.image_size or config.shapes_resolution))
    elif "image" in config.modalities:
        tokenizer = load_image_tokenizer(config.image_tokenizer, config.import_modules)
        if config.image_size and config.image_size != tokenizer.image_size:
            raise UserError(f"--image_size={config.image_size} but the tokenizer in {config.image_tokenizer} "
                             f"takes {tokenizer.image_size}x{tokenizer.image_size} images")
        info.update(image_fingerprint=tokenizer.fingerprint(), image_grid=tuple(tokenizer.grid_size),
                    image_vocab_size=int(tokenizer.vocab_size), image_size=int(tokenizer.image_size))
    if "text" in config.modalities:
        vocab = load_text_vocab(config.text_vocab)
        info.update(text_fingerprint=vocab.fingerprint(), text_vocab_size=vocab.vocab_size)
    return TokenizerInfo(**info)
