"""Perceptual loss on VGG16 features loaded from a local weights file (`keras.ops` only).

VQGAN trains with a perceptual loss next to L1 (Esser et al., 2021, §3.1: "we replace
the L2 loss ... by a perceptual loss"), which taming-transformers implements as LPIPS
(Zhang et al., 2018) on VGG16. mmt cannot download weights at run time (DESIGN.md §7),
so the network loads from a file the user provides:

* any file `keras.applications.VGG16(...).save_weights(path)` wrote, with or without
  the classifier top (`*.weights.h5`), or
* Keras's own ImageNet file `vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`
  (legacy HDF5, loaded by layer name).

The distance is LPIPS's "baseline" form (its unlearned variant, Zhang et al. §3):
features of each chosen layer are unit-normalised along channels, squared
differences are summed over channels and averaged over positions, and the layers'
distances are averaged. LPIPS's learned per-channel weights are a second download and
are not used. The network is frozen.
"""

from __future__ import annotations

import os
from typing import Sequence

import keras
from keras import ops

#: The last convolution of each VGG16 block (LPIPS's `relu1_2` ... `relu5_3`).
VGG16_LAYERS = ("block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3", "block5_conv3")
# Caffe-style preprocessing of Keras's VGG16 weights: BGR, ImageNet mean subtracted.
_BGR_MEAN = (103.939, 116.779, 123.68)


def load_vgg16_features(weights_path: str | os.PathLike, layers: Sequence[str] = VGG16_LAYERS) -> keras.Model:
    """A frozen VGG16 trunk returning the outputs of `layers`, weights from `weights_path`.

    Raises:
      FileNotFoundError: `weights_path` does not exist (the message says what it must hold).
    """
    path = os.fspath(weights_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"perceptual-loss weights {path!r} not found: it must be a VGG16 weights file, e.g. written by "
            "keras.applications.VGG16(include_top=False).save_weights(path) on a machine with the ImageNet "
            "weights, or Keras's vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(None, None, 3))
    vgg.load_weights(path)
    features = keras.Model(vgg.input, [vgg.get_layer(name).output for name in layers], name="vgg16_features")
    features.trainable = False
    return features


@keras.saving.register_keras_serializable(package="mmt")
class PerceptualLoss(keras.layers.Layer):
    """LPIPS-baseline distance between two image batches on frozen VGG16 features.

    Args:
      weights_path: the VGG16 weights file (see the module docstring).
      layers: VGG16 layer names whose outputs are compared.

    Call: (x, y) float `[B, H, W, 3]` in [-1, 1] -> float32 scalar, the batch mean.
    """

    def __init__(self, weights_path: str, layers: Sequence[str] = VGG16_LAYERS, **kwargs):
        super().__init__(**kwargs)
        self.weights_path = os.fspath(weights_path)
        self.layer_names = tuple(layers)
        self.features = load_vgg16_features(self.weights_path, self.layer_names)
        self.trainable = False

    def build(self, x_shape, y_shape=None):
        self.built = True

    @staticmethod
    def preprocess(images):
        """[-1, 1] RGB -> Caffe-style BGR minus the ImageNet mean (Keras's VGG16 input)."""
        rgb = (ops.cast(images, "float32") + 1.0) * 127.5
        return ops.flip(rgb, axis=-1) - ops.convert_to_tensor(_BGR_MEAN, "float32")

    def call(self, x, y):
        both = self.features(self.preprocess(ops.concatenate([x, y], axis=0)))
        if not isinstance(both, (list, tuple)):
            both = [both]
        batch = ops.shape(x)[0]
        distances = []
        for f in both:
            f = ops.cast(f, "float32")
            f = f / ops.sqrt(ops.sum(ops.square(f), axis=-1, keepdims=True) + 1e-10)  # unit along channels
            distances.append(ops.mean(ops.sum(ops.square(f[:batch] - f[batch:]), axis=-1)))
        return sum(distances) / len(distances)

    def get_config(self):
        return {**super().get_config(), "weights_path": self.weights_path, "layers": list(self.layer_names)}


__all__ = ["PerceptualLoss", "VGG16_LAYERS", "load_vgg16_features"]
