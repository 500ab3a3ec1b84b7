"""One error convention for every entry point (`mmt.train`, `beam_pipelines.tokenize`, ...).

An error the user can fix -- a bad flag, path, gin binding, data set, checkpoint --
ends the program with one line on stderr, `error: <what is wrong, where, what to do>`,
and exit status 2. A traceback is printed only with `--verbose`, or for an error that
is not a `UserError` (a bug in mmt itself, which the traceback helps to report).

Library code raises `UserError` (or a subclass) where the cause is the user's input;
entry points wrap their `main` with `run_main`.

This module imports nothing heavy, so entry points can use it before TensorFlow loads.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Sequence

EXIT_USER_ERROR = 2
VERBOSE_FLAG = "--verbose"


class UserError(Exception):
    """An error the user can fix; its message names the file / binding / record at fault."""


def one_line(message: object) -> str:
    """`message` folded onto one line (multi-line details joined with ' | ')."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return " | ".join(lines) or type(message).__name__


def is_verbose(argv: Sequence[str] | None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return any(a == VERBOSE_FLAG or a.startswith(VERBOSE_FLAG + "=") and a.split("=", 1)[1] not in ("0", "false")
               for a in argv)


def quiet_native_logs(verbose: bool) -> None:
    """Silences TensorFlow's C++ start-up lines unless verbose (call before importing TF).

    The oneDNN notice, CUDA probing and `cuInit` errors on a machine without a GPU and
    CPU-feature notices are INFO/WARNING lines of the C++ runtime; level 2 keeps its
    errors. A value the user set is left alone.
    """
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs an entry point's `main(argv)` under the error convention; returns the exit status."""
    verbose = is_verbose(argv)
    quiet_native_logs(verbose)
    try:
        return int(main(argv) or 0)
    except UserError as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR


__all__ = ["EXIT_USER_ERROR", "UserError", "is_verbose", "one_line", "quiet_native_logs", "run_main"]
