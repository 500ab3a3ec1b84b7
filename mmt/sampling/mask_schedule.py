"""Mask schedules (MaskGIT §3.3) and training mask-ratio distributions (ITIT Table 3, UPGen §3).

`schedule` maps the fraction of decoding done, `r` in [0, 1], to the fraction of tokens
still masked. MaskGIT decodes with `cos(pi/2 * r)`; during training it samples `r`
uniformly and masks `schedule(r)` of the tokens. ITIT instead draws training mask ratios
from a truncated Gaussian (mode 0.75, std 0.25, in [0.5, 1.0] for T2I); UPGen from U(0, 1).

Everything here is `keras.ops` only (no TensorFlow), with static shapes.
"""

from __future__ import annotations

import math

from keras import ops

from mmt import backend

_METHODS = ("cosine", "linear", "square", "sqrt", "log", "exp", "pow<k>")
_MIN_RATIO = 1e-6  # MaskGIT clamps the mask ratio to [1e-6, 1]


def schedule(ratio, method: str = "cosine", total_unknown=None):
    """The mask ratio after decoding a fraction `ratio` of the way (MaskGIT's `schedule`).

    Args:
      ratio: float scalar or tensor in [0, 1]: 0 = nothing decoded yet, 1 = done.
      method: "cosine" `cos(pi/2 r)` (MaskGIT, Muse, ITIT), "linear" `1 - r`,
        "square" `1 - r^2`, "sqrt" `1 - sqrt(r)`, "pow<k>" `1 - r^k` (e.g. "pow3"),
        "log" `-log2(r) / log2(total_unknown)`, "exp" `1 - 2^(-log2(total_unknown) (1 - r))`.
      total_unknown: number of tokens to generate (int or int tensor broadcasting
        against `ratio`); required by "log" and "exp" only.

    Returns:
      float32, the shape of `ratio`: the fraction still masked, clamped to [1e-6, 1].
    """
    r = ops.cast(ratio, "float32")
    if method == "cosine":
        mask_ratio = ops.cos(math.pi / 2.0 * r)
    elif method == "linear":
        mask_ratio = 1.0 - r
    elif method == "square":
        mask_ratio = 1.0 - ops.square(r)
    elif method == "sqrt":
        mask_ratio = 1.0 - ops.sqrt(r)
    elif method.startswith("pow") and _is_number(method[3:]):
        mask_ratio = 1.0 - ops.power(r, float(method[3:]))
    elif method in ("log", "exp"):
        if total_unknown is None:
            raise ValueError(f"schedule method {method!r} needs total_unknown.")
        # log2 of fewer than 2 tokens is 0 (or -inf): those schedules are degenerate there.
        log_total = ops.log2(ops.maximum(ops.cast(total_unknown, "float32"), 2.0))
        if method == "log":
            mask_ratio = -ops.log2(ops.maximum(r, 1e-30)) / log_total
        else:
            mask_ratio = 1.0 - ops.power(2.0, -log_total * (1.0 - r))
    else:
        raise ValueError(f"unknown mask schedule {method!r}; expected one of {_METHODS}.")
    return ops.clip(mask_ratio, _MIN_RATIO, 1.0)


def masked_counts(num_steps: int, total, method: str = "cosine"):
    """How many tokens are still masked after each decoding step (MaskGIT's rules).

    With `f_s = floor(total * schedule((s + 1) / num_steps))` and `c_{-1} = total`:
    `c_s = clip(f_s, 1, c_{s-1} - 1)` for `s < num_steps - 1` (each step reveals at
    least one token, and one stays masked until the end; when they conflict, because
    `total < num_steps`, keeping one masked wins and the step reveals nothing), and
    `c_{num_steps - 1} = 0`. `total == 0` gives zeros.

    Args:
      num_steps: static number of decoding steps (>= 1).
      total: int scalar or int tensor `[...]` (e.g. `[B]`): tokens masked at the start.
      method: a `schedule` method.

    Returns:
      int32 `[num_steps, ...]`: row `s` is the count after step `s` (0-based).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    total = ops.cast(total, "int32")
    total_f = ops.cast(total, "float32")
    previous, rows = total, []
    # A Python loop over the static step count: unrolled into num_steps small ops.
    for step in range(num_steps):
        if step == num_steps - 1:
            count = ops.zeros_like(total)
        else:
            ratio = schedule((step + 1) / num_steps, method, total_unknown=total)
            wanted = ops.cast(ops.floor(total_f * ratio), "int32")
            count = ops.maximum(ops.minimum(previous - 1, wanted), 1)
            count = ops.minimum(count, total)  # total == 0: nothing to mask
        rows.append(count)
        previous = count
    return ops.stack(rows, axis=0)


def masked_count(step, num_steps: int, total, method: str = "cosine"):
    """Tokens still masked after step `step` (0-based) of `num_steps`; see `masked_counts`.

    Returns a Python int when `step` and `total` are Python ints, else an int32 tensor
    shaped like `total`.
    """
    counts = ops.take(masked_counts(num_steps, total, method), step, axis=0)
    if isinstance(step, int) and isinstance(total, int):
        return int(ops.convert_to_numpy(counts))
    return counts


def truncated_gaussian_mask_ratio(
    shape, seed, mode: float = 0.75, std: float = 0.25, low: float = 0.5, high: float = 1.0
):
    """Mask ratios from a normal(mode, std) truncated to [low, high] (ITIT Table 3).

    Exact inverse-CDF sampling: `u ~ U(Phi(a), Phi(b))`, `x = mode + std * Phi^-1(u)` with
    `Phi^-1(u) = sqrt(2) erfinv(2u - 1)`; the truncation bounds are computed in float64.
    float32 `erfinv` is accurate while `a, b` stay within about 5 standard deviations
    (ITIT's are +-1); the result is clipped to [low, high] against rounding.

    Args:
      shape: static output shape, e.g. `(B,)`.
      seed: an int or a `keras.random.SeedGenerator`.
      mode, std, low, high: Python floats, `std > 0`, `low < high`. ITIT uses high 1.0
        for T2I and 0.75 for I2T.

    Returns:
      float32 `shape`.
    """
    if not std > 0 or not low < high:
        raise ValueError(f"need std > 0 and low < high, got std={std}, [{low}, {high}].")
    cdf_low = _normal_cdf((low - mode) / std)
    cdf_high = _normal_cdf((high - mode) / std)
    u = backend.uniform(shape, seed, minval=cdf_low, maxval=cdf_high)
    x = mode + std * math.sqrt(2.0) * ops.erfinv(2.0 * u - 1.0)
    return ops.clip(x, low, high)


def uniform_mask_ratio(shape, seed, low: float = 0.0, high: float = 1.0):
    """float32 `shape` mask ratios from U(low, high) (UPGen §3: U(0, 1) per example).

    For MaskGIT-style training pass the result through `schedule`.
    """
    return backend.uniform(shape, seed, minval=low, maxval=high)


def random_mask(shape, ratio, seed, candidates=None):
    """Masks exactly `round(ratio * n)` uniformly chosen tokens per example.

    The choice is the `count` smallest of i.i.d. uniform noise, by rank (argsort of the
    argsort), so counts are exact and shapes static.

    Args:
      shape: static `(B, N)`.
      ratio: float scalar or float `[B]`, the fraction to mask.
      seed: an int or a `keras.random.SeedGenerator`.
      candidates: optional bool `[B, N]`: only these positions may be masked (e.g. not
        padding), and `n` counts them; by default every position (`n = N`).

    Returns:
      bool `[B, N]`, True = masked; `clip(round(ratio * n), 1, n)` per example (rounding
      half to even, like Python's `round`), 0 where `n == 0`.
    """
    batch, length = shape
    noise = backend.uniform((batch, length), seed)
    if candidates is None:
        n = ops.full((batch,), length, "int32")
    else:
        candidates = ops.cast(candidates, "bool")
        noise = ops.where(candidates, noise, 2.0)  # non-candidates rank last
        n = ops.sum(ops.cast(candidates, "int32"), axis=-1)
    ratio = ops.broadcast_to(ops.cast(ratio, "float32"), (batch,))
    count = ops.cast(ops.round(ratio * ops.cast(n, "float32")), "int32")
    count = ops.minimum(ops.maximum(count, 1), n)  # [B]
    ranks = ops.argsort(ops.argsort(noise, axis=-1), axis=-1)  # [B, N], a permutation
    return ranks < count[:, None]


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
