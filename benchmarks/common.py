"""What every benchmark prints: the command that ran it, and one closing JSON line.

The JSON line carries the benchmark's name, its command, the machine (processor, cores,
load average at the end) and the machine's fp32 matmul ceiling measured in the same
run, so figures from different machines can be collected and compared as ratios
without parsing tables:

    python benchmarks/X.py ... | tail -n 1 | python -m json.tool
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np


def command(argv: Sequence[str] | None = None) -> str:
    """The command line that ran this benchmark (`argv`: the arguments main() was given)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *args])


def print_command(argv: Sequence[str] | None = None) -> str:
    line = command(argv)
    print(f"command: {line}", flush=True)
    return line


def matmul_ceiling_gflops(n: int = 1024, repeats: int = 10) -> float:
    """The best fp32 GFLOP/s of an `n x n` NumPy matmul over `repeats` tries (BLAS, all cores)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a  # warm-up: threads, pages
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def machine() -> dict[str, Any]:
    """Processor, cores, load average and the same-run matmul ceiling."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average_1min": None if load is None else round(load, 2),
            "matmul_fp32_gflops": round(matmul_ceiling_gflops(), 1)}


def _finite(value):
    """NaN / infinity -> None, so that strict JSON parsers (jq) read the line too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def report(benchmark: str, figures: Mapping[str, Any], argv: Sequence[str] | None = None) -> None:
    """Prints the closing JSON line: {benchmark, command, machine, figures}."""
    line = {"benchmark": benchmark, "command": command(argv), "machine": machine(), "figures": dict(figures)}
    print(json.dumps(_finite(line), sort_keys=True, default=str, allow_nan=False), flush=True)
