"""What a step with N replicas computes when its random draws are on (masks, dropout, drop-path).

Replica semantics: with N replicas, one step is the step a single replica would take on
the whole global batch if shard r's random draws came from the seed (run seed, step, r).
Masks, dropout and drop-path therefore differ from one shard to another (a 1-replica
run of the same batch draws other numbers, so its update is not the same one), while the
loss normalisation and the gradient sum do not depend on N: a `Ratio` divides by its
denominator summed over all shards, a mean loss by N, and the shards' gradients are
summed once. The test below rebuilds that step by hand on one replica, shard by shard,
and compares it with the trainer's 2-replica step.
"""

import functools

import numpy as np
import tensorflow as tf

from mmt import backend as rng
from mmt.training import distribute
from mmt.optimizers import Adafactor, Constant
from mmt.tasks.base import Ratio
from mmt.training.trainer import Trainer
from tiny_task import TinyTask
from tolerances import assert_close_to_scale, reordered_sum_rtol

SEED, BATCH, LENGTH, REPLICAS = 5, 8, 16, 2


def _trainer():
    return Trainer(task=functools.partial(TinyTask, text_length=LENGTH, random_mask=True, dropout=0.1,
                                          drop_path=0.1),
                   streams={}, train_steps=1, seed=SEED, mode="graph", clip_grad_norm=1.0, progress_bar=False,
                   optimizer=functools.partial(Adafactor, learning_rate=Constant(0.01), beta_1=0.9,
                                               multiply_by_parameter_scale=False))


def _batch():
    ids = np.random.default_rng(0).integers(3, 128, (BATCH, LENGTH)).astype(np.int32)
    ids[:, 12:] = 0  # padding
    return ids


def test_two_replicas_step_is_the_shard_seeded_step_of_one(tmp_path):
    ids = _batch()
    shards = np.split(ids, REPLICAS)

    two = _trainer()
    two.build(distribute.make_strategy(cpu_replicas=REPLICAS))
    assert two.strategy.num_replicas_in_sync == REPLICAS
    initial = [np.array(v) for v in two.task.model.trainable_variables]
    batch = two.strategy.experimental_distribute_values_from_function(
        lambda ctx: {"text": {"text_ids": tf.constant(shards[ctx.replica_id_in_sync_group])}})
    _, applied = two.train_step(batch)
    assert bool(applied)

    one = _trainer()
    one.build()
    variables = one.task.model.trainable_variables
    # The same initial weights: both builds seed Keras's initializers from the run's seed.
    for a, b in zip(initial, variables):
        np.testing.assert_array_equal(a, np.array(b))

    def shard_losses(r):
        seed = rng.for_step(SEED, 0, r)  # what replica r of the trainer draws from
        with rng.scope(seed):
            return one.task.compute_losses({"text": {"text_ids": tf.constant(shards[r])}},
                                           tf.constant(0, tf.int64), seed)

    # A Ratio divides by its denominator summed over every shard (draws are pure functions
    # of the seed, so a second call redraws the same masks).
    first = [shard_losses(r) for r in range(REPLICAS)]
    denominators = {n: sum(float(raw[n].denominator) for raw in first)
                    for n, value in first[0].items() if isinstance(value, Ratio)}
    grads = [tf.zeros_like(v) for v in variables]
    for r in range(REPLICAS):
        with tf.GradientTape() as tape:
            raw = shard_losses(r)
            total = tf.add_n([one.task.loss_weights.get(n, 1.0) *
                              (v.numerator / denominators[n] if n in denominators else v / REPLICAS)
                              for n, v in raw.items()])
        grads = [a + b for a, b in zip(grads, tape.gradient(total, variables))]
    # Shard 1 drew other numbers than shard 0 would have (same weights): draws are per replica.
    seed = rng.for_step(SEED, 0, 0)
    with rng.scope(seed):
        as_shard_0 = one.task.compute_losses({"text": {"text_ids": tf.constant(shards[1])}},
                                             tf.constant(0, tf.int64), seed)
    assert float(as_shard_0["masked_ce"].numerator) != float(first[1]["masked_ce"].numerator)
    grads, _ = tf.clip_by_global_norm(grads, 1.0)
    one.optimizers["model"].apply(grads, variables)

    # Every gradient sums over the global batch's tokens, in another grouping (shards
    # then the all-reduce); one optimizer step.
    rtol = reordered_sum_rtol(BATCH * LENGTH + 1, steps=1)
    assert_close_to_scale([np.array(v) for v in two.task.model.trainable_variables], [np.array(v) for v in variables],
                          rtol, "weights")


def test_cpu_mirrored_strategies_in_one_process_do_not_share_collective_keys():
    """Two CPU-mirrored strategies in one process, each summing tensors of its own shape.

    With TensorFlow's default collective all-reduce, both strategies number their ops
    from the same keys and the second fails with "Shape mismatch in the collective
    instance" (seen when pytest put two replica tests in one worker).
    """
    for width in (3, 5):
        strategy = distribute.make_strategy(cpu_replicas=REPLICAS)

        @tf.function
        def step(width=width):
            def replica_fn():
                ctx = tf.distribute.get_replica_context()
                value = tf.fill([width], tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32))
                return ctx.all_reduce("sum", value)
            return strategy.run(replica_fn)

        summed = strategy.experimental_local_results(step())
        for result in summed:  # 1 + 2 on every element, on every replica
            np.testing.assert_array_equal(result.numpy(), np.full([width], 3.0, np.float32))
