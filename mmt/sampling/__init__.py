"""Samplers as pure functions: mask schedules, MaskGIT parallel decoding, autoregressive decoding.

- `mask_schedule`: MaskGIT schedules and per-step masked counts; training mask ratios
  (ITIT's truncated Gaussian, UPGen's uniform) and exact-count random masks.
- `parallel_decode.decode`: MaskGIT / Muse iterative decoding with classifier-free
  guidance (ITIT T2I, UPGen in both directions).
- `autoregressive`: greedy, sampling (DALL-E: temperature, top-k, top-p) and beam search (ITIT I2T), with a
  fixed-buffer or a KV-cached `logits_fn`.

`keras.ops` only -- importing this package does not import TensorFlow, and every
function compiles under XLA (static shapes, fixed-trip-count loops) on any backend.
"""

from mmt.sampling.autoregressive import beam_search, greedy_decode, sample_decode
from mmt.sampling.mask_schedule import (
    masked_count,
    masked_counts,
    random_mask,
    schedule,
    truncated_gaussian_mask_ratio,
    uniform_mask_ratio,
)
from mmt.sampling.parallel_decode import decode

__all__ = [
    "beam_search",
    "decode",
    "greedy_decode",
    "masked_count",
    "masked_counts",
    "random_mask",
    "sample_decode",
    "schedule",
    "truncated_gaussian_mask_ratio",
    "uniform_mask_ratio",
]
