"""Training the VQGAN with mmt's one trainer: two optimizer groups in one step.

The generator (encoder, quantizer, decoder) minimises (Esser et al., 2021, eq. 5-7)

    reconstruction  |x - x^| (L1) or (x - x^)^2 (L2), mean over pixels
    quantizer       ||sg(z) - e||^2 + beta ||z - sg(e)||^2 (+ MaskGIT's entropy penalty)
    perceptual      LPIPS-baseline distance on VGG16 features (only when a weights
                    file is configured; tiny configs go without)
    adversarial     lambda * -D(x^), from the discriminator's start step on, lambda the
                    adaptive weight of eq. 7 (or 1)

and the discriminator (`PatchDiscriminator`) minimises the hinge loss

    discriminator   0.5 (relu(1 - D(x)) + relu(1 + D(x^))), from its start step on.

Each group's total is the `loss_weights`-weighted sum of its losses; the trainer
differentiates the generator total only with respect to generator variables and the
discriminator total only with respect to discriminator variables, so one forward pass
of D on [x; x^] serves both. Before the start step both GAN losses are multiplied by 0:
the discriminator's gradient is exactly zero, so an optimizer without weight decay
leaves it untouched. Diagnostics with weight 0 (summaries only): `psnr`, `perplexity`,
`code_usage`, `dead_codes`, `adaptive_weight`, `logits_real`, `logits_fake`.

The adaptive weight needs the gradients of two losses with respect to the decoder's
last convolution inside the step; `mmt.backend.gradient` takes them with the active backend's
autodiff.
"""

from __future__ import annotations

from typing import Callable, Mapping

import keras
import numpy as np
from keras import ops

from mmt import backend
from mmt.losses import gan
from mmt.losses.perceptual import PerceptualLoss
from mmt.tokenizers.image import to_unit_range
from mmt.tokenizers.vqgan import VQGAN
from mmt.tasks.base import OptimizerGroup, Task

RECONSTRUCTION_LOSSES = ("l1", "l2")
_DEFAULT_WEIGHTS = {"reconstruction": 1.0, "quantizer": 1.0, "perceptual": 1.0, "adversarial": 0.1,
                    "discriminator": 1.0}
_DIAGNOSTICS = ("psnr", "perplexity", "code_usage", "dead_codes", "adaptive_weight", "logits_real", "logits_fake")


class _TrainingModel(keras.Model):
    """Holds every variable of the task: tokenizer, discriminator, frozen perceptual net."""

    def __init__(self, tokenizer, discriminator, perceptual, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.discriminator = discriminator
        self.perceptual = perceptual


class VQGANTask(Task):
    """Trains a `VQGAN` on one image stream, with a PatchGAN discriminator.

    Args:
      tokenizer: a factory returning the `VQGAN` (called in the strategy's scope), or one.
      stream: the image stream's name in `Trainer.streams` (field `image`).
      reconstruction_loss: "l1" (taming, MaskGIT) or "l2".
      use_discriminator: False trains without GAN losses and with one optimizer group.
      discriminator_filters, discriminator_layers, discriminator_groups: the
        `PatchDiscriminator` (taming: 64, 3).
      discriminator_start: the step from which both GAN losses count (taming's
        `disc_start`); before it they are 0.
      adaptive_weight: scale the generator's GAN loss by Esser et al.'s eq. 7 lambda
        (else 1); `loss_weights["adversarial"]` multiplies it (taming's disc_weight).
      max_adaptive_weight: upper clip of lambda (taming: 1e4).
      perceptual_weights: path of a VGG16 weights file (see `mmt.losses.perceptual`);
        None skips the perceptual loss.
      loss_weights: overrides of the default weights {reconstruction 1, quantizer 1,
        perceptual 1, adversarial 0.1, discriminator 1}.
      summary_images: how many input | reconstruction pairs `image_summaries` shows.
    """

    def __init__(
        self,
        tokenizer: Callable[[], VQGAN] | VQGAN = VQGAN,
        stream: str = "images",
        reconstruction_loss: str = "l1",
        use_discriminator: bool = True,
        discriminator_filters: int = 64,
        discriminator_layers: int = 3,
        discriminator_groups: int = 32,
        discriminator_start: int = 0,
        adaptive_weight: bool = True,
        max_adaptive_weight: float = 1e4,
        perceptual_weights: str | None = None,
        loss_weights: Mapping[str, float] | None = None,
        summary_images: int = 8,
    ):
        self.tokenizer = tokenizer if isinstance(tokenizer, VQGAN) else tokenizer()
        if not isinstance(self.tokenizer, VQGAN):
            raise TypeError(f"VQGANTask.tokenizer must make a VQGAN, got {type(self.tokenizer).__name__}")
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"VQGANTask.reconstruction_loss must be one of {RECONSTRUCTION_LOSSES}, "
                             f"got {reconstruction_loss!r}")
        unknown = set(loss_weights or {}) - set(_DEFAULT_WEIGHTS) - set(_DIAGNOSTICS)
        if unknown:
            raise ValueError(f"VQGANTask.loss_weights names unknown losses {sorted(unknown)}; "
                             f"known: {sorted(_DEFAULT_WEIGHTS)}")
        self.stream = stream
        self.reconstruction_loss = reconstruction_loss
        self.use_discriminator = bool(use_discriminator)
        self.discriminator_start = int(discriminator_start)
        self.adaptive_weight = bool(adaptive_weight)
        self.max_adaptive_weight = float(max_adaptive_weight)
        self.summary_images = int(summary_images)
        self.discriminator = (gan.PatchDiscriminator(discriminator_filters, discriminator_layers,
                                                     discriminator_groups, name="discriminator")
                              if self.use_discriminator else None)
        self.perceptual = (PerceptualLoss(perceptual_weights, name="perceptual")
                           if perceptual_weights else None)
        self.model = _TrainingModel(self.tokenizer, self.discriminator, self.perceptual, name="vqgan_training")
        self.loss_weights = {**_DEFAULT_WEIGHTS, **{name: 0.0 for name in _DIAGNOSTICS}, **dict(loss_weights or {})}

    # -- the Task contract -------------------------------------------------------------

    def build(self) -> None:
        # Each part is built on its own (not inside a parent's build), so its variable
        # paths start with its own name: "vqgan/...", "discriminator/...".
        self.tokenizer.build_for_images()
        size = self.tokenizer.image_size
        if self.discriminator is not None:
            self.discriminator.build((None, size, size, 3))
        self.model.built = True

    def generator_losses(self) -> tuple[str, ...]:
        names = ("reconstruction", "quantizer")
        if self.perceptual is not None:
            names += ("perceptual",)
        if self.discriminator is not None:
            names += ("adversarial",)
        return names

    def optimizer_groups(self):
        generator = OptimizerGroup("generator", losses=self.generator_losses())
        if self.discriminator is None:
            return (generator,)
        return (generator, OptimizerGroup("discriminator", losses=("discriminator",),
                                          variable_prefixes=(f"{self.discriminator.name}/",)))

    def component_layers(self):
        parts = {"encoder": self.tokenizer.encoder, "quantizer": self.tokenizer.quantizer,
                 "decoder": self.tokenizer.decoder}
        if self.discriminator is not None:
            parts["discriminator"] = self.discriminator
        if self.perceptual is not None:
            parts["perceptual"] = self.perceptual
        return parts

    def _reconstruction(self, x, images):
        diff = ops.cast(x, "float32") - images
        return ops.mean(ops.abs(diff)) if self.reconstruction_loss == "l1" else ops.mean(ops.square(diff))

    def compute_losses(self, batch, step, seed):
        images = to_unit_range(batch[self.stream]["image"])  # (B, H, W, 3) in [-1, 1]
        tokenizer = self.tokenizer
        z_q, codes, aux = tokenizer.quantizer(tokenizer.encoder(images), training=True, seed=seed)
        features = tokenizer.decoder.features(z_q)  # (B, H, W, C): the last conv's input
        reconstruction = ops.cast(tokenizer.decoder.conv_out(features), "float32")  # (B, H, W, 3)
        quantizer = tokenizer.quantizer
        mse = ops.mean(ops.square(reconstruction - images))
        losses = {
            "reconstruction": self._reconstruction(reconstruction, images),
            "quantizer": (aux["codebook_loss"] + quantizer.commitment_cost * aux["commitment_loss"]
                          + quantizer.entropy_weight * aux["entropy_loss"]),
            # [-1, 1] images: peak-to-peak 2, so PSNR = 10 log10(4 / mse).
            "psnr": 10.0 * ops.log(4.0 / ops.maximum(mse, 1e-10)) / np.log(10.0),
            "perplexity": aux["perplexity"],
            "code_usage": aux["usage"],
            "dead_codes": aux["dead_codes"],
        }
        if self.perceptual is not None:
            losses["perceptual"] = self.perceptual(images, reconstruction)
        if self.discriminator is not None:
            batch_size = ops.shape(images)[0]
            logits = self.discriminator(ops.concatenate([images, reconstruction], axis=0))  # (2B, h', w', 1)
            logits_real, logits_fake = logits[:batch_size], logits[batch_size:]
            factor = gan.start_factor(step, self.discriminator_start)
            weight = self._adaptive_weight(features, images) if self.adaptive_weight else ops.ones((), "float32")
            losses["adversarial"] = factor * weight * gan.hinge_generator_loss(logits_fake)
            losses["discriminator"] = factor * gan.hinge_discriminator_loss(logits_real, logits_fake)
            losses["adaptive_weight"] = weight
            losses["logits_real"] = ops.mean(logits_real)
            losses["logits_fake"] = ops.mean(logits_fake)
        return losses

    def _adaptive_weight(self, features, images):
        """Esser et al. eq. 7 with G_L the decoder's `conv_out` kernel (gradient-stopped)."""
        conv = self.tokenizer.decoder.conv_out
        features = ops.stop_gradient(ops.cast(features, "float32"))
        kernel = ops.stop_gradient(ops.cast(conv.kernel, "float32"))
        bias = ops.stop_gradient(ops.cast(conv.bias, "float32"))
        images = ops.stop_gradient(images)

        def output(k):
            return ops.conv(features, k, strides=1, padding="same") + bias

        def nll(k):
            x = output(k)
            loss = self.loss_weights["reconstruction"] * self._reconstruction(x, images)
            if self.perceptual is not None:
                loss = loss + self.loss_weights["perceptual"] * self.perceptual(images, x)
            return loss

        def generator(k):
            return gan.hinge_generator_loss(self.discriminator(output(k)))

        return gan.adaptive_weight([backend.gradient(nll, kernel)], [backend.gradient(generator, kernel)],
                                   max_weight=self.max_adaptive_weight)

    # -- summaries and export ------------------------------------------------------------

    def image_summaries(self, batch, step):
        """`reconstruction`: uint8 [N, H, 2W, 3], input | reconstruction through the codes."""
        images = np.asarray(batch[self.stream]["image"])[: self.summary_images]
        decoded = self.tokenizer.decode(self.tokenizer.encode(images))
        return {"reconstruction": np.concatenate([images, decoded], axis=2)}

    def histogram_summaries(self, batch, step):
        """`codes`: int32 [B * h * w], the batch's codes; `code_usage`: float [K], each
        code's moving average of assignments per step (dead codes sit at 0)."""
        images = np.asarray(batch[self.stream]["image"])
        return {"codes": self.tokenizer.encode(images).reshape(-1),
                "code_usage": np.asarray(ops.convert_to_numpy(self.tokenizer.quantizer.usage))}

    def export(self, directory: str, step: int | None = None) -> None:
        self.tokenizer.save(directory)


__all__ = ["VQGANTask"]
