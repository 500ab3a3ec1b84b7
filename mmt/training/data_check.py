"""Model vs data, checked before step 1: every stream's manifest against what the task needs.

A task says what it expects (`Task.data_expectations()` -> `mmt.tasks.base.DataExpectations`: the
model's vocabulary sizes, token grid, text length, special ids, tokenizer fingerprints,
and the gin binding that set each); `check_streams` compares that with each stream's
`manifest.json` and raises `DataMismatchError` naming the manifest, the binding and
both values. Without it, ids beyond the model's vocabulary reach the embedding (on
accelerators an out-of-range gather is clamped or zero-filled: the run "works"), and a
grid mismatch surfaces as `Dimensions must be equal, but are 256 and 64` mid-trace.

No TensorFlow here: the manifests are read by the caller (`mmt.data.manifests`).
"""

from __future__ import annotations

import os
from typing import Any

from mmt.errors import UserError
from mmt.tasks.base import DataExpectations


class DataMismatchError(UserError, ValueError):
    """The data (or tokenizer) and the configured model disagree; the message names both."""


def _binding(expect: DataExpectations, attribute: str) -> str:
    """The gin binding that sets `attribute` (a macro behind it included), for messages."""
    from mmt.errors import describe_binding

    return describe_binding(expect.bindings.get(attribute, attribute))


class TokenizerFileError(UserError, ValueError):
    """The configured image tokenizer or text vocabulary cannot be read."""


def _reading_tokenizers(task: Any, fn):
    """`fn()`, with unreadable tokenizer / vocabulary files turned into a `TokenizerFileError`."""
    try:
        return fn()
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # sentencepiece raises OSError / RuntimeError
        name = type(task).__name__
        paths = ", ".join(f"{name}.{k} = {getattr(task, a, None)!r}" for k, a in
                          (("image_tokenizer", "image_tokenizer_path"), ("text_vocab", "text_vocab_path"))
                          if getattr(task, a, None))
        raise TokenizerFileError(f"{name}: the configured tokenizer or vocabulary cannot be read ({paths}): {e}; "
                                 "point the binding at a saved tokenizer directory / SentencePiece model") from e


def expectations_of(task: Any) -> DataExpectations | None:
    """The task's `data_expectations()`, or None for a task that declares none."""
    method = getattr(task, "data_expectations", None)
    return _reading_tokenizers(task, method) if callable(method) else None


def stream_problems(expect: DataExpectations, manifest: Any, *, stream: str, fields, text_length: int,
                    text_length_binding: str) -> list[str]:
    """Every disagreement between one stream's manifest and the model, as messages.

    Args:
      expect: the task's expectations.
      manifest: the stream's `mmt.data.manifests.Manifest`.
      stream: the stream's name (for messages).
      fields: the fields the stream reads (only those modalities are checked).
      text_length, text_length_binding: the stream's padded text length and its binding.
    """
    path = os.path.join(manifest.data_dir, "manifest.json")
    where = f"stream {stream!r}: {path}"
    problems = []
    if "image_tokens" in fields and manifest.image_tokenizer is not None:
        info = manifest.image_tokenizer
        if expect.image_vocab_size is not None and info.vocab_size > expect.image_vocab_size:
            problems.append(
                f"{where} has image_tokenizer.vocab_size {info.vocab_size}, but the model's image vocabulary "
                f"{_binding(expect, 'image_vocab_size')} is {expect.image_vocab_size}; set it to at least "
                f"{info.vocab_size}")
        if expect.grid is not None and tuple(info.grid) != tuple(expect.grid):
            problems.append(
                f"{where} has image_tokenizer.grid {tuple(info.grid)}, but the model's grid "
                f"{_binding(expect, 'grid')} is {tuple(expect.grid)}; set it to {tuple(info.grid)}")
        fingerprint = expect.image_tokenizer_fingerprint
        if fingerprint is not None and info.fingerprint != fingerprint:
            problems.append(
                f"{where} was made with image tokenizer {info.fingerprint!r}, but the configured "
                f"{_binding(expect, 'image_tokenizer_fingerprint')} has fingerprint {fingerprint!r}; re-tokenize "
                "the data or configure the tokenizer it was made with")
    if "text_ids" in fields:
        info = manifest.text_vocab
        if info is not None and expect.text_vocab_size is not None and info.vocab_size > expect.text_vocab_size:
            problems.append(
                f"{where} has text_vocab.vocab_size {info.vocab_size}, but the model's text vocabulary "
                f"{_binding(expect, 'text_vocab_size')} is {expect.text_vocab_size}; set it to at least "
                f"{info.vocab_size}")
        fingerprint = expect.text_vocab_fingerprint
        if info is not None and fingerprint is not None and info.fingerprint != fingerprint:
            ids = ", ".join(f"{k.removesuffix('_id')} {v}" for k, v in expect.special_text_ids.items() if v is not None)
            model = f", and the model takes its special ids from it ({ids})" if ids else ""
            problems.append(
                f"{where} was made with text vocabulary {info.fingerprint!r}, but the configured "
                f"{_binding(expect, 'text_vocab_fingerprint')} has fingerprint {fingerprint!r}{model}; re-tokenize "
                "the data or configure the vocabulary it was made with")
        if expect.text_length is not None and int(text_length) != expect.text_length:
            problems.append(
                f"stream {stream!r} pads text to {text_length} ({describe(text_length_binding)}), but the "
                f"model's text length {_binding(expect, 'text_length')} is {expect.text_length}; make them equal")
    return problems


def special_id_problems(expect: DataExpectations) -> list[str]:
    """Special text ids outside the model's text vocabulary."""
    if expect.text_vocab_size is None:
        return []
    return [f"special text id {name} = {value} is outside the model's text vocabulary [0, {expect.text_vocab_size}) "
            f"({_binding(expect, 'text_vocab_size')})"
            for name, value in expect.special_text_ids.items()
            if value is not None and not 0 <= int(value) < expect.text_vocab_size]


def raise_if(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise DataMismatchError(f"model and data disagree: {problems[0]}{more}")


def check_tokenizers(task: Any) -> None:
    """The image tokenizer a task generates / captions with against its model (vocab, grid).

    For `mmt.generate` / `mmt.evaluate`: they read no manifest, but decode the model's ids
    with (and encode images by) the configured tokenizer, which must be the data's.
    """
    expect = expectations_of(task)
    if expect is None or not hasattr(task, "tokenizers"):
        return
    image_tokenizer = _reading_tokenizers(task, task.tokenizers)[0]
    where = f"image tokenizer {getattr(task, 'image_tokenizer_path', '') or ''}".rstrip()
    problems = []
    vocab = getattr(image_tokenizer, "vocab_size", None)
    if vocab is not None and expect.image_vocab_size is not None and int(vocab) != expect.image_vocab_size:
        problems.append(f"{where} has {vocab} codes, but the model's image vocabulary "
                        f"{_binding(expect, 'image_vocab_size')} is {expect.image_vocab_size}")
    grid = getattr(image_tokenizer, "grid_size", None)
    if grid is not None and expect.grid is not None and tuple(grid) != tuple(expect.grid):
        problems.append(f"{where} has grid {tuple(grid)}, but the model's grid {_binding(expect, 'grid')} is "
                        f"{tuple(expect.grid)}")
    raise_if(problems)


def describe(binding: str) -> str:
    from mmt.errors import describe_binding

    return describe_binding(binding)


__all__ = ["DataExpectations", "DataMismatchError", "TokenizerFileError", "check_tokenizers", "expectations_of", "raise_if",
           "special_id_problems", "stream_problems"]
