"""The output directory: refusing a completed one, staging an `--overwrite`, swapping it in.

A run that may not destroy anything writes straight into `--output_dir` (after
removing the leftovers of a crashed run). An `--overwrite` of a completed directory
must never lose the previous output before the new one exists (issue 17 item 3), so it
writes the whole new run into a sibling staging directory, `OUTPUT.staging-RUNID`, and
only once that holds `COMPLETED` does `swap_in` move it into place.

Neither the local filesystem (for a non-empty directory with other files in it) nor
GCS (which has no directories at all) can replace a directory atomically, so the swap
goes file by file, in an order that keeps every reader safe and every state
recoverable:

1. the staging directory is complete: its `COMPLETED` was written last;
2. `OUTPUT/COMPLETED`, then `OUTPUT/manifest.json` and `OUTPUT/stats.json` are deleted:
   from here on `beam_pipelines.verify` (which needs `COMPLETED`) and training (which
   needs the manifest) refuse the directory instead of reading a mix of two runs;
3. the new run's shards and dead-letter files (listed in the staging `stats.json`) are
   renamed into `OUTPUT`, replacing same-named old files;
4. the old run's other files (shards of another shard count, dead letters,
   temporaries) are deleted; files that are not a run's output are left alone;
5. `stats.json`, `manifest.json`, and last `COMPLETED` are copied in;
6. the staging directory is deleted.

A run killed before step 2 leaves the previous output untouched (the next run deletes
the stale staging directory). A run killed in steps 2-5 leaves `OUTPUT` without
`COMPLETED` beside a complete staging directory: the next tokenize run on the same
`--output_dir` finishes the swap before anything else (`finish_interrupted_swap`;
step 3 skips files already moved, so repeating it is safe). One run per output
directory at a time: a second run would take the first one's staging directory for a
leftover.

All file access is Beam's `FileSystems` (local paths and `gs://` alike); on GCS a
rename is a copy and a delete per object, which is why the markers go first and last.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import uuid

from apache_beam.io.filesystems import FileSystems

from mmt.errors import UserError

_log = logging.getLogger(__name__)

COMPLETED = "COMPLETED"
MANIFEST = "manifest.json"
STATS = "stats.json"
DEAD_LETTER_DIR = "dead_letter"
#: What a run writes, removed before a new run writes anything (COMPLETED first).
OUTPUT_PATTERNS = (COMPLETED, MANIFEST, STATS, "*-?????-of-?????.tfrecord", "*.tmp-*", f"{DEAD_LETTER_DIR}/*")
_STAGING = ".staging-"
#: Test hook: seconds to sleep in `FinalizeFn` once the shards are written, after
#: printing a line naming the directory (a test SIGKILLs the run there).
PAUSE_ENV = "MMT_TEST_PAUSE_BEFORE_FINALIZE"


class OutputExistsError(UserError):
    """The output directory holds a completed run and --overwrite was not given."""


class OutputNotWritableError(UserError):
    """The output directory (or its staging sibling) cannot be created or written."""


def is_complete(directory: str) -> bool:
    return FileSystems.exists(FileSystems.join(directory, COMPLETED))


def refuse_completed(output_dir: str, overwrite: bool) -> None:
    """Raises `OutputExistsError` for a completed `output_dir` unless `overwrite`."""
    if not overwrite and is_complete(output_dir):
        raise OutputExistsError(f"--output_dir {output_dir} already holds a completed run ({COMPLETED} exists); "
                                "pass --overwrite to replace it, or choose another --output_dir")


def _matched(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _delete_tree(directory: str) -> None:
    """Deletes a directory and everything in it (a prefix of objects on GCS)."""
    if "://" in directory:
        paths = _matched(FileSystems.join(directory, "**"))
        if paths:
            FileSystems.delete(paths)
    elif os.path.isdir(directory):
        FileSystems.delete([directory])


def remove_previous_run(output_dir: str) -> list[str]:
    """Removes a run's files from `output_dir` (COMPLETED first); returns their paths."""
    removed = []
    for pattern in OUTPUT_PATTERNS:  # COMPLETED first: a crash mid-cleanup leaves no marker
        paths = _matched(FileSystems.join(output_dir, pattern))
        if paths:
            FileSystems.delete(paths)
            removed += paths
    return removed


def check_writable(directory: str) -> None:
    """Creates `directory` if needed and writes a probe file into it; `OutputNotWritableError` if not."""
    probe = FileSystems.join(directory, f".write-probe-{uuid.uuid4().hex}")
    try:
        if "://" not in directory:
            os.makedirs(directory, exist_ok=True)
        with FileSystems.create(probe) as handle:
            handle.write(b"")
        FileSystems.delete([probe])
    except Exception as e:  # OSError locally; BeamIOError / backend errors remotely
        raise OutputNotWritableError(f"cannot write to {directory}: {type(e).__name__}: {e}; choose an "
                                     "--output_dir you may write to") from e


def staging_dirs(output_dir: str) -> list[str]:
    """The staging siblings of `output_dir` (of this run, of killed runs, of an interrupted swap)."""
    prefix = output_dir.rstrip("/") + _STAGING
    if "://" not in prefix:
        # Beam's local match lists files only; an empty staging directory counts too.
        return sorted(glob.glob(glob.escape(prefix) + "*"))
    # GCS has objects only: list those under the prefix and cut their directory names.
    found = FileSystems.match([prefix + "**"])[0].metadata_list
    return sorted({prefix + m.path[len(prefix):].split("/", 1)[0] for m in found if m.path.startswith(prefix)})


def new_staging_dir(output_dir: str) -> str:
    return f"{output_dir.rstrip('/')}{_STAGING}{uuid.uuid4().hex[:12]}"


def discard_staging(staging: str) -> None:
    """Deletes the staging directory of a failed run; a failure here is logged, not raised.

    Called while the run's own error propagates: that error is the one to report, and
    a staging directory left behind is removed by the next run anyway.
    """
    try:
        _delete_tree(staging)
    except Exception as e:  # noqa: BLE001 -- see the docstring
        _log.warning("could not remove %s: %s", staging, e)


def _new_run_files(staging: str) -> list[str]:
    """The data files of the complete run in `staging`, relative to it (from its stats.json)."""
    with FileSystems.open(FileSystems.join(staging, STATS)) as handle:
        stats = json.loads(handle.read())
    return list(stats["shards"]) + list(stats["dead_letter_files"])


def _copy_file(source: str, target: str) -> None:
    with FileSystems.open(source, compression_type="uncompressed") as src:
        data = src.read()
    temporary = f"{target}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(temporary, compression_type="uncompressed") as out:
        out.write(data)
    FileSystems.rename([temporary], [target])


def swap_in(staging: str, output_dir: str) -> None:
    """Replaces the run in `output_dir` by the complete run in `staging` (module docstring, steps 2-6)."""
    if not is_complete(staging):
        raise RuntimeError(f"refusing to swap in {staging}: it has no {COMPLETED}")
    names = _new_run_files(staging)
    for marker in (COMPLETED, MANIFEST, STATS):  # 2. hide the old run from every reader
        if FileSystems.exists(FileSystems.join(output_dir, marker)):
            FileSystems.delete([FileSystems.join(output_dir, marker)])
    if "://" not in output_dir:
        os.makedirs(FileSystems.join(output_dir, DEAD_LETTER_DIR), exist_ok=True)
    for name in names:  # 3. move the new data in; a file moved by an interrupted swap is not in staging any more
        if FileSystems.exists(FileSystems.join(staging, name)):
            FileSystems.rename([FileSystems.join(staging, name)], [FileSystems.join(output_dir, name)])
    keep = {FileSystems.join(output_dir, name) for name in names}
    stale = [path for pattern in OUTPUT_PATTERNS
             for path in _matched(FileSystems.join(output_dir, pattern)) if path not in keep]
    if stale:  # 4. the old run's files the new one does not replace
        FileSystems.delete(stale)
    for marker in (STATS, MANIFEST, COMPLETED):  # 5. COMPLETED last
        _copy_file(FileSystems.join(staging, marker), FileSystems.join(output_dir, marker))
    _delete_tree(staging)  # 6.


def finish_interrupted_swap(output_dir: str) -> str | None:
    """Completes a swap that a killed run left half done; removes stale staging directories.

    Returns the staging directory swapped in, or None. Only a directory without
    `COMPLETED` beside a complete staging directory is an interrupted swap (a swap starts
    by deleting `COMPLETED`, and only once the staging directory is complete).
    """
    stagings = staging_dirs(output_dir)
    # At most one is complete: every run finishes an interrupted swap before staging its own.
    finished = None
    complete = [s for s in stagings if is_complete(s)]
    if complete and not is_complete(output_dir):
        finished = complete[-1]
        _log.warning("finishing the interrupted --overwrite of %s from %s", output_dir, finished)
        swap_in(finished, output_dir)
    for staging in stagings:
        if staging != finished:
            _log.warning("removing %s, left by a run that did not finish", staging)
            _delete_tree(staging)
    return finished
