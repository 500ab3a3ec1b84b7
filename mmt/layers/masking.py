"""Dropping masked tokens from an encoder's input and putting them back (MAE §3), `keras.ops` only.

An MAE-style encoder sees only the kept (visible) tokens; its decoder sees every position,
with a learned mask token where a token was dropped. Both steps are a permutation
`order` (int32 `[B, N]`) of each row's positions whose first `kept` entries enter the
encoder. Static `kept` counts give static shapes: XLA compiles one program.

* `keep_order`: the order for a mask chosen elsewhere (ITIT drops some of its masked
  image tokens; the rest enter as [MASK]).
* `random_keep`: MAE / M3AE's per-row shuffle -- a uniformly random subset of the
  valid positions is kept, the rest masked (M3AE §3: sampled without replacement).
* `gather_kept` / `restore_order`: the two halves of the round trip.
"""

from __future__ import annotations

from typing import NamedTuple

from keras import ops

from mmt import backend


def keep_order(mask, seed=None):
    """Which positions enter the encoder, masked ones dropped first (ITIT's encoder).

    Args:
      mask: bool [B, N], True where the token is masked.
      seed: for the random order among masked tokens; None (inference) uses a fixed
        order that spreads the dropped positions over the sequence.

    Returns:
      int32 [B, N]: a permutation of positions -- unmasked first, then masked in
      random order; the first `N - num_dropped` are kept.
    """
    if seed is None:  # golden-ratio sequence: a fixed, evenly spread "random" order
        positions = ops.cast(ops.arange(ops.shape(mask)[-1]), "float32")
        noise = ops.broadcast_to((positions * 0.6180339887) % 1.0, ops.shape(mask))
    else:
        noise = backend.uniform(ops.shape(mask), seed)
    key = noise + ops.where(mask, 0.0, -2.0)
    return ops.cast(ops.argsort(key, axis=-1), "int32")


class Keep(NamedTuple):
    """What `random_keep` chose for one modality.

    order: int32 [B, N], positions in keep order (see module docstring).
    kept_valid: bool [B, kept], True where `order[:, i]` is a visible token; False slots
      (a short caption's padding or surplus masked tokens) must be hidden from
      attention and replaced by the mask token after the encoder.
    masked: bool [B, N], True where a valid token was dropped: the loss targets.
    """

    order: object
    kept_valid: object
    masked: object


def masked_count(n, ratio: float):
    """Tokens masked of `n` valid ones: round(ratio * n), rounding half to even (Python's `round`)."""
    return ops.cast(ops.round(ratio * ops.cast(n, "float32")), "int32")


def random_keep(valid, ratio: float, kept: int, seed=None) -> Keep:
    """MAE's random masking with a static kept count, over rows with padding (M3AE §3).

    Each row keeps `n - round(ratio * n)` of its `n` valid positions, at most `kept`
    (the static slot count, `N - round(ratio * N)`: a full row fills it exactly), drawn
    uniformly without replacement; invalid positions (text padding) are never targets.

    Args:
      valid: bool [B, N], True for real tokens (all True for image patches).
      ratio: the fraction of each row's valid tokens to mask.
      kept: static number of encoder slots.
      seed: a `SeedGenerator`; None uses the fixed golden-ratio order of `keep_order`.

    Returns:
      `Keep(order, kept_valid, masked)`.
    """
    valid = ops.cast(valid, "bool")
    shape = ops.shape(valid)
    if seed is None:
        positions = ops.cast(ops.arange(shape[-1]), "float32")
        noise = ops.broadcast_to((positions * 0.6180339887) % 1.0, shape)
    else:
        noise = backend.uniform(shape, seed)
    order = ops.cast(ops.argsort(ops.where(valid, noise, 2.0), axis=-1), "int32")  # valid first, random order
    n = ops.sum(ops.cast(valid, "int32"), axis=-1)
    visible = ops.minimum(n - masked_count(n, ratio), kept)[:, None]  # [B, 1]
    rank = ops.cast(ops.argsort(order, axis=-1), "int32")  # where each position sits in `order`
    masked = ops.logical_and(valid, rank >= visible)
    kept_valid = ops.arange(kept)[None, :] < visible
    return Keep(order, kept_valid, masked)


def gather_kept(x, order, kept: int):
    """x [B, N, ...] -> [B, kept, ...]: the entries at `order`'s first `kept` positions."""
    index = order[:, :kept]
    index = ops.reshape(index, (*ops.shape(index), *([1] * (len(x.shape) - 2))))
    return ops.take_along_axis(x, index, axis=1)


def restore_order(kept_x, order, filler):
    """Puts the kept entries back at their positions, `filler` everywhere else.

    Args:
      kept_x: float [B, kept, D] (the encoder's output at `order[:, :kept]`).
      order: int32 [B, N] the same permutation.
      filler: float [D] (a learned mask token).

    Returns:
      float [B, N, D] in position order.
    """
    batch, kept, dim = ops.shape(kept_x)[0], ops.shape(kept_x)[1], ops.shape(kept_x)[2]
    n = ops.shape(order)[1]
    fill = ops.broadcast_to(ops.cast(filler, kept_x.dtype), (batch, n - kept, dim))
    in_order = ops.concatenate([kept_x, fill], axis=1)  # positions order[:, i]
    restore = ops.argsort(order, axis=-1)  # where each position sits in `order`
    return ops.take_along_axis(in_order, restore[..., None], axis=1)


__all__ = ["Keep", "gather_kept", "keep_order", "masked_count", "random_keep", "restore_order"]
