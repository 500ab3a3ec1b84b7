"""Adversarial training pieces of the VQGAN (`keras.ops` only).

* `PatchDiscriminator`: the PatchGAN of pix2pix (Isola et al., 2017, §3.2.2), as
  taming-transformers' `NLayerDiscriminator` uses it for VQGAN (Esser et al., 2021,
  §3.1): strided 4x4 convolutions classify overlapping patches as real or fake;
* hinge losses (Lim & Ye, 2017; Esser et al.'s default);
* `adaptive_weight`: Esser et al. eq. 7, lambda = ||grad_GL L_rec|| / (||grad_GL L_GAN|| + delta),
  with G_L the generator's last layer;
* `start_factor`: 0 before a step, 1 from it on (taming's `adopt_weight`).
"""

from __future__ import annotations

import keras
from keras import ops

from mmt.layers.conv import group_norm


@keras.saving.register_keras_serializable(package="mmt")
class PatchDiscriminator(keras.layers.Layer):
    """PatchGAN discriminator: one real/fake logit per overlapping patch.

    conv4x4/2 (filters) -> LeakyReLU(0.2) -> `num_layers - 1` x [conv4x4/2 (2^i filters,
    at most 8x) -> GroupNorm -> LeakyReLU] -> conv4x4/1 -> GroupNorm -> LeakyReLU ->
    conv4x4/1 (1). With 3 layers the receptive field is 70x70 pixels (pix2pix).

    GroupNorm stands in for pix2pix's BatchNorm: no moving statistics to update inside
    the step and no dependence on the per-replica batch.

    Args:
      filters: width of the first layer (pix2pix / taming: 64).
      num_layers: strided layers (taming: 3).
      num_groups: GroupNorm groups.

    Call: float `[B, H, W, 3]` in [-1, 1] -> float32 logits `[B, H', W', 1]`.
    """

    def __init__(self, filters: int = 64, num_layers: int = 3, num_groups: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.num_layers = int(num_layers)
        self.num_groups = int(num_groups)
        policy = self.dtype_policy
        # Named attributes, not lists: `tf.train.Checkpoint` does not see into Keras 3's
        # tracked lists (see `mmt.tokenizers.vqgan._Chain`).
        conv = lambda f, s, name: keras.layers.Conv2D(f, 4, strides=s, padding="same", name=name, dtype=policy)
        self.conv_0 = conv(self.filters, 2, "conv_0")
        for i in range(1, self.num_layers + 1):
            width = self.filters * min(2**i, 8)
            setattr(self, f"conv_{i}", conv(width, 2 if i < self.num_layers else 1, f"conv_{i}"))
            setattr(self, f"norm_{i}", group_norm(width, self.num_groups, f"norm_{i}", policy))
        self.logits = conv(1, 1, "logits")

    def _layers_in_order(self):
        """[(conv, norm or None)] from the input on."""
        return [(getattr(self, f"conv_{i}"), getattr(self, f"norm_{i}", None)) for i in range(self.num_layers + 1)]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for conv, norm in self._layers_in_order():
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            if norm is not None:
                norm.build(shape)
        self.logits.build(shape)
        self.built = True

    def call(self, images):
        x = images
        for conv, norm in self._layers_in_order():
            x = conv(x)
            if norm is not None:
                x = norm(x)
            x = ops.leaky_relu(x, 0.2)
        return ops.cast(self.logits(x), "float32")

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "num_layers": self.num_layers,
                "num_groups": self.num_groups}


def hinge_discriminator_loss(logits_real, logits_fake):
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))): float32 scalar."""
    return 0.5 * (ops.mean(ops.relu(1.0 - logits_real)) + ops.mean(ops.relu(1.0 + logits_fake)))


def hinge_generator_loss(logits_fake):
    """-mean(D(G(z))): float32 scalar."""
    return -ops.mean(logits_fake)


def global_norm(tensors):
    """sqrt of the sum of squares of every element of `tensors` (a list)."""
    return ops.sqrt(sum(ops.sum(ops.square(ops.cast(t, "float32"))) for t in tensors))


def adaptive_weight(reconstruction_grads, generator_grads, max_weight: float = 1e4, delta: float = 1e-4):
    """Esser et al. eq. 7: balances the GAN loss against the reconstruction loss.

    Args:
      reconstruction_grads: gradients of the reconstruction (+ perceptual) loss with
        respect to the generator's last layer (a list of tensors).
      generator_grads: gradients of the generator's GAN loss w.r.t. the same weights.
      max_weight: upper clip (taming: 1e4).
      delta: the paper's delta (taming: 1e-4).

    Returns:
      float32 scalar in [0, max_weight], gradient-stopped.
    """
    weight = global_norm(reconstruction_grads) / (global_norm(generator_grads) + delta)
    return ops.stop_gradient(ops.clip(weight, 0.0, max_weight))


def start_factor(step, start: int):
    """float32 1.0 from `start` on, 0.0 before (e.g. the discriminator's start step)."""
    return ops.cast(ops.greater_equal(ops.cast(step, "int64"), int(start)), "float32")


__all__ = ["PatchDiscriminator", "adaptive_weight", "global_norm", "hinge_discriminator_loss",
           "hinge_generator_loss", "start_factor"]
