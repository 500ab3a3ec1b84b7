"""Rebuilds a trained task from its workdir: its export, or operative config + newest checkpoint.

TensorFlow is imported only on the checkpoint path: an export loads under any backend.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmt import config as mmt_config
from mmt.errors import UserError
from mmt.tasks import exports


class WorkdirError(UserError, FileNotFoundError):
    """The workdir is not a trained `mmt.train` workdir."""


def load_task(workdir: str, gin_params=(), restore: bool = True):
    """The workdir's task with the newest valid checkpoint's weights.

    Args:
      workdir: a `python -m mmt.train` workdir (`operative_config.gin`, `checkpoints/`).
      gin_params: bindings applied on top of the recorded config (e.g. generation options).
      restore: False keeps the freshly initialised weights (the run's seed): the
        untrained baseline of an evaluation.

    Returns:
      (task, step): the built task (`task.model` restored; the iterate average's
      weights when the run used `Trainer.iterate_averaging`) and the checkpoint's step
      (0 without `restore`).
    """
    import tensorflow as tf

    from mmt.training.checkpoint import CheckpointManager, model_variables

    config = os.path.join(workdir, "operative_config.gin")
    if not tf.io.gfile.exists(config):
        raise WorkdirError(f"{config} not found: {workdir} is not a training workdir (give the --workdir "
                           "of a `python -m mmt.train` run)")
    mmt_config.parse([config], gin_params)
    from mmt import configurables

    trainer = configurables.Trainer()
    trainer.build()
    if not restore:
        return trainer.task, 0
    # Frozen parts (a T5 preset) were loaded from their own files by `build`.
    frozen = exports.frozen_variables(trainer.task)
    if trainer.iterate_averaging:
        # The run averaged its iterates: the trainable weights come from the average
        # (`averaged_model/<name>`, the model's own names), the others from `model/`.
        from mmt.training.checkpoint import named_variables
        from mmt.training.trainer import averaged_sources

        averaged = averaged_sources(trainer.task)
        checkpoint = tf.train.Checkpoint(
            model=model_variables(trainer.task.model, exclude=[*frozen, *averaged.values()]),
            averaged_model=named_variables(averaged))
    else:
        checkpoint = tf.train.Checkpoint(model=model_variables(trainer.task.model, exclude=frozen))
    manager = CheckpointManager(os.path.join(workdir, "checkpoints"), checkpoint)
    step = manager.restore_latest()
    if step is None:
        raise WorkdirError(f"no checkpoint in {workdir}/checkpoints: train first")
    return trainer.task, step


def load_trained(workdir: str | os.PathLike):
    """(task, step) of a training workdir: from its export when there is one (any backend),
    else from its newest checkpoint (TensorFlow: a run stopped before completion).

    `workdir` may also be an export directory itself.
    """
    for candidate in (Path(workdir), Path(workdir) / "export"):
        if exports.is_export(candidate):
            return exports.load_task(candidate)
    return load_task(os.fspath(workdir))
