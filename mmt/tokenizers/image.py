"""The one interface of mmt's image tokenizers (VQGAN, dVAE): images <-> code grids.

    tokenizer.encode(uint8 [B, H, W, 3]) -> int32 [B, h, w]
    tokenizer.decode(int32 [B, h, w])    -> uint8 [B, H, W, 3]
    tokenizer.grid_size, tokenizer.vocab_size, tokenizer.image_size
    tokenizer.save(path); ImageTokenizer.load(path)   (config.json + model.weights.h5)
    tokenizer.fingerprint()   -> "sha256:..." of config and weights (data manifests)

`keras.ops` only: importing this module does not import TensorFlow, so the same
tokenizer runs under `KERAS_BACKEND=jax`. `encode` / `decode` are compiled with the
backend's XLA (`tf.function(jit_compile=True)` or `jax.jit`) on first use.

Saved tokenizers hold no pickles: `config.json` names a class from `TOKENIZER_CLASSES`
and its plain-JSON config; the weights are an HDF5 file read by Keras.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import keras
import numpy as np
from keras import ops

from mmt.backend import compile_function
from mmt.errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
FORMAT_VERSION = 1

#: class name -> class, filled by `register_tokenizer`; `load` instantiates only these.
TOKENIZER_CLASSES: dict[str, type] = {}


def register_tokenizer(cls):
    """Class decorator: makes `cls` loadable by `ImageTokenizer.load`."""
    TOKENIZER_CLASSES[cls.__name__] = cls
    return cls


class ConfigMismatchError(UserError, ValueError):
    """Saved weights belong to a tokenizer configured differently."""


class ImageTokenizer(keras.Model):
    """Base class: subclasses implement `encode_codes`, `decode_codes` and `get_config`.

    Args:
      image_size: side of the square RGB images it tokenizes.
      downsample: image side / grid side (4, 8 or 16).
      vocab_size: number of codes.
    """

    def __init__(self, image_size: int, downsample: int, vocab_size: int, **kwargs):
        super().__init__(**kwargs)
        if image_size % downsample:
            raise ValueError(f"image_size {image_size} is not a multiple of downsample {downsample}")
        self.image_size = int(image_size)
        self.downsample = int(downsample)
        self._vocab_size = int(vocab_size)
        self._compiled: dict[str, Callable] = {}

    # -- the interface -------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return (side, side)

    def encode_codes(self, images):
        """float [B, H, W, 3] in [-1, 1] -> int32 [B, h, w] (traceable, no checks)."""
        raise TypeError(f"{type(self).__name__} must implement encode_codes")

    def decode_codes(self, codes):
        """int32 [B, h, w] -> float [B, H, W, 3] in [-1, 1] (traceable, no checks)."""
        raise TypeError(f"{type(self).__name__} must implement decode_codes")

    def encode(self, images) -> np.ndarray:
        """uint8 [B, H, W, 3] -> int32 [B, h, w] codes (XLA-compiled)."""
        images = _check_array(images, "images", np.uint8, (None, self.image_size, self.image_size, 3))
        fn = self._compiled.get("encode")
        if fn is None:
            fn = self._compiled["encode"] = compile_function(
                lambda x: ops.cast(self.encode_codes(to_unit_range(x)), "int32"))
        return np.asarray(ops.convert_to_numpy(fn(images)), np.int32)

    def decode(self, codes) -> np.ndarray:
        """int32 [B, h, w] codes -> uint8 [B, H, W, 3] images (XLA-compiled)."""
        h, w = self.grid_size
        codes = _check_array(codes, "codes", np.int32, (None, h, w))
        if codes.size and (codes.min() < 0 or codes.max() >= self.vocab_size):
            raise ValueError(f"codes must lie in [0, {self.vocab_size}), got [{codes.min()}, {codes.max()}]")
        fn = self._compiled.get("decode")
        if fn is None:
            fn = self._compiled["decode"] = compile_function(lambda c: from_unit_range(self.decode_codes(c)))
        return np.asarray(ops.convert_to_numpy(fn(codes)), np.uint8)

    # -- saving ----------------------------------------------------------------------

    def tokenizer_config(self) -> dict[str, Any]:
        """The plain-JSON config that rebuilds this tokenizer (`get_config` minus Keras's keys)."""
        config = dict(self.get_config())
        for key in ("name", "trainable", "dtype"):
            config.pop(key, None)
        return json.loads(json.dumps(config))  # plain JSON types, tuples as lists

    def save(self, path: str | os.PathLike) -> Path:
        """Writes `config.json` and `model.weights.h5` into the directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "class": type(self).__name__,
                "config": self.tokenizer_config(), "fingerprint": self.fingerprint()}
        self.save_weights(str(path / WEIGHTS_FILE))
        tmp = path / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tmp.replace(path / CONFIG_FILE)
        return path

    @staticmethod
    def read_config(path: str | os.PathLike) -> dict[str, Any]:
        """The `config.json` of a saved tokenizer, checked."""
        file = Path(path) / CONFIG_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: not a saved mmt image tokenizer directory")
        try:
            meta = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from e
        if meta.get("format_version") != FORMAT_VERSION or meta.get("class") not in TOKENIZER_CLASSES:
            raise ValueError(f"{file}: unknown tokenizer format {meta.get('format_version')!r} or class "
                             f"{meta.get('class')!r} (known: {sorted(TOKENIZER_CLASSES)})")
        return meta

    @classmethod
    def load(cls, path: str | os.PathLike, expected: Mapping[str, Any] | None = None) -> "ImageTokenizer":
        """Rebuilds a saved tokenizer.

        Args:
          path: a directory written by `save`.
          expected: a config the weights must have been trained with; differing fields
            raise `ConfigMismatchError` naming them.
        """
        meta = cls.read_config(path)
        config = meta["config"]
        if expected is not None:
            wanted = json.loads(json.dumps(dict(expected)))
            fields = sorted(k for k in set(config) | set(wanted) if config.get(k) != wanted.get(k))
            if fields:
                details = ", ".join(f"{k}: saved {config.get(k)!r} vs expected {wanted.get(k)!r}" for k in fields)
                raise ConfigMismatchError(f"tokenizer weights in {path} have a different config ({details})")
        tokenizer_cls = TOKENIZER_CLASSES[meta["class"]]
        if not issubclass(tokenizer_cls, cls):
            raise ValueError(f"{path} holds a {meta['class']}, not a {cls.__name__}")
        tokenizer = tokenizer_cls(**config)
        tokenizer.build_for_images()
        tokenizer.load_weights(str(Path(path) / WEIGHTS_FILE))
        return tokenizer

    def build_for_images(self) -> None:
        """Creates the variables by running encoder and decoder once on zeros."""
        zeros = ops.zeros((1, self.image_size, self.image_size, 3))
        codes = self.encode_codes(zeros)
        self.decode_codes(ops.cast(codes, "int32"))

    def fingerprint(self) -> str:
        """sha256 of the config and every weight (index, name, shape, dtype, bytes), in order.

        Weights are named by their position and leaf name, not `variable.path`: a path
        holds the name scopes active when the variable was created (`vqgan_1/...` for a
        second instance in one process, or a parent layer's name), which would give one
        set of weights several fingerprints.
        """
        digest = hashlib.sha256()
        digest.update(type(self).__name__.encode())
        digest.update(json.dumps(self.tokenizer_config(), sort_keys=True).encode())
        for index, variable in enumerate(self.weights):
            value = np.ascontiguousarray(ops.convert_to_numpy(variable))
            digest.update(f"{index}|{variable.name}|{value.shape}|{value.dtype}".encode())
            digest.update(value.tobytes())
        return "sha256:" + digest.hexdigest()


def to_unit_range(images):
    """uint8 [..] in [0, 255] -> float32 in [-1, 1]."""
    return ops.cast(images, "float32") / 127.5 - 1.0


def from_unit_range(images):
    """float in [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
    return ops.cast(ops.round(ops.clip((ops.cast(images, "float32") + 1.0) * 127.5, 0.0, 255.0)), "uint8")


def _check_array(value, name: str, dtype, shape) -> np.ndarray:
    """`value` as a numpy array of `dtype` and `shape` (None: any), else ValueError."""
    array = np.asarray(value)
    expected = "[" + ", ".join("B" if s is None else str(s) for s in shape) + "]"
    if array.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype).name} {expected}, got {array.dtype} {list(array.shape)}")
    if array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape)):
        raise ValueError(f"{name} must have shape {expected}, got {list(array.shape)}")
    return array
