"""The VQGAN tokenizer and its training task: interface, quantizer, GAN step, gin files."""

import functools
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from mmt.data.pipeline import StreamSpec
from mmt.layers.quantizers import VectorQuantizer
from mmt.losses.perceptual import PerceptualLoss
from mmt.tokenizers.image import ConfigMismatchError, ImageTokenizer
from mmt.tokenizers.vqgan import VQGAN
from mmt.tasks.vqgan import VQGANTask
from mmt.training.trainer import Trainer

from harness import assert_no_tensorflow

RNG = np.random.default_rng(0)


def _tiny(image_size=32, levels=3, **kwargs):
    """A VQGAN small enough to compile in seconds: f = 2^(levels - 1), no residual blocks
    unless asked for (XLA's compile time on CPU grows with the number of convolutions)."""
    config = dict(image_size=image_size, filters=8, channel_multipliers=(1,) * levels, num_res_blocks=0,
                  embedding_dim=8, codebook_size=32, num_groups=4)
    config.update(kwargs)
    return VQGAN(**config)


def _images(n, size):
    return RNG.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# -- the ImageTokenizer interface ------------------------------------------------------


@pytest.mark.parametrize("size,levels,grid", [(32, 3, 8), (64, 3, 16), (64, 4, 8)])
def test_encode_decode_shapes_and_dtypes(size, levels, grid):
    tokenizer = _tiny(size, levels)
    tokenizer.build_for_images()
    assert tokenizer.downsample == size // grid and tokenizer.grid_size == (grid, grid)
    codes = tokenizer.encode(_images(2, size))
    assert codes.shape == (2, grid, grid) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < tokenizer.vocab_size
    images = tokenizer.decode(codes)
    assert images.shape == (2, size, size, 3) and images.dtype == np.uint8


def test_wrong_inputs_raise_naming_what_was_expected():
    tokenizer = _tiny(32)
    tokenizer.build_for_images()
    with pytest.raises(ValueError, match=r"uint8 \[B, 32, 32, 3\]"):
        tokenizer.encode(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[B, 32, 32, 3\]"):
        tokenizer.encode(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"int32 \[B, 8, 8\]"):
        tokenizer.decode(np.zeros((1, 8, 8), np.int64))
    with pytest.raises(ValueError, match=r"\[B, 8, 8\]"):
        tokenizer.decode(np.zeros((1, 4, 4), np.int32))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        tokenizer.decode(np.full((1, 8, 8), 32, np.int32))


def test_save_load_round_trip_and_fingerprints(tmp_path):
    tokenizer = _tiny(32, num_res_blocks=1, code_dim=4, l2_normalize=True, restart_dead_codes=True, buffer_size=64)
    tokenizer.build_for_images()
    images = _images(4, 32)
    unit = ops.convert_to_tensor(images.astype("float32") / 127.5 - 1)
    tokenizer(unit, training=True, seed=3)  # moves the quantizer's state away from its initial values
    codes = np.asarray(tokenizer.encode_codes(unit))  # eager: no XLA compile of two tokenizers
    tokenizer.save(tmp_path / "tok")
    again = ImageTokenizer.load(tmp_path / "tok")
    assert isinstance(again, VQGAN)
    np.testing.assert_array_equal(np.asarray(again.encode_codes(unit)), codes)
    assert again.fingerprint() == tokenizer.fingerprint()
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["fingerprint"] == tokenizer.fingerprint()

    # Same weights under another config, and another config altogether: other fingerprints.
    other = _tiny(32, num_res_blocks=1, code_dim=4, l2_normalize=True, restart_dead_codes=True, buffer_size=64,
                  commitment_cost=0.5)
    other.build_for_images()
    other.set_weights(tokenizer.get_weights())
    assert other.fingerprint() != tokenizer.fingerprint()
    assert _tiny(32, codebook_size=64).fingerprint() != tokenizer.fingerprint()

    expected = {**tokenizer.tokenizer_config(), "codebook_size": 99, "filters": 4}
    with pytest.raises(ConfigMismatchError, match=r"codebook_size: saved 32 vs expected 99.*filters"):
        ImageTokenizer.load(tmp_path / "tok", expected=expected)
    assert ImageTokenizer.load(tmp_path / "tok", expected=tokenizer.tokenizer_config()).fingerprint() == \
        tokenizer.fingerprint()


# -- quantizer -----------------------------------------------------------------------------


def test_straight_through_gradient_reaches_the_encoder():
    tokenizer = _tiny(32, num_res_blocks=1)
    tokenizer.build_for_images()
    images = tf.constant(_images(2, 32).astype("float32") / 127.5 - 1)
    with tf.GradientTape() as tape:
        reconstruction, _, aux = tokenizer(images)
        loss = tf.reduce_mean(tf.abs(reconstruction - images))
    grads = tape.gradient(loss, tokenizer.encoder.trainable_variables)
    assert grads and all(g is not None for g in grads)
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads[:2] + grads[-2:])
    # The codebook learns from the codebook loss, not from the reconstruction.
    with tf.GradientTape() as tape:
        _, _, aux = tokenizer(images)
    assert float(tf.reduce_max(tf.abs(tape.gradient(aux["codebook_loss"], tokenizer.quantizer.codebook)))) > 0


def test_dead_code_restart_revives_unused_codes():
    quantizer = VectorQuantizer(4, restart_dead_codes=True, restart_threshold=0.5, usage_decay=0.0, buffer_size=16)
    quantizer.build((None, 2, 2, 2))
    # Code 0 at the origin is nearest to every input; codes 1..3 sit far away, unused.
    quantizer.codebook.assign(np.array([[0, 0], [100, 100], [100, 100], [100, 100]], np.float32))
    points = np.array([[1, 1], [-1, 1], [1, -1], [-1, -1]], np.float32)
    z = np.tile(points, (2, 1)).reshape(2, 2, 2, 2)
    _, codes, _ = quantizer(z)
    assert set(np.unique(np.asarray(codes))) == {0}

    _, _, aux = quantizer(z, training=True, seed=7)
    assert float(aux["dead_codes"]) == 3
    table = np.asarray(quantizer.codes_table())
    for k in (1, 2, 3):  # each dead code now sits on one of the recent inputs
        assert np.abs(points - table[k]).sum(-1).min() < 1e-6
    np.testing.assert_array_equal(np.asarray(quantizer.codebook)[1:], 100)  # trainable codebook untouched
    _, codes, _ = quantizer(z)
    assert len(np.unique(np.asarray(codes))) > 1
    np.testing.assert_allclose(np.asarray(quantizer.usage)[1:], 1 / 4)  # restarted at the uniform share


def test_factorised_l2_lookup_uses_unit_codes():
    quantizer = VectorQuantizer(16, code_dim=4, l2_normalize=True)
    quantizer.build((None, 2, 2, 8))
    # x / ||x|| over 4 components: a handful of float32 roundings (~1e-7 each).
    np.testing.assert_allclose(np.linalg.norm(np.asarray(quantizer.codes_table()), axis=-1), 1.0, rtol=1e-5)
    z_q, codes, _ = quantizer(RNG.standard_normal((1, 2, 2, 8)).astype("float32"))
    assert z_q.shape == (1, 2, 2, 8) and codes.shape == (1, 2, 2)


# -- perceptual loss -------------------------------------------------------------------------


def test_perceptual_loss_loads_a_local_vgg16_and_is_skipped_without_one(tmp_path):
    path = tmp_path / "vgg16.weights.h5"
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(None, None, 3))
    vgg.save_weights(str(path))
    loss = PerceptualLoss(str(path))
    np.testing.assert_array_equal(loss.features.get_layer("block3_conv1").kernel,
                                  vgg.get_layer("block3_conv1").kernel)
    assert not loss.features.trainable_variables
    x = ops.convert_to_tensor(RNG.uniform(-1, 1, (2, 32, 32, 3)).astype("float32"))
    y = ops.convert_to_tensor(RNG.uniform(-1, 1, (2, 32, 32, 3)).astype("float32"))
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(x, y)) > 0

    with_file = VQGANTask(tokenizer=_tiny(32), perceptual_weights=str(path))
    assert "perceptual" in with_file.generator_losses()
    without = VQGANTask(tokenizer=_tiny(32))
    assert without.perceptual is None and "perceptual" not in without.generator_losses()
    with pytest.raises(FileNotFoundError, match="VGG16"):
        PerceptualLoss(str(tmp_path / "missing.h5"))


# -- training with the trainer -------------------------------------------------------------


def _trainer(data_dir, steps, *, mode="eager", disc_lr=1e-3, gen_lr=1e-3, **task_kwargs):
    task_kwargs = {"discriminator_filters": 8, "discriminator_layers": 2, "discriminator_groups": 4,
                   "tokenizer": functools.partial(_tiny, 32, restart_dead_codes=True, buffer_size=256), **task_kwargs}
    return Trainer(
        task=functools.partial(VQGANTask, **task_kwargs),
        streams={"images": StreamSpec(data_dir, "image_only", batch_size=8, fields=("image",), shuffle_buffer=32)},
        train_steps=steps,
        optimizer=functools.partial(keras.optimizers.Adam, learning_rate=gen_lr),
        group_optimizers={"discriminator": functools.partial(keras.optimizers.Adam, learning_rate=disc_lr)},
        seed=1, mode=mode, log_every=1, checkpoint_every=1000, progress_bar=False,
    )


def _values(variables):
    return {v.path: np.array(v) for v in variables}


def _changed(before, variables):
    return {v.path for v in variables if not np.array_equal(before[v.path], np.asarray(v))}


def test_each_optimizer_updates_only_its_own_variables(tiny_data, tmp_path):
    trainer = _trainer(tiny_data["data_dir"], 2, gen_lr=0.0, disc_lr=1e-2)
    trainer.build()
    task = trainer.task
    generator, discriminator = trainer.group_variables["generator"], trainer.group_variables["discriminator"]
    assert {v.path for v in discriminator} == {v.path for v in task.discriminator.trainable_variables}
    assert all(v.path.startswith("discriminator/") for v in discriminator)
    assert {v.path for v in generator} == {v.path for v in task.tokenizer.trainable_variables}
    before = _values(task.model.trainable_variables)
    trainer.run(tmp_path / "d")  # builds again, from the same seed: the same initial weights
    # Generator learning rate 0: only the discriminator's optimizer moved anything.
    assert _changed(before, trainer.task.model.trainable_variables) == {v.path for v in discriminator}

    trainer = _trainer(tiny_data["data_dir"], 2, gen_lr=1e-2, disc_lr=0.0)
    trainer.build()
    before = _values(trainer.task.model.trainable_variables)
    trainer.run(tmp_path / "g")
    changed = _changed(before, trainer.task.model.trainable_variables)
    assert changed and not any(p.startswith("discriminator/") for p in changed)


def test_discriminator_is_untouched_before_its_start_step(tiny_data, tmp_path):
    trainer = _trainer(tiny_data["data_dir"], 2, discriminator_start=100)
    trainer.build()
    before = _values(trainer.task.model.trainable_variables)
    result = trainer.run(tmp_path)
    changed = _changed(before, trainer.task.model.trainable_variables)
    assert changed and not any(p.startswith("discriminator/") for p in changed)
    assert result.last_losses["loss/discriminator"] == 0.0 and result.last_losses["loss/adversarial"] == 0.0
    assert np.isfinite(result.last_losses["loss/adaptive_weight"])


def test_a_few_xla_steps_of_the_tiny_config_reduce_the_loss(tiny_data, tmp_path):
    from mmt import config as mmt_config
    from mmt import configurables

    # The tiny config trains in graph mode on CPU (faster there) and without its
    # discriminator; here the step is XLA-compiled as on accelerators (static shapes,
    # state updated with assign) and the discriminator joins at step 16.
    mmt_config.parse(["vqgan_tiny.gin"], [f"DATA_DIR = '{tiny_data['data_dir']}'", "IMAGE_SIZE = 32",
                                          "TRAIN_STEPS = 24", "WARMUP_STEPS = 2", "DISCRIMINATOR_START = 16",
                                          "VQGANTask.use_discriminator = True", "Trainer.mode = 'xla'",
                                          "Trainer.image_every = 0", "Trainer.log_every = 1",
                                          "Trainer.progress_bar = False"])
    try:
        trainer = configurables.Trainer()
        result = trainer.run(str(tmp_path))
    finally:
        mmt_config.reset()
    assert result.status == "completed" and trainer.jit_compile
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = np.mean([r["loss/reconstruction"] for r in rows[:3]])
    last = np.mean([r["loss/reconstruction"] for r in rows[-3:]])
    assert last < 0.7 * first
    assert rows[-1]["loss/discriminator"] > 0  # the discriminator joined at step 16
    exported = ImageTokenizer.load(tmp_path / "export")
    assert exported.grid_size == (8, 8) and exported.fingerprint() == trainer.task.tokenizer.fingerprint()


def test_image_and_histogram_summaries():
    task = VQGANTask(tokenizer=_tiny(32), summary_images=3, use_discriminator=False)
    task.build()
    batch = {"images": {"image": _images(5, 32)}}
    images = task.image_summaries(batch, 0)["reconstruction"]
    assert images.shape == (3, 32, 64, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:, :, :32], batch["images"]["image"][:3])
    histograms = task.histogram_summaries(batch, 0)
    assert histograms["codes"].shape == (5 * 8 * 8,) and histograms["code_usage"].shape == (32,)
    assert [g.name for g in task.optimizer_groups()] == ["generator"]


def test_a_model_only_checkpoint_holds_every_variable(tmp_path):
    # tf.train.Checkpoint does not see into Keras 3's tracked lists: layers must be attributes.
    task = VQGANTask(tokenizer=_tiny(32, num_res_blocks=1, restart_dead_codes=True), discriminator_filters=8,
                     discriminator_layers=2, discriminator_groups=4)
    task.build()
    path = tf.train.Checkpoint(model=task.model).save(str(tmp_path / "ckpt"))
    saved = [k for k in tf.train.load_checkpoint(path).get_variable_to_shape_map() if k.startswith("model/")]
    assert len(saved) == len(task.model.weights)


# -- gin files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gin_file,codes,grid,groups", [
    ("vqgan_maskgit.gin", 1024, 16, {"generator", "discriminator"}),
    ("vqgan_itit.gin", 8192, 16, {"generator", "discriminator"}),
    ("vqgan_tiny.gin", 512, 16, {"generator"}),
    ("vqgan_quickstart.gin", 256, 8, {"generator"}),
])
def test_gin_files_build_with_dry_run(gin_file, codes, grid, groups, tmp_path, capsys):
    from mmt import config as mmt_config
    from mmt import configurables

    mmt_config.parse([gin_file], ["DATA_DIR = '/nonexistent'"])
    try:
        trainer = configurables.Trainer()
        result = trainer.run(str(tmp_path), dry_run=True)
    finally:
        mmt_config.reset()
    assert result.status == "dry_run"
    tokenizer = trainer.task.tokenizer
    assert tokenizer.vocab_size == codes and tokenizer.grid_size == (grid, grid)
    assert set(trainer.optimizers) == groups
    assert "decoder" in capsys.readouterr().out  # the parameter breakdown


# -- no TensorFlow in model code ------------------------------------------------------------------

_MODEL_FILES = ("mmt/tokenizers/vqgan.py", "mmt/layers/conv.py", "mmt/layers/quantizers.py", "mmt/losses/gan.py",
                "mmt/losses/perceptual.py")


def test_importing_the_vqgan_does_not_import_tensorflow():
    seen = assert_no_tensorflow(_MODEL_FILES, ["mmt.tokenizers.vqgan"])
    assert {"mmt.layers.conv", "mmt.layers.quantizers", "mmt.tokenizers.image"} <= seen


def test_background_synonyms_counts_the_codes_of_all_black_patches():
    from mmt.evaluation import tokenizer_quality as quality

    images = np.zeros((2, 4, 4, 3), np.uint8)  # 2x2 grids of 2x2 patches
    images[0, 0, 0] = 255  # patch (0, 0) of image 0 is not black
    codes = np.array([[[9, 1], [1, 2]], [[1, 1], [2, 2]]])
    # Black patches' codes: 1, 1, 2 | 1, 1, 2, 2 -> two distinct, p = (4/7, 3/7).
    distinct, perplexity = quality.background_synonyms(images, codes)
    p = np.array([4 / 7, 3 / 7])
    assert distinct == 2 and perplexity == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert quality.background_synonyms(np.full((1, 4, 4, 3), 7, np.uint8), codes[:1]) == (0, 0.0)
