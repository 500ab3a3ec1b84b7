"""Writes `torch.save` files by hand (torch is not installed): test fixtures for the readers.

A small protocol-2 pickle emitter that names torch's globals without importing anything
(`GLOBAL 'torch._utils\\n_rebuild_tensor_v2'`), and the two containers torch uses:
the zip format (`<name>/data.pkl`, `<name>/data/<key>`, `<name>/version`) and the
legacy format (magic number, protocol, sys info, object, storage keys, then per
storage an int64 element count and the raw bytes). numpy arrays become tensors
(`_rebuild_tensor_v2` over a persistent-id storage); `Parameter` wraps one as an
`nn.Parameter`; `Module` is an object of a named class restored by NEWOBJ + BUILD.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
                 np.dtype(np.int64): "LongStorage", np.dtype(np.float16): "HalfStorage"}


@dataclass
class Global:
    module: str
    name: str


@dataclass
class Reduce:
    func: Any
    args: tuple


@dataclass
class Module:
    """An instance of `module.name` pickled as NEWOBJ + BUILD(state)."""
    cls: Global
    state: dict = field(default_factory=dict)


@dataclass
class Parameter:
    data: np.ndarray


def module_state(modules=(), parameters=(), **fields) -> dict:
    """The attribute dict torch pickles for an nn.Module."""
    return {"training": False, "_parameters": collections.OrderedDict(parameters),
            "_buffers": collections.OrderedDict(), "_non_persistent_buffers_set": set(),
            "_backward_hooks": collections.OrderedDict(), "_forward_hooks": collections.OrderedDict(),
            "_forward_pre_hooks": collections.OrderedDict(), "_state_dict_hooks": collections.OrderedDict(),
            "_load_state_dict_pre_hooks": collections.OrderedDict(), "_modules": collections.OrderedDict(modules),
            **fields}


def state_dict_node(state: dict) -> collections.OrderedDict:
    return collections.OrderedDict((k, np.asarray(v)) for k, v in state.items())


class _Emitter:
    def __init__(self, legacy: bool):
        self.out = io.BytesIO()
        self.legacy = legacy
        self.storages: list[tuple[str, np.ndarray]] = []

    def emit(self, obj) -> bytes:
        self.out.write(b"\x80\x02")
        self._save(obj)
        self.out.write(b".")
        return self.out.getvalue()

    def _w(self, b: bytes):
        self.out.write(b)

    def _save(self, obj):
        w = self._w
        if obj is None:
            w(b"N")
        elif obj is True:
            w(b"\x88")
        elif obj is False:
            w(b"\x89")
        elif isinstance(obj, int):
            if -2**31 <= obj < 2**31:
                w(b"J" + struct.pack("<i", obj))
            else:
                raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                w(b"\x8a" + bytes([len(raw)]) + raw)
        elif isinstance(obj, float):
            w(b"G" + struct.pack(">d", obj))
        elif isinstance(obj, str):
            raw = obj.encode("utf-8")
            w(b"X" + struct.pack("<I", len(raw)) + raw)
        elif isinstance(obj, Global):
            w(b"c" + obj.module.encode() + b"\n" + obj.name.encode() + b"\n")
        elif isinstance(obj, tuple):
            w(b"(")
            for item in obj:
                self._save(item)
            w(b"t")
        elif isinstance(obj, list):
            w(b"]")
            if obj:
                w(b"(")
                for item in obj:
                    self._save(item)
                w(b"e")
        elif isinstance(obj, set):
            self._save(Reduce(Global("builtins", "set"), (sorted(obj),)))
        elif isinstance(obj, collections.OrderedDict):
            self._save(Reduce(Global("collections", "OrderedDict"), ()))
            self._items(obj)
        elif isinstance(obj, dict):
            w(b"}")
            self._items(obj)
        elif isinstance(obj, Reduce):
            self._save(obj.func)
            self._save(tuple(obj.args))
            w(b"R")
        elif isinstance(obj, Module):
            self._save(obj.cls)
            self._save(())
            w(b"\x81")
            self._save(obj.state)
            w(b"b")
        elif isinstance(obj, Parameter):
            self._save(Reduce(Global("torch._utils", "_rebuild_parameter"),
                              (obj.data, True, collections.OrderedDict())))
        elif isinstance(obj, np.ndarray):
            self._tensor(obj)
        else:
            raise TypeError(f"cannot emit {type(obj).__name__}")

    def _items(self, mapping):
        if mapping:
            self._w(b"(")
            for k, v in mapping.items():
                self._save(k)
                self._save(v)
            self._w(b"u")

    def _tensor(self, array):
        array = np.ascontiguousarray(array)
        key = str(len(self.storages))
        self.storages.append((key, array))
        storage = Global("torch", STORAGE_NAMES[array.dtype])
        pid = ("storage", storage, key, "cpu", int(array.size)) + ((None,) if self.legacy else ())
        strides = tuple(s // array.itemsize for s in array.strides)
        self._save(Global("torch._utils", "_rebuild_tensor_v2"))
        self._w(b"(")
        self._save(pid)
        self._w(b"Q")  # BINPERSID
        for item in (0, tuple(array.shape), strides, False, collections.OrderedDict()):
            self._save(item)
        self._w(b"tR")


def save_zip(path, obj, archive_name: str = "archive") -> None:
    emitter = _Emitter(legacy=False)
    data = emitter.emit(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive_name}/data.pkl", data)
        for key, array in emitter.storages:
            z.writestr(f"{archive_name}/data/{key}", array.astype(array.dtype.newbyteorder("<")).tobytes())
        z.writestr(f"{archive_name}/version", "3\n")
        z.writestr(f"{archive_name}/byteorder", "little")


def save_legacy(path, obj) -> None:
    emitter = _Emitter(legacy=True)
    data = emitter.emit(obj)
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001,
                       {"protocol_version": 1001, "little_endian": True,
                        "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, f, protocol=2)
        f.write(data)
        pickle.dump([key for key, _ in emitter.storages], f, protocol=2)
        for _, array in emitter.storages:
            f.write(struct.pack("<q", array.size))
            f.write(array.tobytes())


def raw_pickle_zip(path, pickle_bytes: bytes) -> None:
    """A zip-format torch file whose data.pkl is `pickle_bytes` (for malicious-file tests)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/version", "3\n")
