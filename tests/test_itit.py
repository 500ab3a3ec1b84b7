"""ITIT: token dropping, the gradient scale, stop-gradients, half vs full cycles, Table 2
configurations, XLA == eager, parameter totals."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from mmt.models import itit_inference
from mmt.models.itit import ITIT
from mmt.tasks.itit import ITITTask
from mmt.optimizers import Adafactor, Constant
from harness import assert_xla_matches_eager, check_layer
from tolerances import assert_close_to_scale, reordered_sum_rtol
from mmt.tasks.base import StepSeed
from mmt.training.trainer import Trainer
from t5_presets import t5_preset

NETWORK = dict(size="tiny", image_vocab_size=32, grid=(4, 4), text_vocab_size=40, text_length=6,
               size_overrides={"encoder_depth": 1, "encoder_width": 32, "decoder_width": 32,
                               "text_encoder_width": 32, "encoder_heads": 2, "decoder_heads": 2,
                               "text_decoder_depth": 1, "image_decoder_depth": 1})
B = 4


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 40, (B, 6)).astype(np.int32)
    ids[:, 4] = 1  # EOS
    ids[:, 5] = 0  # padding
    return {
        "paired": {"image_tokens": rng.integers(0, 32, (B, 4, 4)).astype(np.int32), "text_ids": ids},
        "text_only": {"text_ids": ids[::-1].copy()},
        "image_only": {"image_tokens": rng.integers(0, 32, (B, 4, 4)).astype(np.int32)},
    }


def _task(**kwargs):
    task = ITITTask(network=NETWORK, cycle_start_step=0, synthesis_steps=2, **kwargs)
    task.build()
    return task


def _grads(task, loss_fn):
    variables = task.model.trainable_variables
    with tf.GradientTape() as tape:
        loss = loss_fn()
    return {v.path: g for v, g in zip(variables, tape.gradient(loss, variables))}


def _norm(grads, prefix):
    # Paths are "<model name>/<component>/..."; the model name varies (itit, itit_1, ...).
    values = [tf.norm(g) for p, g in grads.items() if p.split("/", 1)[1].startswith(prefix) and g is not None]
    return float(tf.add_n(values)) if values else 0.0


def test_keep_order_drops_only_masked_tokens():
    model = ITIT(**NETWORK)
    mask = np.zeros((2, 16), bool)
    mask[0, :10] = True
    mask[1, 3:16] = True
    order = np.asarray(model.keep_order(ops.convert_to_tensor(mask), seed=1))
    kept = 16 - model.num_dropped
    assert model.num_dropped == 8
    for row in range(2):
        assert sorted(order[row]) == list(range(16))
        dropped = order[row, kept:]
        assert mask[row, dropped].all()  # only masked tokens are dropped
        assert not mask[row, order[row, : 16 - mask[row].sum()]].any()  # unmasked come first


def test_mask_ratios_below_the_drop_ratio_are_refused_and_a_lower_drop_ratio_allows_them():
    with pytest.raises(ValueError, match="mask_min = 0.25 is below the network's drop_ratio 0.5"):
        ITITTask(network=NETWORK, mask_min=0.25)
    task = ITITTask(network={**NETWORK, "drop_ratio": 0.25}, mask_min=0.25, i2t_mask_max=0.5)
    assert task.model.num_dropped == 4  # a quarter of the 4 x 4 grid


def test_image_decoder_restores_positions_whatever_the_kept_order():
    model = ITIT(**NETWORK)
    model.build_all()
    rng = np.random.default_rng(0)
    tokens = ops.convert_to_tensor(rng.integers(0, 32, (1, 16)).astype(np.int32))
    mask = ops.convert_to_tensor(np.arange(16)[None] >= 8)  # 8 masked: exactly the dropped count
    features, valid = model.encode_text(ops.convert_to_tensor(np.array([[5, 6, 1, 0, 0, 0]], np.int32)))
    outputs = []
    for seed in (1, 2):  # two random orders of the same kept tokens
        order = model.keep_order(mask, seed=seed)
        z, z_valid = model.encode(model.embed_image(tokens, mask=mask, order=order), features, valid)
        outputs.append(np.asarray(model.image_logits(z, z_valid, order)))
    # Kept tokens permute with their positions (attention is permutation-equivariant),
    # dropped positions get the mask token: the restored logits agree up to the order of
    # float32 sums (tests/tolerances.py): attention over the keys and, for safety, every
    # contraction (the longest is the MLP's 4 x 32 = 128), in two blocks one after the other.
    assert_close_to_scale([outputs[1]], [outputs[0]], reordered_sum_rtol(128, steps=2), "logits")


def test_inference_drops_masked_tokens_while_every_row_has_enough_masked():
    model = ITIT(**NETWORK)
    model.build_all()
    rng = np.random.default_rng(3)
    text = ops.convert_to_tensor(np.array([[5, 6, 1, 0, 0, 0]] * 2, np.int32))
    features, valid = model.encode_text(text)
    logits_fn = itit_inference.image_logits_fn(model, text)
    compiled = tf.function(logits_fn, jit_compile=True)

    def reference(tokens, mask, drop):
        order = model.keep_order(mask) if drop else None
        z, z_valid = model.encode(model.embed_image(tokens, mask=mask, order=order), features, valid)
        return np.asarray(model.image_logits(z, z_valid, order))

    for masked_counts, drop in (((10, 12), True), ((10, 5), False)):  # num_dropped = 8 of 16
        mask = np.zeros((2, 16), bool)
        for row, count in enumerate(masked_counts):
            mask[row, rng.permutation(16)[:count]] = True
        tokens = np.where(mask, model.mask_id, rng.integers(0, 32, (2, 16))).astype(np.int32)
        mask, tokens = ops.convert_to_tensor(mask), ops.convert_to_tensor(tokens)
        expected = reference(tokens, mask, drop)
        # Other shapes (dropped tokens gathered) reorder float32 sums, as above; XLA adds
        # its own exp / rsqrt / erf (a few ulp each, ~16 along the chain).
        assert_close_to_scale([np.asarray(logits_fn(tokens))], [expected], reordered_sum_rtol(128, steps=2), "eager")
        assert_close_to_scale([np.asarray(compiled(tokens))], [expected],
                              reordered_sum_rtol(128, steps=2, chained_ops=16), "xla")
        if drop:  # the two encoder inputs do differ: the comparison can tell them apart
            assert np.abs(reference(tokens, mask, False) - expected).max() > 1e-3
    order = np.asarray(model.keep_order(mask))
    assert (order == np.asarray(model.keep_order(mask))).all()  # fixed without a seed
    assert np.asarray(mask)[0, order[0, 8:]].all()


def test_git_mask_text_decoder_is_causal_and_sees_all_image_features():
    model = ITIT(**NETWORK)
    model.build_all()
    rng = np.random.default_rng(1)
    z = ops.convert_to_tensor(rng.normal(size=(1, 22, 32)).astype(np.float32))
    valid = ops.ones((1, 22), "bool")
    ids = np.array([[3, 7, 8, 9, 10, 11]], np.int32)
    base = np.asarray(model.text_logits(z, valid, ids))
    changed = ids.copy()
    changed[0, 4] = 20
    later = np.asarray(model.text_logits(z, valid, changed))
    np.testing.assert_allclose(base[0, :4], later[0, :4], atol=1e-6)  # earlier positions unaffected
    assert np.abs(base[0, 4:] - later[0, 4:]).max() > 1e-4
    z2 = np.asarray(z).copy()
    z2[0, 0] += 1.0  # an image feature reaches the first text position
    assert np.abs(np.asarray(model.text_logits(z2, valid, ids))[0, 0] - base[0, 0]).max() > 1e-4


def test_i2t_gradient_into_the_encoder_is_scaled_by_a_tenth():
    grads = {}
    for scale in (1.0, 0.1):
        keras.utils.set_random_seed(0)
        task = _task(encoder_gradient_scale=scale)
        ids = ops.convert_to_tensor(_batch()["paired"]["text_ids"])
        tokens = ops.convert_to_tensor(_batch()["paired"]["image_tokens"].reshape(B, 16))
        grads[scale] = _grads(task, lambda: ops.divide(*task.i2t_losses(ids, StepSeed([0, 1]), tokens=tokens)[0]))
    ratio = _norm(grads[0.1], "encoder") / _norm(grads[1.0], "encoder")
    assert ratio == pytest.approx(0.1, rel=1e-3)
    assert _norm(grads[0.1], "text_decoder") == pytest.approx(_norm(grads[1.0], "text_decoder"), rel=1e-5)


def _cycle_gradients(task, loss_fn):
    """Gradients w.r.t. the variables, and w.r.t. each encoder output in call order."""
    outputs, encode = [], task.model.encode

    def recording_encode(*args, **kwargs):
        z, valid = encode(*args, **kwargs)
        outputs.append(z)
        return z, valid

    task.model.encode = recording_encode
    variables = task.model.trainable_variables
    try:
        with tf.GradientTape(persistent=True) as tape:
            loss = loss_fn()
        grads = dict(zip([v.path for v in variables], tape.gradient(loss, variables)))
        by_pass = [tape.gradient(loss, z) for z in outputs]
    finally:
        del task.model.encode
    return grads, [0.0 if g is None else float(tf.norm(g)) for g in by_pass]


@pytest.mark.parametrize("mode", ["half", "full"])
def test_t2i2t_half_and_full_cycles(mode):
    task = _task(t2i2t=mode)
    ids = ops.convert_to_tensor(_batch()["text_only"]["text_ids"])
    grads, passes = _cycle_gradients(task, lambda: ops.divide(*task.t2i2t_loss(ids, StepSeed([0, 2]))))
    # The reconstruction (one T2I pass) gets gradient only through the estimator.
    assert (_norm(grads, "image_decoder") > 0) == (mode == "full")
    # Encoder passes: the synthesis, the first (reconstruction) pass, then the I2T pass;
    # only the last one receives gradient (App. B: stop after the first pass).
    assert len(passes) >= 3 and all(g == 0.0 for g in passes[:-1]) and passes[-1] > 0
    assert _norm(grads, "text_decoder") > 0


@pytest.mark.parametrize("mode", ["half", "full"])
def test_i2t2i_half_and_full_cycles(mode):
    task = _task(i2t2i=mode)
    tokens = ops.convert_to_tensor(_batch()["image_only"]["image_tokens"].reshape(B, 16))
    grads, passes = _cycle_gradients(task, lambda: ops.divide(*task.i2t2i_loss(tokens, StepSeed([0, 3]))))
    assert (_norm(grads, "text_decoder") > 0) == (mode == "full")
    assert _norm(grads, "image_decoder") > 0
    assert len(passes) >= 3 and all(g == 0.0 for g in passes[:-1]) and passes[-1] > 0


TABLE_2 = {  # row: (t2i, i2t, t2i2t, i2t2i)
    1: (True, False, "off", "off"), 2: (False, True, "off", "off"), 3: (True, True, "off", "off"),
    5: (True, True, "baseline", "off"), 6: (True, True, "off", "baseline"), 7: (True, True, "baseline", "baseline"),
    8: (True, True, "half", "off"), 9: (True, True, "off", "half"), 10: (True, True, "half", "half"),
    11: (True, True, "full", "off"), 12: (True, True, "off", "full"), 14: (True, True, "full", "full"),
}


def _trainer(row, mode="eager"):
    t2i, i2t, t2i2t, i2t2i = TABLE_2[row]
    return Trainer(
        task=functools.partial(ITITTask, network=NETWORK, t2i=t2i, i2t=i2t, t2i2t=t2i2t, i2t2i=i2t2i,
                               cycle_start_step=1, synthesis_steps=2),
        streams={}, train_steps=2, mode=mode,
        optimizer=functools.partial(Adafactor, learning_rate=Constant(1e-3), beta_1=0.9, beta_2=0.96,
                                    multiply_by_parameter_scale=False, weight_decay=0.045),
        clip_grad_norm=3.0)


@pytest.mark.slow
@pytest.mark.parametrize("row", sorted(TABLE_2))
def test_every_table_2_configuration_trains_two_steps(row):
    trainer = _trainer(row)
    trainer.build()
    batch = tf.nest.map_structure(tf.constant, _batch())
    before = [np.array(v) for v in trainer.task.model.trainable_variables]
    for _ in range(2):  # step 0: paired only; step 1: the cycles have started
        metrics, applied = trainer.train_step(batch)
        assert bool(applied)
    names = {k.split("/", 1)[1] for k in metrics if k.startswith("loss/")}
    t2i, i2t, t2i2t, i2t2i = TABLE_2[row]
    expected = ({"t2i"} if t2i else set()) | ({"i2t", "i2i"} if i2t else set())
    expected |= {"baseline": {"t2t"}, "off": set()}.get(t2i2t, {"t2i2t"})
    expected |= {"baseline": {"i2i_unpaired"}, "off": set()}.get(i2t2i, {"i2t2i"})
    assert names == expected
    assert all(np.isfinite(float(v)) for v in metrics.values())
    after = [np.array(v) for v in trainer.task.model.trainable_variables]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_t2i_loss_xla_equals_eager():
    task = _task()
    m = task.model
    batch = _batch()
    tokens = ops.convert_to_tensor(batch["paired"]["image_tokens"].reshape(B, 16))
    ids = ops.convert_to_tensor(batch["paired"]["text_ids"])
    mask = ops.convert_to_tensor(np.arange(16)[None].repeat(B, 0) % 3 != 0)
    order = ops.convert_to_tensor(np.argsort(np.where(np.asarray(mask), 1, 0), kind="stable", axis=1).astype(np.int32))

    def loss():
        features, valid = m.encode_text(ids)
        z, z_valid = m.encode(m.embed_image(tokens, mask=mask, order=order), features, valid)
        logits = m.image_logits(z, z_valid, order)
        text = m.text_logits(z, z_valid, m.text_decoder_inputs(ids))
        return ops.mean(logits) + ops.mean(text)

    # XLA reorders float32 sums (the longest: the MLP's 4 x 32 = 128 terms) and brings its
    # own exp / erf / rsqrt (~16 along the chain); encoder then decoder (tests/tolerances.py).
    assert_xla_matches_eager(loss, rtol=reordered_sum_rtol(128, steps=2, chained_ops=16), what="t2i loss")


def test_standard_checks_of_the_network():
    """Config round trip, eager == XLA, mixed_bfloat16 (tests/harness.py) on the whole network."""
    batch = _batch()["paired"]
    inputs = {"image_tokens": batch["image_tokens"].reshape(B, 16), "text_ids": batch["text_ids"]}
    # As above; the call runs the encoder and both decoders, two blocks on any path.
    check_layer(lambda: ITIT(**NETWORK), inputs, xla_rtol=reordered_sum_rtol(128, steps=2, chained_ops=16),
                mixed_dtype="float32", lazy_variables=True)


def _itit_parameters(c, vocab, codes, t5_width, text_length, k):
    """ITIT's trainable parameters (T5 and the VQ tokenizer excluded) for the `ITITSize` c."""
    d, e = c.encoder_width, c.decoder_width
    block = lambda w: 12 * w * w + 13 * w  # qkv/out/mlp kernels and biases, two LayerNorms
    total = (codes + 1) * d + k * d + (t5_width + 1) * d + c.encoder_depth * block(d) + 2 * d
    total += (d + 1) * e + k * e + c.image_decoder_depth * block(e) + 2 * e + (e + 1) * codes + e
    total += (d + 1) * e + vocab * e + vocab + text_length * e + c.text_decoder_depth * block(e) + 2 * e
    return total


def test_parameter_formula_counts_the_built_network(tmp_path):
    # The formula below gives Table 1's totals; here it must match a built network with
    # B's widths (one block per stack, to stay small) and a T5 preset as the text encoder.
    from mmt.models.variants import itit_size

    overrides = {"encoder_depth": 1, "image_decoder_depth": 1, "text_decoder_depth": 1}
    t5_preset(tmp_path / "t5", hidden_dim=24)
    m = ITIT(size="B", image_vocab_size=64, grid=(4, 4), text_length=8, text_encoder=str(tmp_path / "t5"),
             size_overrides=overrides)
    m.build_all()
    built = sum(int(np.prod(v.shape)) for v in m.trainable_variables)
    assert built == _itit_parameters(itit_size("B", **overrides), vocab=40, codes=64, t5_width=24, text_length=8,
                                     k=16)


def test_paper_sizes_have_the_papers_parameter_counts():
    from mmt.models.variants import ITIT_SIZES

    for size, paper in (("B", 221), ("L", 487), ("H", 868)):
        total = _itit_parameters(ITIT_SIZES[size], vocab=32128, codes=8192, t5_width=4096, text_length=64,
                                 k=256) / 1e6
        assert abs(total - paper) / paper < 0.05, (size, total)


@pytest.mark.slow
def test_full_cycle_train_step_compiles_with_xla():
    # Static shapes everywhere: both cycles (parallel decoding, greedy captioning inside
    # the step) compile into one XLA program. XLA's RNG differs from TensorFlow's kernels
    # (measured: same seed, other numbers), so values are compared on the
    # deterministic path in test_t2i_loss_xla_equals_eager.
    trainer = _trainer(14, mode="xla")
    trainer.build()
    batch = tf.nest.map_structure(tf.constant, _batch())
    for _ in range(2):
        metrics, applied = trainer.train_step(batch)
    assert bool(applied) and trainer.jit_compile
    assert {"loss/t2i2t", "loss/i2t2i"} <= set(metrics)
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_cached_captioning_equals_full_recomputation_and_beam_one_is_greedy():
    task = _task()
    keras.utils.set_random_seed(3)
    for v in task.model.trainable_variables:  # larger weights: distinct, non-trivial captions
        v.assign(v * 4.0)
    tokens = ops.convert_to_tensor(_batch()["image_only"]["image_tokens"].reshape(B, 16))
    cached = np.asarray(itit_inference.greedy_captions(task.model, tokens))
    full = np.asarray(itit_inference.greedy_captions(task.model, tokens, cached=False))
    np.testing.assert_array_equal(cached, full)
    beam1 = np.asarray(itit_inference.beam_captions(task.model, tokens, beam_size=1))
    np.testing.assert_array_equal(beam1, cached)
    beam4 = np.asarray(itit_inference.beam_captions(task.model, tokens, beam_size=4))
    assert beam4.shape == (B, 6) and beam4.min() >= 0 and beam4.max() < 40


def test_one_compiled_step_per_cycle_phase():
    # The cycles start at a step: the trainer compiles one step before and one after
    # instead of a `cond` on the step tensor (which made XLA recompile every step).
    trainer = _trainer(14, mode="graph")
    trainer.build()
    assert tuple(trainer.task.phase_boundaries()) == (1,)
    batch = tf.nest.map_structure(tf.constant, _batch())
    first, _ = trainer.train_step(batch)  # step 0: warm-up, no cycle computed
    second, _ = trainer.train_step(batch)  # step 1: cycles on
    third, _ = trainer.train_step(batch)
    assert sorted(trainer._step_fns) == [0, 1]
    assert float(first["loss/t2i2t"]) == 0.0 and float(first["loss/i2t2i"]) == 0.0
    assert float(second["loss/t2i2t"]) > 0.0 and float(third["loss/i2t2i"]) > 0.0


def test_t5_preset_on_disk_is_the_frozen_text_encoder(tmp_path):
    """ITIT §4.1: a keras-hub T5 preset from a local directory embeds the text, frozen."""
    preset = tmp_path / "t5_preset"
    t5 = t5_preset(preset)
    network = {**NETWORK, "text_vocab_size": 999, "text_encoder": str(preset)}
    trainer = Trainer(task=functools.partial(ITITTask, network=network, cycle_start_step=0, synthesis_steps=2,
                                             t2i2t="full", i2t2i="full"),
                      streams={}, train_steps=2, mode="graph",
                      optimizer=functools.partial(Adafactor, learning_rate=Constant(1e-2)))
    trainer.build()
    m = trainer.task.model
    assert m.text_vocab_size == 40  # the preset's vocabulary, whatever the binding said
    assert m.text_encoder.output_dim == 16

    # The encoder's features are T5's own encoder output at the text positions.
    ids = _batch()["paired"]["text_ids"]
    valid = ids != 0
    features, got_valid = m.encode_text(ops.convert_to_tensor(ids))
    reference = t5({"encoder_token_ids": ids, "encoder_padding_mask": valid,
                    "decoder_token_ids": ids[:, :1], "decoder_padding_mask": valid[:, :1]})["encoder_sequence_output"]
    np.testing.assert_array_equal(np.asarray(got_valid), valid)
    # Exact by construction: keras-hub's own layers, the same weights, the same kernels
    # and shapes; the soft path's one-hot matmul adds exact zeros to the gathered row.
    np.testing.assert_array_equal(np.asarray(features)[valid], np.asarray(reference)[valid])
    # The soft path (I2T2I's straight-through caption) reads the same table.
    soft, _ = m.encode_soft_text(ops.one_hot(ids, 40), ops.convert_to_tensor(valid))
    np.testing.assert_array_equal(np.asarray(soft)[valid], np.asarray(reference)[valid])

    # Frozen: no T5 weight is trainable, and training steps leave every one of them as it was.
    t5_weights = m.text_encoder.weights
    assert not {id(v) for v in t5_weights} & {id(v) for v in m.trainable_variables}
    before = [np.array(v) for v in t5_weights]
    others = [np.array(v) for v in m.trainable_variables]
    for _ in range(2):
        metrics, applied = trainer.train_step(tf.nest.map_structure(tf.constant, _batch()))
        assert bool(applied)
    assert {"loss/t2i2t", "loss/i2t2i"} <= set(metrics)
    for a, v in zip(before, t5_weights):
        np.testing.assert_array_equal(a, np.array(v))
    assert any(not np.array_equal(a, np.array(v)) for a, v in zip(others, m.trainable_variables))


def test_compiled_generation_equals_eager_and_compiles_once_per_shape():
    """`text_to_image_tokens` / `image_tokens_to_text` under XLA give the eager run's codes and
    captions (stateless draws from the seed), and a second call of one shape reuses the graph."""
    compiled, eager = _task(), _task(compile_inference=False)
    keras.utils.set_random_seed(3)
    for v in compiled.model.trainable_variables:  # larger weights: non-trivial samples
        v.assign(v * 4.0)
    for a, b in zip(compiled.model.weights, eager.model.weights):
        b.assign(a)
    ids = _batch()["paired"]["text_ids"]
    options = dict(num_steps=3, guidance_scale=2.0, choice_temperature=1.0, sampling_temperature=1.0)
    codes = compiled.text_to_image_tokens(ids, seed=5, **options)
    np.testing.assert_array_equal(codes, eager.text_to_image_tokens(ids, seed=5, **options))
    assert codes.shape == (B, 4, 4) and codes.min() >= 0 and codes.max() < 32
    assert not np.array_equal(codes, compiled.text_to_image_tokens(ids, seed=6, **options))
    for beam in (1, 2):
        captions = compiled.image_tokens_to_text(codes, beam_size=beam)
        np.testing.assert_array_equal(captions, eager.image_tokens_to_text(codes, beam_size=beam))
        assert captions.shape == (B, 6)
    assert len(compiled._compiled) == 3  # t2i at one option set (two seeds), i2t at beams 1 and 2
