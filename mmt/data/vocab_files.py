"""SentencePiece model files as data: where a vocabulary's file is, its fingerprint, its algorithm.

What the input pipeline needs of a vocabulary without importing `mmt.tokenizers`
(data comes before tokenizers in the layout): `resolve_model_file` finds the `.model`
file of a path, `vocab_fingerprint` is the id manifests record for it, and
`proto_model_type` reads which SentencePiece algorithm (unigram, BPE, ...) trained it.
`mmt.tokenizers.text.TextTokenizer` uses the same three.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mmt.errors import UserError

# File names a vocabulary directory may hold, in order of preference: T5 checkpoints
# ship `spiece.model`, keras-hub presets `assets/tokenizer/vocabulary.spm`.
MODEL_FILE_NAMES = ("spiece.model", "vocabulary.spm", "assets/tokenizer/vocabulary.spm")
# sentencepiece_model.proto: TrainerSpec.ModelType's values.
_PROTO_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def vocab_fingerprint(model_proto: bytes) -> str:
    """A vocabulary's stable id: the SHA-256 of its model file's bytes."""
    return "sha256:" + hashlib.sha256(model_proto).hexdigest()


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _proto_fields(data: bytes):
    """(field number, wire type, value) of a serialized protobuf message, top level only."""
    pos = 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def proto_model_type(model_proto: bytes) -> str:
    """ModelProto.trainer_spec (field 2).model_type (field 3), read from the wire format.

    The sentencepiece package's generated `sentencepiece_model_pb2` refuses to load
    with the protobuf runtime TensorFlow pins, so the two fields are read by hand.
    An absent field takes the proto's default, UNIGRAM.
    """
    model_type = 1
    for number, wire, value in _proto_fields(model_proto):
        if number == 2 and wire == 2:
            for inner, inner_wire, inner_value in _proto_fields(value):
                if inner == 3 and inner_wire == 0:
                    model_type = inner_value
    return _PROTO_MODEL_TYPES.get(model_type, f"unknown({model_type})")


def resolve_model_file(path: str | os.PathLike) -> Path:
    """Returns the SentencePiece model file at `path`, or inside the directory `path`."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in MODEL_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        models = sorted(path.glob("*.model"))
        if len(models) == 1:
            return models[0]
        raise VocabularyNotFoundError(
            f"no SentencePiece model in directory {path}: expected one of "
            f"{', '.join(MODEL_FILE_NAMES)} or a single *.model file"
            + (f", found {[m.name for m in models]}" if models else "")
        )
    raise VocabularyNotFoundError(f"SentencePiece model not found: {path}; give the .model file (or its directory) "
                                  "the data was tokenized with")


class VocabularyNotFoundError(UserError, FileNotFoundError):
    """The configured SentencePiece model does not exist."""


__all__ = ["MODEL_FILE_NAMES", "VocabularyNotFoundError", "proto_model_type", "resolve_model_file", "vocab_fingerprint"]
