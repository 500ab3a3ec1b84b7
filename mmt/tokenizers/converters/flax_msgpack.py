"""Reads Flax checkpoints (`flax.training.checkpoints.save_checkpoint`) without flax or msgpack.

A Flax checkpoint file is one msgpack document: the state dict as nested maps with
string keys, arrays as msgpack extension type 1 holding a msgpack array
`[shape, dtype name, raw C-order bytes]` (`flax.serialization._ndarray_to_bytes`),
numpy scalars as extension 3 (`[dtype name, bytes]`), complex numbers as extension 2.
Arrays over 2^30 bytes are split into `{"__msgpack_chunked_array__": True, "shape",
"chunks"}` maps, joined again here. Nothing in the format executes code; this decoder
reads only the types above and refuses the rest.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

EXT_NDARRAY, EXT_COMPLEX, EXT_NPSCALAR = 1, 2, 3


class MsgpackError(ValueError):
    """Not a msgpack document of the kinds a Flax checkpoint holds."""


class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MsgpackError(f"truncated msgpack at byte {self.pos}")
        out = self.data[self.pos:self.pos + n].tobytes()
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def value(self) -> Any:  # noqa: C901 -- one branch per msgpack type
        b = self.take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F)
        if 0xA0 <= b <= 0xBF:
            return self.take(b & 0x1F).decode("utf-8")
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        sized = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}  # bin 8/16/32
        if b in sized:
            return self.take(self.unpack(sized[b]))
        ext = {0xC7: ">B", 0xC8: ">H", 0xC9: ">I"}
        if b in ext:
            n = self.unpack(ext[b])
            return self.ext(self.unpack(">b"), self.take(n))
        numbers = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
                   0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
        if b in numbers:
            return self.unpack(numbers[b])
        fixext = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
        if b in fixext:
            code = self.unpack(">b")
            return self.ext(code, self.take(fixext[b]))
        strings = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}
        if b in strings:
            return self.take(self.unpack(strings[b])).decode("utf-8")
        if b in (0xDC, 0xDD):
            return self.array(self.unpack(">H" if b == 0xDC else ">I"))
        if b in (0xDE, 0xDF):
            return self.map(self.unpack(">H" if b == 0xDE else ">I"))
        raise MsgpackError(f"unknown msgpack type byte 0x{b:02x} at {self.pos - 1}")

    def array(self, n: int) -> list:
        return [self.value() for _ in range(n)]

    def map(self, n: int) -> dict:
        out = {}
        for _ in range(n):
            key = self.value()
            if isinstance(key, (list, dict)):
                raise MsgpackError("unhashable msgpack map key")
            out[key] = self.value()
        return out

    @staticmethod
    def ext(code: int, payload: bytes):
        if code == EXT_NDARRAY:
            shape, dtype, raw = unpackb(payload)
            dtype = _dtype(dtype)
            return np.frombuffer(raw, dtype).reshape([int(s) for s in shape]).copy()
        if code == EXT_NPSCALAR:
            dtype, raw = unpackb(payload)
            return np.frombuffer(raw, _dtype(dtype))[0]
        if code == EXT_COMPLEX:
            real, imag = unpackb(payload)
            return complex(real, imag)
        raise MsgpackError(f"unknown msgpack extension type {code} (not a Flax checkpoint?)")


def _dtype(name) -> np.dtype:
    name = name.decode() if isinstance(name, bytes) else str(name)
    if name == "bfloat16":
        raise MsgpackError("bfloat16 arrays need ml_dtypes; save the checkpoint in float32")
    try:
        return np.dtype(name)
    except TypeError as e:
        raise MsgpackError(f"unknown array dtype {name!r}") from e


def unpackb(data: bytes) -> Any:
    reader = _Reader(data)
    out = reader.value()
    if reader.pos != len(reader.data):
        raise MsgpackError(f"{len(reader.data) - reader.pos} trailing bytes after the msgpack document")
    return out


def _join_chunks(tree):
    if isinstance(tree, dict):
        if tree.get("__msgpack_chunked_array__"):
            flat = np.concatenate([np.ravel(c) for c in tree["chunks"].values()]) if isinstance(
                tree["chunks"], dict) else np.concatenate([np.ravel(c) for c in tree["chunks"]])
            return flat.reshape(tree["shape"])
        return {k: _join_chunks(v) for k, v in tree.items()}
    return tree


def load(path: str | os.PathLike) -> dict:
    """The state dict of a Flax checkpoint file (nested dicts of numpy arrays)."""
    path = Path(path)
    if path.is_dir():  # a checkpoint directory: its newest `checkpoint_<step>` file
        candidates = sorted((p for p in path.glob("checkpoint_*") if p.name.split("_")[-1].isdigit()),
                            key=lambda p: int(p.name.split("_")[-1]))
        if not candidates:
            raise FileNotFoundError(f"no checkpoint_<step> file in {path}")
        path = candidates[-1]
    try:
        tree = unpackb(path.read_bytes())
    except MsgpackError as e:
        raise MsgpackError(f"{path}: not a Flax (msgpack) checkpoint: {e}") from e
    if not isinstance(tree, dict):
        raise MsgpackError(f"{path}: a Flax checkpoint holds a map, got {type(tree).__name__}")
    return _join_chunks(tree)


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts -> {"a/b/c": array}, in the file's order."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, np.ndarray):
            out[name] = value
    return out


__all__ = ["MsgpackError", "flatten", "load", "unpackb"]
