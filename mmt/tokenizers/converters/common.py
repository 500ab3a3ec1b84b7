"""What the importers share: a checked assignment that names the tensor at fault."""

from __future__ import annotations

import numpy as np
from keras import ops

from mmt.errors import UserError


class ConversionError(UserError):
    """A checkpoint does not fit the target tokenizer config (or is not the expected file)."""


class Assigner:
    """Assigns source tensors to Keras variables, checking each shape as it goes.

    Args:
      source: the checkpoint's name, for messages.
      tensors: source key -> array (already in the target layout where `assign` says so).
    """

    def __init__(self, source: str, tensors: dict[str, np.ndarray]):
        self.source = source
        self.tensors = tensors
        self.used: set[str] = set()

    def get(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise ConversionError(f"{self.source}: tensor {key!r} not found (the target config expects it; "
                                  f"the file's tensors start {sorted(self.tensors)[:5]})")
        self.used.add(key)
        return np.asarray(self.tensors[key])

    def assign(self, variable, key: str, transform=None) -> None:
        """variable <- transform(tensors[key]); a shape mismatch names the key and both shapes."""
        value = self.get(key)
        raw_shape = value.shape
        if transform is not None:
            value = transform(value)
        want = tuple(variable.shape)
        if tuple(value.shape) != want:
            raise ConversionError(f"{self.source}: tensor {key!r} has shape {raw_shape}, but the target config's "
                                  f"{variable.path} needs {want} (after layout conversion): the checkpoint and the "
                                  f"config differ")
        variable.assign(value.astype(np.float32))

    @staticmethod
    def zero(variable) -> None:
        variable.assign(np.zeros(tuple(variable.shape), np.float32))

    def check_all_used(self) -> None:
        unused = [k for k in self.tensors if k not in self.used]
        if unused:
            raise ConversionError(f"{self.source}: {len(unused)} tensors have no place in the target config, "
                                  f"first {unused[0]!r} {np.shape(self.tensors[unused[0]])}")


def oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    """torch conv weight [out, in, kh, kw] -> Keras kernel [kh, kw, in, out]."""
    return np.transpose(w, (2, 3, 1, 0))


def to_numpy(variable) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(variable))
