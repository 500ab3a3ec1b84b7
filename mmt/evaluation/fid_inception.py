"""The FID Inception-v3: the 2015 TensorFlow graph that published FIDs use, in Keras.

FID (Heusel et al., 2017) is defined by one network: the Inception-v3 graph
`pool_3:0` of TensorFlow's 2015-12-05 release, which TTUR's `fid.py`, `pytorch-fid`
and `clean-fid` all use. `pytorch-fid` ports it to torchvision's `Inception3` layout
with four patches, reproduced here (`FIDInceptionA/C/E_1/E_2` there):

* the average pools inside Mixed_5b..5d (A), Mixed_6b..6e (C) and Mixed_7b (E_1)
  exclude the zero padding from the count (TF's SAME pooling; torchvision's
  `count_include_pad=True` would differ at the borders);
* Mixed_7c (E_2) pools its last branch with a 3x3 *max* pool, not an average;
* the classifier has 1008 classes (not 1000), irrelevant to pool3 but present in
  the weights file;
* BatchNorm ε is 0.001 (as torchvision).

Features are the 2048-d global average of Mixed_7c ("pool3").

**Weights.** `pytorch-fid`'s `pt_inception-2015-12-05-6726825d.pth` (a torch
state dict, released with pytorch-fid under github.com/mseitzer/pytorch-fid/releases)
is read directly, without torch and without running pickle code
(`mmt.tokenizers.converters.torch_pickle`), or from an `.npz` with the same keys
(`Conv2d_1a_3x3.conv.weight`, `....bn.{weight,bias,running_mean,running_var}`,
`fc.{weight,bias}`): `python -m mmt.evaluation.fid_inception in.pth out.npz` writes
one. BatchNorm is folded into the convolutions when loading.

**Resize protocol (pytorch-fid's).** uint8 images -> [0, 1] -> bilinear resize to
299x299 with `align_corners=False` and no antialiasing (torch's
`F.interpolate(..., mode="bilinear")`) -> `2x - 1` in [-1, 1]. clean-fid's PIL-bicubic
protocol gives different numbers; compare FIDs only under one protocol.

`keras.ops` only (no TensorFlow import), so it runs under `KERAS_BACKEND=jax`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

import keras
import numpy as np
from keras import ops

FID_RESOLUTION = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPSILON = 1e-3

# (torch prefix, in, out, (kh, kw), stride, padding) of every BasicConv2d, in forward order.
# padding "same" is torch's symmetric (k - 1) / 2 at stride 1; "valid" is torch's 0.


def _basic_convs() -> list[tuple[str, int, int, tuple[int, int], int, str]]:
    convs = [("Conv2d_1a_3x3", 3, 32, (3, 3), 2, "valid"), ("Conv2d_2a_3x3", 32, 32, (3, 3), 1, "valid"),
             ("Conv2d_2b_3x3", 32, 64, (3, 3), 1, "same"), ("Conv2d_3b_1x1", 64, 80, (1, 1), 1, "valid"),
             ("Conv2d_4a_3x3", 80, 192, (3, 3), 1, "valid")]
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):  # A
        convs += [(f"{name}.branch1x1", cin, 64, (1, 1), 1, "same"),
                  (f"{name}.branch5x5_1", cin, 48, (1, 1), 1, "same"),
                  (f"{name}.branch5x5_2", 48, 64, (5, 5), 1, "same"),
                  (f"{name}.branch3x3dbl_1", cin, 64, (1, 1), 1, "same"),
                  (f"{name}.branch3x3dbl_2", 64, 96, (3, 3), 1, "same"),
                  (f"{name}.branch3x3dbl_3", 96, 96, (3, 3), 1, "same"),
                  (f"{name}.branch_pool", cin, pool, (1, 1), 1, "same")]
    convs += [("Mixed_6a.branch3x3", 288, 384, (3, 3), 2, "valid"),  # B
              ("Mixed_6a.branch3x3dbl_1", 288, 64, (1, 1), 1, "same"),
              ("Mixed_6a.branch3x3dbl_2", 64, 96, (3, 3), 1, "same"),
              ("Mixed_6a.branch3x3dbl_3", 96, 96, (3, 3), 2, "valid")]
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):  # C
        convs += [(f"{name}.branch1x1", 768, 192, (1, 1), 1, "same"),
                  (f"{name}.branch7x7_1", 768, c7, (1, 1), 1, "same"),
                  (f"{name}.branch7x7_2", c7, c7, (1, 7), 1, "same"),
                  (f"{name}.branch7x7_3", c7, 192, (7, 1), 1, "same"),
                  (f"{name}.branch7x7dbl_1", 768, c7, (1, 1), 1, "same"),
                  (f"{name}.branch7x7dbl_2", c7, c7, (7, 1), 1, "same"),
                  (f"{name}.branch7x7dbl_3", c7, c7, (1, 7), 1, "same"),
                  (f"{name}.branch7x7dbl_4", c7, c7, (7, 1), 1, "same"),
                  (f"{name}.branch7x7dbl_5", c7, 192, (1, 7), 1, "same"),
                  (f"{name}.branch_pool", 768, 192, (1, 1), 1, "same")]
    convs += [("Mixed_7a.branch3x3_1", 768, 192, (1, 1), 1, "same"),  # D
              ("Mixed_7a.branch3x3_2", 192, 320, (3, 3), 2, "valid"),
              ("Mixed_7a.branch7x7x3_1", 768, 192, (1, 1), 1, "same"),
              ("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7), 1, "same"),
              ("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1), 1, "same"),
              ("Mixed_7a.branch7x7x3_4", 192, 192, (3, 3), 2, "valid")]
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):  # E
        convs += [(f"{name}.branch1x1", cin, 320, (1, 1), 1, "same"),
                  (f"{name}.branch3x3_1", cin, 384, (1, 1), 1, "same"),
                  (f"{name}.branch3x3_2a", 384, 384, (1, 3), 1, "same"),
                  (f"{name}.branch3x3_2b", 384, 384, (3, 1), 1, "same"),
                  (f"{name}.branch3x3dbl_1", cin, 448, (1, 1), 1, "same"),
                  (f"{name}.branch3x3dbl_2", 448, 384, (3, 3), 1, "same"),
                  (f"{name}.branch3x3dbl_3a", 384, 384, (1, 3), 1, "same"),
                  (f"{name}.branch3x3dbl_3b", 384, 384, (3, 1), 1, "same"),
                  (f"{name}.branch_pool", cin, 192, (1, 1), 1, "same")]
    return convs


BASIC_CONVS = _basic_convs()


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """pytorch-fid's state-dict key -> shape (torch layouts: conv OIHW, fc [out, in])."""
    shapes = {}
    for prefix, cin, cout, (kh, kw), _, _ in BASIC_CONVS:
        shapes[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{leaf}"] = (cout,)
    shapes["fc.weight"] = (NUM_CLASSES, FEATURE_DIM)
    shapes["fc.bias"] = (NUM_CLASSES,)
    return shapes


def _layer_name(prefix: str) -> str:
    return prefix.replace(".", "__")


class FIDInception(keras.Model):
    """FID Inception-v3 up to pool3: float `[B, S, S, 3]` in [-1, 1] -> float32 `[B, 2048]`.

    S is 299 under the FID protocol; any S >= 75 runs (tests use small inputs).
    Every convolution carries its folded BatchNorm as a bias, followed by ReLU.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("name", "fid_inception")
        # float32 whatever the global policy (a restored task may have set mixed_bfloat16):
        # FID compares means and covariances, which bfloat16 features would shift.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        for prefix, _, cout, kernel, stride, padding in BASIC_CONVS:
            # Attributes named after pytorch-fid's modules: tracked in a stable (forward) order.
            setattr(self, _layer_name(prefix),
                    keras.layers.Conv2D(cout, kernel, strides=stride, padding=padding, name=_layer_name(prefix),
                                        dtype=self.dtype_policy))

    def conv_layer(self, prefix: str) -> keras.layers.Conv2D:
        """The Conv2D of pytorch-fid's BasicConv2d `prefix` (e.g. "Mixed_5b.branch1x1")."""
        return getattr(self, _layer_name(prefix))

    def build(self, input_shape=None):
        for prefix, cin, _, _, _, _ in BASIC_CONVS:
            self.conv_layer(prefix).build((None, None, None, cin))
        self.built = True

    def _conv(self, prefix, x):
        return ops.relu(self.conv_layer(prefix)(x))

    def _mixed_a(self, name, x):
        c = lambda branch, h: self._conv(f"{name}.{branch}", h)  # noqa: E731
        b1 = c("branch1x1", x)
        b5 = c("branch5x5_2", c("branch5x5_1", x))
        b3 = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)))
        bp = c("branch_pool", ops.average_pool(x, 3, 1, padding="same"))  # excludes padding (TF)
        return ops.concatenate([b1, b5, b3, bp], axis=-1)

    def _mixed_b(self, x):
        c = lambda branch, h: self._conv(f"Mixed_6a.{branch}", h)  # noqa: E731
        b3 = c("branch3x3", x)
        bd = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)))
        return ops.concatenate([b3, bd, ops.max_pool(x, 3, 2, padding="valid")], axis=-1)

    def _mixed_c(self, name, x):
        c = lambda branch, h: self._conv(f"{name}.{branch}", h)  # noqa: E731
        b1 = c("branch1x1", x)
        b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
        bd = x
        for i in range(1, 6):
            bd = c(f"branch7x7dbl_{i}", bd)
        bp = c("branch_pool", ops.average_pool(x, 3, 1, padding="same"))
        return ops.concatenate([b1, b7, bd, bp], axis=-1)

    def _mixed_d(self, x):
        c = lambda branch, h: self._conv(f"Mixed_7a.{branch}", h)  # noqa: E731
        b3 = c("branch3x3_2", c("branch3x3_1", x))
        b7 = x
        for i in range(1, 5):
            b7 = c(f"branch7x7x3_{i}", b7)
        return ops.concatenate([b3, b7, ops.max_pool(x, 3, 2, padding="valid")], axis=-1)

    def _mixed_e(self, name, x, max_pool: bool):
        c = lambda branch, h: self._conv(f"{name}.{branch}", h)  # noqa: E731
        b1 = c("branch1x1", x)
        b3 = c("branch3x3_1", x)
        b3 = ops.concatenate([c("branch3x3_2a", b3), c("branch3x3_2b", b3)], axis=-1)
        bd = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
        bd = ops.concatenate([c("branch3x3dbl_3a", bd), c("branch3x3dbl_3b", bd)], axis=-1)
        # pytorch-fid's FIDInceptionE_2 patch: the 2015 graph max-pools in Mixed_7c.
        pooled = ops.max_pool(x, 3, 1, padding="same") if max_pool else ops.average_pool(x, 3, 1, padding="same")
        return ops.concatenate([b1, b3, bd, c("branch_pool", pooled)], axis=-1)

    def call(self, images):
        """float [B, S, S, 3] in [-1, 1] -> float32 pool3 features [B, 2048]."""
        x = ops.cast(images, self.compute_dtype)
        for prefix in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = self._conv(prefix, x)
        x = ops.max_pool(x, 3, 2, padding="valid")
        x = self._conv("Conv2d_4a_3x3", self._conv("Conv2d_3b_1x1", x))
        x = ops.max_pool(x, 3, 2, padding="valid")  # (B, 35, 35, 192) at 299
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
            x = self._mixed_a(name, x)
        x = self._mixed_b(x)  # (B, 17, 17, 768)
        for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = self._mixed_c(name, x)
        x = self._mixed_d(x)  # (B, 8, 8, 1280)
        x = self._mixed_e("Mixed_7b", x, max_pool=False)
        x = self._mixed_e("Mixed_7c", x, max_pool=True)  # (B, 8, 8, 2048)
        return ops.cast(ops.mean(x, axis=(1, 2)), "float32")  # pool3

    # -- weights -------------------------------------------------------------------

    def load_state_dict(self, state: Mapping[str, np.ndarray], source: str = "state dict") -> None:
        """Assigns pytorch-fid's state dict (torch layouts), folding BatchNorm into the convs.

        Raises `ValueError` naming the first key (in forward order) that is missing or
        has another shape; the 1008-class `fc` must be present with its shape but is unused.
        """
        if not self.built:
            self.build()
        expected = state_dict_shapes()
        for key, shape in expected.items():
            if key not in state:
                raise ValueError(f"{source}: missing tensor {key!r} (expected shape {shape}): not pytorch-fid's "
                                 f"FID Inception weights")
            if tuple(np.shape(state[key])) != shape:
                raise ValueError(f"{source}: tensor {key!r} has shape {tuple(np.shape(state[key]))}, expected {shape}")
        for prefix, *_ in BASIC_CONVS:
            layer = self.conv_layer(prefix)
            w = np.asarray(state[f"{prefix}.conv.weight"], np.float64)  # (O, I, kh, kw)
            gamma, beta, mean, var = (np.asarray(state[f"{prefix}.bn.{leaf}"], np.float64)
                                      for leaf in ("weight", "bias", "running_mean", "running_var"))
            scale = gamma / np.sqrt(var + BN_EPSILON)  # BN(conv(x)) = conv(x) * scale + (beta - mean * scale)
            kernel = np.transpose(w, (2, 3, 1, 0)) * scale  # (kh, kw, I, O)
            layer.kernel.assign(kernel.astype(np.float32))
            layer.bias.assign((beta - mean * scale).astype(np.float32))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "FIDInception":
        """The network with weights from pytorch-fid's `.pth` or an `.npz` of its state dict."""
        model = cls()
        model.build()
        model.load_state_dict(read_weights(path), source=str(path))
        return model


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """pytorch-fid's state dict from a `.pth` (read without pickle code) or an `.npz`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights {path} not found (pytorch-fid's "
                                f"pt_inception-2015-12-05-6726825d.pth or an .npz converted from it)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") and path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    from mmt.tokenizers.converters import torch_pickle

    state = torch_pickle.load(path)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of tensors), got {type(state).__name__}")
    return {str(k): np.asarray(v) for k, v in state.items() if isinstance(v, np.ndarray)}


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float32 [out, in]: torch's bilinear `align_corners=False` resize along one axis, no antialias.

    Output pixel o samples source coordinate `(o + 0.5) * in / out - 0.5`, clamped at 0,
    between its two neighbours (the upper clamped to `in - 1`).
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), hi), frac)
    return matrix.astype(np.float32)


def preprocess(images, size: int = FID_RESOLUTION):
    """uint8 [B, H, W, 3] -> float32 [B, size, size, 3] in [-1, 1] (pytorch-fid's protocol).

    The bilinear resize is two small matrix products (exactly torch's sampling), so it
    costs little next to the network and runs on any backend.
    """
    _, height, width, _ = ops.shape(images)
    x = ops.cast(images, "float32") / 255.0
    rows = ops.convert_to_tensor(resize_matrix(int(height), size))  # (size, H)
    cols = ops.convert_to_tensor(resize_matrix(int(width), size))  # (size, W)
    x = ops.einsum("oh,bhwc->bowc", rows, x)  # (B, size, W, 3)
    x = ops.einsum("pw,bowc->bopc", cols, x)  # (B, size, size, 3)
    return 2.0 * x - 1.0


def main(argv=None) -> int:
    """`python -m mmt.evaluation.fid_inception IN.pth OUT.npz`: the state dict as a plain .npz."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(main.__doc__, file=sys.stderr)
        return 2
    state = read_weights(argv[0])
    FIDInception().load_state_dict(state, source=argv[0])  # checks every shape
    np.savez(argv[1], **state)
    print(f"wrote {argv[1]} ({len(state)} tensors)")
    return 0


__all__ = ["FEATURE_DIM", "FIDInception", "FID_RESOLUTION", "preprocess", "read_weights", "resize_matrix",
           "state_dict_shapes"]

if __name__ == "__main__":
    sys.exit(main())
