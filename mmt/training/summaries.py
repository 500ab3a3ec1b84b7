"""Where a run's numbers go: TensorBoard, `metrics.jsonl`, and one console line.

TensorBoard event files live in `{workdir}/train`; `metrics.jsonl` holds one JSON object
per logged step, each step once: a resumed run first drops the lines after the step it
resumes from (steps it is about to replay), then appends; the console shows step, losses, steps/s and ETA -- as a
progress bar when stdout is a terminal, as plain lines otherwise (logs, CI).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import numpy as np
import tensorflow as tf


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def truncate_jsonl(path: str, last_step: int) -> int:
    """Drops the lines of `path` after `last_step` (and a torn last line); returns how many.

    A run killed after step 30 but resumed from the checkpoint at step 28 replays steps
    29 and 30; their old lines go, so `metrics.jsonl` holds every step once. The file is
    rewritten atomically (temporary file + rename).
    """
    if not tf.io.gfile.exists(path):
        return 0
    with tf.io.gfile.GFile(path, "r") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill mid-write
        if step <= last_step:
            kept.append(line)
    if len(kept) == len(lines):
        return 0
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return len(lines) - len(kept)


class MetricsWriter:
    """Writes scalars and images of one run.

    Args:
      workdir: the run's directory.
      total_steps: the run's last step (for the ETA and progress bar).
      start_step: the step the run (re)starts from.
      progress_bar: draw a tqdm bar; None decides by whether stdout is a terminal.
    """

    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, progress_bar: bool | None = None):
        tf.io.gfile.makedirs(workdir)
        self._writer = tf.summary.create_file_writer(os.path.join(workdir, "train"))
        path = os.path.join(workdir, "metrics.jsonl")
        truncate_jsonl(path, start_step)
        self._jsonl = tf.io.gfile.GFile(path, "a")
        self._total = total_steps
        self._last_time = time.perf_counter()
        self._last_step = start_step
        if progress_bar is None:
            progress_bar = sys.stdout.isatty()
        self._bar = None
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def rates(self, step: int) -> float:
        """Steps per second since the previous call (and resets the clock)."""
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        return rate

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """TensorBoard scalars plus one `metrics.jsonl` line."""
        values = {k: float(v) for k, v in values.items()}
        with self._writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)
        self._jsonl.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")
        self._jsonl.flush()

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        with self._writer.as_default(step=step):
            for name, batch in images.items():
                tf.summary.image(name, np.asarray(batch), max_outputs=len(batch))

    def histogram(self, step: int, name: str, values: np.ndarray) -> None:
        with self._writer.as_default(step=step):
            tf.summary.histogram(name, values)

    def console(self, step: int, values: Mapping[str, float], steps_per_s: float) -> None:
        """The one-line progress report."""
        shown = "  ".join(f"{k.split('/', 1)[-1]} {v:.4g}" for k, v in values.items())
        eta = _format_duration((self._total - step) / steps_per_s if steps_per_s > 0 else math.inf)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(shown, refresh=True)
        else:
            print(f"step {step}/{self._total}  {shown}  {steps_per_s:.2f} steps/s  ETA {eta}", flush=True)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def flush(self) -> None:
        self._writer.flush()
        self._jsonl.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._writer.close()
        self._jsonl.close()
