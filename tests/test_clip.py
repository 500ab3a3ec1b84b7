"""CLIP reranker (DALL-E §2.6): symmetric InfoNCE by hand, padding-aware text pooling, the
clipped temperature, score / retrieval hooks, XLA == eager, JAX, replica semantics (per-shard
negatives), the tiny gin config learning, and reranking (top-k by score, ties by lower index;
the same reranker over a tiny UPGen's samples)."""

import functools
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from harness import assert_no_tensorflow, assert_xla_matches_eager, check_layer, distribute_shards, jax_check
from mmt import backend
from mmt.models.clip import CLIP, MAX_LOGIT_SCALE
from mmt.sampling import rerank
from mmt.tasks.base import Ratio
from mmt.tasks.clip import CLIPTask, contrastive_losses, recall_at_k
from tolerances import assert_close_to_scale, reordered_sum_rtol

REPO = Path(__file__).resolve().parents[1]
V_I, V_T, L, B = 32, 40, 8, 4
SMALL = {"width": 32, "depth": 1, "heads": 2, "text_width": 32, "text_depth": 1, "text_heads": 2, "embed_dim": 16}
NETWORK = dict(size="tiny", image_vocab_size=V_I, grid=(4, 4), text_vocab_size=V_T, text_length=L,
               size_overrides=SMALL)
PIXELS = dict(size="tiny", image_input="pixels", image_size=16, patch_size=4, text_vocab_size=V_T, text_length=L,
              size_overrides=SMALL)


def _text(rng, n, lengths=(6, 3, 8, 5)):
    ids = rng.integers(2, V_T, (n, L)).astype(np.int32)
    for i in range(n):
        k = lengths[i % len(lengths)]
        ids[i, k - 1] = 1  # EOS
        ids[i, k:] = 0  # padding
    return ids


def _batch(seed=0, n=B):
    rng = np.random.default_rng(seed)
    return {"paired": {"image_tokens": rng.integers(0, V_I, (n, 4, 4)).astype(np.int32), "text_ids": _text(rng, n)}}


def _task(network=NETWORK, **kwargs):
    task = CLIPTask(network=network, compile_inference=False, **kwargs)
    task.build()
    return task


def _numpy_infonce(logits, positives):
    """Reference: per-example (CE_row + CE_column) / 2 with targets uniform over positives."""
    def ce(x, p):
        log_softmax = x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)
        t = p / p.sum(1, keepdims=True)
        return -(t * log_softmax).sum(1)

    return 0.5 * (ce(logits, positives) + ce(logits.T, positives.T))


def test_model_modules_import_neither_tensorflow_nor_gin():
    files = ["mmt/models/clip.py", "mmt/tasks/clip.py", "mmt/sampling/rerank.py"]
    seen = assert_no_tensorflow(files, ["mmt.models.clip", "mmt.tasks.clip", "mmt.sampling.rerank"])
    assert "mmt.layers" in seen


# -- the loss ---------------------------------------------------------------------------


def test_symmetric_infonce_by_hand():
    # 3 captions x 3 images; hand values: row 0 = [2, 0, 0] -> CE = log(e^2 + 2) - 2.
    logits = np.array([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 3.0, -1.0]], np.float32)
    loss, t2i, i2t = (float(x) for x in contrastive_losses(ops.convert_to_tensor(logits)))
    rows = [np.log(np.exp(2) + 2) - 2, np.log(2 * np.e + 1) - 1, np.log(1 + np.e ** 3 + np.e ** -1) + 1]
    cols = [np.log(np.e ** 2 + np.e + 1) - 2, np.log(1 + np.e + np.e ** 3) - 1, np.log(2 + np.e ** -1) + 1]
    assert loss == pytest.approx(0.5 * (sum(rows) + sum(cols)), rel=1e-6)
    # t2i argmax per row: 0, 0 (tie -> first), 1 -> rows 0 correct; i2t per column: 0, 2, 1 -> column 0.
    assert (t2i, i2t) == (1.0, 1.0)
    # Identical captions 1 and 2: both images are positives of both captions (uniform targets).
    same = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 1]], bool)
    loss_same, t2i_same, i2t_same = (float(x) for x in contrastive_losses(ops.convert_to_tensor(logits),
                                                                          ops.convert_to_tensor(same)))
    assert loss_same == pytest.approx(_numpy_infonce(logits.astype(np.float64), same.astype(float)).sum(), rel=1e-6)
    assert loss_same != pytest.approx(loss, rel=1e-3)
    assert (t2i_same, i2t_same) == (2.0, 2.0)  # row 2's argmax (image 1) is now a positive; column 1's too


def test_compute_losses_is_infonce_of_the_encoders_and_marks_duplicate_captions():
    task = _task()
    batch = _batch()
    batch["paired"]["text_ids"][3] = batch["paired"]["text_ids"][1]  # a duplicate caption
    losses = task.compute_losses(batch, tf.constant(0, tf.int64), backend.for_step(0, 0, 0))
    assert isinstance(losses["contrastive"], Ratio) and float(losses["contrastive"].denominator) == B
    m, data = task.model, batch["paired"]
    zi = np.asarray(m.encode_image(data["image_tokens"]), np.float64)
    zt = np.asarray(m.encode_text(data["text_ids"]), np.float64)
    np.testing.assert_allclose(np.linalg.norm(zi, axis=1), 1.0, rtol=1e-5)
    logits = float(m.logit_scale()) * zt @ zi.T
    positives = np.eye(B)
    positives[1, 3] = positives[3, 1] = 1.0
    want = _numpy_infonce(logits, positives).sum()
    # float32 encoders and a float32 [B, B] softmax: rtol of a few hundred float32 roundings.
    assert float(losses["contrastive"].numerator) == pytest.approx(want, rel=reordered_sum_rtol(32, steps=4))
    assert float(losses["logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-6)
    off = _task(identical_captions_positive=False)
    for a, b in zip(off.model.weights, m.weights):
        a.assign(b)
    plain = off.compute_losses(batch, tf.constant(0, tf.int64), backend.for_step(0, 0, 0))["contrastive"]
    assert float(plain.numerator) == pytest.approx(_numpy_infonce(logits, np.eye(B)).sum(),
                                                   rel=reordered_sum_rtol(32, steps=4))


def test_logit_scale_is_clipped_at_100_and_starts_at_1_over_0_07():
    m = CLIP(**NETWORK)
    m.build_all()
    assert float(m.logit_scale()) == pytest.approx(1 / 0.07, rel=1e-6)
    m.log_logit_scale.assign(np.log(250.0))
    assert float(m.logit_scale()) == pytest.approx(MAX_LOGIT_SCALE, rel=1e-6)
    with tf.GradientTape() as tape:  # past the clip the scale gets no gradient (CLIP clamps it)
        value = m.logit_scale()
    assert float(tape.gradient(value, m.log_logit_scale) or 0.0) == 0.0


def test_text_embedding_ignores_padding_and_its_length():
    """Padding is neither attended to nor pooled: a longer text slot (more padding) and the same
    weights give the same embedding; any change of a real token changes it."""
    short = CLIP(**NETWORK)
    short.build_all()
    long = CLIP(**{**NETWORK, "text_length": L + 5})
    long.build_all()
    for a, b in zip(long.weights, short.weights):
        a.assign(b if a.shape == b.shape else np.concatenate([np.asarray(b), np.ones((5, b.shape[1]), np.float32)]))
    ids = _text(np.random.default_rng(3), B)
    padded = np.concatenate([ids, np.zeros((B, 5), np.int32)], axis=1)
    # Same arithmetic up to the padded keys' zero weights: float32 rounding only.
    np.testing.assert_allclose(np.asarray(long.encode_text(padded)), np.asarray(short.encode_text(ids)), atol=1e-5)
    changed = ids.copy()
    changed[:, 0] = np.where(changed[:, 0] == 5, 6, 5)
    assert np.abs(np.asarray(short.encode_text(changed)) - np.asarray(short.encode_text(ids))).max() > 1e-3


def test_score_similarity_and_retrieval_agree():
    task = _task()
    data = _batch(n=6)["paired"]
    sims = task.similarity(data["image_tokens"], data["text_ids"])
    scores = task.score(data["image_tokens"], data["text_ids"])
    assert scores.shape == (6,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, np.diag(sims), rtol=1e-5, atol=1e-5)
    assert task.retrieval(data["image_tokens"], data["text_ids"]) == recall_at_k(sims)


def test_recall_at_k_by_hand():
    s = np.array([[0.9, 0.1, 0.0],   # answer first
                  [0.8, 0.5, 0.9],   # answer third
                  [0.3, 0.3, 0.3]])  # a three-way tie: counts as third
    assert recall_at_k(s, (1, 2, 3)) == {"recall@1": pytest.approx(1 / 3), "recall@2": pytest.approx(1 / 3),
                                         "recall@3": 1.0}


# -- standard checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("network", [NETWORK, PIXELS], ids=["tokens", "pixels"])
def test_standard_checks_of_the_network(network):
    rng = np.random.default_rng(0)
    images = (rng.integers(0, V_I, (B, 4, 4)).astype(np.int32) if network is NETWORK
              else rng.integers(0, 256, (B, 16, 16, 3)).astype(np.uint8))
    key = "image_tokens" if network is NETWORK else "image"
    # XLA reorders float32 sums (the longest: the MLP's 4 x 32 = 128 terms) and brings its own
    # exp / rsqrt (~16 along each encoder's chain); one block per encoder (tests/tolerances.py).
    check_layer(lambda: CLIP(**network), {key: images, "text_ids": _text(rng, B)},
                xla_rtol=reordered_sum_rtol(128, steps=2, chained_ops=16), mixed_dtype="float32", lazy_variables=True)


def test_loss_and_gradients_xla_equal_eager():
    task = _task()
    batch = tf.nest.map_structure(tf.constant, _batch())

    def loss_and_grads():
        with tf.GradientTape() as tape:
            value = task.compute_losses(batch, tf.constant(0, tf.int64), backend.for_step(0, 0, 0))["contrastive"]
            value = value.numerator / value.denominator
        return value, tape.gradient(value, task.model.trainable_variables)

    # Forward then backward through one block per encoder: the MLP's 128-term sums, ~16 own ops.
    assert_xla_matches_eager(loss_and_grads, rtol=reordered_sum_rtol(128, steps=2, chained_ops=16))


@jax_check(modules=["mmt.models.clip", "mmt.tasks.clip", "mmt.sampling.rerank"], rtol=1e-4)
def test_clip_runs_under_jax_without_tensorflow():
    model = CLIP(**NETWORK)
    model.build_all(2)
    data = _batch(n=2)["paired"]
    return model, ({"image_tokens": data["image_tokens"], "text_ids": data["text_ids"]},), {}


# -- replicas ------------------------------------------------------------------------------------


def test_two_replicas_step_is_the_per_shard_infonce_step_and_not_the_full_batch_one():
    import keras

    from mmt.optimizers import Constant
    from mmt.training import distribute
    from mmt.training.trainer import Trainer

    def trainer():
        return Trainer(task=functools.partial(CLIPTask, network=NETWORK), streams={}, train_steps=1, seed=5,
                       mode="graph", progress_bar=False,
                       optimizer=functools.partial(keras.optimizers.SGD, learning_rate=Constant(0.5)))

    full = _batch(seed=2, n=8)["paired"]
    shards = [{k: v[r * 4:(r + 1) * 4] for k, v in full.items()} for r in range(2)]
    two = trainer()
    two.build(distribute.make_strategy(cpu_replicas=2))
    two.train_step(distribute_shards(two.strategy, full))

    one = trainer()
    one.build()
    variables = one.task.model.trainable_variables
    initial = [np.array(v) for v in variables]

    def step(shard_list):
        """One SGD step on one replica: the per-shard InfoNCE sums over the global count."""
        for v, value in zip(variables, initial):
            v.assign(value)
        with tf.GradientTape() as tape:
            parts = [one.task.compute_losses({"paired": tf.nest.map_structure(tf.constant, s)},
                                             tf.constant(0, tf.int64), backend.for_step(5, 0, 0))["contrastive"]
                     for s in shard_list]
            total = tf.add_n([p.numerator for p in parts]) / tf.add_n([p.denominator for p in parts])
        one.optimizers["model"].apply(tape.gradient(total, variables), variables)
        return [np.array(v) for v in variables]

    rtol = reordered_sum_rtol(8 * 16 + 1, steps=2)
    per_shard = step(shards)
    assert_close_to_scale([np.array(v) for v in two.task.model.trainable_variables], per_shard, rtol, "weights")
    # The full batch has 7 negatives per example instead of 3: another loss, another step.
    whole = step([full])
    assert max(np.abs(a - b).max() for a, b in zip(whole, per_shard)) > 1e-3


# -- the tiny gin config learns ------------------------------------------------------------------


def test_tiny_gin_config_loss_decreases_in_a_few_steps():
    from mmt import config as mmt_config

    mmt_config.parse([str(REPO / "gin" / "clip_tiny.gin")], [
        "DATA_DIR = 'unused'", "GRID = (4, 4)", f"IMAGE_VOCAB_SIZE = {V_I}", f"TEXT_VOCAB_SIZE = {V_T}",
        f"TEXT_LENGTH = {L}", f"SIZE_OVERRIDES = {SMALL}", "WARMUP_STEPS = 2", "TRAIN_STEPS = 15",
        "Trainer.mode = 'graph'"])
    from mmt import configurables

    trainer = configurables.Trainer()
    trainer.build()
    assert set(trainer.streams) == {"paired"}
    batch = tf.nest.map_structure(tf.constant, _batch(seed=4, n=8))
    task = trainer.task

    def loss():
        value = task.compute_losses(batch, tf.constant(0, tf.int64), backend.for_step(0, 0, 0))["contrastive"]
        return float(value.numerator / value.denominator)

    before = loss()
    for _ in range(15):
        _, applied = trainer.train_step(batch)
        assert bool(applied)
    after = loss()
    assert after < 0.5 * before, (before, after)  # log(8) = 2.08 at chance; 8 pairs are easily memorised
    assert task.retrieval(batch["paired"]["image_tokens"].numpy(), batch["paired"]["text_ids"].numpy())[
        "recall@1"] >= 0.75


def test_pixel_clip_trains_on_images_and_export_round_trips(tmp_path):
    from mmt.tasks import exports

    task = _task(PIXELS)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (B, 16, 16, 3)).astype(np.uint8)
    text = _text(rng, B)
    losses = task.compute_losses({"paired": {"image": images, "text_ids": text}}, tf.constant(0, tf.int64),
                                 backend.for_step(0, 0, 0))
    assert np.isfinite(float(losses["contrastive"].numerator))
    with pytest.raises(ValueError, match="'paired' stream with fields 'image'"):
        task.compute_losses({"paired": {"image_tokens": images, "text_ids": text}}, 0, None)
    exports.save_task(task, tmp_path / "export", step=3)
    loaded, step = exports.load_task(tmp_path / "export")
    assert step == 3
    np.testing.assert_array_equal(loaded.score(images, text), task.score(images, text))


# -- reranking -----------------------------------------------------------------------------------


def test_top_k_by_score_highest_first_ties_by_lower_index_nan_last():
    scores = np.array([[0.5, 2.0, 0.5, 2.0, -1.0],
                       [np.nan, 1.0, 1.0, 1.0, 3.0]], np.float32)
    got = np.asarray(rerank.top_k_by_score(ops.convert_to_tensor(scores), 5))
    np.testing.assert_array_equal(got, [[1, 3, 0, 2, 4], [4, 1, 2, 3, 0]])
    np.testing.assert_array_equal(np.asarray(rerank.top_k_by_score(ops.convert_to_tensor(scores), 2)),
                                  [[1, 3], [4, 1]])
    # Against numpy's stable sort on random scores with many ties; XLA gives the same integers.
    rng = np.random.default_rng(0)
    many = rng.integers(0, 6, (7, 16)).astype(np.float32)
    want = np.argsort(-many, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(np.asarray(rerank.top_k_by_score(ops.convert_to_tensor(many), 4)), want)
    assert_xla_matches_eager(lambda s: rerank.top_k_by_score(s, 4), tf.constant(many), rtol=0.0, want=want)
    with pytest.raises(ValueError, match="1 <= k <= N"):
        rerank.top_k_by_score(ops.convert_to_tensor(many), 17)


def test_rerank_keeps_the_highest_scoring_samples():
    # sample j of prompt b is the constant image (10 b + j); the scorer prefers images near 10 b + 3.
    def sample(text_ids, num_samples, seed):
        b = len(text_ids)
        return (10 * np.arange(b)[:, None, None] + np.arange(num_samples)[None, :, None]
                + np.zeros((1, 1, 5), np.int64)).astype(np.int32)

    def score(samples, text_ids):
        assert len(samples) == len(text_ids) <= 7  # batched
        return -np.abs(samples[:, 0] - (10 * text_ids[:, 0] + 3)).astype(np.float32)

    text = np.array([[0, 1], [1, 1], [2, 1]], np.int32)
    out = rerank.rerank(sample, score, text, num_samples=6, k=3, score_batch_size=7)
    np.testing.assert_array_equal(out.indices, [[3, 2, 4]] * 3)  # 2 and 4 tie at distance 1: lower index first
    np.testing.assert_array_equal(out.samples[:, 0, 0], [3, 13, 23])
    np.testing.assert_array_equal(out.scores, [[0, -1, -1]] * 3)
    assert out.samples.shape == (3, 3, 5) and out.all_scores.shape == (3, 6)


def test_the_same_reranker_serves_upgen_samples():
    """A tiny random UPGen draws N = 4 images per prompt; a token CLIP over its codes and a pixel CLIP
    over their decoded images each keep the samples they score highest."""
    from mmt.tasks.upgen import UPGenTask

    upgen = UPGenTask(network=dict(size="tiny", image_vocab_size=V_I, grid=(4, 4), text_vocab_size=V_T,
                                   text_length=L, size_overrides={"width": 32, "depth": 1, "heads": 2}),
                      compile_inference=False)
    upgen.build()
    sample = rerank.repeat_sampler(lambda ids, seed: upgen.text_to_image_tokens(ids, seed, num_steps=2))
    text = _text(np.random.default_rng(1), 3)
    clip = _task()
    out = rerank.rerank(sample, clip.score, text, num_samples=4, k=2, seed=7)
    assert out.samples.shape == (3, 2, 4, 4) and out.samples.dtype == np.int32
    drawn = sample(text, 4, 7)  # the sampler is deterministic per seed: the same candidates
    np.testing.assert_array_equal(out.samples, drawn[np.arange(3)[:, None], out.indices])
    independent = np.stack([clip.score(drawn[:, j], text) for j in range(4)], axis=1)  # [B, N]
    np.testing.assert_allclose(out.all_scores, independent, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.scores[:, 0], independent.max(axis=1), rtol=1e-5, atol=1e-5)
    assert (out.scores[:, 0] >= out.scores[:, 1]).all()
    assert len({tuple(s.ravel()) for s in drawn.reshape(12, -1)}) > 3  # the N samples differ

    pixels = _task(PIXELS)
    palette = np.random.default_rng(2).integers(0, 256, (V_I, 3)).astype(np.uint8)
    decode = lambda tokens: np.repeat(np.repeat(palette[tokens], 4, axis=1), 4, axis=2)  # noqa: E731  [M, 16, 16, 3]
    by_pixels = rerank.rerank(sample, rerank.decode_then_score(decode, pixels.score), text, num_samples=4, k=1,
                              seed=7)
    want = np.stack([pixels.score(decode(drawn[:, j]), text) for j in range(4)], axis=1).argmax(axis=1)
    np.testing.assert_array_equal(by_pixels.indices[:, 0], want)


def test_clip_b_config_binds_clips_vit_b32_recipe():
    import gin

    from mmt import config as mmt_config
    from mmt.models.clip import CLIP_SIZES

    mmt_config.parse([str(REPO / "gin" / "clip_b.gin")], ["DATA_DIR = 'unused'"])
    q = gin.query_parameter
    assert q("%CLIP_SIZE") == "B" and q("%PAIRED_BATCH") == 32768 and q("%WARMUP_STEPS") == 2000
    assert (q("AdamW.weight_decay"), q("AdamW.beta_2"), q("AdamW.epsilon")) == (0.2, 0.98, 1e-6)
    assert q("%PEAK_LEARNING_RATE") == 5e-4
    assert (q("%GRID"), q("%IMAGE_VOCAB_SIZE"), q("%TEXT_LENGTH")) == ((32, 32), 8192, 256)  # DALL-E's tokens
    cfg = CLIP_SIZES["B"]  # CLIP Table 20, ViT-B/32
    assert (cfg.width, cfg.depth, cfg.heads, cfg.text_width, cfg.text_depth, cfg.text_heads, cfg.embed_dim) == (
        768, 12, 12, 512, 12, 8, 512)
