"""Shared test setup: two logical CPU devices (for 1-vs-2-replica tests) and tiny data."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny_task.py, importable from gin files

from mmt.training import distribute  # noqa: E402

# Before TensorFlow initialises its devices: the default strategy still runs on CPU:0,
# while MirroredStrategy tests get a second logical device.
distribute.split_cpu(2)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A shapes data directory (32x32, small splits, text vocabulary <= 128 pieces).

    Returns the quickstart summary: `data_dir`, `vocabulary`, `records`, ...
    """
    from mmt import quickstart
    from mmt.data import shapes

    workdir = tmp_path_factory.mktemp("tiny_data")
    return quickstart.run(
        str(workdir),
        shapes_config=shapes.ShapesConfig(resolution=32, seed=11),
        examples_per_split=(("paired", 64), ("image_only", 32), ("text_only", 128), ("eval", 16)),
        vocab_size=128,
        num_shards=2,
        grid_samples=4,
        show_progress=False,
    )
