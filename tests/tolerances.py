"""Tolerances of equivalence tests, derived from float32 arithmetic instead of picked.

Two computations that are equal in exact arithmetic (1 vs 2 replicas, eager vs XLA,
factored vs reference) differ in float32 only by rounding, and rounding is bounded:

* one float32 operation rounds with relative error at most u = 2^-24 (unit roundoff);
* a sum of N terms, in any order or grouping, is off by at most (N - 1) * u * sum|x_i|
  (Higham, *Accuracy and Stability of Numerical Algorithms*, §4.2). Two orders of
  the same sum therefore differ by at most 2 (N - 1) u sum|x_i|; measured against the
  tensor's largest magnitude (which is what `assert_close_to_scale` divides by),
  sum|x_i| / max|sum| is O(1) for the gradients here (no catastrophic cancellation
  across a whole tensor);
* a square doubles a relative error (Adam / Adafactor second moments: v ~ g^2), a
  square root halves it;
* errors of successive steps add (the second step starts from weights that already
  differ), so k steps multiply the bound by k.

The CPU's vector width changes the order in which Eigen / oneDNN / XLA accumulate (AVX2
sums 8 lanes, AVX-512 16), which is why a tolerance must cover every order of the sum,
not the order one machine happens to use.
"""

from __future__ import annotations

import numpy as np

U32 = 2.0**-24  # unit roundoff of float32 (round to nearest)


def reordered_sum_rtol(n_terms: int, *, squared: bool = False, steps: int = 1, chained_ops: int = 0) -> float:
    """Bound on the relative difference between two float32 evaluations of one result.

    Args:
      n_terms: the longest reduction whose order may differ between the two
        computations (e.g. the batch x positions a gradient sums over).
      squared: the compared value is (a moving average of) a square of the result
        (second-moment slots): relative errors double.
      steps: optimizer steps the difference accumulates over.
      chained_ops: element-wise operations that may round differently between the two
        (XLA's own exp / tanh / rsqrt are a few ulp from Eigen's): u each.

    Returns:
      2 (n_terms - 1) u (two independent orders), doubled for a square, plus
      `chained_ops` u, times `steps`.
    """
    bound = 2 * max(n_terms - 1, 1) * U32 * (2 if squared else 1) + chained_ops * U32
    return steps * bound


def assert_close_to_scale(got, want, rtol: float, what: str = "") -> None:
    """max|got - want| <= rtol * max|want|, tensor by tensor (a per-tensor scale, not
    per element: an element that is the sum of cancelling terms has no meaningful
    relative error of its own)."""
    assert len(got) == len(want), f"{what}: {len(got)} tensors vs {len(want)}"
    for i, (x, y) in enumerate(zip(got, want)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(np.abs(y).max(initial=0.0), 1e-30)
        error = np.abs(x - y).max(initial=0.0) / scale
        assert error <= rtol, f"{what}[{i}] shape {y.shape}: relative difference {error:.3g} > {rtol:.3g}"
