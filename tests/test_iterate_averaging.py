"""Exponentially weighted iterate averaging (DALL-E §2.2 / B.2) in the one trainer:
the average against a hand computation, exact resume with it, and the averaged weights
being what `mmt.restore.load_task` and the export hold."""

import functools
import json

import h5py
import numpy as np
import pytest

from mmt.data.pipeline import StreamSpec
from mmt.optimizers import Adafactor, Constant
from mmt.training.trainer import Trainer
from tiny_task import TinyTask
from tolerances import U32

DECAY = 0.5  # large steps between averages: a wrong weight shows at once


class _Recording(Trainer):
    """Keeps the trainable weights after every step (the iterates w_1, w_2, ...)."""

    def train_step(self, batch):
        out = super().train_step(batch)
        self.iterates.append({n: np.array(v) for n, v in self._averaged_sources.items()})
        return out


def _trainer(data_dir, steps, cls=Trainer, **kwargs):
    defaults = dict(
        task=functools.partial(TinyTask, text_length=16, random_mask=False),
        streams={"text": StreamSpec(data_dir, "text_only", batch_size=8, fields=("text_ids",),
                                    text_length=16, shuffle_buffer=64)},
        train_steps=steps,
        optimizer=functools.partial(Adafactor, learning_rate=Constant(0.05), beta_1=0.9, beta_2=0.96,
                                    multiply_by_parameter_scale=False),
        seed=5, log_every=1, checkpoint_every=2, progress_bar=False, mode="graph",
        iterate_averaging=DECAY,
    )
    defaults.update(kwargs)
    return cls(**defaults)


def _averages(trainer):
    return {n: np.array(v) for n, v in trainer.averaged.items()}


def test_average_matches_the_bias_corrected_ema_of_the_iterates(tiny_data, tmp_path):
    trainer = _trainer(tiny_data["data_dir"], 3, cls=_Recording)
    trainer.iterates = []
    trainer.run(tmp_path)
    w = trainer.iterates
    assert len(w) == 3 and int(trainer.averaging_updates.numpy()) == 3
    d = DECAY
    got = _averages(trainer)
    for name, value in got.items():
        # avg_3 = ((1-d) w_3 + d (1-d) w_2 + d^2 (1-d) w_1) / (1 - d^3); initial weights excluded.
        want = ((1 - d) * w[2][name] + d * (1 - d) * w[1][name] + d**2 * (1 - d) * w[0][name]) / (1 - d**3)
        # Three recursive float32 updates (a subtraction, a product, a sum each) against
        # the direct float64 formula: a few u relative to the weights' scale per update.
        scale = max(np.abs(x[name]).max() for x in w)
        np.testing.assert_allclose(value, want, rtol=0, atol=3 * 4 * U32 * scale, err_msg=name)
        assert not np.array_equal(value, w[2][name]), f"{name}: the average is just the last iterate"
    # The model itself keeps the raw (last) weights.
    for name, variable in trainer._averaged_sources.items():
        np.testing.assert_array_equal(np.array(variable), w[2][name])


def test_skipped_steps_do_not_enter_the_average(tiny_data, tmp_path):
    clean = _trainer(tiny_data["data_dir"], 2)
    clean.run(tmp_path / "clean")
    poisoned = _trainer(tiny_data["data_dir"], 3,
                        task=functools.partial(TinyTask, text_length=16, random_mask=False, nan_at_steps=(2,)))
    poisoned.run(tmp_path / "poisoned")
    assert int(poisoned.averaging_updates.numpy()) == 2
    for name, value in _averages(clean).items():
        np.testing.assert_array_equal(_averages(poisoned)[name], value, err_msg=name)


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(("loss/", "grad_norm/"))} for r in rows}


def test_resume_with_averaging_reproduces_the_uninterrupted_run(tiny_data, tmp_path):
    reference = _trainer(tiny_data["data_dir"], 4)
    reference.run(tmp_path / "reference")
    first = _trainer(tiny_data["data_dir"], 2)
    first.run(tmp_path / "resumed")  # stops at step 2 with a checkpoint, as a preempted run
    resumed = _trainer(tiny_data["data_dir"], 4)
    resumed.run(tmp_path / "resumed")
    assert int(resumed.averaging_updates.numpy()) == 4
    got, want = _losses(tmp_path / "resumed"), _losses(tmp_path / "reference")
    for step in (3, 4):
        assert got[step] == want[step], step
    for name, value in _averages(reference).items():
        np.testing.assert_array_equal(_averages(resumed)[name], value, err_msg=f"average {name}")
        np.testing.assert_array_equal(np.array(resumed._averaged_sources[name]),
                                      np.array(reference._averaged_sources[name]), err_msg=f"raw {name}")


def test_load_task_and_export_hold_the_averaged_weights(tiny_data, tmp_path):
    from mmt import config as mmt_config
    from mmt import configurables, restore
    from mmt.tasks import exports

    gin_file = str(__import__("pathlib").Path(__file__).parent / "gin" / "tiny_train.gin")
    try:
        mmt_config.parse([gin_file], [f"DATA_DIR='{tiny_data['data_dir']}'", "TRAIN_STEPS=3",
                                      f"Trainer.iterate_averaging={DECAY}", "Trainer.mode='graph'"])
        trainer = configurables.Trainer()
        trainer.run(str(tmp_path))
        averages, raw = _averages(trainer), {n: np.array(v) for n, v in trainer._averaged_sources.items()}
        non_trainable = {n: np.array(v) for n, v in exports.weight_names(trainer.task.model).items()
                         if n not in averages}
        task, step = restore.load_task(str(tmp_path))
    finally:
        mmt_config.reset()
    assert step == 3
    loaded = exports.weight_names(task.model)
    for name, value in averages.items():
        assert not np.array_equal(value, raw[name]), name  # the test can tell the two apart
        np.testing.assert_array_equal(np.array(loaded[name]), value, err_msg=name)
    for name, value in non_trainable.items():
        np.testing.assert_array_equal(np.array(loaded[name]), value, err_msg=name)
    with h5py.File(tmp_path / "export" / exports.WEIGHTS_FILE, "r") as f:
        for name, value in averages.items():
            np.testing.assert_array_equal(f[name][()], value, err_msg=f"export {name}")


def test_bad_decay_is_refused(tiny_data):
    with pytest.raises(ValueError, match="iterate_averaging"):
        _trainer(tiny_data["data_dir"], 1, iterate_averaging=1.5)


def test_one_and_two_replicas_make_the_same_average(tiny_data, tmp_path):
    from mmt.training import distribute
    from tolerances import assert_close_to_scale, reordered_sum_rtol

    one = _trainer(tiny_data["data_dir"], 2)
    one.run(tmp_path / "one")
    two = _trainer(tiny_data["data_dir"], 2)
    two.run(tmp_path / "two", strategy=distribute.make_strategy(cpu_replicas=2))
    assert two.strategy.num_replicas_in_sync == 2 and int(two.averaging_updates.numpy()) == 2
    # As tests/test_trainer.py: gradients sum 8 x 16 tokens in another order (+1 all-reduce
    # addition) over two steps; the average is a convex combination of the iterates.
    names = sorted(_averages(one))
    assert_close_to_scale([_averages(two)[n] for n in names], [_averages(one)[n] for n in names],
                          reordered_sum_rtol(8 * 16 + 1, steps=2), "averages")
