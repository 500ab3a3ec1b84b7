"""Training DALL-E's dVAE with mmt's one trainer: the relaxed ELB and its schedules.

Stage one of DALL-E (§2.1) maximises the evidence lower bound over images alone,

    ELB = E_{z ~ q^τ(z|x)} ln p(x|z) - β KL(q(z|x) || uniform),

with the expectation over the Gumbel-softmax relaxation `q^τ` of the encoder's
categorical distributions, a logit-Laplace `p(x|z)` (A.3) and a uniform prior over the
K codes. Appendix A.2 divides the loss by the number of pixel values (256 x 256 x 3),
so the KL term, summed over the h x w grid, gets weight β / (3 f²) per position
(f = 8: β / 192). This task returns exactly that, averaged over the batch:

    reconstruction  mean over pixels and channels of -ln f(φ(x) | mu, b)   (weight 1)
    kl_term         β(step) * mean over positions of KL / (3 f²)           (weight 1)

and, with weight 0 (for the summaries only): `nll` (the reconstruction term without
the weighting below), `kl` (nats per position), `mse` of the reconstruction
φ⁻¹(sigmoid(mu)) in [0, 1], `perplexity` of the batch's average code distribution,
the schedules' `temperature` and `beta`.

`scale_weighting` (γ, default 0: the paper) weights each pixel's term by
`stop_gradient(b)^γ`, normalised by the weights' global sum -- the β-NLL of Seitzer et
al. (2022) for a Laplace scale. The per-pixel optimum is unchanged, but the decoder's
gradient no longer grows as 1/b where it is already confident. This matters on sparse
images (`shapes`: ~3% coloured pixels on black): with γ = 0 the decoder makes b tiny on
the background and large on the objects, whose `mu` gradient (~1/b) then drowns in the
background's; measured on 32x32 shapes, a plain conv autoencoder with the paper's
likelihood stays at the all-black reconstruction for 3,000 Adam steps, with γ = 1 it
reaches MSE 0.0036 in 200. γ = 2 goes further: the `mu` gradient sign(x - mu) / b
becomes sign(x - mu) * b, and b tracks |x - mu|, so large errors (the objects) dominate
as under an L2 loss; on 64x64 shapes it lifts the tiny dVAE's argmax reconstructions
from 55% to 99.8% detector agreement at equal steps (`gin/dvae_tiny.gin` uses γ = 2).

Schedules (A.2, "all of which use a cosine schedule"): β rises from 0 to 6.6 over the
first 5,000 updates and τ falls from 1 to 1/16 over the first 150,000; both are
half-cosine interpolations computed from the step inside the compiled train step.
The learning rate (1e-4 -> 1.25e-6 over 1.2M updates, AdamW) is the optimizer's, set
in gin (`gin/dvae_dalle.gin`).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from keras import ops

from mmt.losses import estimators, likelihoods
from mmt.tokenizers.dvae import DVAE
from mmt.tokenizers.image import to_unit_range
from mmt.tasks.base import Ratio, Task


def cosine_anneal(step, start: float, end: float, steps: int):
    """`start` at step 0 to `end` at `steps` along a half cosine, `end` afterwards.

        p = clip(step / steps, 0, 1);   value = end + (start - end) * (1 + cos(pi p)) / 2

    Args:
      step: int or float scalar (tensor), 0-based.
      steps: length of the ramp (>= 1; 0 means `end` from the start).
    Returns:
      float32 scalar.
    """
    if steps <= 0:
        return ops.convert_to_tensor(end, "float32")
    progress = ops.clip(ops.cast(step, "float32") / float(steps), 0.0, 1.0)
    return end + (start - end) * 0.5 * (1.0 + ops.cos(math.pi * progress))


class DVAETask(Task):
    """Trains a `DVAE` on one image stream.

    Args:
      tokenizer: a factory returning the `DVAE` to train (called in the strategy's scope).
      stream: the name of the image stream in `Trainer.streams` (field `image`).
      kl_weight: β at the end of its ramp (DALL-E: 6.6).
      kl_warmup_steps: steps over which β rises from 0 (DALL-E: 5,000).
      temperature_start, temperature_end: τ's ramp (DALL-E: 1 -> 1/16).
      temperature_steps: steps of τ's ramp (DALL-E: 150,000).
      straight_through: feed the decoder the one-hot of the relaxed sample with its soft
        gradient (straight-through Gumbel); DALL-E feeds the soft sample.
      scale_weighting: γ of the pixel weights `stop_gradient(b)^γ` (see above; DALL-E: 0).
      summary_images: how many input | reconstruction pairs `image_summaries` shows.
    """

    def __init__(self, tokenizer: Callable[[], DVAE] = DVAE, stream: str = "images", kl_weight: float = 6.6,
                 kl_warmup_steps: int = 5000, temperature_start: float = 1.0, temperature_end: float = 1.0 / 16,
                 temperature_steps: int = 150_000, straight_through: bool = False, scale_weighting: float = 0.0,
                 summary_images: int = 8):
        self.tokenizer = tokenizer() if callable(tokenizer) and not isinstance(tokenizer, DVAE) else tokenizer
        if not isinstance(self.tokenizer, DVAE):
            raise TypeError(f"DVAETask.tokenizer must make a DVAE, got {type(self.tokenizer).__name__}")
        if temperature_start <= 0 or temperature_end <= 0:
            raise ValueError(f"temperatures must be positive, got {temperature_start} -> {temperature_end}")
        self.model = self.tokenizer
        self.stream = stream
        self.kl_weight = float(kl_weight)
        self.kl_warmup_steps = int(kl_warmup_steps)
        self.temperature_start = float(temperature_start)
        self.temperature_end = float(temperature_end)
        self.temperature_steps = int(temperature_steps)
        self.straight_through = bool(straight_through)
        self.scale_weighting = float(scale_weighting)
        self.summary_images = int(summary_images)
        self.loss_weights = {"reconstruction": 1.0, "kl_term": 1.0, "nll": 0.0, "kl": 0.0, "mse": 0.0,
                             "perplexity": 0.0, "temperature": 0.0, "beta": 0.0}

    # -- schedules ---------------------------------------------------------------

    def temperature(self, step):
        """τ at `step`: float32 scalar (A.2: cosine from 1 to 1/16 over 150k updates)."""
        return cosine_anneal(step, self.temperature_start, self.temperature_end, self.temperature_steps)

    def beta(self, step):
        """β at `step`: float32 scalar (A.2: cosine from 0 to 6.6 over 5k updates)."""
        return cosine_anneal(step, 0.0, self.kl_weight, self.kl_warmup_steps)

    # -- the Task contract -------------------------------------------------------------

    def build(self) -> None:
        self.tokenizer.build_for_images()

    def compute_losses(self, batch, step, seed):
        images = to_unit_range(batch[self.stream]["image"])  # (B, H, W, 3) in [-1, 1]
        logits = self.tokenizer.encoder_logits(images)  # (B, h, w, K)
        temperature = self.temperature(step)
        z = estimators.gumbel_softmax(logits, temperature, seed, hard=self.straight_through)  # (B, h, w, K)
        mu, log_b = self.tokenizer.decoder_statistics(z)  # (B, H, W, 3) each
        target = likelihoods.map_pixels((images + 1.0) / 2.0, self.tokenizer.epsilon)  # φ(x) (A.3)
        nll = likelihoods.logit_laplace_nll(target, mu, log_b)  # (B, H, W, 3)
        weights = ops.stop_gradient(ops.exp(self.scale_weighting * log_b))  # b^γ; ones for γ = 0
        reconstruction = Ratio(ops.sum(weights * nll), ops.sum(weights))
        kl = ops.mean(likelihoods.kl_to_uniform(logits))  # nats per grid position
        beta = self.beta(step)
        # A.2: the loss is divided by H*W*3, so the KL summed over h*w positions weighs
        # beta * h*w / (H*W*3) = beta / (3 f^2) per position.
        kl_term = beta * kl / (3.0 * self.tokenizer.downsample**2)
        mse = ops.mean(ops.square(likelihoods.logit_laplace_reconstruction(mu, self.tokenizer.epsilon)
                                  - (images + 1.0) / 2.0))
        average_q = ops.mean(ops.reshape(ops.softmax(logits, axis=-1), (-1, self.tokenizer.vocab_size)), axis=0)
        perplexity = ops.exp(-ops.sum(average_q * ops.log(average_q + 1e-10)))
        return {"reconstruction": reconstruction, "kl_term": kl_term, "nll": ops.mean(nll), "kl": kl, "mse": mse,
                "perplexity": perplexity, "temperature": temperature, "beta": beta}

    def image_summaries(self, batch, step):
        """`reconstruction`: uint8 [N, H, 2W, 3], input | reconstruction through the argmax codes."""
        images = np.asarray(batch[self.stream]["image"])[: self.summary_images]
        decoded = self.tokenizer.decode(self.tokenizer.encode(images))
        return {"reconstruction": np.concatenate([images, decoded], axis=2)}

    def histogram_summaries(self, batch, step):
        """`codes`: int32 [N * h * w], the argmax codes of the batch (code usage)."""
        images = np.asarray(batch[self.stream]["image"])
        return {"codes": self.tokenizer.encode(images).reshape(-1)}

    def export(self, directory: str, step: int | None = None) -> None:
        self.tokenizer.save(directory)


__all__ = ["DVAETask", "cosine_anneal"]
