"""M3AE / MAE: exact per-row masking without replacement, a visible-only encoder, losses over
masked positions only, unpaired streams without NaN, patchify round trip, 1 == 2 replicas,
XLA == eager, JAX without TensorFlow, and the command-line chain (train -> export ->
generate -> linear probe) on real records."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from mmt import backend
from mmt.layers import masking
from mmt.layers.patches import patchify, unpatchify
from mmt.models.m3ae import M3AE
from mmt.tasks.base import Ratio, StepSeed, parameter_breakdown
from mmt.tasks.m3ae import M3AETask
from harness import assert_no_tensorflow, assert_xla_matches_eager, distribute_shards, jax_check
from tolerances import assert_close_to_scale, reordered_sum_rtol

REPO = Path(__file__).resolve().parents[1]
R, V, L, B = 16, 40, 8, 4
NETWORK = dict(size="tiny", image_size=R, text_vocab_size=V, text_length=L,
               size_overrides={"width": 32, "depth": 1, "heads": 2, "patch_size": 4, "decoder_width": 32,
                               "decoder_depth": 1, "decoder_heads": 2})
K = (R // 4) ** 2  # 16 patches


def _text(rng, n, real=(8, 5, 3, 6)):
    ids = rng.integers(4, V, (n, L)).astype(np.int32)
    for i in range(n):
        ids[i, real[i % len(real)]:] = 0  # padding
    return ids


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    images = lambda: rng.integers(0, 256, (B, R, R, 3)).astype(np.uint8)  # noqa: E731
    return {"paired": {"image": images(), "text_ids": _text(rng, B)},
            "image_only": {"image": images()}, "text_only": {"text_ids": _text(rng, B)}}


def _task(**kwargs):
    task = M3AETask(network={**NETWORK, **kwargs.pop("network", {})}, **kwargs)
    task.build()
    return task


def _seed(a=3, b=4):
    return StepSeed(tf.constant([a, b], tf.int64))


def test_model_modules_import_neither_tensorflow_nor_gin():
    files = ["mmt/models/m3ae.py", "mmt/tasks/m3ae.py", "mmt/layers/patches.py", "mmt/layers/masking.py"]
    seen = assert_no_tensorflow(files, ["mmt.models.m3ae", "mmt.tasks.m3ae"], forbidden=("tensorflow", "gin"))
    assert "mmt.layers.patches" in seen


def test_patchify_unpatchify_is_the_identity():
    x = np.random.default_rng(0).random((2, 12, 8, 3)).astype(np.float32)
    patches = np.asarray(patchify(x, 4))
    assert patches.shape == (2, 6, 48)
    np.testing.assert_array_equal(patches[0, 1], x[0, 0:4, 4:8].reshape(-1))  # row-major patches
    np.testing.assert_array_equal(np.asarray(unpatchify(patches, (3, 2), 4)), x)


def test_masking_keeps_exact_counts_without_replacement_and_never_targets_padding():
    valid = np.ones((6, 8), bool)
    valid[1, 5:] = valid[2, 3:] = valid[3, 1:] = False
    valid[4, :] = False  # an empty caption
    keep = masking.random_keep(valid, 0.75, 2, _seed())
    order, kept_valid, masked = (np.asarray(t) for t in keep)
    for row in range(6):
        assert sorted(order[row]) == list(range(8))  # a permutation: no position twice
        n = valid[row].sum()
        visible = min(n - round(0.75 * n), 2)
        assert kept_valid[row].sum() == visible and masked[row].sum() == n - visible
        assert not (masked[row] & ~valid[row]).any()  # padding is never a target
        seen = order[row, :2][kept_valid[row]]
        assert valid[row, seen].all() and not masked[row, seen].any()  # the encoder sees visible tokens only
    # Image patches: every row keeps exactly K - round(0.75 K) and masks the rest.
    m = M3AE(**NETWORK)
    image_keep, _ = m.random_keeps(None, 5, _seed(1, 2))
    assert m.image_kept == 4 and np.asarray(image_keep.masked).sum(axis=1).tolist() == [12] * 5
    assert len({tuple(r) for r in np.asarray(image_keep.order)[:, :4]}) == 5  # rows draw their own subsets


def test_encoder_sees_only_visible_tokens_and_cls():
    task = _task()
    m, seen = task.model, []
    original = m.encoder.call

    def record(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    m.encoder.call = record
    batch = _batch()
    task.compute_losses(batch, 0, _seed())
    # paired: CLS + 4 of 16 patches + 2 of 8 text slots; image-only; text-only.
    assert seen == [(B, 1 + 4 + 2, 32), (B, 1 + 4, 32), (B, 1 + 2, 32)]


def test_losses_count_masked_positions_only():
    task = _task()
    m = task.model
    batch = _batch()["paired"]
    image_keep, text_keep = m.random_keeps(batch["text_ids"], B, _seed())
    masked = np.asarray(image_keep.masked)

    def losses(images, text_ids):
        return task.stream_losses(images, text_ids, _seed(), training=False)

    base = losses(batch["image"], batch["text_ids"])
    assert float(base["image"][1]) == masked.sum() == B * 12
    assert float(base["text"][1]) == np.asarray(text_keep.masked).sum()
    # Changing a visible patch's target only (through the loss's target, not the input).
    target = task.pixel_targets
    row, patch = 0, int(np.flatnonzero(~masked[0])[0])
    task.pixel_targets = lambda p: ops.convert_to_tensor(  # noqa: E731
        np.asarray(target(p)) + (np.arange(K) == patch)[None, :, None] * (np.arange(B) == row)[:, None, None] * 5.0, "float32")
    changed = losses(batch["image"], batch["text_ids"])
    assert float(changed["image"][0]) == pytest.approx(float(base["image"][0]), rel=1e-6)
    # ... and a masked one does change it.
    patch = int(np.flatnonzero(masked[0])[0])
    assert float(losses(batch["image"], batch["text_ids"])["image"][0]) != pytest.approx(float(base["image"][0]))
    task.pixel_targets = target
    # A padding id in the text is never scored: text targets are real tokens only.
    assert not (np.asarray(text_keep.masked) & (batch["text_ids"] == 0)).any()


def test_unpaired_streams_train_and_the_absent_modality_is_zero_not_nan():
    from mmt.training.trainer import Trainer
    from mmt.optimizers import Constant
    import keras

    for stream in ("image_only", "text_only"):
        trainer = Trainer(task=functools.partial(M3AETask, network=NETWORK), streams={}, train_steps=1, seed=1,
                          mode="graph", progress_bar=False,
                          optimizer=functools.partial(keras.optimizers.AdamW, learning_rate=Constant(1e-3)))
        trainer.build()
        before = [np.array(v) for v in trainer.task.model.trainable_variables]
        batch = tf.nest.map_structure(tf.constant, {stream: _batch()[stream]})
        metrics, applied = trainer.train_step(batch)
        assert bool(applied)
        values = {k: float(v) for k, v in metrics.items()}
        assert all(np.isfinite(v) for v in values.values()), values
        absent, present = ("loss/text", "loss/image") if stream == "image_only" else ("loss/image", "loss/text")
        assert values[absent] == 0.0 and values[present] > 0.0
        moved = [not np.array_equal(a, np.array(b)) for a, b in zip(before, trainer.task.model.trainable_variables)]
        assert any(moved)


def test_mae_is_the_network_without_text_and_the_contrastive_loss_is_one_binding():
    mae = _task(network={"use_text": False})
    assert mae.model.text_embedding is None and mae.model.text_head is None
    assert set(mae.compute_losses(_batch(), 0, _seed())) == {"image"}
    m3ae = _task(contrastive=True)
    losses = m3ae.compute_losses(_batch(), 0, _seed())
    assert set(losses) == {"image", "text", "text_accuracy", "contrastive"}
    assert float(m3ae.model.temperature()) == pytest.approx(0.01)
    assert float(losses["contrastive"].denominator) == B  # the paired examples only


def test_loss_and_gradients_xla_equal_eager():
    task = _task()
    m = task.model
    batch = _batch()["paired"]
    images, text = tf.constant(batch["image"]), tf.constant(batch["text_ids"])

    def loss_and_grads():
        # A fixed keep order (seed None): TensorFlow's XLA and kernel RNGs differ for one seed.
        with tf.GradientTape() as tape:
            out = task.stream_losses(images, text, None, training=False)
            value = out["image"][0] / out["image"][1] + 0.5 * out["text"][0] / out["text"][1]
        return value, tape.gradient(value, m.trainable_variables)

    # The loss and every gradient, each within `rtol` of its own scale (tests/harness.py).
    assert_xla_matches_eager(loss_and_grads, rtol=reordered_sum_rtol(128, steps=2, chained_ops=16),
                             what="loss and gradients")


@jax_check(modules=["mmt.models.m3ae"], rtol=1e-4)
def test_m3ae_runs_under_jax_without_tensorflow():
    model = M3AE(**NETWORK)
    model.build_all(2)
    rng = np.random.default_rng(0)
    inputs = {"image": rng.random((2, R, R, 3)).astype(np.float32), "text_ids": _text(rng, 2)}
    return model, (inputs,), {}


def test_two_replicas_step_is_the_shard_seeded_step_of_one():
    import keras

    from mmt.optimizers import Constant
    from mmt.training import distribute
    from mmt.training.trainer import Trainer

    def trainer():
        return Trainer(task=functools.partial(M3AETask, network=NETWORK), streams={}, train_steps=1, seed=5,
                       mode="graph", progress_bar=False,
                       optimizer=functools.partial(keras.optimizers.SGD, learning_rate=Constant(0.1)))

    full = _batch()["paired"]
    shards = [{k: v[r * 2:(r + 1) * 2] for k, v in full.items()} for r in range(2)]
    two = trainer()
    two.build(distribute.make_strategy(cpu_replicas=2))
    two.train_step(distribute_shards(two.strategy, full))

    one = trainer()
    one.build()
    variables = one.task.model.trainable_variables

    def shard_losses(r):
        seed = backend.for_step(5, 0, r)
        with backend.scope(seed):
            return one.task.compute_losses({"paired": tf.nest.map_structure(tf.constant, shards[r])},
                                           tf.constant(0, tf.int64), seed)

    first = [shard_losses(r) for r in range(2)]
    denominators = {n: sum(float(raw[n].denominator) for raw in first) for n in first[0]}
    grads = [tf.zeros_like(v) for v in variables]
    for r in range(2):
        with tf.GradientTape() as tape:
            raw = shard_losses(r)
            total = tf.add_n([one.task.loss_weights.get(n, 1.0) * v.numerator / max(denominators[n], 1e-9)
                              for n, v in raw.items() if isinstance(v, Ratio)])
        grads = [a + b for a, b in zip(grads, tape.gradient(total, variables))]
    one.optimizers["model"].apply(grads, variables)
    rtol = reordered_sum_rtol(B * (K + L) + 1, steps=1)
    assert_close_to_scale([np.array(v) for v in two.task.model.trainable_variables],
                          [np.array(v) for v in variables], rtol, "weights")


def test_reconstruct_fill_caption_and_features_hooks(tiny_data):
    task = _task(network={"text_vocab_size": 256, "text_length": 16}, text_vocab=tiny_data["vocabulary"])
    images = _batch()["paired"]["image"]
    masked_input, reconstruction = task.reconstruct(images, seed=1)
    assert masked_input.shape == reconstruction.shape == images.shape and reconstruction.dtype == np.uint8
    keep, _ = task.model.random_keeps(None, B, backend.FixedSeed(np.array([1, 0], np.int32)))
    visible = ~np.asarray(keep.masked)
    # Visible patches come back exactly (up to the uint8 round trip of the normalisation).
    got = np.asarray(patchify(reconstruction.astype(np.float32), 4))[visible]
    want = np.asarray(patchify(images.astype(np.float32), 4))[visible]
    assert np.abs(got - want).max() <= 1
    masked_text, filled = task.fill_caption(images[:2], ["a large red circle", "a small blue square"], seed=0)
    assert len(filled) == 2 and all("_" in t for t in masked_text)
    for pooling, width in (("cls", 32), ("mean", 32)):
        assert task.image_features(images, pooling=pooling).shape == (B, width)
    assert task.image_features(images, all_layers=True).shape == (B, 32)  # one block
    summary = task.image_summaries({"image_only": {"image": images}}, 3)["reconstruction"]
    assert summary.shape == (B, R, 3 * R, 3)


# -- configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["m3ae_b", "mae_s"])
def test_paper_configs_bind_maes_recipe_and_the_encoders_are_vit_sized(name):
    import gin

    from mmt import config as mmt_config
    from mmt import configurables

    mmt_config.parse([str(REPO / "gin" / f"{name}.gin")], ["DATA_DIR = 'unused'"])
    q = gin.query_parameter
    assert (q("AdamW.weight_decay"), q("AdamW.beta_1"), q("AdamW.beta_2")) == (0.05, 0.9, 0.95)
    assert q("%PEAK_LEARNING_RATE") == pytest.approx(1.5e-4 * 4096 / 256)  # MAE Table 8, linear scaling
    assert q("%PAIRED_BATCH") == 4096 and q("%IMAGE_MASK_RATIO") == q("%TEXT_MASK_RATIO") == 0.75
    assert q("M3AETask.loss_weights") == {"image": 1.0, "text": 0.5} and q("%NORM_PIX_LOSS")
    assert q("%USE_TEXT") == (name == "m3ae_b")
    task = configurables.Trainer().task_factory()
    m = task.model
    task.build()
    rows = {n: t for n, t, _ in parameter_breakdown(task.component_layers())}
    want = {"m3ae_b": 86e6, "mae_s": 22e6}[name]  # ViT-B/16, ViT-S/16 (DeiT)
    assert abs(rows["vit_encoder"] - want) <= 0.05 * want, rows
    assert (m.cfg.decoder_depth, m.cfg.decoder_width, m.cfg.decoder_heads) == (8, 512, 16)
    assert (m.text_head is None) == (name == "mae_s")


@pytest.mark.parametrize("name, streams", [("m3ae_tiny", 3), ("mae_tiny", 2)])
def test_tiny_configs_use_every_binding(name, streams, tmp_path, capsys):
    # mmt.train refuses a binding the run never builds: MAE must not inherit M3AE's
    # text-only stream (gin/run/m3ae_tiny_shapes.gin holds what both share).
    from mmt import train
    from mmt.errors import run_main

    status = run_main(train.main, [f"--gin_file={REPO / 'gin' / (name + '.gin')}", "--gin_param=DATA_DIR='unused'",
                                   f"--workdir={tmp_path / 'run'}", "--dry_run"])
    captured = capsys.readouterr()
    assert status == 0, captured.err[-2000:]
    assert captured.out.count("/StreamSpec()") == streams, captured.out


@pytest.mark.slow
def test_tiny_gin_config_loss_decreases_in_a_few_steps():
    from mmt import config as mmt_config

    mmt_config.parse([str(REPO / "gin" / "m3ae_tiny.gin")], [
        "DATA_DIR = 'unused'", f"IMAGE_SIZE = {R}", f"TEXT_VOCAB_SIZE = {V}", f"TEXT_LENGTH = {L}",
        "SIZE_OVERRIDES = {'patch_size': 4, 'width': 32, 'depth': 1, 'decoder_width': 32, 'decoder_depth': 1}",
        "WARMUP_STEPS = 2", "TRAIN_STEPS = 12", "PEAK_LEARNING_RATE = 0.003", "Trainer.mode = 'graph'"])
    from mmt import configurables

    trainer = configurables.Trainer()
    trainer.build()
    assert set(trainer.streams) == {"paired", "image_only", "text_only"}
    batch = tf.nest.map_structure(tf.constant, _batch())
    task = trainer.task

    def fixed_mask_loss():  # the weighted total under one fixed draw of masks
        losses = task.compute_losses(batch, tf.constant(0, tf.int64), _seed(7, 11))
        return sum(float(task.loss_weights.get(n, 1.0)) * float(v.numerator / v.denominator)
                   for n, v in losses.items() if n in ("image", "text"))

    before = fixed_mask_loss()
    for _ in range(12):
        _, applied = trainer.train_step(batch)
        assert bool(applied)
    assert fixed_mask_loss() < 0.9 * before


# -- the command-line chain on real records ------------------------------------------------------------


@pytest.mark.slow
def test_train_export_generate_and_probe_from_the_command_line(tiny_data, tmp_path):
    from PIL import Image

    from mmt.data import shapes
    from mmt.data.shapes.records import write_shapes_records
    from mmt.tokenizers.text import TextTokenizer

    config = shapes.ShapesConfig(resolution=32, seed=11)
    examples = {s: list(shapes.generate(config, s, n)) for s, n in (("paired", 8), ("image_only", 8),
                                                                       ("text_only", 8))}
    vocab = TextTokenizer.from_file(tiny_data["vocabulary"])
    write_shapes_records(tmp_path / "data", config, examples, text_tokenizer=vocab, num_shards=1)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    workdir = tmp_path / "run"
    train = [sys.executable, "-m", "mmt.train", "--gin_file=gin/m3ae_tiny.gin", f"--workdir={workdir}",
             f"--gin_param=DATA_DIR='{tmp_path / 'data'}'", f"--gin_param=TEXT_VOCAB='{tiny_data['vocabulary']}'",
             "--gin_param=IMAGE_SIZE=32", f"--gin_param=TEXT_VOCAB_SIZE={vocab.vocab_size}",
             "--gin_param=TEXT_LENGTH=16",
             "--gin_param=SIZE_OVERRIDES={'width': 32, 'depth': 1, 'heads': 2, 'decoder_width': 32, "
             "'decoder_depth': 1, 'decoder_heads': 2}",
             "--gin_param=TRAIN_STEPS=2", "--gin_param=WARMUP_STEPS=1", "--gin_param=PAIRED_BATCH=4",
             "--gin_param=TEXT_ONLY_BATCH=4", "--gin_param=IMAGE_ONLY_BATCH=4", "--gin_param=Trainer.mode='graph'",
             "--gin_param=Trainer.progress_bar=False"]
    result = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "completed at step 2" in result.stdout
    assert (workdir / "export" / "task.json").is_file()

    image_path = tmp_path / "eval.png"
    Image.fromarray(examples["paired"][0].image).save(image_path)
    generate = [sys.executable, "-m", "mmt.generate", f"--workdir={workdir}", f"--image={image_path}",
                "--caption=a large red circle"]
    result = subprocess.run(generate, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = workdir / "generated"
    grid = np.asarray(Image.open(out / "reconstruction_000_eval.png"))
    assert grid.shape == (32, 96, 3)
    assert json.loads((out / "captions.json").read_text()).keys() == {str(image_path)}

    probe = [sys.executable, "-m", "mmt.evaluate", "linear_probe", f"--workdir={workdir}", "--train_examples=40",
             "--test_examples=20", "--pooling=mean"]
    result = subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((workdir / "eval" / "linear_probe_mean.json").read_text())
    assert record["step"] == 2 and record["pooling"] == "mean"
    for attribute in ("shape", "color", "cell", "count"):
        assert 0.0 <= record["results"][attribute]["accuracy"] <= 1.0
