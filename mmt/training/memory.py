"""Per-replica memory of a training run, for `--dry_run` (DESIGN.md §5; issue: paper-scale ITIT).

Under pure data parallelism every replica holds the whole model, so what must fit one
accelerator core is:

* parameters: trainable (their dtype), frozen parts (their own dtype: a bf16 T5);
* gradients: one per trainable parameter, float32 (the trainer's all-reduce dtype);
* optimizer slots, with their real shapes (the trainer has built the optimizers:
  Adafactor's factored second moments are a row and a column per matrix);
* activations kept for the backward pass at the per-replica batch.

Activations are estimated per transformer stack a step runs (the task lists them in
`activation_passes`) with the count of Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", §4.1) for a layer without recomputation:
`s * b * h * (34 + 5 * a * s / h)` bytes in 16-bit precision (s tokens, b examples, h
width, a heads), i.e. 17 + 2.5 a s / h values per token and channel; they assume a
4h MLP, which mmt's stacks use. Passes under `stop_gradient` or in inference keep
nothing for the backward pass and are not counted. An estimate, not a measurement:
XLA fuses and rematerialises, and the attention's `s^2` term dominates at long inputs.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import numpy as np

from mmt.tasks.base import StackPass

GIB = 2**30
#: Accelerator cores to compare against: HBM per core.
CORES = {"TPU v4 core (32 GiB HBM)": 32 * GIB, "TPU v5e core (16 GiB HBM)": 16 * GIB}


def activation_bytes(p: StackPass, bytes_per_value: int) -> int:
    """Activations one pass keeps for its backward pass (Korthikanti et al. 2022, eq. 1)."""
    s, b, h, a = p.tokens, p.batch, p.width, p.heads
    values_per_layer = s * b * h * (17 + 2.5 * a * s / h)
    return int(p.depth * values_per_layer * bytes_per_value)


def itemsize(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else np.dtype(dtype).itemsize


def _bytes(variables) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for v in variables:
        dtype = str(getattr(v.dtype, "name", v.dtype))
        totals[dtype] += int(np.prod(v.shape)) * itemsize(dtype)
    return dict(totals)


def _fmt(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def report(task, optimizers: Mapping[str, object], batch_sizes: Mapping[str, int], replicas: int,
           precision: str) -> str:
    """The per-replica memory table `--dry_run` prints.

    Args:
      task: the built task (`frozen_parts`, optional `activation_passes`).
      optimizers: group name -> built Keras optimizer.
      batch_sizes: stream -> global batch size.
      replicas: replicas the global batch is split over.
      precision: the trainer's precision (activations in 16 bits unless float32).
    """
    frozen_parts = task.frozen_parts()
    frozen_ids = {id(v) for part in frozen_parts.values() for v in part.weights}
    trainable = list(task.model.trainable_variables)
    other = [v for v in task.model.non_trainable_variables if id(v) not in frozen_ids]
    lines = [f"per-replica memory ({replicas} replica(s), precision {precision}):"]
    rows: list[tuple[str, int]] = []

    def add(label, by_dtype):
        for dtype, size in sorted(by_dtype.items()):
            rows.append((f"{label} [{dtype}]", size))

    add("trainable parameters", _bytes(trainable))
    add("gradients", {"float32": sum(int(np.prod(v.shape)) * 4 for v in trainable)})
    for name, part in sorted(frozen_parts.items()):
        count = part.parameter_count() if hasattr(part, "parameter_count") else sum(
            int(np.prod(v.shape)) for v in part.weights)
        dtype = str(part.compute_dtype if hasattr(part, "compute_dtype") else "float32")
        rows.append((f"frozen {name}: {count:,} parameters [{dtype}]", count * itemsize(dtype)))
    if other:
        add("other non-trainable state", _bytes(other))
    for group, optimizer in sorted(optimizers.items()):
        slots = [v for v in optimizer.variables if len(v.shape)]  # scalars: iteration counters
        factored = sum(1 for v in slots if len(v.shape) == 1)
        add(f"optimizer slots '{group}' ({type(optimizer).__name__}: {len(slots)} tensors, "
            f"{factored} of them vectors)", _bytes(slots))
    passes = list(getattr(task, "activation_passes", lambda b: [])(
        {k: max(1, v // max(replicas, 1)) for k, v in batch_sizes.items()}))
    per_value = 4 if precision == "float32" else 2
    for p in passes:
        rows.append((f"activations {p.name} (b {p.batch}, s {p.tokens}, {p.depth} x {p.width})",
                     activation_bytes(p, per_value)))
    width = max(len(r[0]) for r in rows)
    lines += [f"  {label:<{width}}  {_fmt(size)}" for label, size in rows]
    total = sum(size for _, size in rows)
    lines.append(f"  {'total':<{width}}  {_fmt(total)}")
    if not passes:
        lines.append("  (no activation estimate: the task lists no activation_passes)")
    for core, capacity in CORES.items():
        verdict = "fits" if total <= capacity else f"does NOT fit ({_fmt(total - capacity).strip()} over)"
        lines.append(f"  one {core}: {verdict}")
    return "\n".join(lines)


__all__ = ["CORES", "StackPass", "activation_bytes", "itemsize", "report"]
