"""Vector quantization with a straight-through estimator (`keras.ops` only).

`VectorQuantizer` maps each feature vector to its nearest codebook entry (van den Oord
et al., 2017, "Neural Discrete Representation Learning", eq. 3):

    loss = ||sg(z) - e||^2 + beta ||z - sg(e)||^2,     z_q = z + sg(e - z)

with the known cures for codebook collapse available as options:

* factorised, l2-normalised codes (Yu et al., 2022, "Vector-quantized Image Modeling
  with Improved VQGAN", §3.2): z is projected to a low-dimensional `code_dim` space
  and both z and the codes are l2-normalised before the lookup (cosine similarity);
  the chosen code is projected back to the decoder's width;
* restart of dead codes (Dhariwal et al., 2020, "Jukebox", §2.2; Zeghidour et al.,
  2021, SoundStream §3.3): a code whose share of the assignments (an exponential
  moving average) falls below `restart_threshold` times the uniform share 1/K is
  moved onto a recent encoder output, drawn from a ring buffer of them. The buffer is
  filled with inputs drawn in proportion to their distance from the nearest code (the
  D^2 weighting of k-means++, Arthur & Vassilvitskii, 2007), so restarted codes go
  where the codebook represents the data worst rather than onto the most common input
  (on `shapes`, the black background);
* MaskGIT's entropy penalty (per-token entropy minus batch-average entropy of the
  soft assignment), off by default.

Training-time state (usage counts, the ring buffer, restarted codes) lives in
non-trainable variables updated with `assign` and static-shape ops, so the update runs
inside an XLA-compiled step. They are created with `aggregation="only_first_replica"`:
under a mirrored strategy every replica keeps the first replica's update. Restarts
never assign the trainable codebook: the codebook the lookup uses is
`codebook + codebook_offset`, and a restart rewrites the non-trainable offset, so the
optimizer keeps the only write to the trainable variable.
"""

from __future__ import annotations

import keras
from keras import ops

from mmt import backend

_STATE = dict(trainable=False, aggregation="only_first_replica")
RESTART_SAMPLING = ("error", "uniform")


def l2_normalize(x, axis: int = -1, epsilon: float = 1e-6):
    """x / max(||x||, epsilon) along `axis`."""
    norm = ops.sqrt(ops.sum(ops.square(x), axis=axis, keepdims=True))
    return x / ops.maximum(norm, epsilon)


def squared_distances(z, codes):
    """Squared euclidean distances.

    Args:
      z: float [N, D].
      codes: float [K, D].

    Returns:
      float [N, K]: ||z_n - e_k||^2 (clipped at 0 against rounding).
    """
    zz = ops.sum(ops.square(z), axis=1, keepdims=True)  # [N, 1]
    ee = ops.sum(ops.square(codes), axis=1)[None, :]  # [1, K]
    return ops.maximum(zz - 2.0 * ops.matmul(z, ops.transpose(codes)) + ee, 0.0)


def perplexity(p):
    """exp(entropy) of a distribution p (float [K], summing to 1): 1 when one code takes
    everything, K when all are used equally. Returns float32 scalar."""
    return ops.exp(-ops.sum(p * ops.log(ops.maximum(p, 1e-10))))


def code_perplexity(codes, codebook_size: int):
    """`perplexity` of the histogram of `codes` (int [...])."""
    counts = ops.sum(ops.one_hot(ops.reshape(codes, (-1,)), codebook_size, dtype="float32"), axis=0)
    return perplexity(counts / ops.maximum(ops.sum(counts), 1.0))


def entropy_penalty(distances, temperature: float):
    """MaskGIT's codebook entropy loss: mean per-token entropy minus the entropy of the
    batch-average assignment, with soft assignments softmax(-d / temperature).

    Args:
      distances: float [N, K].
    Returns:
      float32 scalar (lower when tokens are confident and codes used evenly).
    """
    logits = -ops.cast(distances, "float32") / temperature
    probs = ops.softmax(logits, axis=-1)
    log_probs = ops.log_softmax(logits, axis=-1)
    per_token = -ops.mean(ops.sum(probs * log_probs, axis=-1))
    average = ops.mean(probs, axis=0)
    batch = -ops.sum(average * ops.log(ops.maximum(average, 1e-10)))
    return per_token - batch


@keras.saving.register_keras_serializable(package="mmt")
class VectorQuantizer(keras.layers.Layer):
    """Nearest-code quantizer with straight-through gradients.

    Args:
      codebook_size: K, the number of codes.
      code_dim: width of the lookup space. None looks up in the input width; a smaller
        value adds the factorised in/out projections of ViT-VQGAN.
      l2_normalize: compare l2-normalised inputs and codes (cosine similarity).
      commitment_cost: beta (VQ-VAE: 0.25, MaskGIT: 0.25).
      entropy_weight, entropy_temperature: MaskGIT's entropy penalty (0.1, 0.01 there);
        0 disables it.
      restart_dead_codes: keep a buffer of recent inputs and move dead codes onto
        buffered inputs during training.
      restart_threshold: a code is dead when its share of assignments (EMA) is below
        `restart_threshold / K`, this fraction of the uniform share.
      usage_decay: decay of the usage EMA (0.99: about 100 steps of memory).
      buffer_size: recent inputs kept for restarts.
      restart_sampling: how inputs enter the buffer: "error" (in proportion to their
        squared distance from the nearest code) or "uniform" (Jukebox).

    Call (training=True also updates usage, buffer and restarts, given `seed`):
      z: float [B, h, w, C].

    Returns:
      (z_q float [B, h, w, C] with straight-through gradients, codes int32 [B, h, w],
      aux dict of float32 scalars: `codebook_loss` ||sg(z) - e||^2, `commitment_loss`
      ||z - sg(e)||^2 (unweighted by beta), `entropy_loss` (0 when disabled),
      `perplexity` and `usage` (fraction of codes used) of this batch, `dead_codes`
      (codes restarted at this step)).
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int | None = None,
        l2_normalize: bool = False,
        commitment_cost: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        restart_dead_codes: bool = False,
        restart_threshold: float = 0.03,
        usage_decay: float = 0.99,
        buffer_size: int = 4096,
        restart_sampling: str = "error",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be at least 2, got {codebook_size}")
        if not 0.0 <= usage_decay < 1.0:
            raise ValueError(f"usage_decay must lie in [0, 1), got {usage_decay}")
        if restart_sampling not in RESTART_SAMPLING:
            raise ValueError(f"restart_sampling must be one of {RESTART_SAMPLING}, got {restart_sampling!r}")
        self.codebook_size = int(codebook_size)
        self.code_dim = None if code_dim is None else int(code_dim)
        self.l2_normalize = bool(l2_normalize)
        self.commitment_cost = float(commitment_cost)
        self.entropy_weight = float(entropy_weight)
        self.entropy_temperature = float(entropy_temperature)
        self.restart_dead_codes = bool(restart_dead_codes)
        self.restart_threshold = float(restart_threshold)
        self.usage_decay = float(usage_decay)
        self.buffer_size = int(buffer_size)
        self.restart_sampling = restart_sampling
        self.project_in = self.project_out = None

    def build(self, input_shape):
        width = int(input_shape[-1])
        dim = self.code_dim or width
        if self.code_dim is not None:
            self.project_in = keras.layers.Dense(dim, name="project_in", dtype=self.dtype_policy)
            self.project_in.build(input_shape)
            self.project_out = keras.layers.Dense(width, name="project_out", dtype=self.dtype_policy)
            self.project_out.build((*input_shape[:-1], dim))
        # Codes ~ U(-1/K, 1/K) as in VQ-VAE / taming-transformers; with l2 normalisation
        # only their directions matter, so a unit-scale normal spreads them better.
        init = ("random_normal" if self.l2_normalize else
                keras.initializers.RandomUniform(-1.0 / self.codebook_size, 1.0 / self.codebook_size))
        self.codebook = self.add_weight(shape=(self.codebook_size, dim), initializer=init, name="codebook")
        self.codebook_offset = self.add_weight(shape=(self.codebook_size, dim), initializer="zeros",
                                               name="codebook_offset", **_STATE)
        # EMA of each code's share of the assignments; starts at 0, so the first training
        # step restarts every code onto the first batch's inputs (a data-dependent
        # initialisation).
        self.usage = self.add_weight(shape=(self.codebook_size,), initializer="zeros", name="usage", **_STATE)
        if self.restart_dead_codes:
            self.buffer = self.add_weight(shape=(self.buffer_size, dim), initializer="zeros", name="buffer",
                                          **_STATE)
            self.buffer_position = self.add_weight(shape=(), initializer="zeros", dtype="int32",
                                                   name="buffer_position", **_STATE)
            self.buffer_filled = self.add_weight(shape=(), initializer="zeros", dtype="int32",
                                                 name="buffer_filled", **_STATE)
        self.built = True

    # -- the lookup space ------------------------------------------------------------

    def codes_table(self):
        """float [K, D]: the codes the lookup compares against (offset and norm applied)."""
        codes = ops.cast(self.codebook, "float32") + ops.cast(self.codebook_offset, "float32")
        return l2_normalize(codes) if self.l2_normalize else codes

    def _to_lookup_space(self, z):
        if self.project_in is not None:
            z = self.project_in(z)
        z = ops.cast(z, "float32")
        return l2_normalize(z) if self.l2_normalize else z

    def _from_lookup_space(self, e):
        e = ops.cast(e, self.compute_dtype)
        return self.project_out(e) if self.project_out is not None else e

    def nearest_codes(self, z):
        """Codes only: float [B, h, w, C] -> int32 [B, h, w] (no state changes)."""
        latents = self._to_lookup_space(z)
        b, h, w = ops.shape(latents)[0], ops.shape(latents)[1], ops.shape(latents)[2]
        flat = ops.reshape(latents, (-1, ops.shape(latents)[-1]))
        codes = ops.argmin(squared_distances(flat, self.codes_table()), axis=-1)
        return ops.reshape(ops.cast(codes, "int32"), (b, h, w))

    def lookup(self, codes):
        """int [B, h, w] -> float [B, h, w, C]: the codes' vectors in the input width."""
        return self._from_lookup_space(ops.take(self.codes_table(), ops.cast(codes, "int32"), axis=0))

    # -- training ----------------------------------------------------------------------

    def call(self, z, training=False, seed=None):
        latents = self._to_lookup_space(z)  # [B, h, w, D]
        shape = ops.shape(latents)
        flat = ops.reshape(latents, (-1, shape[-1]))  # [N, D]
        table = self.codes_table()  # [K, D]
        distances = squared_distances(flat, table)  # [N, K]
        flat_codes = ops.cast(ops.argmin(distances, axis=-1), "int32")  # [N]
        chosen = ops.take(table, flat_codes, axis=0)  # [N, D]
        codebook_loss = ops.mean(ops.square(ops.stop_gradient(flat) - chosen))
        commitment_loss = ops.mean(ops.square(flat - ops.stop_gradient(chosen)))
        straight_through = flat + ops.stop_gradient(chosen - flat)  # VQ-VAE §3.2
        z_q = self._from_lookup_space(ops.reshape(straight_through, shape))
        codes = ops.reshape(flat_codes, shape[:-1])

        counts = ops.sum(ops.one_hot(flat_codes, self.codebook_size, dtype="float32"), axis=0)  # [K]
        p = counts / ops.cast(ops.shape(flat)[0], "float32")
        aux = {
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment_loss,
            "entropy_loss": (entropy_penalty(distances, self.entropy_temperature) if self.entropy_weight
                             else ops.zeros((), "float32")),
            "perplexity": perplexity(p),
            "usage": ops.mean(ops.cast(counts > 0, "float32")),
            "dead_codes": ops.zeros((), "float32"),
        }
        if training:
            usage = self.usage_decay * self.usage + (1.0 - self.usage_decay) * p
            if self.restart_dead_codes:
                if seed is None:
                    raise ValueError("VectorQuantizer with restart_dead_codes needs a seed when training")
                nearest = ops.stop_gradient(ops.min(distances, axis=-1))  # [N]
                usage, aux["dead_codes"] = self._restart(ops.stop_gradient(flat), nearest, usage, seed)
            self.usage.assign(usage)
        return z_q, codes, aux

    def _restart(self, flat, nearest, usage, seed):
        """Writes recent inputs into the buffer; moves dead codes onto buffered inputs.

        Args:
          flat: float [N, D], this step's inputs in the lookup space.
          nearest: float [N], their squared distances to the nearest code.
          usage: float [K], the usage EMA including this step.

        Returns the usage EMA after restarts (restarted codes get the uniform share 1/K,
        so they have about ln(1 / restart_threshold) / (1 - usage_decay) steps to
        attract inputs) and the number of codes restarted.
        """
        n = int(flat.shape[0])  # static: batches have static shapes
        take = min(self.buffer_size, n)
        # `take` of this batch's inputs, written at the ring position.
        if self.restart_sampling == "error":
            logits = ops.log(ops.maximum(ops.cast(nearest, "float32"), 1e-12))  # [N]
            index = backend.categorical(ops.broadcast_to(logits[None, :], (take, n)), seed)  # [take], with replacement
        else:
            index = backend.randint((take,), 0, n, seed)
        rows = ops.take(flat, ops.cast(index, "int32"), axis=0)  # [take, D]
        slots = (self.buffer_position + ops.arange(take, dtype="int32")) % self.buffer_size
        buffer = ops.scatter_update(self.buffer, ops.expand_dims(slots, -1), rows)
        filled = ops.minimum(self.buffer_filled + take, self.buffer_size)
        self.buffer.assign(buffer)
        self.buffer_position.assign((self.buffer_position + take) % self.buffer_size)
        self.buffer_filled.assign(filled)

        dead = usage * self.codebook_size < self.restart_threshold  # [K]
        pick = ops.cast(backend.uniform((self.codebook_size,), seed) * ops.cast(filled, "float32"), "int32")
        replacement = ops.take(buffer, ops.minimum(pick, filled - 1), axis=0)  # [K, D]
        codebook = ops.cast(self.codebook, "float32")
        offset = ops.where(dead[:, None], replacement - codebook, ops.cast(self.codebook_offset, "float32"))
        self.codebook_offset.assign(ops.cast(offset, self.codebook_offset.dtype))
        return ops.where(dead, 1.0 / self.codebook_size, usage), ops.sum(ops.cast(dead, "float32"))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "codebook_size": self.codebook_size,
            "code_dim": self.code_dim,
            "l2_normalize": self.l2_normalize,
            "commitment_cost": self.commitment_cost,
            "entropy_weight": self.entropy_weight,
            "entropy_temperature": self.entropy_temperature,
            "restart_dead_codes": self.restart_dead_codes,
            "restart_threshold": self.restart_threshold,
            "usage_decay": self.usage_decay,
            "buffer_size": self.buffer_size,
            "restart_sampling": self.restart_sampling,
        }


__all__ = ["VectorQuantizer", "code_perplexity", "entropy_penalty", "l2_normalize", "perplexity",
           "squared_distances"]
