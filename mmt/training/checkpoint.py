"""Checkpoints that survive preemption: atomic commits, validation, fallback (DESIGN.md §5).

Cloud TPU preempts at any moment, so a save can be cut off half way. The last good
checkpoint must never be damaged by that, and a half-written one must never be restored.

Layout: `{directory}/ckpt-{step:09d}/` holds the `tf.train.Checkpoint` files
(`ckpt.index`, `ckpt.data-*`, written with `Checkpoint.write`, which unlike `save` keeps
no numbering or `checkpoint` state file of its own) and `COMMITTED.json`, the commit
marker: step, format version, every file with its byte size, the caller's metadata and a
timestamp.

* Atomic: files go to `ckpt-{step}.tmp-{random}/`, the marker is written last, then the
  directory is renamed to its final name. A crash before the rename leaves only a
  `.tmp-` directory, which is never restored and is deleted after the next good save.
  Nothing old is deleted before the new checkpoint is committed.
* Why a marker and sizes: on a local disk the rename is atomic, but on GCS (`gs://`, all
  I/O goes through `tf.io.gfile`) a directory rename is a copy + delete of each object,
  in name order, and `COMMITTED.json` sorts before `ckpt.*`. A preemption during the
  rename leaves a final-named directory that may hold the marker but not every file, or a
  short one. So a checkpoint is valid only if its marker parses and every file it lists
  exists with exactly the listed size; a directory without a marker is uncommitted.
* Why sizes and no file checksums: TensorFlow's tensor bundle already stores a crc32c of
  every tensor (and of every index block) and checks it on `read`, which raises
  `DataLossError` on a flipped bit; `restore_latest` then falls back. A whole-file
  checksum would mean reading every GB back after writing it (from GCS: downloading it):
  measured for a 512 MB checkpoint on a local disk (read-back from the page cache):
  write 2.0 s, read-back + crc32c (`crcmod`, 350 MB/s) 3.2 s, read-back + zlib crc32
  1.0 s; from GCS the read-back is a download on top. Sizes cost one `stat` per file.
* Replacing a step that exists: the old directory is moved aside to `ckpt-{step}.old-*`
  before the new one takes its name; if the run dies between the two renames,
  `restore_latest` still finds the old one.
* `restore_latest` tries checkpoints newest first. A damaged one (fails validation or
  `read` raises) is logged as a WARNING naming its path and the reason, and the previous
  one is tried. If checkpoints exist but none can be read it raises `CheckpointError`
  rather than silently starting from scratch.
* One process writes a directory (under MultiWorkerMirroredStrategy the trainer gives
  non-chief workers scratch directories).

Restoring checks `assert_existing_objects_matched()`: every object that exists when
`restore_latest` runs got a value, so the caller must build the model and the optimizer
(slots) before restoring. Values for objects created later are restored when they are
created (measured: a Keras 3 Adam built after `read` gets its slots), but nothing checks
that they ever are. `assert_consumed()` is not used: it also rejects checkpoints holding
values the program does not use (e.g. an eval job restoring a model without its optimizer).

Test hook: if the environment variable `MMT_TEST_PAUSE_BEFORE_COMMIT` is set to a number
of seconds (`S`, or `S@N` to pause only when saving step N or later), `save` prints
`checkpoint files written for step N; pausing before commit` and sleeps that long before
writing the marker, so a test can SIGKILL the process there.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import secrets
import time
from typing import Any

import tensorflow as tf

from mmt.errors import UserError

_log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "COMMITTED.json"
PAUSE_ENV = "MMT_TEST_PAUSE_BEFORE_COMMIT"
_PREFIX = "ckpt"  # tf.train.Checkpoint file prefix inside a step directory
_NAME = re.compile(r"^ckpt-(\d{9,})(?:\.(tmp|old)-[0-9a-z]+)?$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is not committed, not intact, or cannot be read."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: str
    metadata: dict[str, Any]


def model_variables(model, exclude=()) -> tf.__internal__.tracking.AutoTrackable:
    """Every variable of a Keras 3 `model`, as one flat trackable for `tf.train.Checkpoint`.

    `exclude`: variables left out (a task's frozen parts, recorded by fingerprint).

    `tf.train.Checkpoint(model=model)` follows the TensorFlow object graph, which does
    not see into the lists Keras 3 tracks layers in (a `TransformerStack`'s blocks): a
    model-only checkpoint of ITIT held 15 of its 121 variables, and restoring it left
    the rest at their initial values without an error. Here each variable is an edge
    named after its Keras path without the model's own name (`encoder/block_0/...`),
    which stays the same across instances (`itit`, `itit_1`) and processes.
    """
    from mmt.tasks.exports import weight_names  # the naming exports share

    return named_variables(weight_names(model, exclude))


def named_variables(variables) -> tf.__internal__.tracking.AutoTrackable:
    """name -> variable as one flat trackable: each variable an edge named `name`.

    The trainer's iterate average is saved this way under the model's names
    (`averaged_model/<name>`), so `mmt.restore` can read it straight into a model.
    """
    trackable = tf.__internal__.tracking.AutoTrackable()
    for name, variable in variables.items():
        setattr(trackable, name, variable)
    return trackable


class CheckpointManager:
    """Saves `checkpoint` atomically into numbered directories and restores the newest valid one."""

    def __init__(self, directory: str, checkpoint: tf.train.Checkpoint, *, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = os.fspath(directory).rstrip("/")
        self.checkpoint = checkpoint
        self.keep = int(keep)

    def save(self, step: int, metadata: dict | None = None) -> str:
        """Writes and commits the checkpoint for `step`; returns its directory.

        Replaces a committed checkpoint of the same step. Afterwards deletes leftovers of
        interrupted saves and all but the newest `keep` checkpoints (never this one).
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        metadata = dict(metadata or {})
        json.dumps(metadata)  # not serialisable: fail before writing anything
        final = self._path(f"ckpt-{step:09d}")
        tmp = f"{final}.tmp-{secrets.token_hex(4)}"
        tf.io.gfile.makedirs(tmp)
        self.checkpoint.write(f"{tmp}/{_PREFIX}")
        names = [name.rstrip("/") for name in tf.io.gfile.listdir(tmp)]
        files = {name: tf.io.gfile.stat(f"{tmp}/{name}").length for name in names}
        pause, _, from_step = os.environ.get(PAUSE_ENV, "").partition("@")
        if pause and step >= int(from_step or 0):
            print(f"checkpoint files written for step {step}; pausing before commit", flush=True)
            time.sleep(float(pause))
        marker = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "files": files,
            "metadata": metadata,
            "timestamp": time.time(),
            "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        with tf.io.gfile.GFile(f"{tmp}/{MARKER}", "w") as f:
            f.write(json.dumps(marker, indent=1, sort_keys=True))
        if tf.io.gfile.exists(final):
            tf.io.gfile.rename(final, f"{final}.old-{secrets.token_hex(4)}")
        tf.io.gfile.rename(tmp, final)
        self._validate(final, step)  # on GCS the rename was a copy: check what arrived
        try:
            self._clean_up(keep_step=step)
        except tf.errors.OpError as e:  # the new checkpoint is committed; retry on the next save
            _log.warning("checkpoint %s saved, but cleaning up %s failed: %s", final, self.directory, e)
        return final

    def restore_latest(self) -> int | None:
        """Restores the newest valid checkpoint and returns its step; None if none is committed.

        Raises:
          CheckpointError: checkpoints are committed but none of them can be restored.
        """
        candidates = []
        for step, kind, name in self._entries():
            path = self._path(name)
            if kind != "tmp" and tf.io.gfile.exists(f"{path}/{MARKER}"):
                candidates.append((step, kind is None, path))
            elif kind is None:
                _log.info("ignoring uncommitted checkpoint directory %s (no %s)", path, MARKER)
        problems = []
        for step, _, path in sorted(candidates, reverse=True):
            try:
                self._validate(path, step)
                # read() raises on checksum mismatches and truncation (several error types).
                # Every object of ours must be in the file; values of the file that we do
                # not hold (the optimizer's, when a model alone is loaded) are expected.
                self.checkpoint.read(f"{path}/{_PREFIX}").assert_existing_objects_matched().expect_partial()
            except Exception as e:  # noqa: BLE001 - any failure means: try the previous one
                reason = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                _log.warning("checkpoint %s is damaged (%s); trying the previous one", path, reason)
                problems.append(f"  {path}: {reason}")
                continue
            if problems:
                _log.warning("restored step %d from %s after %d damaged checkpoint(s)", step, path, len(problems))
            return step
        if problems:
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored:\n" + "\n".join(problems))
        return None

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints (marker present and readable), oldest first.

        File sizes are checked by `restore_latest`, not here.
        """
        infos = []
        for step, kind, name in self._entries():
            if kind is not None:
                continue
            path = self._path(name)
            try:
                marker = self._read_marker(path, step)
            except CheckpointError:
                continue
            infos.append(CheckpointInfo(step, path, marker.get("metadata", {})))
        return infos

    def latest_step(self) -> int | None:
        """Step of the newest committed checkpoint, or None."""
        infos = self.checkpoints()
        return infos[-1].step if infos else None

    def _path(self, name: str) -> str:
        return f"{self.directory}/{name}"

    def _entries(self) -> list[tuple[int, str | None, str]]:
        """(step, None | 'tmp' | 'old', name) of every checkpoint-like directory, by step."""
        if not tf.io.gfile.isdir(self.directory):
            return []
        entries = []
        for name in tf.io.gfile.listdir(self.directory):
            match = _NAME.match(name.rstrip("/"))
            if match:
                entries.append((int(match.group(1)), match.group(2), name.rstrip("/")))
        return sorted(entries, key=lambda e: (e[0], e[1] or ""))

    def _read_marker(self, path: str, step: int) -> dict[str, Any]:
        try:
            with tf.io.gfile.GFile(f"{path}/{MARKER}", "r") as f:
                marker = json.loads(f.read())
        except (tf.errors.OpError, ValueError) as e:
            raise CheckpointError(f"{MARKER} missing or unreadable: {type(e).__name__}: {e}") from e
        if not isinstance(marker, dict) or marker.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{MARKER} has an unknown format (expected version {FORMAT_VERSION})")
        if marker.get("step") != step:
            raise CheckpointError(f"{MARKER} is for step {marker.get('step')}, directory for step {step}")
        return marker

    def _validate(self, path: str, step: int) -> dict[str, Any]:
        """Returns the marker if every file it lists exists with its recorded size."""
        marker = self._read_marker(path, step)
        files = marker.get("files") or {}
        if f"{_PREFIX}.index" not in files:
            raise CheckpointError(f"{MARKER} lists no {_PREFIX}.index")
        for name, size in sorted(files.items()):
            try:
                actual = tf.io.gfile.stat(f"{path}/{name}").length
            except tf.errors.NotFoundError:
                raise CheckpointError(f"{name} is missing") from None
            if actual != size:
                raise CheckpointError(f"{name} has {actual} bytes, {MARKER} says {size}")
        return marker

    def _clean_up(self, keep_step: int) -> None:
        """Deletes leftovers of interrupted saves and checkpoints beyond the newest `keep`.

        "Uncommitted" means the marker does not exist; an error while looking (GCS
        hiccup) raises instead of deleting.
        """
        entries = self._entries()
        committed = [
            s for s, kind, name in entries if kind is None and tf.io.gfile.exists(f"{self._path(name)}/{MARKER}")
        ]
        keep = set(committed[-self.keep :]) | {keep_step}
        for step, kind, name in entries:
            if kind is None and step in keep:  # keep holds only committed steps and this one
                continue
            tf.io.gfile.rmtree(self._path(name))
