"""Rebuilds a trained task from its workdir: operative config + newest valid checkpoint."""

from __future__ import annotations

import os

import tensorflow as tf

from mmt import config as mmt_config
from mmt.errors import UserError
from mmt.training.checkpoint import CheckpointManager, model_variables


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
      (task, step): the built task (`task.model` restored) and the checkpoint's step
      (0 without `restore`).
    """
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
    from mmt.exports import frozen_variables

    # Frozen parts (a T5 preset) were loaded from their own files by `build`.
    checkpoint = tf.train.Checkpoint(model=model_variables(trainer.task.model, exclude=frozen_variables(trainer.task)))
    manager = CheckpointManager(os.path.join(workdir, "checkpoints"), checkpoint)
    step = manager.restore_latest()
    if step is None:
        raise WorkdirError(f"no checkpoint in {workdir}/checkpoints: train first")
    return trainer.task, step
