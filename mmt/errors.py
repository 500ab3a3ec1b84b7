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

import atexit
import os
import re
import sys
import threading
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


# TensorFlow's C++ start-up lines. Those logged before absl is initialised (CUDA stub
# probing) ignore TF_CPP_MIN_LOG_LEVEL, so they are filtered on file descriptor 2.
_NATIVE_LINE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.]+:\d+\] "  # absl INFO / WARNING lines
    r"|E\d{4} \d\d:\d\d:[\d.]+ +\d+ cuda_\w+\.cc:\d+\] "  # cuInit on a machine without a GPU
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.)"
)
_filter_started = False


def _filter_native_stderr() -> None:
    """Drops TensorFlow's native start-up lines from file descriptor 2 (once per process).

    fd 2 becomes a pipe; a daemon thread copies every other line to the real stderr
    (Python warnings, tracebacks, `error:` lines, child processes' output). At exit the
    pipe is closed and drained, so nothing written before is lost.
    """
    global _filter_started
    if _filter_started:
        return
    _filter_started = True
    try:
        sys.stderr.flush()
        real = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:
        return

    def pump():
        with os.fdopen(read_end, "rb") as pipe, os.fdopen(real, "wb", buffering=0) as out:
            for line in pipe:
                if not _NATIVE_LINE.match(line.decode("utf-8", "replace")):
                    out.write(line)

    thread = threading.Thread(target=pump, name="mmt-stderr-filter", daemon=True)
    thread.start()

    def drain():
        global _stop_filter
        if _stop_filter is None:
            return
        _stop_filter = None
        try:
            sys.stderr.flush()
            os.dup2(real, 2)  # closes the pipe's last write end held by this process
        except (OSError, ValueError):
            return
        thread.join(timeout=5)

    global _stop_filter
    _stop_filter = drain
    atexit.register(drain)


_stop_filter: Callable[[], None] | None = None


def stop_filtering_native_stderr() -> None:
    """Ends the filter of `quiet_native_logs` once TensorFlow has started (devices found).

    From then on file descriptor 2 is the real stderr again: a long run's native errors
    and a crash's last words (written just before an abort) cannot be lost in the pipe.
    """
    if _stop_filter is not None:
        _stop_filter()


def quiet_native_logs(verbose: bool, filter_stderr: bool = False) -> None:
    """Silences TensorFlow's C++ start-up lines unless verbose (call before importing TF).

    The oneDNN notice, CUDA probing and `cuInit` errors on a machine without a GPU and
    CPU-feature notices are INFO/WARNING lines of the C++ runtime; level 2 keeps its
    errors. A value the user set is left alone. Lines logged before absl initialises
    (the CUDA stub's) ignore that level: `filter_stderr` (command-line runs only, not
    an entry point called from Python) also filters them out of file descriptor 2.
    """
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if filter_stderr:
            _filter_native_stderr()


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs an entry point's `main(argv)` under the error convention; returns the exit status."""
    verbose = is_verbose(argv)
    # Only a command-line run (argv from sys.argv) owns the process's stderr.
    quiet_native_logs(verbose, filter_stderr=argv is None)
    try:
        return int(main(argv) or 0)
    except UserError as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR


def describe_binding(binding: str) -> str:
    """`binding` (e.g. "ITITTask.network['grid']"), with the macro behind it if any.

    "GRID (ITITTask.network['grid'])" when the parsed config binds it to `%GRID`. Library
    code calls this to name the binding at fault in a `UserError`; it never binds anything.
    """
    import gin  # read only: the parsed config, when there is one

    match = re.fullmatch(r"(?:(?P<scope>[\w.]+)/)?(?P<selector>[\w.]+)\.(?P<param>\w+)(?:\['(?P<key>\w+)'\])?",
                         binding)
    if not match:
        return binding
    try:
        configurable = gin.config._REGISTRY.get_match(match["selector"])  # pylint: disable=protected-access
    except (KeyError, ValueError):
        configurable = None
    if configurable is None:
        return binding
    params = gin.config._CONFIG.get((match["scope"] or "", configurable.selector), {})  # pylint: disable=protected-access
    value = params.get(match["param"])
    if match["key"] and isinstance(value, dict):
        value = value.get(match["key"])
    if isinstance(value, gin.config.ConfigurableReference) and value.configurable.wrapped is gin.config.macro:
        return f"{value.scoped_selector.split('/')[0]} ({binding})"
    return binding


__all__ = ["EXIT_USER_ERROR", "UserError", "describe_binding", "is_verbose", "one_line", "quiet_native_logs", "run_main",
           "stop_filtering_native_stderr"]
