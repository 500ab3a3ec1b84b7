"""Reads `torch.save` files without torch and without running any code from the file.

A torch file is a Python pickle, and unpickling an arbitrary pickle runs arbitrary code
(`os.system` as a REDUCE target, say). This reader resolves only an allowlist of names:

* tensor storage and rebuild functions (`torch.FloatStorage`, ...,
  `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`): rebuilt as numpy arrays;
* `collections.OrderedDict` (state dicts, module registries) and `builtins.set`;
* the module classes the caller names (e.g. `dall_e.encoder.EncoderBlock`,
  `torch.nn.modules.container.Sequential`): never imported, rebuilt as `ModuleRecord`s,
  plain data holding the pickled attribute dict.

Any other global is refused with `UnsafePickleError` naming it, before anything is
called. Both container formats of `torch.save` are read:

* zip (torch >= 1.6): `<name>/data.pkl` with persistent ids
  `('storage', StorageType, key, location, numel)` and raw bytes in `<name>/data/<key>`;
* legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): five pickles in a
  row -- magic number, protocol version, sys info, the object (persistent ids
  `('storage', StorageType, root_key, location, numel, view_metadata)` and
  `('module', cls, source_file, source)`), the storage keys -- then, per key, an
  int64 element count and the raw little-endian bytes.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
    """The file needs a global outside the allowlist; nothing from it was run."""


class ModuleRecord:
    """A pickled object of an allowed class, kept as data: its class name and state.

    `state` is the attribute dict the pickle restored (for a torch module: `training`,
    `_parameters`, `_buffers`, `_modules`, and the class's own fields); `args` holds
    constructor arguments of objects pickled by REDUCE (e.g. `torch.device('cpu')`).
    """

    qualified_name = "?"

    def __init__(self, *args):
        self.args = args
        self.state: dict[str, Any] = {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = dict(state) if isinstance(state, Mapping) else {"__state__": state}

    def __getitem__(self, key):
        return self.state[key]

    def __repr__(self):
        return f"ModuleRecord({self.qualified_name})"


def _record_class(qualified_name: str) -> type:
    return type(qualified_name.rsplit(".", 1)[-1], (ModuleRecord,), {"qualified_name": qualified_name})


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


def _rebuild_tensor_v2(storage, *args):
    """torch's `_rebuild_tensor_v2`: an array now (zip), or once the legacy format's bytes are read."""
    if isinstance(storage, _LazyStorage):
        return _LazyTensor((storage, *args))
    return _tensor_view(storage, *args)


def _tensor_view(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """A tensor's view of a storage -> a contiguous numpy array."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if not size:
        return np.array(storage[storage_offset])
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if storage_offset < 0 or last >= storage.size or len(stride) != len(size) or min(stride) < 0:
        raise pickle.UnpicklingError(f"tensor view {size} / {stride} at {storage_offset} exceeds its storage "
                                     f"of {storage.size} elements")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=tuple(s * itemsize for s in stride), writeable=False)
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _safe_globals(modules: Iterable[str]) -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    }
    for name in STORAGE_DTYPES:
        table[("torch", name)] = _StorageType(name)
    for qualified in modules:
        module, _, name = qualified.rpartition(".")
        table[(module, name)] = _record_class(qualified)
    return table


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, safe_globals, load_storage, source: str):
        super().__init__(file)
        self._safe = safe_globals
        self._load_storage = load_storage
        self._source = source

    def find_class(self, module, name):
        try:
            return self._safe[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source} needs {module}.{name}, which is not allowed (only tensor storage, OrderedDict and "
                f"the expected module classes are): refusing the file without running anything from it") from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"{self._source}: unexpected persistent id {pid!r}")
        if pid[0] == "storage":
            storage_type = pid[1]
            if not isinstance(storage_type, _StorageType):
                raise pickle.UnpicklingError(f"{self._source}: unexpected storage type {storage_type!r}")
            return self._load_storage(storage_type, *pid[2:])
        if pid[0] == "module" and len(pid) == 4:  # legacy: (class, source file, source); the class is checked
            return pid[1]
        raise pickle.UnpicklingError(f"{self._source}: unexpected persistent id kind {pid[0]!r}")


def load(path: str | os.PathLike, modules: Iterable[str] = ()) -> Any:
    """The object saved in the torch file `path`, tensors as numpy arrays.

    Args:
      path: a `torch.save` file (zip or legacy format).
      modules: fully qualified class names the file may contain
        (`"torch.nn.modules.container.Sequential"`), rebuilt as `ModuleRecord`s.

    Raises:
      UnsafePickleError: the file needs any other global (nothing was executed).
      ValueError: not a torch file.
    """
    path = Path(path)
    safe = _safe_globals(modules)
    data = path.read_bytes()
    if data[:4] == b"PK\x03\x04":
        return _load_zip(data, safe, str(path))
    return _load_legacy(data, safe, str(path))


def _load_zip(data: bytes, safe, source: str):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{source}: a zip file without exactly one data.pkl (found {pickles}): not a torch file")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and archive.read(byteorder).strip() != b"little":
            raise ValueError(f"{source}: big-endian torch files are not supported")

        def load_storage(storage_type, key, location, numel, *rest):
            raw = archive.read(f"{prefix}data/{key}")
            array = np.frombuffer(raw, storage_type.dtype)
            if array.size < int(numel):
                raise pickle.UnpicklingError(f"{source}: storage {key} holds {array.size} elements, needs {numel}")
            return array

        return _Unpickler(io.BytesIO(archive.read(pickles[0])), safe, load_storage, source).load()


def _load_legacy(data: bytes, safe, source: str):
    f = io.BytesIO(data)
    no_objects = _safe_globals(())  # the header pickles hold plain values only

    def plain(what):
        try:
            return _Unpickler(f, no_objects, _no_storage, source).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise ValueError(f"{source}: not a torch file (cannot read its {what}: {e})") from e

    if plain("magic number") != LEGACY_MAGIC_NUMBER:
        raise ValueError(f"{source}: not a torch file (wrong magic number)")
    if plain("protocol version") != LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"{source}: unsupported legacy torch protocol version")
    sys_info = plain("sys info")
    if isinstance(sys_info, Mapping) and not sys_info.get("little_endian", True):
        raise ValueError(f"{source}: big-endian torch files are not supported")
    storages: dict[str, tuple[_StorageType, int, list]] = {}

    def load_storage(storage_type, root_key, location, numel, view_metadata=None):
        entry = storages.setdefault(str(root_key), (storage_type, int(numel), []))
        holder = entry[2]
        if view_metadata is not None:
            raise pickle.UnpicklingError(f"{source}: storage views are not supported")
        # A lazy storage: its values arrive once the raw bytes (after this pickle) are read.
        proxy = _LazyStorage(storage_type.dtype)
        holder.append(proxy)
        return proxy

    obj = _Unpickler(f, safe, load_storage, source).load()
    keys = plain("storage keys")
    for key in keys:
        (count,) = struct.unpack("<q", f.read(8))
        storage_type, numel, proxies = storages[str(key)]
        nbytes = count * np.dtype(storage_type.dtype).itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise ValueError(f"{source}: truncated storage {key}")
        array = np.frombuffer(raw, storage_type.dtype)
        for proxy in proxies:
            proxy.array = array
    return _resolve(obj)


def _no_storage(*args):
    raise pickle.UnpicklingError("a storage in a torch file header")


class _LazyStorage:
    """Legacy files store the bytes after the object pickle: tensors are rebuilt on resolve."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.array = None


class _LazyTensor:
    def __init__(self, args):
        self.args = args


def _resolve(obj, memo=None):
    """Replaces the legacy loader's lazy tensors by numpy arrays, in place where possible."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, _LazyTensor):
        storage, *rest = obj.args
        result = _tensor_view(storage.array, *rest)
    elif isinstance(obj, dict):
        memo[id(obj)] = obj
        for k in list(obj):
            obj[k] = _resolve(obj[k], memo)
        result = obj
    elif isinstance(obj, list):
        memo[id(obj)] = obj
        obj[:] = [_resolve(v, memo) for v in obj]
        result = obj
    elif isinstance(obj, tuple):
        result = tuple(_resolve(v, memo) for v in obj)
    elif isinstance(obj, ModuleRecord):
        memo[id(obj)] = obj
        obj.state = _resolve(obj.state, memo)
        result = obj
    else:
        result = obj
    memo[id(obj)] = result
    return result


def state_dict(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """torch's `module.state_dict()` of a `ModuleRecord` tree: dotted name -> array.

    Parameters and buffers of every module, depth first in registration order (the
    order of the `_modules` OrderedDicts). A plain mapping of arrays (a saved state
    dict) is returned as is.
    """
    if isinstance(obj, Mapping):
        return {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not isinstance(obj, ModuleRecord):
        raise ValueError(f"expected a module or a state dict, got {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (obj.state.get(group) or {}).items():
            if isinstance(value, np.ndarray):
                out[prefix + name] = value
    for name, child in (obj.state.get("_modules") or {}).items():
        if child is not None:
            out.update(state_dict(child, f"{prefix}{name}."))
    return out


__all__ = ["ModuleRecord", "UnsafePickleError", "load", "state_dict"]
