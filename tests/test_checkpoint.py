"""CheckpointManager: round trip (variables, optimizer slots, input position), pruning,
uncommitted leftovers, fallback from damaged checkpoints, and a save killed before commit."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmt.training.checkpoint import MARKER, CheckpointError, CheckpointManager

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class State:
    """Two variables, a built and stepped Adam (so slots exist) and a shuffled tf.data iterator."""

    def __init__(self, scale: float = 1.0, steps: int = 1, consumed: int = 3):
        self.v = tf.Variable([1.0, -2.0, 3.0])
        self.w = tf.Variable(4.0)
        self.optimizer = keras.optimizers.Adam(0.1)
        self.optimizer.build([self.v, self.w])  # built before restoring: the documented requirement
        for _ in range(steps):
            grads = [tf.constant([0.5, 0.25, -1.0]) * scale, tf.constant(scale)]
            self.optimizer.apply_gradients(zip(grads, [self.v, self.w]))
        self.iterator = iter(tf.data.Dataset.range(100).shuffle(10, seed=1))
        for _ in range(consumed):
            next(self.iterator)
        self.checkpoint = tf.train.Checkpoint(
            v=self.v, w=self.w, optimizer=self.optimizer, iterator=self.iterator
        )

    def values(self) -> list[np.ndarray]:
        return [x.numpy() for x in (self.v, self.w, *self.optimizer.variables)]


def dirs(directory) -> list[str]:
    return sorted(os.listdir(directory))


def data_file(path) -> str:
    (name,) = [n for n in os.listdir(path) if n.startswith("ckpt.data-")]
    return os.path.join(path, name)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_round_trip_restores_variables_slots_and_input_position(tmp_path):
    saved = State(scale=1.0, steps=2, consumed=5)
    manager = CheckpointManager(str(tmp_path), saved.checkpoint)
    assert manager.restore_latest() is None and manager.latest_step() is None
    path = manager.save(7, metadata={"skipped_total": 2})
    expected, expected_next = saved.values(), int(next(saved.iterator))
    assert path == str(tmp_path / "ckpt-000000007") and dirs(tmp_path) == ["ckpt-000000007"]
    marker = json.loads((tmp_path / "ckpt-000000007" / MARKER).read_text())
    assert (marker["step"], marker["format_version"], marker["metadata"]) == (7, 1, {"skipped_total": 2})
    sizes = {n: os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n != MARKER}
    assert marker["files"] == sizes and "ckpt.index" in sizes
    assert [(i.step, i.path, i.metadata) for i in manager.checkpoints()] == [(7, path, {"skipped_total": 2})]

    fresh = State(scale=-3.0, steps=1, consumed=0)  # other values everywhere, slots included
    assert not np.array_equal(fresh.values()[4], expected[4])  # v's first Adam slot
    assert CheckpointManager(str(tmp_path), fresh.checkpoint).restore_latest() == 7
    assert_same(fresh.values(), expected)
    assert int(fresh.optimizer.iterations.numpy()) == 2
    assert int(next(fresh.iterator)) == expected_next


def test_keep_prunes_oldest_and_same_step_is_replaced(tmp_path):
    state = State()
    manager = CheckpointManager(str(tmp_path), state.checkpoint, keep=2)
    for step in (1, 2, 3):
        state.w.assign(float(step))
        manager.save(step, metadata={"n": step})
    assert dirs(tmp_path) == ["ckpt-000000002", "ckpt-000000003"]
    assert [i.step for i in manager.checkpoints()] == [2, 3] and manager.latest_step() == 3
    state.w.assign(33.0)
    manager.save(3, metadata={"n": "again"})
    assert dirs(tmp_path) == ["ckpt-000000002", "ckpt-000000003"]  # no .old- / .tmp- left behind
    assert manager.checkpoints()[-1].metadata == {"n": "again"}
    state.w.assign(0.0)
    assert manager.restore_latest() == 3 and state.w.numpy() == 33.0


def test_uncommitted_directories_are_ignored_and_cleaned(tmp_path):
    state = State()
    manager = CheckpointManager(str(tmp_path), state.checkpoint)
    manager.save(5)
    saved_w = state.w.numpy()
    state.w.assign(-1.0)
    # A crash after writing files but before the marker (e.g. a GCS rename cut short), and
    # a crash inside a temporary directory.
    state.checkpoint.write(str(tmp_path / "ckpt-000000007" / "ckpt"))
    state.checkpoint.write(str(tmp_path / "ckpt-000000008.tmp-abc" / "ckpt"))
    assert manager.latest_step() == 5 and [i.step for i in manager.checkpoints()] == [5]
    assert manager.restore_latest() == 5 and state.w.numpy() == saved_w
    manager.save(9)
    assert dirs(tmp_path) == ["ckpt-000000005", "ckpt-000000009"]


def test_checkpoint_moved_aside_during_replacement_is_still_found(tmp_path):
    state = State()
    manager = CheckpointManager(str(tmp_path), state.checkpoint)
    manager.save(3)
    saved_w = state.w.numpy()
    # Killed between moving the old step-3 directory aside and renaming the new one in.
    os.rename(tmp_path / "ckpt-000000003", tmp_path / "ckpt-000000003.old-deadbeef")
    state.w.assign(0.0)
    assert manager.restore_latest() == 3 and state.w.numpy() == saved_w


def test_unserialisable_metadata_fails_before_writing(tmp_path):
    manager = CheckpointManager(str(tmp_path), State().checkpoint)
    with pytest.raises(TypeError):
        manager.save(1, metadata={"bad": object()})
    assert not tmp_path.exists() or dirs(tmp_path) == []


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_last_byte(path):
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x01
    open(path, "wb").write(bytes(data))


def drop_marker_listed_file(path):
    os.remove(path)


@pytest.mark.parametrize(
    "damage, reason",
    [(truncate, "bytes"), (flip_last_byte, "Checksum does not match"), (drop_marker_listed_file, "missing")],
)
def test_damaged_newest_falls_back_to_previous(tmp_path, caplog, damage, reason):
    state = State()
    manager = CheckpointManager(str(tmp_path), state.checkpoint)
    manager.save(1)
    step1 = state.values()
    state.v.assign([9.0, 9.0, 9.0])
    state.optimizer.apply_gradients([(tf.ones([3]), state.v), (tf.constant(1.0), state.w)])
    newest = manager.save(2)
    damage(data_file(newest))
    with caplog.at_level(logging.WARNING, logger="mmt.training.checkpoint"):
        assert manager.restore_latest() == 1
    assert_same(state.values(), step1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(newest in m and reason in m for m in warnings), warnings


def test_all_damaged_is_a_clear_error(tmp_path):
    manager = CheckpointManager(str(tmp_path), State().checkpoint)
    paths = [manager.save(1), manager.save(2)]
    truncate(data_file(paths[0]))
    shutil.rmtree(paths[1])
    os.makedirs(paths[1])
    (tmp_path / "ckpt-000000002" / MARKER).write_text("{not json")
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be restored") as error:
        manager.restore_latest()
    for path in paths:
        assert path in str(error.value)


CHILD = textwrap.dedent(
    """
    import os, sys
    import tensorflow as tf
    from mmt.training.checkpoint import CheckpointManager

    v = tf.Variable([1.0, 2.0])
    manager = CheckpointManager(sys.argv[1], tf.train.Checkpoint(v=v))
    manager.save(1)
    v.assign([10.0, 20.0])
    os.environ["MMT_TEST_PAUSE_BEFORE_COMMIT"] = "30"
    manager.save(2)
    print("committed step 2", flush=True)
    """
)


def test_save_killed_before_commit_is_never_restored(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env.pop("MMT_TEST_PAUSE_BEFORE_COMMIT", None)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(90, child.kill)
    watchdog.start()
    try:
        lines = []
        for line in child.stdout:
            lines.append(line)
            if "pausing before commit" in line:
                child.send_signal(signal.SIGKILL)
                break
        child.wait()
    finally:
        watchdog.cancel()
    assert lines and lines[-1].strip() == "checkpoint files written for step 2; pausing before commit", lines
    assert child.returncode == -signal.SIGKILL
    names = dirs(tmp_path)
    (leftover,) = [n for n in names if n.startswith("ckpt-000000002.tmp-")]
    assert "ckpt-000000002" not in names and "ckpt.index" in os.listdir(tmp_path / leftover)
    assert MARKER not in os.listdir(tmp_path / leftover)

    v = tf.Variable([0.0, 0.0])
    manager = CheckpointManager(str(tmp_path), tf.train.Checkpoint(v=v))
    assert manager.latest_step() == 1
    assert manager.restore_latest() == 1
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])
    manager.save(3)
    assert dirs(tmp_path) == ["ckpt-000000001", "ckpt-000000003"]


def _itit(seed):
    from mmt.models.itit import ITIT

    keras.utils.set_random_seed(seed)
    model = ITIT(size="tiny", image_vocab_size=16, grid=(2, 2), text_vocab_size=20, text_length=4,
                 size_overrides={"encoder_depth": 2, "encoder_width": 16, "decoder_width": 16,
                                 "text_encoder_width": 16, "encoder_heads": 2, "decoder_heads": 2,
                                 "text_decoder_depth": 2, "image_decoder_depth": 2})
    model.build_all()
    return model


def test_model_variables_checkpoints_every_variable_of_list_held_layers(tmp_path):
    from mmt.training.checkpoint import model_variables

    trained, fresh = _itit(1), _itit(2)
    assert len(trained.weights) == len(fresh.weights) > 50
    # The pitfall: the TensorFlow object graph misses the blocks Keras 3 holds in lists.
    plain = tf.train.Checkpoint(model=trained).write(str(tmp_path / "plain" / "ckpt"))
    saved = tf.train.load_checkpoint(plain).get_variable_to_shape_map()
    assert sum(k.startswith("model/") for k in saved) < len(trained.weights)

    path = tf.train.Checkpoint(model=model_variables(trained)).write(str(tmp_path / "flat" / "ckpt"))
    saved = tf.train.load_checkpoint(path).get_variable_to_shape_map()
    assert sum(k.startswith("model/") for k in saved) == len(trained.weights)
    assert any(k.startswith("model/encoder.") for k in saved)  # named without the model's own name
    status = tf.train.Checkpoint(model=model_variables(fresh)).read(path)
    status.assert_existing_objects_matched()
    for a, b in zip(trained.weights, fresh.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
