"""mmt.optimizers.Adafactor: hand-computed updates, Keras' Adafactor, slots, config, XLA."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmt.optimizers import Adafactor, WarmupCosine
from tolerances import U32, assert_close_to_scale, reordered_sum_rtol


def _apply(opt, x0, grads, name="w"):
    """Runs `opt` on a fresh variable initialised to `x0`; returns its value per step."""
    var = keras.Variable(np.asarray(x0, np.float32), name=name)
    values = []
    for g in grads:
        opt.apply([np.asarray(g, np.float32)], [var])
        values.append(np.array(var))
    return values


def _reference(x0, grads, *, lr, beta_1=None, beta_2=None, decay_rate=0.8, eps1=1e-30,
               eps2=1e-3, clip=1.0, scale_by_param=True, weight_decay=0.0, factored):
    """Adafactor in float64 numpy, straight from Shazeer & Stern (2018), Alg. 4 / 5.

    Written with the paper's row/column *sums* (R = G2 1_m, C = 1_n^T G2,
    V = R C / 1_n^T R), independently of the optimizer's means.
    """
    x = np.asarray(x0, np.float64)
    R = C = V = M = 0.0
    rms = lambda a: np.sqrt(np.mean(np.square(a)))
    values = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        x = x - lr * weight_decay * x  # decoupled weight decay, before the update
        if beta_2 is None:
            b = 1.0 - t ** (-decay_rate)
        else:
            b = beta_2 * (1.0 - beta_2 ** (t - 1)) / (1.0 - beta_2**t)
        G2 = g**2 + eps1
        if factored:
            R = b * R + (1 - b) * G2.sum(axis=1)
            C = b * C + (1 - b) * G2.sum(axis=0)
            V = np.outer(R, C) / R.sum()
        else:
            V = b * V + (1 - b) * G2
        U = g / np.sqrt(V)
        if clip is not None:
            U = U / max(1.0, rms(U) / clip)
        alpha = lr * max(eps2, rms(x)) if scale_by_param else lr
        if beta_1 is None:
            x = x - alpha * U
        else:
            M = beta_1 * M + (1 - beta_1) * alpha * U
            x = x - M
        values.append(x)
    return values


MATRIX_X0 = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]
MATRIX_GRADS = [[[0.3, -1.2, 0.5], [2.0, 0.1, -0.4]], [[-0.7, 0.2, 1.1], [0.6, -1.5, 0.05]]]
VECTOR_X0 = [0.5, -1.0, 2.0]
VECTOR_GRADS = [[0.3, -1.2, 2.0], [-0.7, 0.2, 0.05]]

# Paper defaults (step-dependent beta2, relative step) and ITIT's (fixed beta2 0.96,
# weight decay, absolute step); clip 0.5 makes update clipping bite at every step.
# Active clipping hides any global scale of v -- such as beta2's bias correction --
# hence the unclipped fixed-beta2 case.
SETTINGS = {
    "paper": dict(lr=0.1),
    "itit": dict(lr=0.1, beta_2=0.96, weight_decay=0.045, clip=0.5, scale_by_param=False),
    "fixed_beta2_unclipped": dict(lr=0.1, beta_2=0.96, weight_decay=0.045, clip=None),
}


@pytest.mark.parametrize("beta_1", [None, 0.9])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize(
    "x0, grads, factored",
    [(MATRIX_X0, MATRIX_GRADS, True), (VECTOR_X0, VECTOR_GRADS, False)],
    ids=["matrix_2x3", "vector_3"],
)
def test_two_steps_match_paper_formulas(x0, grads, factored, setting, beta_1):
    s = SETTINGS[setting]
    opt = Adafactor(
        s["lr"], beta_1=beta_1, beta_2=s.get("beta_2"), clip_threshold=s.get("clip", 1.0),
        multiply_by_parameter_scale=s.get("scale_by_param", True),
        weight_decay=s.get("weight_decay"), min_dim_size_to_factor=1,
    )
    got = _apply(opt, x0, grads)
    want = _reference(x0, grads, beta_1=beta_1, factored=factored, **s)
    assert (opt._rows[0] is not None) == factored
    # float32 against a float64 reference: each of the ~20 operations of a step (g^2, row
    # and column means, R C / sum R, rsqrt, RMS of 6 values, clip, momentum, decay, update)
    # rounds once (u = 2^-24); sums of <= 6 terms have one order on every CPU. Two steps.
    assert_close_to_scale(got, want, 2 * 20 * U32, "variables")


def test_first_step_by_hand():
    # b_1 = 0, so v = g^2 (+eps1) and u = sign(g). A rank-1 g^2 is factored exactly:
    # g = [1, 2]^T [1, 2, 3] gives V = R C / sum(R) = g^2, hence u = 1 everywhere.
    g = np.outer([1.0, 2.0], [1.0, 2.0, 3.0])
    opt = Adafactor(0.1, multiply_by_parameter_scale=False, min_dim_size_to_factor=1)
    (x1,) = _apply(opt, np.zeros((2, 3)), [g])
    np.testing.assert_allclose(x1, np.full((2, 3), -0.1), rtol=1e-6)

    # Vector, clip 0.5 halves u = sign(g); momentum 0.9 keeps (1 - 0.9) of the step;
    # weight decay: 2.0 * (1 - 0.1 * 0.5) = 1.9 before the update.
    opt = Adafactor(0.1, beta_1=0.9, clip_threshold=0.5, weight_decay=0.5,
                    multiply_by_parameter_scale=False)
    (x1,) = _apply(opt, [2.0, -2.0, 0.0], [[1.0, -3.0, 0.5]])
    np.testing.assert_allclose(x1, [1.9 - 0.005, -1.9 + 0.005, -0.005], rtol=1e-6)


@pytest.mark.parametrize("extra", [{}, {"weight_decay": 0.1, "global_clipnorm": 1.0}],
                         ids=["plain", "weight_decay+global_clipnorm"])
def test_matches_keras_adafactor(extra):
    # Overlap with keras.optimizers.Adafactor: no momentum, b_t = 1 - t^-0.8, parameter
    # scaling always on, every rank >= 2 variable factored over its last two dims, and a
    # step size min(lr, 1/sqrt(t)) that equals lr while t <= 1/lr^2 (here t <= 6).
    rng = np.random.default_rng(0)
    shapes = [(4, 5), (2, 3, 4), (5,), ()]
    x0 = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(6)]
    ours = Adafactor(0.01, min_dim_size_to_factor=1, weight_decay_exclude=(), **extra)
    theirs = keras.optimizers.Adafactor(0.01, **extra)
    results = []
    for opt in (ours, theirs):
        variables = [keras.Variable(x, name=f"w{i}") for i, x in enumerate(x0)]
        for g in grads:
            opt.apply(g, variables)
        results.append([np.array(v) for v in variables])
    assert all(r is not None for r in ours._rows[:2])
    # Both float32, with other operation orders: the longest sum is the update RMS over
    # 24 values; second moments are squares; six steps (tests/tolerances.py).
    assert_close_to_scale(results[0], results[1], reordered_sum_rtol(24, squared=True, steps=6), "variables")
    for a, start in zip(results[0], x0):
        assert np.abs(a - start).max() > 1e-3  # the variables did move


def _tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="dense"),
            keras.layers.LayerNormalization(name="layer_norm"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    return model


def test_weight_decay_skips_excluded_names():
    model = _tiny_model()
    before = {v.path: np.array(v) for v in model.trainable_variables}
    opt = Adafactor(0.1, weight_decay=0.5, multiply_by_parameter_scale=False)
    opt.apply([keras.ops.zeros(v.shape) for v in model.trainable_variables],
              model.trainable_variables)
    # Zero gradients: u = 0, so only weight decay moves anything (by 1 - 0.1 * 0.5).
    for v in model.trainable_variables:
        decayed = v.path.endswith("kernel")
        np.testing.assert_allclose(np.array(v), before[v.path] * (0.95 if decayed else 1.0),
                                   rtol=1e-6, err_msg=v.path)
    excluded = [v.path for v in model.trainable_variables if not opt._use_weight_decay(v)]
    assert {"/".join(p.split("/")[-2:]) for p in excluded} == {
        "dense/bias", "layer_norm/gamma", "layer_norm/beta", "head/bias"}

    # Keras' own exclusion still works on top.
    opt = Adafactor(0.1, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_list=[model.layers[-1].kernel])
    assert not opt._use_weight_decay(model.layers[-1].kernel)
    assert opt._use_weight_decay(model.layers[0].kernel)


def _slot_sizes(opt):
    own = {id(opt.iterations), id(opt._learning_rate)}
    return [int(np.prod(v.shape)) for v in opt.variables if id(v) not in own]


def test_slot_memory():
    big = keras.Variable(keras.ops.zeros((4096, 4096)), name="kernel")
    opt = Adafactor()
    opt.build([big])
    assert sorted(_slot_sizes(opt)) == [4096, 4096]  # rows + cols, no [4096, 4096] slot

    opt = Adafactor(beta_1=0.9)
    opt.build([big])
    assert sorted(_slot_sizes(opt)) == [4096, 4096, 4096 * 4096]  # + momentum

    # Leading dims are kept; dims below min_dim_size_to_factor are not factored.
    small = [keras.Variable(np.zeros(s, np.float32)) for s in [(2, 3, 4), (256, 64), (7,)]]
    opt = Adafactor(min_dim_size_to_factor=3)
    opt.build(small)
    assert [tuple(r.shape) if r is not None else None for r in opt._rows] == [(2, 3), (256,), None]
    assert [tuple(c.shape) if c is not None else None for c in opt._cols] == [(2, 4), (64,), None]
    assert [tuple(v.shape) if v is not None else None for v in opt._second_moments] == [
        None, None, (7,)]
    assert Adafactor()._factored((256, 64)) is False  # default 128


def test_config_round_trip():
    opt = Adafactor(
        WarmupCosine(1e-4, 5_000, 1_495_000), beta_1=0.9, beta_2=0.96, weight_decay=0.045,
        multiply_by_parameter_scale=False, global_clipnorm=3.0, min_dim_size_to_factor=1,
        weight_decay_exclude=("norm",),
    )
    config = opt.get_config()
    json.dumps(config)
    restored = Adafactor.from_config(json.loads(json.dumps(config)))
    assert restored.get_config() == config
    assert isinstance(restored._learning_rate, WarmupCosine)

    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, Adafactor)
    assert restored.get_config() == config


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.function test")
def test_xla_train_step_matches_eager():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = rng.normal(size=(8, 2)).astype(np.float32)

    def make_step(model, opt):
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - y))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply(grads, model.trainable_variables)
            return loss
        return step

    results = []
    initial = [np.array(v) for v in _tiny_model(seed=0).trainable_variables]
    for jit in (False, True):
        model = _tiny_model(seed=0)
        opt = Adafactor(
            WarmupCosine(0.05, 2, 10), beta_1=0.9, beta_2=0.96, weight_decay=0.045,
            multiply_by_parameter_scale=False, global_clipnorm=3.0, min_dim_size_to_factor=1,
        )
        step = make_step(model, opt)
        if jit:
            step = tf.function(step, jit_compile=True)
        losses = [float(step()) for _ in range(4)]
        results.append((losses, [np.array(v) for v in model.trainable_variables + opt.variables]))
    (eager_losses, eager_vars), (xla_losses, xla_vars) = results
    # XLA may reorder the batch sums (8 examples) and brings its own rsqrt / sqrt (~16
    # such operations along a step); second-moment slots hold g^2; 4 steps accumulate.
    rtol = reordered_sum_rtol(8, squared=True, steps=4, chained_ops=16)
    assert_close_to_scale([xla_losses], [eager_losses], rtol, "losses")
    assert_close_to_scale(xla_vars, eager_vars, rtol, "variables")
    for a, start in zip(eager_vars, initial):
        assert np.abs(a - start).max() > 1e-3  # every weight moved


def test_decreases_quadratic_loss():
    target = np.random.default_rng(2).normal(size=(16, 16)).astype(np.float32)
    w = keras.Variable(np.zeros((16, 16), np.float32), name="kernel")
    opt = Adafactor(0.05, beta_1=0.9, beta_2=0.96, multiply_by_parameter_scale=False,
                    min_dim_size_to_factor=1)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(w - target))
        opt.apply(tape.gradient(loss, [w]), [w])
        return loss

    losses = [float(step()) for _ in range(150)]
    assert losses[-1] < 0.05 * losses[0]
