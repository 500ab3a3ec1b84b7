"""Learning-rate schedules: values at hand-picked steps, serialization, bad arguments."""

# Schedules are a few element-wise float32 operations (a cosine, products, one division)
# against float64 references: a few ulp, so rtol 1e-6 (16 ulp) or atol 1e-6 near 0.

import math

import keras
import numpy as np
import pytest

from mmt.optimizers import Constant, Rsqrt, WarmupCosine


def _values(schedule, steps):
    return [float(schedule(np.int64(s))) for s in steps]


def test_warmup_cosine():
    schedule = WarmupCosine(1e-3, warmup_steps=100, decay_steps=200, end_value=1e-5)
    steps = [0, 50, 100, 150, 200, 300, 1000]
    # 150: a quarter into the decay, (1 + cos(pi / 4)) / 2 = 0.8535534.
    want = [0.0, 5e-4, 1e-3, 1e-5 + 9.9e-4 * 0.8535534, 1e-5 + 9.9e-4 * 0.5, 1e-5, 1e-5]
    np.testing.assert_allclose(_values(schedule, steps), want, rtol=1e-6)


def test_warmup_cosine_itit():
    # ITIT Table 3: peak 1e-4, 5K warmup, cosine decay to 0 at 1.5M steps.
    schedule = WarmupCosine(1e-4, warmup_steps=5_000, decay_steps=1_495_000)
    steps = [0, 2_500, 5_000, 752_500, 1_500_000]
    np.testing.assert_allclose(_values(schedule, steps), [0.0, 5e-5, 1e-4, 5e-5, 0.0],
                               rtol=1e-5, atol=1e-12)


def test_warmup_cosine_without_warmup():
    schedule = WarmupCosine(2.0, warmup_steps=0, decay_steps=4)
    np.testing.assert_allclose(_values(schedule, [0, 2, 4, 9]), [2.0, 1.0, 0.0, 0.0], atol=1e-6)


def test_constant():
    np.testing.assert_allclose(_values(Constant(0.01, warmup_steps=10), [0, 5, 10, 1000]),
                               [0.0, 0.005, 0.01, 0.01], rtol=1e-6)
    np.testing.assert_allclose(_values(Constant(0.01), [0, 7]), [0.01, 0.01], rtol=1e-6)


def test_rsqrt():
    schedule = Rsqrt(0.01, warmup_steps=10_000)
    steps = [0, 5_000, 10_000, 40_000, 1_000_000]
    np.testing.assert_allclose(_values(schedule, steps), [0.01, 0.01, 0.01, 0.005, 0.001],
                               rtol=1e-6)
    # T5's relative step size min(1e-2, 1 / sqrt(step)).
    for s in [20_000, 123_456]:
        assert math.isclose(float(schedule(s)), min(1e-2, 1 / math.sqrt(s)), rel_tol=1e-6)


@pytest.mark.parametrize(
    "schedule",
    [WarmupCosine(1e-4, 5_000, 1_495_000, end_value=1e-6), Constant(0.3, 7), Rsqrt(1e-2, 10_000)],
    ids=lambda s: type(s).__name__,
)
def test_serialization_round_trip(schedule):
    restored = type(schedule).from_config(schedule.get_config())
    assert restored.get_config() == schedule.get_config()
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule)
    )
    assert type(restored) is type(schedule)
    steps = [0, 3, 4_000, 9_999, 600_000]
    assert _values(restored, steps) == _values(schedule, steps)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        WarmupCosine(1e-3, warmup_steps=-1, decay_steps=10)
    with pytest.raises(ValueError):
        WarmupCosine(1e-3, warmup_steps=10, decay_steps=0)
    with pytest.raises(ValueError):
        Rsqrt(1e-2, warmup_steps=0)
