"""mmt's AdamW: MAE's weight-decay rule (no decay on one-dimensional variables)."""

from pathlib import Path

import gin
import keras
import numpy as np

from mmt.optimizers import AdamW

LR, WD = 0.1, 0.5


def _step(optimizer, variables):
    zeros = [keras.ops.zeros_like(v) for v in variables]  # Adam's update is 0: only decay moves them
    optimizer.apply(zeros, variables)
    return [keras.ops.convert_to_numpy(v) for v in variables]


def _variables():
    return [keras.Variable(np.full((2, 3), 2.0, np.float32), name="kernel"),
            keras.Variable(np.full((3,), 2.0, np.float32), name="bias"),
            keras.Variable(np.full((4,), 2.0, np.float32), name="token"),
            keras.Variable(np.full((2, 2), 2.0, np.float32), name="pos_embedding")]


def test_one_dimensional_variables_are_not_decayed():
    kernel, bias, token, pos = _step(AdamW(LR, weight_decay=WD, exclude_one_dimensional=True), _variables())
    decayed = 2.0 * (1 - LR * WD)  # Keras AdamW: v -= lr * wd * v
    np.testing.assert_allclose(kernel, decayed, rtol=1e-6)
    np.testing.assert_allclose(pos, decayed, rtol=1e-6)
    np.testing.assert_array_equal(bias, 2.0)
    np.testing.assert_array_equal(token, 2.0)


def test_default_decays_everything_like_keras():
    ours = _step(AdamW(LR, weight_decay=WD), _variables())
    theirs = _step(keras.optimizers.AdamW(LR, weight_decay=WD), _variables())
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def test_name_patterns_and_config_round_trip():
    optimizer = AdamW(LR, weight_decay=WD, exclude_names=["pos_"])
    kernel, bias, _, pos = _step(optimizer, _variables())
    np.testing.assert_array_equal(pos, 2.0)
    assert bias[0] < 2.0 and kernel[0, 0] < 2.0
    clone = AdamW.from_config(AdamW(LR, exclude_one_dimensional=True, exclude_names=["x"]).get_config())
    assert clone.exclude_one_dimensional and clone.exclude_names == ("x",)


def test_mae_gin_binds_the_rule():
    import mmt.configurables  # noqa: F401  (registers AdamW)
    with gin.unlock_config():
        gin.clear_config()
        gin.parse_config_files_and_bindings(
            [str(Path(__file__).resolve().parents[1] / "gin" / "optimizer" / "mae_adamw.gin")],
            ["TRAIN_STEPS = 10", "PEAK_LEARNING_RATE = 1e-3", "WARMUP_STEPS = 2"])
        optimizer = gin.get_configurable("AdamW")()
        gin.clear_config()
    assert optimizer.exclude_one_dimensional and abs(optimizer.weight_decay - 0.05) < 1e-9
