"""Rebuilds a trained task from its workdir: operative config + newest valid checkpoint."""

from __future__ import annotations

import os

import tensorflow as tf

from mmt import config as mmt_config
from mmt.training.checkpoint import CheckpointManager


def load_task(workdir: str, gin_params=()):
    """The workdir's task with the newest valid checkpoint's weights.

    Args:
      workdir: a `python -m mmt.train` workdir (`operative_config.gin`, `checkpoints/`).
      gin_params: bindings applied on top of the recorded config (e.g. generation options).

    Returns:
      (task, step): the built task (`task.model` restored) and the checkpoint's step.
    """
    config = os.path.join(workdir, "operative_config.gin")
    if not tf.io.gfile.exists(config):
        raise FileNotFoundError(f"{config} not found: {workdir} is not a training workdir")
    mmt_config.parse([config], gin_params)
    from mmt import configurables

    trainer = configurables.Trainer()
    trainer.build()
    manager = CheckpointManager(os.path.join(workdir, "checkpoints"), tf.train.Checkpoint(model=trainer.task.model))
    step = manager.restore_latest()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first")
    return trainer.task, step
