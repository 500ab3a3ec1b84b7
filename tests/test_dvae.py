"""DALL-E's dVAE: estimators, logit-Laplace likelihood, schedules, the tokenizer
interface, saving, and a few steps through the one trainer."""

import functools
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmt.data.pipeline import StreamSpec
from mmt.losses import estimators, likelihoods
from mmt.optimizers import Constant
from mmt.tokenizers.dvae import DVAE
from mmt.tasks.dvae import DVAETask, cosine_anneal
from mmt.tokenizers.image import ImageTokenizer
from mmt.training.trainer import Trainer

from harness import assert_no_tensorflow, jax_check
from tolerances import assert_close_to_scale, reordered_sum_rtol

TINY = dict(vocab_size=32, width=8, width_multipliers=(1, 2, 4), blocks_per_group=1, decoder_input_width=8)


def _tokenizer(image_size=32, **overrides):
    keras.utils.set_random_seed(0)
    tokenizer = DVAE(image_size=image_size, **{**TINY, **overrides})
    tokenizer.build_for_images()
    return tokenizer


def _images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# --------------------------------------------------------------- the tokenizer interface


@pytest.fixture(scope="module")
def tokenizer32():
    return _tokenizer(32)


def _check_round_trip(tokenizer, image_size, grid):
    assert tokenizer.grid_size == (grid, grid)
    assert tokenizer.downsample == image_size // grid
    assert tokenizer.vocab_size == 32
    codes = tokenizer.encode(_images(3, image_size))
    assert codes.shape == (3, grid, grid) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 32
    images = tokenizer.decode(codes)
    assert images.shape == (3, image_size, image_size, 3) and images.dtype == np.uint8


def test_encode_decode_shapes_and_dtypes_at_32(tokenizer32):
    _check_round_trip(tokenizer32, 32, 8)


def test_encode_decode_shapes_and_dtypes_at_64_with_downsampling_8():
    _check_round_trip(_tokenizer(64, width_multipliers=(1, 2, 4, 8)), 64, 8)


def test_decode_is_the_inverse_epsilon_map_of_sigmoid_mu(tokenizer32):
    codes = tokenizer32.encode(_images(2, 32))
    mu, _ = tokenizer32.decoder_statistics(keras.ops.one_hot(codes, 32))
    expected = np.clip((1 / (1 + np.exp(-np.asarray(mu))) - 0.1) / 0.8, 0, 1) * 2 - 1
    # float32 sigmoid, affine map and clip against float64: a few ulp of 1, scaled by 2 / 0.8.
    np.testing.assert_allclose(np.asarray(tokenizer32.decode_codes(codes)), expected, atol=1e-5)


def test_encode_is_the_argmax_of_the_logits(tokenizer32):
    images = _images(2, 32)
    logits = np.asarray(tokenizer32.encoder_logits(images.astype(np.float32) / 127.5 - 1))
    np.testing.assert_array_equal(tokenizer32.encode(images), logits.argmax(-1))


def _kernels(layer):
    """'group_2_block_1/conv_1' -> kernel shape, for the convolutions inside `layer`."""
    prefix = layer.name + "/"
    return {w.path[w.path.index(prefix) + len(prefix):].rsplit("/", 1)[0]: tuple(w.shape)
            for w in layer.weights if w.path.endswith("kernel")}


def test_architecture_follows_dalle(tokenizer32):
    # width 8, multipliers (1, 2, 4): encoder groups 8, 16, 32 wide, decoder 32, 16, 8; K = 32.
    encoder, decoder = _kernels(tokenizer32.encoder), _kernels(tokenizer32.decoder)
    assert encoder["input"] == (7, 7, 3, 8)  # A.1: the encoder opens with a 7x7 convolution
    assert encoder["output"] == (1, 1, 32, 32)  # ... and ends with a 1x1 to the K logits
    assert decoder["input"] == (1, 1, 32, 8)  # the decoder's first and last convolutions are 1x1
    assert decoder["output"] == (1, 1, 8, 6)  # mu and ln b per colour channel (A.3)
    # Bottleneck resblocks (width / 4 hidden), a 1x1 id path where the width changes;
    # kernels 3,3,3,1 in the encoder and 1,3,3,3 in the decoder (the release).
    assert [encoder[f"group_2_block_1/conv_{i}"] for i in range(1, 5)] == [
        (3, 3, 8, 4), (3, 3, 4, 4), (3, 3, 4, 4), (1, 1, 4, 16)]
    assert encoder["group_2_block_1/id_path"] == (1, 1, 8, 16)
    assert "group_1_block_1/id_path" not in encoder
    assert [decoder[f"group_1_block_1/conv_{i}"] for i in range(1, 5)] == [
        (1, 1, 8, 8), (3, 3, 8, 8), (3, 3, 8, 8), (3, 3, 8, 32)]
    assert decoder["group_2_block_1/id_path"] == (1, 1, 32, 16)
    assert tokenizer32.encoder.chain[0].post_gain == pytest.approx(1 / 3**2)  # 1 / (resblocks)^2


def test_scale_weighting_weights_pixels_by_their_scale():
    task = DVAETask(functools.partial(DVAE, image_size=32, **TINY), scale_weighting=1.0)
    task.build()
    images = _images(2, 32)
    losses = task.compute_losses({"images": {"image": tf.constant(images)}}, tf.constant(0, tf.int64), seed=5)
    # Without noise at the decoder's input this would be deterministic; recompute it from
    # the same sample instead: NLL and weights b from the decoder's statistics.
    logits = task.tokenizer.encoder_logits(images.astype(np.float32) / 127.5 - 1)
    z = estimators.gumbel_softmax(logits, task.temperature(0), seed=5)
    mu, log_b = (np.asarray(t) for t in task.tokenizer.decoder_statistics(z))
    nll = np.asarray(likelihoods.logit_laplace_nll(0.8 * images / 255.0 + 0.1, mu, log_b))
    b = np.exp(log_b)
    ratio = losses["reconstruction"]
    assert float(ratio.numerator / ratio.denominator) == pytest.approx((b * nll).sum() / b.sum(), rel=1e-4)
    assert float(losses["nll"]) == pytest.approx(nll.mean(), rel=1e-4)


def test_init_gains_scale_the_convolutions_around_the_relaxation():
    from mmt.tokenizers.dvae import DVAEDecoder, DVAEEncoder

    keras.utils.set_random_seed(0)
    decoder = DVAEDecoder(8, (1, 2), 1, 64, embedding_init_gain=math.sqrt(4096))
    decoder.input_conv.build((None, 1, 1, 4096))
    assert np.asarray(decoder.input_conv.kernel).std() == pytest.approx(1.0, rel=0.05)  # N(0, 1) embeddings
    encoder = DVAEEncoder(4096, 64, (1,), 1, logits_init_gain=10.0)
    encoder.output_conv.build((None, 1, 1, 64))
    assert np.asarray(encoder.output_conv.kernel).std() == pytest.approx(10 / 8, rel=0.05)
    default = DVAEDecoder(8, (1, 2), 1, 64)
    default.input_conv.build((None, 1, 1, 4096))
    assert np.asarray(default.input_conv.kernel).std() == pytest.approx(1 / 64, rel=0.05)  # the release's


def test_post_gain_scales_the_residual_branch():
    from mmt.tokenizers.dvae import DVAEResBlock

    x = np.random.default_rng(0).normal(size=(1, 4, 4, 8)).astype(np.float32)
    keras.utils.set_random_seed(1)
    full = DVAEResBlock(8, 1.0)
    keras.utils.set_random_seed(1)
    scaled = DVAEResBlock(8, 0.25)
    residual = np.asarray(full(x)) - x
    # Same weights, so the branch is computed identically and 0.25 scales it exactly (a
    # power of two); only x + branch - x rounds, by ulp(|x| <= 5) = 5 * 2^-23 < 1e-6.
    np.testing.assert_allclose(np.asarray(scaled(x)) - x, 0.25 * residual, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- saving, fingerprints


def test_a_model_only_checkpoint_holds_every_variable(tmp_path):
    # tf.train.Checkpoint (the trainer's) does not see into Keras 3's tracked lists.
    task = DVAETask(tokenizer=functools.partial(DVAE, image_size=16, **TINY))
    task.build()
    path = tf.train.Checkpoint(model=task.model).save(str(tmp_path / "ckpt"))
    saved = [k for k in tf.train.load_checkpoint(path).get_variable_to_shape_map() if k.startswith("model/")]
    assert len(saved) == len(task.model.weights)



def test_save_load_gives_identical_codes_and_fingerprint(tokenizer32, tmp_path):
    images = _images(4, 32)
    tokenizer32.save(tmp_path / "dvae")
    loaded = ImageTokenizer.load(tmp_path / "dvae")
    assert type(loaded) is DVAE
    np.testing.assert_array_equal(loaded.encode(images), tokenizer32.encode(images))
    assert loaded.fingerprint() == tokenizer32.fingerprint()
    meta = json.loads((tmp_path / "dvae" / "config.json").read_text())
    assert meta["class"] == "DVAE" and meta["config"]["vocab_size"] == 32
    assert meta["config"]["width_multipliers"] == [1, 2, 4]


def test_a_different_config_gives_a_different_fingerprint(tokenizer32):
    other = _tokenizer(epsilon=0.05)  # the same seed, so the same weights
    for mine, theirs in zip(tokenizer32.weights, other.weights):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    assert other.fingerprint() != tokenizer32.fingerprint()


# ---------------------------------------------------------------------- likelihoods


def test_logit_laplace_nll_matches_the_formula_on_two_pixels():
    # -ln f(x | mu, b) = ln(2b) + ln x + ln(1 - x) + |logit(x) - mu| / b   (DALL-E eq. 2)
    x = np.array([0.5, 0.9], np.float32)
    mu = np.array([0.0, 1.0], np.float32)
    log_b = np.array([0.0, math.log(0.5)], np.float32)
    pixel_1 = math.log(2 * 1.0) + math.log(0.5) + math.log(0.5) + abs(0.0 - 0.0) / 1.0  # = -ln 2
    pixel_2 = math.log(2 * 0.5) + math.log(0.9) + math.log(0.1) + abs(math.log(0.9 / 0.1) - 1.0) / 0.5
    nll = np.asarray(likelihoods.logit_laplace_nll(x, mu, log_b))
    np.testing.assert_allclose(nll, [pixel_1, pixel_2], rtol=1e-6, atol=1e-6)
    assert pixel_1 == pytest.approx(-math.log(2))


def test_logit_laplace_density_integrates_to_one():
    x = np.linspace(1e-6, 1 - 1e-6, 200_001)
    nll = np.asarray(likelihoods.logit_laplace_nll(x.astype(np.float32), np.float32(0.7), np.float32(math.log(0.3))))
    assert np.trapezoid(np.exp(-nll.astype(np.float64)), x) == pytest.approx(1.0, abs=2e-3)


def test_epsilon_map_and_its_inverse():
    x = np.linspace(0, 1, 256).astype(np.float32)
    y = np.asarray(likelihoods.map_pixels(x))
    assert y.min() == pytest.approx(0.1) and y.max() == pytest.approx(0.9)  # phi: [0, 1] -> [eps, 1 - eps]
    np.testing.assert_allclose(y, 0.8 * x + 0.1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(likelihoods.unmap_pixels(y)), x, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(likelihoods.unmap_pixels(np.float32([0.0, 1.0]))), [0.0, 1.0])  # clipped
    np.testing.assert_allclose(np.asarray(likelihoods.map_pixels(x, 0.05)), 0.9 * x + 0.05, rtol=1e-6)


def test_kl_to_uniform():
    assert float(likelihoods.kl_to_uniform(np.zeros(8, np.float32))) == pytest.approx(0.0, abs=1e-6)
    q = np.array([0.5, 0.25, 0.125, 0.125])
    expected = float(np.sum(q * np.log(q / 0.25)))
    assert float(likelihoods.kl_to_uniform(np.log(q).astype(np.float32))) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------- estimators


def test_gumbel_softmax_soft_sums_to_one_and_sharpens_as_temperature_falls():
    logits = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    warm = np.asarray(estimators.gumbel_softmax(logits, 1.0, seed=3))
    cold = np.asarray(estimators.gumbel_softmax(logits, 1 / 16, seed=3))
    np.testing.assert_allclose(warm.sum(-1), 1.0, rtol=1e-5)
    assert cold.max(-1).mean() > warm.max(-1).mean()
    np.testing.assert_array_equal(warm.argmax(-1), cold.argmax(-1))  # same noise, same seed
    np.testing.assert_array_equal(np.asarray(estimators.gumbel_softmax(logits, 1.0, seed=3)), warm)


def test_gumbel_argmax_samples_the_categorical():
    probs = np.array([0.7, 0.2, 0.1])
    logits = np.tile(np.log(probs).astype(np.float32), (40_000, 1))
    sample = np.asarray(estimators.gumbel_softmax(logits, 1.0, seed=0, hard=True))
    np.testing.assert_allclose(sample.mean(0), probs, atol=0.01)


def _value_and_grad(fn, logits, upstream):
    logits = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        out = fn(logits)
        loss = tf.reduce_sum(out * upstream)
    return out.numpy(), tape.gradient(loss, logits).numpy()


def test_straight_through_gumbel_is_one_hot_forward_with_soft_gradients():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 7)).astype(np.float32)
    upstream = tf.constant(rng.normal(size=(5, 7)).astype(np.float32))
    hard, hard_grad = _value_and_grad(lambda l: estimators.gumbel_softmax(l, 0.5, seed=9, hard=True), logits, upstream)
    soft, soft_grad = _value_and_grad(lambda l: estimators.gumbel_softmax(l, 0.5, seed=9), logits, upstream)
    assert set(np.unique(hard)) == {0.0, 1.0}
    np.testing.assert_array_equal(hard.sum(-1), 1.0)
    np.testing.assert_array_equal(hard.argmax(-1), soft.argmax(-1))
    # Exact by construction: hard = stop_gradient(one_hot - soft) + soft, so the gradient
    # runs through the very same soft ops.
    np.testing.assert_array_equal(hard_grad, soft_grad)
    assert np.abs(hard_grad).max() > 0


def test_straight_through_softmax_and_argmax():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 6)).astype(np.float32)
    upstream = rng.normal(size=(4, 6)).astype(np.float32)
    one_hot = np.eye(6, dtype=np.float32)[logits.argmax(-1)]
    value, grad = _value_and_grad(estimators.straight_through_softmax, logits, upstream)
    np.testing.assert_array_equal(value, one_hot)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    softmax_grad = p * (upstream - (p * upstream).sum(-1, keepdims=True))  # J_softmax^T g
    # numpy's float32 exp / sums of 6 terms vs TensorFlow's: other orders and a few ulp per
    # exp, divide and subtract (tests/tolerances.py); per-tensor scale, since g - sum(p g)
    # cancels in places.
    assert_close_to_scale([grad], [softmax_grad], reordered_sum_rtol(6, steps=2, chained_ops=4), "gradient")
    value, grad = _value_and_grad(estimators.straight_through_argmax, logits, upstream)
    np.testing.assert_array_equal(value, one_hot)
    np.testing.assert_allclose(grad, upstream)  # identity gradient


# ------------------------------------------------------------------------- schedules


def test_cosine_anneal_values():
    # value = end + (start - end) * (1 + cos(pi * step / steps)) / 2, then end
    temperature = functools.partial(cosine_anneal, start=1.0, end=1 / 16, steps=1000)
    assert float(temperature(0)) == pytest.approx(1.0)
    assert float(temperature(500)) == pytest.approx(17 / 32)  # halfway: (1 + 1/16) / 2
    assert float(temperature(250)) == pytest.approx(1 / 16 + 15 / 16 * (1 + math.sqrt(0.5)) / 2)
    assert float(temperature(1000)) == pytest.approx(1 / 16)
    assert float(temperature(5000)) == pytest.approx(1 / 16)
    assert float(cosine_anneal(3, 1.0, 0.5, 0)) == 0.5


def test_task_schedules_follow_dalle_appendix_a2():
    task = DVAETask(functools.partial(DVAE, image_size=32, **TINY))  # the paper's schedule defaults
    assert float(task.temperature(0)) == pytest.approx(1.0)
    assert float(task.temperature(75_000)) == pytest.approx(17 / 32)
    assert float(task.temperature(150_000)) == pytest.approx(1 / 16)
    assert float(task.temperature(3_000_000)) == pytest.approx(1 / 16)
    assert float(task.beta(0)) == pytest.approx(0.0)
    assert float(task.beta(2_500)) == pytest.approx(3.3)
    assert float(task.beta(1_250)) == pytest.approx(6.6 * (1 - math.sqrt(0.5)) / 2)
    assert float(task.beta(5_000)) == pytest.approx(6.6)
    assert float(task.beta(tf.constant(10_000, tf.int64))) == pytest.approx(6.6)  # the trainer's int64 step


def test_kl_term_is_beta_over_three_f_squared_per_position():
    task = DVAETask(functools.partial(DVAE, image_size=32, **TINY), kl_warmup_steps=0)
    task.build()
    batch = {"images": {"image": tf.constant(_images(2, 32))}}
    losses = task.compute_losses(batch, tf.constant(7, tf.int64), seed=5)
    assert float(losses["beta"]) == pytest.approx(6.6)
    assert float(losses["kl_term"]) == pytest.approx(6.6 * float(losses["kl"]) / (3 * 4**2), rel=1e-5)
    assert float(losses["temperature"]) == pytest.approx(float(task.temperature(7)))
    assert set(losses) == set(task.loss_weights)
    reconstruction = losses["reconstruction"]  # a Ratio: the trainer divides by the global sum
    assert float(reconstruction.numerator / reconstruction.denominator) == pytest.approx(float(losses["nll"]), rel=1e-5)
    task.straight_through = True  # the decoder then sees one-hot samples
    hard = task.compute_losses(batch, tf.constant(7, tf.int64), seed=5)
    assert float(hard["kl"]) == pytest.approx(float(losses["kl"]))  # same encoder, same KL
    assert np.isfinite(float(hard["nll"]))


# ------------------------------------------------------------------------- training


def _trainer(data_dir, steps, **kwargs):
    task = functools.partial(DVAETask, functools.partial(DVAE, image_size=32, **TINY), kl_warmup_steps=10,
                             temperature_steps=20, summary_images=3, **kwargs)
    return Trainer(task=task, streams={"images": StreamSpec(data_dir, "image_only", 8, fields=("image",),
                                                            shuffle_buffer=32)},
                   train_steps=steps,
                   optimizer=functools.partial(keras.optimizers.Adam, learning_rate=Constant(3e-3)),
                   seed=1, log_every=1, checkpoint_every=1000, progress_bar=False, mode="xla")


def test_a_few_training_steps_reduce_the_loss_and_export_the_tokenizer(tiny_data, tmp_path):
    trainer = _trainer(tiny_data["data_dir"], 25)
    result = trainer.run(tmp_path / "run")
    assert result.status == "completed" and result.skipped_steps == 0
    assert trainer.jit_compile
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    nll = [line["loss/nll"] for line in lines]
    assert np.mean(nll[-5:]) < np.mean(nll[:5]) - 0.1, nll
    exported = ImageTokenizer.load(tmp_path / "run" / "export")
    assert exported.fingerprint() == trainer.task.tokenizer.fingerprint()

    # The TensorBoard hooks: input | reconstruction, and the codes' usage.
    batch = {"images": {"image": tf.constant(_images(5, 32))}}
    images = trainer.task.image_summaries(batch, 25)["reconstruction"]
    assert images.shape == (3, 32, 64, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:, :, :32], _images(5, 32)[:3])
    codes = trainer.task.histogram_summaries(batch, 25)["codes"]
    assert codes.shape == (5 * 8 * 8,) and codes.max() < 32


# ---------------------------------------------------------------------- gin configs


def _parse(gin_file, *params):
    from mmt import config as mmt_config

    mmt_config.parse([gin_file], ["DATA_DIR = '/nonexistent'", *params])


def test_dalle_gin_is_the_papers_dvae():
    import gin

    from mmt import configurables

    try:
        _parse("dvae_dalle.gin")
        trainer = configurables.Trainer()
        task = trainer.task_factory()
        tokenizer = task.tokenizer
        assert tokenizer.image_size == 256 and tokenizer.grid_size == (32, 32) and tokenizer.vocab_size == 8192
        assert (tokenizer.width, tokenizer.width_multipliers, tokenizer.blocks_per_group) == (256, (1, 2, 4, 8), 2)
        assert float(task.temperature(150_000)) == pytest.approx(1 / 16)
        assert float(task.beta(5_000)) == pytest.approx(6.6) and float(task.beta(0)) == 0.0
        assert trainer.train_steps == 3_000_000
        assert sum(spec.batch_size for spec in trainer.streams.values()) == 512
        optimizer = trainer.optimizer_factory()
        assert isinstance(optimizer, keras.optimizers.AdamW)
        assert (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon, optimizer.weight_decay) == (0.9, 0.999, 1e-8, 1e-4)
        schedule = optimizer._learning_rate  # pylint: disable=protected-access
        assert float(schedule(0)) == pytest.approx(1e-4)
        assert float(schedule(1_200_000)) == pytest.approx(1.25e-6)
        task.build()  # on an 8x8 image: no weight depends on the resolution
        encoder, decoder = (sum(int(np.prod(w.shape)) for w in part.weights)
                            for part in (tokenizer.encoder, tokenizer.decoder))
        assert (encoder, decoder) == (53_786_240, 43_829_766)
    finally:
        gin.clear_config()


def test_tiny_gin_builds():
    import gin

    from mmt import configurables

    try:
        _parse("dvae_tiny.gin")
        trainer = configurables.Trainer()
        tokenizer = trainer.task_factory().tokenizer
        assert tokenizer.image_size == 64 and tokenizer.grid_size == (16, 16)
    finally:
        gin.clear_config()


# ------------------------------------------------------------------ no TensorFlow import

_OWN_FILES = ("mmt/tokenizers/dvae.py", "mmt/tasks/dvae.py", "mmt/losses/estimators.py",
              "mmt/losses/likelihoods.py")


def test_dvae_modules_do_not_import_tensorflow_or_gin():
    seen = assert_no_tensorflow(_OWN_FILES, ["mmt.tokenizers.dvae", "mmt.tasks.dvae"])
    assert "mmt.losses.likelihoods" in seen and "mmt.tokenizers.image" in seen


# JAX vs TensorFlow: other orders of float32 sums (the longest: a 3x3 convolution over 16
# channels, 144 terms) in the ~8 convolutions from pixels to logits, and from one-hot
# codes to pixels, plus their own exp / sigmoid (tests/tolerances.py).
_JAX_RTOL = reordered_sum_rtol(144, steps=8, chained_ops=16)


@jax_check(modules=["numpy", "mmt.tokenizers.dvae", "mmt.tasks.dvae"], rtol=_JAX_RTOL,
           call="(obj.encoder_logits(args[0]), obj.decode_codes(args[1]),"
                " numpy.array(obj.decode(obj.encode(args[2])).shape))")
def test_dvae_runs_under_jax_without_tensorflow():
    tokenizer = _tokenizer(16, vocab_size=8, width_multipliers=(1, 2))
    images = _images(2, 16)
    codes = np.random.default_rng(1).integers(0, 8, (2, 4, 4)).astype(np.int32)
    return tokenizer, (images.astype(np.float32) / 127.5 - 1.0, codes, images), {}
