"""Trained weights that any Keras backend loads: `{workdir}/export/` (no `Trainer`, no TensorFlow).

Checkpoints are `tf.train.Checkpoint` files that only a whole `Trainer` restores, so a
model trained under TensorFlow could not be used under `KERAS_BACKEND=jax`. When a run
completes, a model task writes an export:

    export/
      task.json          the task's class and constructor arguments, the step, the
                         frozen parts (source and fingerprint), the weights' names
      model.weights.h5   one dataset per weight, named as in checkpoints
      assets/            the image tokenizer and text vocabulary the task was given,
                         copied, so the export moves as one directory

`load_task(directory)` rebuilds the task from `task.json`, builds its model and assigns
every weight by name (shapes checked), then checks the frozen parts' fingerprints.
Frozen parts (a T5 preset) are not copied: they are loaded from their recorded source,
as in training. Writing is atomic: the new export is assembled beside the old one and
replaces it only when complete.

The weights file is plain HDF5 keyed by the checkpoint names (`encoder.block_0...`)
rather than Keras's `save_weights` layout: that layout follows the layer tree and
cannot leave a frozen sub-layer out.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from keras import ops

from mmt.errors import UserError

FORMAT_VERSION = 1
TASK_FILE = "task.json"
WEIGHTS_FILE = "model.weights.h5"
ASSETS = "assets"
#: Task arguments that name files the export copies into `assets/`.
ASSET_ARGUMENTS = ("image_tokenizer", "text_vocab")


class ExportError(UserError):
    """An export directory is missing, incomplete, or does not match its model."""


def weight_names(model, exclude=()) -> dict[str, Any]:
    """name -> variable for every weight of `model` but `exclude`, named as in checkpoints.

    The name is the variable's Keras path without the model's own name, with dots
    (`encoder.block_0.attention.qkv_kernel`): the same across instances and processes.
    """
    excluded = {id(v) for v in exclude}
    names: dict[str, Any] = {}
    for variable in model.weights:
        if id(variable) in excluded:
            continue
        parts = variable.path.split("/")
        name = ".".join(parts[1:] if len(parts) > 1 and parts[0] == model.name else parts)
        if name in names:
            raise ValueError(f"two variables of {model.name!r} share the name {name!r}; give their layers "
                             "distinct names")
        names[name] = variable
    return names


def frozen_variables(task) -> list:
    """The variables of the task's frozen parts (never written into checkpoints or exports)."""
    return [v for part in task.frozen_parts().values() for v in part.weights]


def frozen_record(task) -> dict[str, dict[str, str | None]]:
    """name -> {source, fingerprint} of each frozen part."""
    return {name: {"source": str(part.source), "fingerprint": part.fingerprint}
            for name, part in sorted(task.frozen_parts().items())}


def save_task(task, directory: str | os.PathLike, step: int | None = None) -> Path:
    """Writes `task`'s export into `directory` (replacing an old one only once complete)."""
    import h5py

    arguments = getattr(task, "arguments", None)
    if arguments is None:
        raise TypeError(f"{type(task).__name__} records no constructor arguments (Task.arguments); cannot export")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        arguments = json.loads(json.dumps(dict(arguments)))  # plain JSON (tuples as lists); fails early if not
        for key in ASSET_ARGUMENTS:
            source = arguments.get(key)
            if source and os.path.exists(source):
                target = staging / ASSETS / key / Path(source).name
                if os.path.isdir(source):
                    shutil.copytree(source, target)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, target)
                arguments[key] = target.relative_to(staging).as_posix()
        weights = weight_names(task.model, exclude=frozen_variables(task))
        with h5py.File(staging / WEIGHTS_FILE, "w") as f:
            for name, variable in weights.items():
                value = np.asarray(ops.convert_to_numpy(ops.cast(variable, "float32")
                                                        if variable.dtype == "bfloat16" else variable))
                f.create_dataset(name, data=value)
        cls = type(task)
        cls = next(c for c in cls.__mro__ if c.__module__.startswith("mmt."))  # gin's wrapper subclasses
        document = {"format_version": FORMAT_VERSION, "task": f"{cls.__module__}.{cls.__qualname__}",
                    "arguments": arguments, "step": step, "frozen": frozen_record(task),
                    "weights": sorted(weights), "assets": [k for k in ASSET_ARGUMENTS if
                                                           str(arguments.get(k) or "").startswith(ASSETS + "/")]}
        (staging / TASK_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(old)
            staging.rename(directory)
            shutil.rmtree(old)
        else:
            staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


def is_export(directory: str | os.PathLike) -> bool:
    return (Path(directory) / TASK_FILE).is_file()


def read_document(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / TASK_FILE
    if not path.is_file():
        raise ExportError(f"{path} not found: {directory} is not an mmt export (a completed `mmt.train` run "
                          "writes {workdir}/export/)")
    try:
        document = json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path} is not valid JSON ({e}); export the run again") from None
    if document.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: unknown export format {document.get('format_version')!r} "
                          f"(this mmt reads {FORMAT_VERSION})")
    return document


def load_task(directory: str | os.PathLike, overrides: Mapping[str, Any] | None = None):
    """The exported task, built and holding the exported weights: (task, step).

    Args:
      directory: an export directory (`{workdir}/export`).
      overrides: constructor arguments replacing the recorded ones (e.g. `generation`).
    """
    import h5py

    directory = Path(directory)
    document = read_document(directory)
    module_name, _, class_name = document["task"].rpartition(".")
    if not module_name.startswith("mmt."):
        raise ExportError(f"{directory / TASK_FILE} names task {document['task']!r}, not an mmt task")
    cls = getattr(importlib.import_module(module_name), class_name)
    arguments = dict(document["arguments"])
    for key in document.get("assets", ()):
        arguments[key] = str(directory / arguments[key])
    arguments.update(overrides or {})
    task = cls(**arguments)
    task.build()
    weights = weight_names(task.model, exclude=frozen_variables(task))
    path = directory / WEIGHTS_FILE
    with h5py.File(path, "r") as f:
        missing = sorted(set(weights) - set(f))
        if missing:
            raise ExportError(f"{path} lacks {len(missing)} weights of {class_name}, e.g. {missing[0]!r}; "
                              "export the run again with this mmt")
        for name, variable in weights.items():
            value = f[name][()]
            if tuple(value.shape) != tuple(variable.shape):
                raise ExportError(f"{path}: {name} has shape {tuple(value.shape)}, the model built from "
                                  f"{TASK_FILE} has {tuple(variable.shape)}")
            variable.assign(value)
    for name, record in frozen_record(task).items():
        wanted = document.get("frozen", {}).get(name, {})
        if wanted.get("fingerprint") != record["fingerprint"]:
            raise ExportError(f"{directory}: frozen part {name!r} was exported with {wanted or 'nothing'}, "
                              f"this machine loads {record}; point it at the same files")
    return task, document.get("step")


__all__ = ["ExportError", "frozen_record", "frozen_variables", "is_export", "load_task", "read_document",
           "save_task", "weight_names"]
