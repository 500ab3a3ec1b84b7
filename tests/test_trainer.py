"""The trainer in-process: replica-count independence, eager == XLA, the non-finite guard,
several optimizer groups, mixed precision."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmt.training import distribute
from mmt.data.pipeline import StreamSpec
from mmt.optimizers import Adafactor, Constant
from mmt.training.checkpoint import CheckpointManager, model_variables
from mmt.training.trainer import Trainer, TrainingError
from tiny_task import TinyTask
from tolerances import assert_close_to_scale, reordered_sum_rtol


def _trainer(data_dir, steps, *, task=None, batch_size=8, **kwargs):
    defaults = dict(
        task=task or functools.partial(TinyTask, text_length=16),
        streams={"text": StreamSpec(data_dir, "text_only", batch_size=batch_size, fields=("text_ids", "caption"),
                                    text_length=16, shuffle_buffer=64)},
        train_steps=steps,
        optimizer=functools.partial(Adafactor, learning_rate=Constant(0.01), beta_1=0.9, beta_2=0.96,
                                    multiply_by_parameter_scale=False, weight_decay=0.01),
        clip_grad_norm=1.0,
        seed=5,
        log_every=1,
        checkpoint_every=1000,
        progress_bar=False,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


def _weights(trainer):
    return [np.array(v) for v in trainer.task.model.weights]


def _slots(trainer):
    return [np.array(v) for opt in trainer.optimizers.values() for v in opt.variables]


# Every gradient of TinyTask sums over the global batch's tokens (8 records x 16
# positions); the replica count, eager vs XLA and the CPU's vector width change the order
# of those sums and nothing else that accumulates (see tests/tolerances.py).
_TOKENS = 8 * 16


def test_one_and_two_replicas_make_the_same_update(tiny_data, tmp_path):
    task = functools.partial(TinyTask, text_length=16, random_mask=False)
    one = _trainer(tiny_data["data_dir"], 2, task=task)
    one.run(tmp_path / "one")
    two = _trainer(tiny_data["data_dir"], 2, task=task)
    result = two.run(tmp_path / "two", strategy=distribute.make_strategy(cpu_replicas=2))
    assert two.strategy.num_replicas_in_sync == 2
    assert result.step == 2
    # Two steps; with 2 replicas every gradient is two partial sums of 64 tokens plus the
    # all-reduce's addition (129 terms in another order). Second-moment slots hold g^2.
    assert_close_to_scale(_weights(two), _weights(one), reordered_sum_rtol(_TOKENS + 1, steps=2), "weights")
    assert_close_to_scale(_slots(two), _slots(one), reordered_sum_rtol(_TOKENS + 1, squared=True, steps=2), "slots")


def test_eager_equals_xla(tiny_data, tmp_path):
    # A fixed mask: TensorFlow's stateless RNG picks its algorithm per device/compiler
    # (AUTO_SELECT), so eager and XLA draw different random numbers from one seed.
    task = functools.partial(TinyTask, text_length=16, random_mask=False)
    eager = _trainer(tiny_data["data_dir"], 3, mode="eager", task=task)
    eager_result = eager.run(tmp_path / "eager")
    xla = _trainer(tiny_data["data_dir"], 3, mode="xla", task=task)
    xla_result = xla.run(tmp_path / "xla")
    assert xla.jit_compile and not eager.jit_compile
    # Three steps; XLA fuses and reorders the token sums and brings its own exp / log /
    # tanh / rsqrt (a few ulp each, ~16 such operations along the step's longest chain).
    rtol = reordered_sum_rtol(_TOKENS, steps=3, chained_ops=16)
    for key, value in eager_result.last_losses.items():
        assert xla_result.last_losses[key] == pytest.approx(value, rel=rtol), key
    assert_close_to_scale(_weights(xla), _weights(eager), rtol, "weights")


def test_non_finite_step_is_skipped_leaving_weights_and_slots_untouched(tiny_data, tmp_path):
    clean = _trainer(tiny_data["data_dir"], 2)
    clean.run(tmp_path / "clean")
    poisoned = _trainer(tiny_data["data_dir"], 3, task=functools.partial(TinyTask, text_length=16, nan_at_steps=(2,)))
    result = poisoned.run(tmp_path / "poisoned")
    assert result.step == 3 and result.skipped_steps == 1
    # Step 2 (0-based) was skipped: weights and optimizer slots are those after two steps.
    # Exact: both runs compute steps 0 and 1 with the same graph on the same batches (the
    # poisoned task's NaN is a select, which leaves the other steps' values untouched).
    for got, want in zip(_weights(poisoned) + _slots(poisoned), _weights(clean) + _slots(clean)):
        np.testing.assert_array_equal(got, want)
    lines = (tmp_path / "poisoned" / "metrics.jsonl").read_text().splitlines()
    assert '"skipped_steps": 1.0' in lines[-1]


def test_consecutive_non_finite_steps_stop_the_run_with_checkpoint_intact(tiny_data, tmp_path):
    trainer = _trainer(tiny_data["data_dir"], 20, checkpoint_every=1, max_consecutive_skips=3,
                       task=functools.partial(TinyTask, text_length=16, nan_at_steps=(2, 3, 4, 5)))
    with pytest.raises(TrainingError, match="3 consecutive steps"):
        trainer.run(tmp_path)
    # The newest checkpoint restores finite weights.
    fresh = _trainer(tiny_data["data_dir"], 20)
    fresh.build()
    manager = CheckpointManager(str(tmp_path / "checkpoints"),
                                tf.train.Checkpoint(model=model_variables(fresh.task.model)))
    assert manager.latest_step() == 4  # the stop came at step 5, before its checkpoint
    assert all(np.isfinite(w).all() for w in _weights(fresh))


def test_two_optimizer_groups_train_disjoint_variables(tiny_data, tmp_path):
    trainer = _trainer(
        tiny_data["data_dir"], 2,
        task=functools.partial(TinyTask, text_length=16, two_groups=True),
        group_optimizers={"head": functools.partial(keras.optimizers.Adam, learning_rate=1e-3)},
    )
    trainer.build()
    before = {v.path: np.array(v) for v in trainer.task.model.trainable_variables}
    result = trainer.run(tmp_path)
    head = {v.path for v in trainer.group_variables["head"]}
    body = {v.path for v in trainer.group_variables["body"]}
    assert head and body and not head & body
    assert all(p.startswith(("logits", "mlp")) for p in head)
    assert isinstance(trainer.optimizers["head"], keras.optimizers.Adam)
    assert isinstance(trainer.optimizers["body"], Adafactor)
    assert {"grad_norm/head", "grad_norm/body", "loss/masked_ce", "loss/l2"} <= set(result.last_losses)
    changed = {v.path for v in trainer.task.model.trainable_variables if not np.array_equal(before[v.path], v)}
    assert changed == head | body


def test_mixed_bfloat16_keeps_float32_variables(tiny_data, tmp_path):
    trainer = _trainer(tiny_data["data_dir"], 2, precision="mixed_bfloat16")
    result = trainer.run(tmp_path)
    assert all(v.dtype == "float32" for v in trainer.task.model.weights)
    assert np.isfinite(result.last_losses["loss/masked_ce"])
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run


def test_bad_group_optimizer_name_is_refused(tiny_data):
    trainer = _trainer(tiny_data["data_dir"], 1, group_optimizers={"generatr": keras.optimizers.Adam})
    with pytest.raises(ValueError, match="generatr"):
        trainer.build()


def test_itit_optimizer_gin_binds_the_paper_settings():
    import gin

    from mmt import config as mmt_config

    try:
        mmt_config.parse(["run/train_defaults.gin", "optimizer/itit_adafactor.gin"],
                         ["TRAIN_STEPS = 1500000", "PEAK_LEARNING_RATE = 1e-4"])
        optimizer = gin.get_configurable("Adafactor")()
        schedule = optimizer._learning_rate  # pylint: disable=protected-access
        assert (optimizer.beta_1, optimizer.beta_2, optimizer.weight_decay) == (0.9, 0.96, 0.045)
        assert (schedule.warmup_steps, schedule.decay_steps) == (5000, 1_495_000)
        assert gin.query_parameter("Trainer.clip_grad_norm") == 3.0
    finally:
        mmt_config.reset()
