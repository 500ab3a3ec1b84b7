"""Per-resblock gradient scaling (DALL-E §2.4, Figure 4): float16 underflow that one
global loss scale cannot avoid, exactness in float32, non-finite filtering per block,
and the trainer's `mixed_float16` + `resblock_gradient_scaling` end to end."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from mmt.data.pipeline import StreamSpec
from mmt.layers import gradient_scaling as gs
from mmt.layers.transformer import TransformerStack
from mmt.optimizers import Adafactor, Constant
from mmt.tasks.base import Ratio, Task, task_arguments
from mmt.training.checkpoint import CheckpointManager
from mmt.training.trainer import Trainer
from tolerances import assert_close_to_scale, reordered_sum_rtol

B, T, D, DEPTH = 2, 4, 16, 3
U16 = 2.0**-11  # unit roundoff of float16


@pytest.fixture
def policy():
    previous = keras.mixed_precision.global_policy()
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy(previous)


def _stack(scaling, **kwargs):
    stack = TransformerStack(DEPTH, num_heads=2, mlp_dim=2 * D, gradient_scaling=scaling, name="stack", **kwargs)
    stack.build((B, T, D))
    return stack


def _copy_weights(source, target):
    values = {v.path.split("/", 1)[1]: np.array(v) for v in source.trainable_variables}
    for v in target.trainable_variables:
        v.assign(values[v.path.split("/", 1)[1]])


def _block_index(variable):
    return int(variable.path.split("block_")[1].split("/")[0]) if "block_" in variable.path else None


def _grads(stack, x, loss_fn, loss_scale=1.0):
    """(unscaled gradients of the stack's trainable variables, d loss / d x, filtered counts per block)."""
    scales = [b.gradient_scale.scale.value for b in stack.blocks if b.gradient_scale is not None]
    with tf.GradientTape() as tape:
        tape.watch(x)
        for s in scales:
            tape.watch(s)
        loss = loss_fn(stack(x)) * loss_scale
    variables = stack.trainable_variables
    grads = tape.gradient(loss, [*variables, x, *scales])
    out = {}
    for v, g in zip(variables, grads):
        g = tf.cast(g, tf.float32) / loss_scale
        block = _block_index(v)
        if scales and block is not None:
            g = g / tf.convert_to_tensor(scales[block])  # what the trainer does
        out[v.path.split("/", 1)[1]] = g.numpy()
    counts = [float(c) for c in grads[len(variables) + 1:]]
    return out, tf.cast(grads[len(variables)], tf.float32).numpy() / loss_scale, counts


def _inputs():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(B, T, D)), tf.float32)
    r = tf.constant(rng.normal(size=(B, T, D)), tf.float32)
    return x, r


def test_float32_gradients_equal_those_without_the_wrapper():
    x, r = _inputs()
    plain = _stack(False)
    scaled = _stack({"initial_scale": 2.0**10})
    _copy_weights(plain, scaled)
    loss = lambda out: ops.sum(ops.cast(out, "float32") * r)  # noqa: E731
    want, want_x, _ = _grads(plain, x, loss)
    got, got_x, counts = _grads(scaled, x, loss)
    assert counts == [0.0] * DEPTH
    # Scaling by 2^10 and unscaling by 2^-10 are exact in float32; what differs is the
    # order in which TensorFlow adds each block's branch gradients to the identity path's
    # once the wrapper's ops are in the graph: sums over the B * T positions, and up to
    # 2 additions per later block on the way back (float32 rounding).
    rtol = reordered_sum_rtol(B * T, chained_ops=2 * DEPTH)
    for name, value in want.items():
        assert_close_to_scale([got[name]], [value], rtol, name)
    assert_close_to_scale([got_x], [want_x], rtol, "d loss / d x")
    np.testing.assert_array_equal(scaled(x), plain(x))  # forward: identities


TINY = 2.0**-48  # the stack's share of the loss: its gradients live around 2^-48
F16_MAX = 65504.0


def _underflow_case(policy_setter, scaling):
    """x0 = Dense(u) (gradient ~1 from its own loss term), out = stack(x0) (gradient ~2^-48)."""
    u, r = _inputs()
    q = tf.constant(np.random.default_rng(1).normal(size=(B, T, D)), tf.float32)
    policy_setter("float32")
    reference_in = keras.layers.Dense(D, name="input")
    reference_in.build((B, T, D))
    reference = _stack(False)
    policy_setter("mixed_float16")
    layer_in = keras.layers.Dense(D, name="input")
    layer_in.build((B, T, D))
    stack = _stack(scaling)
    _copy_weights(reference, stack)
    layer_in.set_weights(reference_in.get_weights())
    return u, r, q, (reference_in, reference), (layer_in, stack)


def _model_grads(layers, u, r, q, loss_scale):
    layer_in, stack = layers
    scales = [b.gradient_scale.scale.value for b in stack.blocks if b.gradient_scale is not None]
    with tf.GradientTape() as tape:
        for s in scales:
            tape.watch(s)
        x0 = layer_in(u)
        out = stack(x0)
        loss = ops.sum(ops.cast(x0, "float32") * q) + TINY * ops.sum(ops.cast(out, "float32") * r)
        loss = loss * loss_scale
    variables = stack.trainable_variables
    grads = tape.gradient(loss, [*variables, layer_in.kernel, *scales])
    result = {}
    for v, g in zip(variables, grads):
        g = tf.cast(g, tf.float32) / loss_scale
        block = _block_index(v)
        if scales and block is not None:
            g = g / tf.convert_to_tensor(scales[block])
        result[v.path.split("/", 1)[1]] = g.numpy()
    return result, tf.cast(grads[len(variables)], tf.float32).numpy() / loss_scale, grads[len(variables) + 1:]


def test_one_global_scale_loses_the_small_blocks_per_resblock_scales_keep_them(policy):
    u, r, q, reference, global_only = _underflow_case(policy, False)
    want, want_input, _ = _model_grads(reference, u, r, q, 1.0)
    # The one global scale a dynamic loss scale settles at: the largest power of two
    # keeping the input layer's float16 gradient (~1 per element) finite, with a factor
    # 2 of margin for float16 rounding.
    GLOBAL = 2.0 ** np.floor(np.log2(F16_MAX / 2 / np.abs(want_input).max()))
    got, input_grad, _ = _model_grads(global_only, u, r, q, GLOBAL)
    assert np.isfinite(input_grad).all()
    blocks = [n for n in want if n.startswith("block_")]
    # Under one loss scale the blocks' float16 gradients (~2^-48 * 2^12) underflow to zero.
    assert all(not np.any(got[n]) for n in blocks), "expected every block gradient to vanish"
    assert all(np.any(want[n]) for n in blocks)
    # And the global scale cannot be raised to rescue them: the input layer overflows first.
    _, overflowing, _ = _model_grads(global_only, u, r, q, GLOBAL * 4)
    assert not np.isfinite(overflowing).all()

    u, r, q, reference, per_block = _underflow_case(policy, {"initial_scale": 2.0**32})
    want, _, _ = _model_grads(reference, u, r, q, 1.0)  # the new layers' float32 reference
    got, input_grad, counts = _model_grads(per_block, u, r, q, GLOBAL)
    assert np.isfinite(input_grad).all() and [float(c) for c in counts] == [0.0] * DEPTH
    # Each block back-propagates at 2^-48 * GLOBAL * 2^32 (~2^-4): float16 rounding only.
    # Forward and backward through a block chain ~16 float16 roundings (two layer norms,
    # four projections, softmax, GELU, each way) plus sums over D = 16 and T = 4 terms,
    # for each of DEPTH blocks the gradient passes: (16 + 16 + 4) * DEPTH * u16.
    rtol = (16 + 16 + 4) * DEPTH * U16
    for name in blocks:
        assert_close_to_scale([got[name]], [want[name]], rtol, name)


def test_non_finite_in_one_block_is_filtered_and_lowers_only_its_scale(policy):
    policy("mixed_float16")
    x, r = _inputs()
    stack = _stack({"initial_scale": 1.0, "growth_interval": 1000})
    stack.blocks[1].gradient_scale.scale.assign(2.0**30)  # its float16 backward overflows
    loss = lambda out: ops.sum(ops.cast(out, "float32") * r)  # noqa: E731
    grads, x_grad, counts = _grads(stack, x, loss)
    assert counts[1] > 0 and counts[0] == counts[2] == 0
    # The filter keeps the overflow out of the identity path: block 0 and the input are finite.
    assert np.isfinite(x_grad).all()
    assert all(np.isfinite(g).all() for n, g in grads.items() if n.startswith(("block_0", "block_2")))
    for block, count in zip(stack.blocks, counts):
        block.gradient_scale.update(count > 0)
    scales = [float(keras.ops.convert_to_numpy(b.gradient_scale.scale)) for b in stack.blocks]
    assert scales == [1.0, 2.0**29, 1.0]
    assert [float(b.gradient_scale.good_steps.value) for b in stack.blocks] == [1.0, 0.0, 1.0]


def test_next_scale_halves_on_overflow_and_doubles_after_the_interval():
    scale, good = 8.0, 0.0
    for _ in range(2):
        scale, good = gs.next_scale(scale, good, False, 3, 1.0, 2.0**64)
    assert (float(scale), float(good)) == (8.0, 2.0)
    scale, good = gs.next_scale(scale, good, False, 3, 1.0, 2.0**64)
    assert (float(scale), float(good)) == (16.0, 0.0)
    scale, good = gs.next_scale(scale, good, True, 3, 1.0, 2.0**64)
    assert (float(scale), float(good)) == (8.0, 0.0)


def test_jax_custom_vjp_matches_the_rule():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from mmt import backend

    entry, exit_ = backend._jax_scale_ops()  # pylint: disable=protected-access
    x = jnp.asarray([1.0, 2.0, 3.0], jnp.float32)
    scale = jnp.asarray(2.0**20, jnp.float32)

    def f(x, scale):  # exit scales 2^-30 by 2^20 before float16 sees it; a branch that overflows at index 2
        h = entry(x, scale, "float16")
        h = h * jnp.asarray([1.0, 1.0, 1e4], jnp.float16)
        return jnp.sum(exit_(h, scale, "float32") * 2.0**-30 * jnp.asarray([1.0, 1.0, 2.0**30]))

    gx, gscale = jax.grad(f, argnums=(0, 1))(x, scale)
    # Index 0, 1: 2^-30 survives float16 through the scale and comes back exactly;
    # index 2: 2^20 * 1e4 overflows float16, is filtered to 0 and counted.
    np.testing.assert_array_equal(np.asarray(gx), [2.0**-30, 2.0**-30, 0.0])
    assert float(gscale) == 1.0


# -- the trainer ---------------------------------------------------------------------


class _StackTask(Task):
    """Masked-token toy on a `TransformerStack` (which picks up the trainer's scaling)."""

    def __init__(self, vocab_size=128, text_length=16, overflow_block=None):
        self.arguments = task_arguments(locals())
        self.vocab_size, self.text_length, self.overflow_block = vocab_size, text_length, overflow_block
        tokens = keras.Input((text_length,), dtype="int32")
        x = keras.layers.Embedding(vocab_size, D, name="embed")(tokens)
        x = TransformerStack(DEPTH, num_heads=2, mlp_dim=2 * D, name="stack")(x)
        logits = keras.layers.Dense(vocab_size, name="logits", dtype="float32")(x)
        self.model = keras.Model(tokens, logits, name="toy")

    def build(self):
        self.model(ops.zeros((1, self.text_length), "int32"))
        if self.overflow_block is not None:
            self.model.get_layer("stack").blocks[self.overflow_block].gradient_scale.scale.assign(2.0**40)

    def compute_losses(self, batch, step, seed):
        ids = batch["text"]["text_ids"]
        mask = ops.cast(ops.not_equal(ids, 0), "float32")
        logits = self.model(ids, training=True)
        ce = keras.losses.sparse_categorical_crossentropy(ids, logits, from_logits=True)
        return {"ce": Ratio(ops.sum(ce * mask), ops.sum(mask))}


def _trainer(data_dir, steps, **kwargs):
    return Trainer(
        task=kwargs.pop("task", _StackTask),
        streams={"text": StreamSpec(data_dir, "text_only", batch_size=8, fields=("text_ids",), text_length=16,
                                    shuffle_buffer=64)},
        train_steps=steps,
        optimizer=functools.partial(Adafactor, learning_rate=Constant(0.01), multiply_by_parameter_scale=False),
        seed=1, log_every=1, progress_bar=False, mode="graph", **kwargs)


def test_trainer_mixed_float16_trains_with_finite_losses(tiny_data, tmp_path, policy):
    trainer = _trainer(tiny_data["data_dir"], 3, precision="mixed_float16", resblock_gradient_scaling=True)
    result = trainer.run(tmp_path)
    assert result.skipped_steps == 0 and np.isfinite(result.last_losses["loss/ce"])
    assert result.last_losses["resblock_filtered"] == 0.0
    assert all(v.dtype == "float32" for v in trainer.task.model.weights)


@pytest.mark.slow
def test_trainer_lowers_only_the_overflowing_blocks_scale_and_checkpoints_the_scales(tiny_data, tmp_path, policy):
    from mmt.training import distribute

    # Two replicas: the filtered counts are all-reduced before the scales move.
    trainer = _trainer(tiny_data["data_dir"], 2, precision="mixed_float16",
                       resblock_gradient_scaling={"initial_scale": 1.0, "growth_interval": 1000},
                       task=functools.partial(_StackTask, overflow_block=1))
    result = trainer.run(tmp_path, strategy=distribute.make_strategy(cpu_replicas=2))
    assert trainer.strategy.num_replicas_in_sync == 2
    stack = trainer.task.model.get_layer("stack")
    scales = [float(keras.ops.convert_to_numpy(b.gradient_scale.scale)) for b in stack.blocks]
    # Block 1 overflowed at both steps (2^40, then 2^39): both skipped, its scale halved
    # twice; the other blocks and the global loss scale did not move.
    assert scales == [1.0, 2.0**38, 1.0]
    assert result.skipped_steps == 2
    assert float(trainer.loss_scale.numpy()) == 2.0**15
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run
    # The scales are model weights: in the checkpoint.
    reader = tf.train.load_checkpoint(CheckpointManager(str(tmp_path / "checkpoints"), None).checkpoints()[-1].path
                                      + "/ckpt")
    keys = [k for k in reader.get_variable_to_shape_map() if k.startswith("model/") and "gradient_scale..scale/" in k]
    assert sorted(float(reader.get_tensor(k)) for k in keys) == [1.0, 1.0, 2.0**38]


_JAX_SCRIPT = r'''
import os, sys
os.environ["KERAS_BACKEND"] = "jax"
import jax, jax.numpy as jnp, numpy as np
from mmt.layers.transformer import TransformerStack
assert "tensorflow" not in sys.modules, "the layers imported TensorFlow"

def build(scaling):
    stack = TransformerStack(2, num_heads=2, mlp_dim=32, gradient_scaling=scaling, name="stack")
    stack.build((2, 4, 16))
    return stack

plain, scaled = build(False), build({"initial_scale": 1024.0})
values = {v.path: np.array(v) for v in plain.trainable_variables}
for v in scaled.trainable_variables:
    v.assign(values[v.path])
rng = np.random.default_rng(0)
x, r = (jnp.asarray(rng.normal(size=(2, 4, 16)), jnp.float32) for _ in range(2))

def grads(stack):
    def loss(trainable, non_trainable, x):
        out, _ = stack.stateless_call(trainable, non_trainable, x)
        return jnp.sum(out * r)
    tv = [v.value for v in stack.trainable_variables]
    ntv = [v.value for v in stack.non_trainable_variables]
    return jax.grad(loss, argnums=(0, 1, 2))(tv, ntv, x)

gp, _, xp = grads(plain)
gs, counts, xs = grads(scaled)
for v, a, b in zip(scaled.trainable_variables, gp, gs):
    b = b / 1024.0 if "block_" in v.path else b  # the trainer's unscaling of branch parameters
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=RTOL * float(jnp.abs(a).max()), err_msg=v.path)
np.testing.assert_allclose(np.asarray(xs), np.asarray(xp), rtol=0, atol=RTOL * float(jnp.abs(xp).max()))
assert all(float(c) == 0.0 for c in counts), counts
print("ok")
'''


@pytest.mark.slow
def test_jax_backend_stack_gradients_equal_those_without_the_wrapper():
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("jax")
    rtol = reordered_sum_rtol(B * T, chained_ops=2 * DEPTH)  # as the TensorFlow case
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", _JAX_SCRIPT.replace("RTOL", repr(rtol))], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
