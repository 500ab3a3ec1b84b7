"""UPGen: mask ratios (U(0, 1) over the whole paired sequence, 15% for unpaired text), the
weighted masked loss by hand, modality-type embeddings, conditioning kept by the sampler,
XLA == eager, the tiny gin config learning, valid generated ids, and the command-line chain
(train -> generate -> linear probe) on real records."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops
from scipy import stats

from mmt.models import upgen_inference
from mmt.models.upgen import IMAGE, IMAGE_ONLY, PAIRED, TEXT, TEXT_ONLY, UPGen
from mmt.tasks.upgen import UPGenTask
from mmt.sampling.mask_schedule import masked_counts
from mmt.tasks.base import StepSeed
from mmt.training.trainer import Trainer
from harness import assert_no_tensorflow, check_layer
from tolerances import assert_close_to_scale, reordered_sum_rtol

REPO = Path(__file__).resolve().parents[1]
V_I, V_T, K, L, B = 32, 40, 16, 8, 4
NETWORK = dict(size="tiny", image_vocab_size=V_I, grid=(4, 4), text_vocab_size=V_T, text_length=L,
               size_overrides={"width": 32, "depth": 2, "heads": 2})


def _text(rng, n):
    ids = rng.integers(4, V_T, (n, L)).astype(np.int32)
    ids[:, 5] = 1  # EOS
    ids[:, 6:] = 0  # padding
    return ids


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "paired": {"image_tokens": rng.integers(0, V_I, (B, 4, 4)).astype(np.int32), "text_ids": _text(rng, B)},
        "text_only": {"text_ids": _text(rng, B)},
        "image_only": {"image_tokens": rng.integers(0, V_I, (B, 4, 4)).astype(np.int32)},
    }


def _task(**kwargs):
    task = UPGenTask(network=NETWORK, **kwargs)
    task.build()
    return task


def _recording_masks(task):
    """Wraps `masked_losses` to record the mask of each stream's layout."""
    seen = {}
    original = task.masked_losses

    def record(ids, mask, modalities, training=True):
        seen[modalities] = np.asarray(mask)
        return original(ids, mask, modalities, training)

    task.masked_losses = record
    return seen


def test_model_modules_import_neither_tensorflow_nor_gin():
    files = ["mmt/models/upgen.py", "mmt/models/upgen_inference.py", "mmt/tasks/upgen.py"]
    seen = assert_no_tensorflow(files, ["mmt.models.upgen", "mmt.models.upgen_inference", "mmt.tasks.upgen"])
    assert "mmt.layers" in seen


# -- masking ------------------------------------------------------------------------------


def test_paired_mask_ratio_is_uniform_over_the_whole_sequence_and_unpaired_text_is_15_percent():
    task = _task()
    n = 2000
    ids, modalities = task.model.sequence(np.zeros((n, K), np.int32), np.zeros((n, L), np.int32))
    mask = np.asarray(task.uniform_mask(ids, modalities, StepSeed([0, 1])))
    ratios = mask.mean(axis=1)  # counts round(r * 24), at least 1
    assert stats.kstest(ratios, "uniform").pvalue > 1e-3
    assert abs(ratios.mean() - 0.5) < 0.03 and ratios.min() > 0 and ratios.max() == 1.0
    # One ratio for the whole [image; text] sequence: image and text ratios move together.
    assert np.corrcoef(mask[:, :K].mean(1), mask[:, K:].mean(1))[0, 1] > 0.7
    fixed = np.asarray(task.fixed_mask(ops.zeros((n, 40), "int32"), TEXT_ONLY, StepSeed([0, 2])))
    assert (fixed.sum(axis=1) == 6).all()  # round(0.15 * 40)

    # compute_losses uses exactly these: U(0, 1) for paired and image-only, 15% for text.
    seen = _recording_masks(task)
    task.compute_losses(tf.nest.map_structure(tf.constant, _batch()), 0, StepSeed([0, 3]))
    assert set(seen) == {PAIRED, IMAGE_ONLY, TEXT_ONLY}
    assert (seen[TEXT_ONLY].sum(axis=1) == round(0.15 * L)).all()
    assert len(set(seen[PAIRED].sum(axis=1))) > 1  # per-example ratios


def test_mixed_paired_masking_also_masks_one_modality_alone():
    task = _task(paired_masking="mixed")
    n = 600
    ids, modalities = task.model.sequence(np.zeros((n, K), np.int32), np.zeros((n, L), np.int32))
    mask = np.asarray(task.uniform_mask(ids, modalities, StepSeed([0, 5])))
    image_only = mask[:, :K].any(1) & ~mask[:, K:].any(1)
    text_only = ~mask[:, :K].any(1) & mask[:, K:].any(1)
    both = mask[:, :K].any(1) & mask[:, K:].any(1)
    assert (image_only | text_only | both).all()
    for share in (image_only.mean(), text_only.mean()):
        assert 0.25 < share < 0.42  # a third each, plus joint masks that happen to miss a modality
    with pytest.raises(ValueError, match="paired_masking"):
        UPGenTask(network=NETWORK, paired_masking="bogus")


def test_mask_padding_false_never_masks_text_padding():
    task = _task(mask_padding=False)
    ids, modalities = task.model.sequence(np.zeros((64, K), np.int32), _text(np.random.default_rng(0), 64))
    mask = np.asarray(task.uniform_mask(ids, modalities, StepSeed([0, 4])))
    assert not mask[:, K + 6:].any() and mask[:, :K + 6].any()


# -- the loss by hand ------------------------------------------------------------------------


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_weighted_masked_loss_by_hand():
    keras.utils.set_random_seed(0)
    trainer = Trainer(task=functools.partial(UPGenTask, network=NETWORK), streams={}, train_steps=1, mode="eager",
                      optimizer=functools.partial(keras.optimizers.SGD, learning_rate=0.0))
    trainer.build()
    task, m = trainer.task, trainer.task.model
    rng = np.random.default_rng(5)
    masks = {layout: rng.random((B, sum(m.lengths(layout)))) < 0.4 for layout in (PAIRED, IMAGE_ONLY, TEXT_ONLY)}
    task.uniform_mask = lambda ids, layout, seed: ops.convert_to_tensor(masks[layout])
    task.fixed_mask = lambda ids, layout, seed: ops.convert_to_tensor(masks[layout])
    batch = _batch()
    metrics, _ = trainer.train_step(tf.nest.map_structure(tf.constant, batch))

    expected = {}
    for stream, layout, prefix in (("paired", PAIRED, "paired_"), ("image_only", IMAGE_ONLY, "unpaired_"),
                                   ("text_only", TEXT_ONLY, "unpaired_")):
        data = batch[stream]
        target = np.concatenate(([data["image_tokens"].reshape(B, K)] if IMAGE in layout else [])
                                + ([data["text_ids"] + V_I] if TEXT in layout else []), axis=1)
        inputs = np.where(masks[layout], m.mask_id, target)
        log_p = _log_softmax(np.asarray(m.logits(ops.convert_to_tensor(inputs), layout)))
        nll = -np.take_along_axis(log_p, target[..., None], -1)[..., 0]
        start = 0
        for modality in layout:
            n = K if modality == IMAGE else L
            sel = masks[layout][:, start:start + n]
            expected[prefix + modality] = nll[:, start:start + n][sel].mean()  # masked positions only
            start += n
    for name, value in expected.items():
        assert float(metrics[f"loss/{name}"]) == pytest.approx(value, rel=1e-5), name
    total = 1.0 * expected["paired_image"] + 0.1 * expected["paired_text"] + 0.01 * expected["unpaired_text"] \
        + 1.0 * expected["unpaired_image"]  # Table 5's weights; accuracies weigh 0
    assert float(metrics["total_loss/model"]) == pytest.approx(total, rel=1e-5)


# -- modality-type embeddings ------------------------------------------------------------------


def test_modality_type_embeddings_distinguish_the_streams():
    model = UPGen(**NETWORK)
    model.build_all()
    blank_image, blank_text = model.masked_empty(1, IMAGE), model.masked_empty(1, TEXT)
    image = np.asarray(model.embed(blank_image, IMAGE_ONLY))[0]  # [K, D]
    text = np.asarray(model.embed(blank_text, TEXT_ONLY))[0]  # [L, D]
    types = np.asarray(model.modality_embedding.embeddings)
    scale = np.sqrt(model.cfg.width)
    # The same [MASK] token: once the fixed positions are taken away, only the (scaled)
    # type embedding tells an image position from a text position.
    image_content = image - np.asarray(model.positions(IMAGE_ONLY))
    text_content = text - np.asarray(model.positions(TEXT_ONLY))
    # Element-wise only (a few float32 additions of terms up to ~35 in size): each result
    # is within a few ulp of 35, about 4 * 35 * 2^-24 = 8e-6 apart at most.
    np.testing.assert_allclose(image_content[:L] - text_content,
                               np.broadcast_to(scale * (types[0] - types[1]), text.shape), atol=1e-5)
    # Token and type terms are on the sinusoids' scale (rms ~1 vs 0.71), not 35x below it.
    assert 0.5 < np.sqrt(np.mean(image_content ** 2)) < 3.0
    assert np.abs(types[0] - types[1]).max() * scale > 0.3
    # A stream's layout is the same wherever it occurs: text-only == the text of a pair.
    paired_ids, _ = model.sequence(blank_image, np.zeros((1, L), np.int32))
    text_ids, _ = model.sequence(None, np.zeros((1, L), np.int32))
    # The same element-wise sums of the same values in another tensor: equal up to the
    # order of two or three additions of O(1) terms (< 2^-21).
    np.testing.assert_allclose(np.asarray(model.embed(paired_ids, PAIRED))[0, K:],
                               np.asarray(model.embed(text_ids, TEXT_ONLY))[0], atol=1e-6)
    # ... and the network's predictions at masked positions differ by modality.
    logits_image = np.asarray(model.logits(blank_image, IMAGE_ONLY))[0, :L]
    logits_text = np.asarray(model.logits(blank_text, TEXT_ONLY))[0]
    assert np.abs(logits_image - logits_text).max() > 1e-3


# -- generation -------------------------------------------------------------------------------


def _trained_looking_task():
    # Seeded before the build: the initial weights must not depend on which tests ran
    # earlier in this process (a scaled-up unlucky draw samples one code everywhere,
    # whatever the seed).
    keras.utils.set_random_seed(3)
    task = _task()
    for v in task.model.trainable_variables:  # larger weights: confident, non-trivial samples
        v.assign(v * 4.0)
    return task


def test_sampler_keeps_the_given_modality_untouched_and_fills_the_other():
    m = _trained_looking_task().model
    batch = _batch()
    tokens, text = batch["paired"]["image_tokens"].reshape(B, K), batch["paired"]["text_ids"]
    # T2I: [MASK * K; text] -- every step's text part is the given text.
    ids, layout = m.sequence(m.masked_empty(B, IMAGE), text)
    out, history = upgen_inference.decode(m, ids, layout, seed=1, num_steps=4, return_history=True)
    history = np.asarray(history)
    assert (history[:, :, K:] == text + V_I).all()
    out = np.asarray(out)
    assert (out[:, :K] >= 0).all() and (out[:, :K] < V_I).all()
    still_masked = (history[:, :, :K] == m.mask_id).sum(axis=2)  # [steps, B]: the cosine schedule's counts
    np.testing.assert_array_equal(still_masked, np.asarray(masked_counts(4, K))[:, None].repeat(B, 1))
    # I2T: [image; MASK * L] -- the image part never changes.
    ids, layout = m.sequence(tokens, m.masked_empty(B, TEXT) - V_I)
    out, history = upgen_inference.decode(m, ids, layout, seed=2, num_steps=4, return_history=True)
    assert (np.asarray(history)[:, :, :K] == tokens).all()
    assert (np.asarray(out)[:, K:] >= V_I).all() and (np.asarray(out)[:, K:] < V_I + V_T).all()


def test_left_to_right_order_reveals_the_text_one_position_after_another():
    m = _trained_looking_task().model
    tokens = _batch()["paired"]["image_tokens"].reshape(B, K)
    ids, layout = m.sequence(tokens, m.masked_empty(B, TEXT) - V_I)
    _, history = upgen_inference.decode(m, ids, layout, seed=3, num_steps=L, order="left_to_right",
                                        sampling_temperature=0.0, return_history=True)
    text = np.asarray(history)[:, :, K:]  # [steps, B, L]
    for step in range(L):  # after step s, exactly positions 0..s are filled
        assert (text[step, :, :step + 1] != m.mask_id).all() and (text[step, :, step + 1:] == m.mask_id).all()
    with pytest.raises(ValueError, match="order"):
        upgen_inference.decode(m, ids, layout, seed=3, order="random")


def test_generated_ids_are_valid_and_of_the_right_modality_only():
    m = _trained_looking_task().model
    batch = _batch()
    text_ids, tokens = batch["paired"]["text_ids"], batch["paired"]["image_tokens"]
    images = np.asarray(upgen_inference.text_to_image(m, text_ids, seed=0, num_steps=4))
    assert images.shape == (B, K) and images.min() >= 0 and images.max() < V_I
    texts = np.asarray(upgen_inference.image_to_text(m, tokens, seed=0, num_steps=4))
    assert texts.shape == (B, L) and texts.min() >= 0 and texts.max() < V_T
    uncond = np.asarray(upgen_inference.unconditional_images(m, 3, seed=0, num_steps=4))
    assert uncond.shape == (3, K) and uncond.min() >= 0 and uncond.max() < V_I
    other = np.asarray(upgen_inference.text_to_image(m, text_ids, seed=1, num_steps=4))
    assert (other != images).any()  # the seed matters
    guided = np.asarray(upgen_inference.text_to_image(m, text_ids, seed=0, num_steps=4, guidance_scale=1.0))
    assert guided.min() >= 0 and guided.max() < V_I
    features = np.asarray(upgen_inference.image_features(m, tokens, all_layers=True))
    assert features.shape == (B, 2 * 32) and np.isfinite(features).all()


# -- XLA == eager ---------------------------------------------------------------------------------


def test_standard_checks_of_the_network():
    """Config round trip, eager == XLA, mixed_bfloat16 (tests/harness.py) on the whole network."""
    paired = _batch()["paired"]
    inputs = {"image_tokens": paired["image_tokens"].reshape(B, K), "text_ids": paired["text_ids"]}
    network = {**NETWORK, "size_overrides": {"width": 32, "depth": 1, "heads": 2}}
    # XLA reorders float32 sums (the longest: the MLP's 4 x 32 = 128 terms) and brings its
    # own exp / erf / rsqrt (~16 along the chain); one block and the head (tests/tolerances.py).
    check_layer(lambda: UPGen(**network), inputs, xla_rtol=reordered_sum_rtol(128, steps=2, chained_ops=16),
                mixed_dtype="float32", lazy_variables=True)


def test_loss_gradient_and_generation_xla_equal_eager():
    task = UPGenTask(network={**NETWORK, "size_overrides": {"width": 32, "depth": 1, "heads": 2}})
    task.build()
    m = task.model
    batch = _batch()
    ids, layout = m.sequence(batch["paired"]["image_tokens"], batch["paired"]["text_ids"])
    # Fixed masks: TensorFlow's XLA and kernel RNGs give different floats for one seed.
    mask = ops.convert_to_tensor(np.random.default_rng(1).random((B, K + L)) < 0.5)

    def loss():
        parts = task.masked_losses(ids, mask, layout, training=False)
        return parts[IMAGE][0][0] / parts[IMAGE][0][1] + 0.1 * parts[TEXT][0][0] / parts[TEXT][0][1]

    def loss_and_grads():
        with tf.GradientTape() as tape:
            value = loss()
        return value, tape.gradient(value, m.trainable_variables)

    eager_loss, eager_grads = loss_and_grads()
    xla_loss, xla_grads = tf.function(loss_and_grads, jit_compile=True)()
    # XLA reorders float32 sums (the longest: the MLP's 4 x 32 = 128 terms; gradients sum
    # over B x (K + L) = 96 positions) and brings its own exp / erf / rsqrt (~16 along the
    # chain); forward then backward: two passes (tests/tolerances.py). Per-tensor scale.
    rtol = reordered_sum_rtol(128, steps=2, chained_ops=16)
    assert float(xla_loss) == pytest.approx(float(eager_loss), rel=rtol)
    assert_close_to_scale([tf.convert_to_tensor(g).numpy() for g in xla_grads],
                          [tf.convert_to_tensor(g).numpy() for g in eager_grads], rtol, "gradients")
    # Generation draws integers only (mmt.backend): the same samples either way.
    from mmt.backend import FixedSeed

    text = tf.constant(batch["paired"]["text_ids"])
    run = lambda t: upgen_inference.text_to_image(m, t, FixedSeed(tf.constant([5, 0])), num_steps=4)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(run(text)), tf.function(run, jit_compile=True)(text).numpy())


# -- the tiny gin config learns ----------------------------------------------------------------------


def test_tiny_gin_config_loss_decreases_in_a_few_steps():
    from mmt import config as mmt_config

    mmt_config.parse([str(REPO / "gin" / "upgen_tiny.gin")], [
        "DATA_DIR = 'unused'", "GRID = (4, 4)", "IMAGE_VOCAB_SIZE = 32", "TEXT_VOCAB_SIZE = 40",
        "TEXT_LENGTH = 8", "WARMUP_STEPS = 2", "TRAIN_STEPS = 12", "Trainer.mode = 'graph'"])
    from mmt import configurables

    trainer = configurables.Trainer()
    assert isinstance(trainer.optimizer_factory(), keras.optimizers.AdamW)
    trainer.build()
    assert set(trainer.streams) == {"paired", "text_only", "image_only"}
    batch = tf.nest.map_structure(tf.constant, _batch())
    task = trainer.task

    def fixed_mask_loss():  # the weighted total under one fixed draw of masks: no step noise
        from mmt.tasks.base import StepSeed

        losses = task.compute_losses(batch, tf.constant(0, tf.int64), StepSeed([7, 11]))
        return sum(float(task.loss_weights.get(name, 1.0)) * float(v.numerator / v.denominator)
                   for name, v in losses.items() if not name.endswith("_accuracy"))

    before = fixed_mask_loss()
    for _ in range(12):
        metrics, applied = trainer.train_step(batch)
        assert bool(applied)
    after = fixed_mask_loss()
    assert after < 0.9 * before, (before, after)


def _resolve(value):
    """A gin binding with its macros replaced by their values (dicts included)."""
    import gin

    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    if isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
        return _resolve(gin.query_parameter(f"%{value.scoped_selector.split('/')[0]}"))
    return value


@pytest.mark.parametrize("size", ["b", "l"])
def test_paper_configs_bind_appendix_a(size):
    import gin

    from mmt import config as mmt_config
    from mmt.models.variants import UPGEN_SIZES

    mmt_config.parse([str(REPO / "gin" / f"upgen_{size}.gin")], ["DATA_DIR = 'unused'"])
    q = lambda name: _resolve(gin.query_parameter(name))  # noqa: E731
    assert q("AdamW.weight_decay") == 0.05 and (q("AdamW.beta_1"), q("AdamW.beta_2")) == (0.9, 0.95)
    assert q("WarmupCosine.peak_value") == 0.005
    assert q("WarmupCosine.warmup_steps") * 10 == q("WarmupCosine.total_steps")  # 5 of 50 epochs
    assert q("paired/StreamSpec.batch_size") + q("text_only/StreamSpec.batch_size") == 4096
    assert q("UPGenTask.text_mask_ratio") == 0.15 and q("UPGenTask.paired_masking") == "joint"
    assert (q("UPGenTask.mask_min"), q("UPGenTask.mask_max")) == (0.0, 1.0)
    weights = q("UPGenTask.loss_weights")
    assert (weights["paired_image"], weights["paired_text"], weights["unpaired_text"]) == (1.0, 0.1, 0.01)
    network = q("UPGenTask.network")
    assert network["dropout"] == 0.1 and network["size"] == size.upper()
    assert network["image_vocab_size"] == 1024 and tuple(network["grid"]) == (16, 16)
    cfg = UPGEN_SIZES[size.upper()]  # ViT-B / ViT-L
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio) == {"b": (768, 12, 12, 4), "l": (1024, 24, 16, 4)}[size]


# -- the command-line chain on real records ------------------------------------------------------------


@pytest.mark.slow
def test_train_generate_and_linear_probe_from_the_command_line(tiny_data, tmp_path):
    from token_records import make_token_records

    records = make_token_records(tmp_path, tiny_data["vocabulary"], {"paired": 16, "image_only": 16, "text_only": 16})
    examples = records["examples"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    workdir = tmp_path / "run"
    train = [sys.executable, "-m", "mmt.train", "--gin_file=gin/upgen_tiny.gin", f"--workdir={workdir}",
             *records["gin_params"], "--gin_param=SIZE_OVERRIDES={'width': 32, 'depth': 1, 'heads': 2}",
             "--gin_param=PAIRED_BATCH=4", "--gin_param=TEXT_ONLY_BATCH=4", "--gin_param=IMAGE_ONLY_BATCH=4",
             "--gin_param=UPGenTask.compile_inference=False"]
    result = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "completed at step 2" in result.stdout

    image_path = tmp_path / "eval.png"
    from PIL import Image

    Image.fromarray(examples["paired"][0].image).save(image_path)
    generate = [sys.executable, "-m", "mmt.generate", f"--workdir={workdir}", "--prompt=a red circle",
                f"--image={image_path}", "--unconditional=2", "--num_steps=3"]
    result = subprocess.run(generate, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = workdir / "generated"
    assert (out / "000_a_red_circle.png").is_file() and (out / "unconditional_001.png").is_file()
    assert json.loads((out / "captions.json").read_text()).keys() == {str(image_path)}

    probe = [sys.executable, "-m", "mmt.evaluate", "linear_probe", f"--workdir={workdir}", "--train_examples=40",
             "--test_examples=20"]
    result = subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((workdir / "eval" / "linear_probe.json").read_text())
    for attribute in ("shape", "color", "cell", "count"):
        assert 0.0 <= record["results"][attribute]["accuracy"] <= 1.0
    assert record["step"] == 2
