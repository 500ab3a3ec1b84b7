"""DALL-E's transformer: the three masks by hand, App. B.1's layer schedule, per-position pad
tokens, the 1/8 + 7/8 losses normalised over the global batch (by hand, 1 == 2 replicas),
cached == uncached decoding, XLA == eager, no TensorFlow in the model, the gin configs
(tiny trains, 12B counts 12B parameters), and train -> generate on real records."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from mmt.backend import FixedSeed
from mmt.layers.attention import dalle_column_mask, dalle_conv_mask, dalle_row_mask
from mmt.models.dalle import CONV, COLUMN, DALLE, ROW, layer_kinds, sample_image_tokens
from mmt.sampling.autoregressive import top_p_filter
from mmt.tasks.dalle import DALLETask
from mmt.training.trainer import Trainer
from harness import assert_no_tensorflow, assert_xla_matches_eager, check_layer, distribute_shards, jax_check
from tolerances import assert_close_to_scale, reordered_sum_rtol

REPO = Path(__file__).resolve().parents[1]
V_T, V_I, L, GRID, B = 40, 16, 6, (3, 4), 4
N = GRID[0] * GRID[1]
NETWORK = dict(size="tiny", text_vocab_size=V_T, text_length=L, image_vocab_size=V_I, grid=GRID, conv_kernel=3,
               size_overrides={"width": 32, "depth": 3, "heads": 2})


def _text(rng, lengths):
    """Caption slots: `n` pieces then EOS (1) then pad (0), one row per length."""
    ids = np.zeros((len(lengths), L), np.int32)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(2, V_T, n)
        if n < L:
            ids[row, n] = 1
    return ids


def _batch(seed=0, lengths=(2, 5, 3, 6)):
    rng = np.random.default_rng(seed)
    return {"text_ids": _text(rng, lengths), "image_tokens": rng.integers(0, V_I, (len(lengths), *GRID)).astype(np.int32)}


def _model(**overrides):
    keras.utils.set_random_seed(0)
    model = DALLE(**{**NETWORK, **overrides})
    model.build_all()
    return model


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_model_modules_import_neither_tensorflow_nor_gin():
    files = ["mmt/models/dalle.py", "mmt/tasks/dalle.py", "mmt/sampling/autoregressive.py"]
    seen = assert_no_tensorflow(files, ["mmt.models.dalle", "mmt.tasks.dalle"])
    assert "mmt.layers" in seen


def test_standard_checks_of_the_network():
    """Config round trip, eager == XLA, mixed_bfloat16 (tests/harness.py) on the whole network."""
    batch = _batch()
    inputs = {"text_ids": batch["text_ids"], "image_tokens": batch["image_tokens"].reshape(B, N)}
    network = {**NETWORK, "size_overrides": {"width": 32, "depth": 1, "heads": 2}}
    # XLA reorders float32 sums (the longest: the MLP's 4 x 32 = 128 terms) and brings its
    # own exp / erf / rsqrt (~16 along the chain); one block and the heads (tests/tolerances.py).
    check_layer(lambda: DALLE(**network), inputs, xla_rtol=reordered_sum_rtol(128, steps=2, chained_ops=16),
                mixed_dtype="float32", lazy_variables=True)


@jax_check(modules=["mmt.models.dalle"], rtol=reordered_sum_rtol(128, chained_ops=16),
           call="[obj.build_all(), *obj.logits(args[0]), obj.step_logits(args[0][:, :1], 0, obj.init_cache(2))[0]][1:]")
def test_network_and_a_cached_step_equal_under_jax_without_tensorflow():
    model = _model(size_overrides={"width": 32, "depth": 2, "heads": 2})
    batch = _batch(lengths=(2, 5))
    return model, (np.asarray(model.sequence(batch["text_ids"], batch["image_tokens"])),), {}


# -- masks and their schedule --------------------------------------------------------------------


def _expected(attended_images, text_len=2):
    """The full mask from hand-listed image keys per image query (raster indices)."""
    n = len(attended_images)
    mask = np.zeros((text_len + n, text_len + n), bool)
    mask[:text_len, :text_len] = np.tril(np.ones((text_len, text_len), bool))  # text: causal
    mask[text_len:, :text_len] = True  # every image token sees all text (§2.2)
    for q, keys in enumerate(attended_images):
        mask[text_len + q, [text_len + k for k in keys]] = True
    return mask


def test_masks_match_hand_built_cases():
    # A 2 x 4 grid after 2 text positions (App. B.1, Fig. 11 at a smaller size).
    grid = (2, 4)
    row = [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 2, 3, 4}, {1, 2, 3, 4, 5}, {2, 3, 4, 5, 6}, {3, 4, 5, 6, 7}]
    column = [{0}, {1}, {2}, {3}, {0, 4}, {1, 5}, {2, 6}, {3, 7}]
    # 3x3 causal convolution: the query, its left neighbour and the three above it. With
    # wraparound the neighbourhood is in raster offsets {0, 1, w-1, w, w+1} (Fig. 11d), so
    # the last column's "above right" wraps to the start of its own row (query 3 sees 0).
    conv_wrapped = [{0}, {0, 1}, {1, 2}, {0, 2, 3}, {0, 1, 3, 4}, {0, 1, 2, 4, 5}, {1, 2, 3, 5, 6}, {2, 3, 4, 6, 7}]
    conv_clipped = [{0}, {0, 1}, {1, 2}, {2, 3}, {0, 1, 4}, {0, 1, 2, 4, 5}, {1, 2, 3, 5, 6}, {2, 3, 6, 7}]
    got = {
        "row": dalle_row_mask(2, grid), "column": dalle_column_mask(2, grid),
        "conv": dalle_conv_mask(2, grid, kernel=3), "conv clipped": dalle_conv_mask(2, grid, 3, wraparound=False),
    }
    for name, keys in (("row", row), ("column", column), ("conv", conv_wrapped), ("conv clipped", conv_clipped)):
        np.testing.assert_array_equal(np.asarray(got[name]), _expected(keys), err_msg=name)
    # Fig. 11a's extent: on the figure's 4 x 4 grid each image token sees 5 image tokens,
    # the furthest being the same column of the previous row.
    fig = np.asarray(dalle_row_mask(6, 4))[6 + 9, 6:]
    assert np.flatnonzero(fig).tolist() == [5, 6, 7, 8, 9]


def test_layer_schedule_follows_appendix_b1():
    # App. B.1 (arXiv:2102.12092): conv only in the last layer; otherwise, for layer i in
    # [1, 63], column if (i - 2) mod 4 == 0 else row; "the first four self-attention layers
    # use row, column, row, row".
    kinds = layer_kinds(64)
    assert kinds[:4] == [ROW, COLUMN, ROW, ROW] and kinds[4:8] == [ROW, COLUMN, ROW, ROW]
    assert kinds[-1] == CONV and kinds.count(CONV) == 1
    assert [i + 1 for i, k in enumerate(kinds) if k == COLUMN] == list(range(2, 64, 4))  # 2, 6, ..., 62
    assert kinds.count(COLUMN) == 16 and kinds.count(ROW) == 47
    assert layer_kinds(1) == [CONV] and layer_kinds(4) == [ROW, COLUMN, ROW, CONV]
    model = DALLE(**{**NETWORK, "size_overrides": {"width": 16, "depth": 4, "heads": 2}})
    assert model.layer_pattern == [ROW, COLUMN, ROW, CONV]
    for kind, mask in zip(model.layer_pattern, model.layer_masks()):
        np.testing.assert_array_equal(np.asarray(mask), model.masks[kind])


@pytest.mark.parametrize("kind", [ROW, COLUMN, CONV])
def test_a_layer_sees_exactly_its_mask(kind):
    """One layer of one kind: changing the token at position k changes the output at q iff mask[q, k]."""
    model = _model(layer_pattern=[kind], size_overrides={"width": 16, "depth": 1, "heads": 2})
    tokens = model.sequence(*(_batch()[k][:1] for k in ("text_ids", "image_tokens")))
    base = np.asarray(model.hidden(tokens))[0]
    changed = np.zeros((L + N, L + N), bool)
    for k in range(L + N):
        other = np.array(tokens)
        other[0, k] = (other[0, k] + 3) % (V_T if k < L else V_I)
        if k < L and other[0, k] == 0:
            other[0, k] = 2  # stay a real token (pad is a different embedding, tested below)
        changed[:, k] = np.abs(np.asarray(model.hidden(other))[0] - base).max(-1) > 1e-6
    np.testing.assert_array_equal(changed, model.masks[kind])


# -- per-position padding ----------------------------------------------------------------------------


def test_pad_tokens_are_used_exactly_where_the_caption_is_shorter_than_its_slot():
    model = _model()
    text = _batch()["text_ids"]  # captions of 2, 5, 3, 6 pieces (+ EOS), then pad
    x = np.asarray(model.embed(model.sequence(text)))[:, :L]
    pads = np.asarray(model.pad_embedding.embeddings)  # [L, D]: one per text position
    tokens = np.asarray(model.text_embedding.embeddings)
    positions = np.asarray(model.text_position.embeddings)
    for b in range(len(text)):
        for p in range(L):
            if text[b, p] == model.pad_id:
                np.testing.assert_array_equal(x[b, p], pads[p])
            else:
                # One float32 addition either way.
                np.testing.assert_allclose(x[b, p], tokens[text[b, p]] + positions[p], rtol=0, atol=1e-7)
                assert np.abs(x[b, p] - pads[p]).max() > 1e-3
    # Distinct positions have distinct learned pads.
    assert np.abs(pads[1] - pads[2]).max() > 1e-3


# -- losses -------------------------------------------------------------------------------------------


def _trainer(strategy=None):
    trainer = Trainer(task=functools.partial(DALLETask, network=NETWORK), streams={}, train_steps=1, mode="graph",
                      optimizer=functools.partial(keras.optimizers.SGD, learning_rate=0.1), progress_bar=False)
    trainer.build(strategy)
    return trainer


def test_losses_by_hand_text_eighth_image_seven_eighths_over_the_global_token_counts():
    trainer = _trainer()
    m = trainer.task.model
    batch = _batch()
    text_logits, image_logits = (np.asarray(t) for t in m({k: tf.constant(v) for k, v in batch.items()}))
    metrics, applied = trainer.train_step({"paired": tf.nest.map_structure(tf.constant, batch)})
    assert bool(applied)
    text, image = batch["text_ids"], batch["image_tokens"].reshape(B, N)
    # Text: position p predicts token p + 1; only real tokens (pieces, EOS) count: 2+1, 4+1... tokens.
    nll_text = -np.take_along_axis(_log_softmax(text_logits), text[:, 1:, None], -1)[..., 0]
    real = text[:, 1:] != 0
    assert real.sum() == (2 + 5 + 3 + 6) + 3 - 4  # pieces + EOS of the short ones, minus each first token
    want_text = nll_text[real].sum() / real.sum()  # one mean over the batch's text tokens
    nll_image = -np.take_along_axis(_log_softmax(image_logits), image[..., None], -1)[..., 0]
    want_image = nll_image.mean()  # all B * N codes
    # A per-example mean would weigh short captions' tokens more: a different number.
    per_example = np.mean([nll_text[b][real[b]].mean() for b in range(B)])
    assert abs(per_example - want_text) > 1e-3
    assert float(metrics["loss/text"]) == pytest.approx(want_text, rel=1e-5)
    assert float(metrics["loss/image"]) == pytest.approx(want_image, rel=1e-5)
    assert float(metrics["total_loss/model"]) == pytest.approx(want_text / 8 + 7 * want_image / 8, rel=1e-5)


def test_one_and_two_replicas_take_the_same_step():
    from mmt.training import distribute

    batch = _batch(seed=3, lengths=(1, 6, 2, 4))  # shards with 2+3 and 6+3 text tokens (unequal)
    one = _trainer()
    before = [np.array(v) for v in one.task.model.trainable_variables]
    one_metrics, _ = one.train_step({"paired": tf.nest.map_structure(tf.constant, batch)})
    two = _trainer(distribute.make_strategy(cpu_replicas=2))
    for a, b in zip(before, two.task.model.trainable_variables):
        np.testing.assert_array_equal(a, np.asarray(b))  # same initial weights (the run's seed)
    two_metrics, _ = two.train_step(distribute_shards(two.strategy, batch))
    # Sums over the batch's tokens split in two partial sums: B * (L + N) terms at most.
    rtol = reordered_sum_rtol(B * (L + N), chained_ops=8)
    for name in ("loss/text", "loss/image", "total_loss/model"):
        assert float(two_metrics[name]) == pytest.approx(float(one_metrics[name]), rel=rtol), name
    assert_close_to_scale([np.asarray(v) for v in two.task.model.trainable_variables],
                          [np.asarray(v) for v in one.task.model.trainable_variables], rtol, "weights after a step")


# -- decoding ----------------------------------------------------------------------------------------------


def test_cached_decoding_gives_the_uncached_logits_at_every_step():
    model = _model()
    batch = _batch()
    tokens = model.sequence(batch["text_ids"], batch["image_tokens"])
    cache = model.init_cache(B)
    _, full_image_logits = (np.asarray(t) for t in model.logits(tokens))
    for index in range(L + N - 1):
        cached, cache = model.step_logits(tokens[:, index:index + 1], index, cache)
        if index < L - 1:
            continue  # the caption is fed; its image logits are not used
        uncached = model.buffer_logits(tokens, index)
        # The same sums over at most L + N keys and D = 32 channels, in another grouping.
        rtol = reordered_sum_rtol(4 * 32, steps=2, chained_ops=16)
        assert_close_to_scale([np.asarray(cached)], [np.asarray(uncached)], rtol, f"step {index}")
        assert_close_to_scale([np.asarray(cached)], [full_image_logits[:, index - (L - 1)]], rtol, f"step {index}")
    # Whole samples: the same draws, so the same codes with and without the cache.
    text = tf.constant(batch["text_ids"])
    with_cache = np.asarray(sample_image_tokens(model, text, FixedSeed(tf.constant([3, 0])), use_cache=True))
    without = np.asarray(sample_image_tokens(model, text, FixedSeed(tf.constant([3, 0])), use_cache=False))
    np.testing.assert_array_equal(with_cache, without)
    assert with_cache.shape == (B, *GRID) and with_cache.min() >= 0 and with_cache.max() < V_I
    first = with_cache.reshape(B, N)[:, 0]  # the first code is drawn from the text alone
    assert len(set(first.tolist()) | set(with_cache.reshape(-1).tolist())) > 1


def test_learns_a_caption_conditional_image_that_greedy_decoding_reproduces():
    """Training targets and sampling positions line up: after 120 steps on images that are a
    function of the caption's one word (its first code included: predicted from the text
    alone), cached greedy decoding draws exactly those images."""
    grid, text_length, vocab = (3, 4), 4, 8
    network = dict(size="tiny", text_vocab_size=12, text_length=text_length, image_vocab_size=vocab, grid=grid,
                   conv_kernel=3, size_overrides={"width": 32, "depth": 2, "heads": 2})
    trainer = Trainer(task=functools.partial(DALLETask, network=network), streams={}, train_steps=1, mode="graph",
                      optimizer=functools.partial(keras.optimizers.Adam, learning_rate=3e-3), progress_bar=False)
    trainer.build()

    def data(rng, n):
        word = rng.integers(2, 6, n)
        text = np.zeros((n, text_length), np.int32)
        text[:, 0], text[:, 1] = word, 1  # one word, EOS, pads
        image = (word[:, None] * 3 + np.arange(12)[None] * (word[:, None] - 1)) % vocab  # first codes 6, 1, 4, 7
        return text, image.reshape(n, *grid).astype(np.int32)

    rng = np.random.default_rng(0)
    for _ in range(120):
        text, image = data(rng, 16)
        metrics, _ = trainer.train_step({"paired": {"text_ids": tf.constant(text), "image_tokens": tf.constant(image)}})
    assert float(metrics["loss/image"]) < 0.05
    text, image = data(np.random.default_rng(1), 8)
    got = sample_image_tokens(trainer.task.model, tf.constant(text), FixedSeed(tf.constant([0, 0])), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(got), image)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]], np.float32))
    kept = np.asarray(top_p_filter(ops.convert_to_tensor(logits), 0.75, 1.0)) > -1e8
    # Row 0 sorted: 0.5, 0.3 (0.8 >= 0.75) -> tokens 0 and 2; row 1 ties: all kept.
    np.testing.assert_array_equal(kept, [[True, False, True, False], [True, True, True, True]])
    kept = np.asarray(top_p_filter(ops.convert_to_tensor(logits), 0.4, 1.0)) > -1e8
    np.testing.assert_array_equal(kept[0], [True, False, False, False])  # the top token always
    model = _model()
    text = tf.constant(_batch()["text_ids"])
    codes = np.asarray(sample_image_tokens(model, text, FixedSeed(tf.constant([1, 0])), top_k=1))
    greedy = np.asarray(sample_image_tokens(model, text, FixedSeed(tf.constant([1, 0])), temperature=0.0))
    np.testing.assert_array_equal(codes, greedy)


def test_loss_gradients_and_sampling_xla_equal_eager():
    task = DALLETask(network={**NETWORK, "size_overrides": {"width": 32, "depth": 1, "heads": 2}})
    task.build()
    m = task.model
    batch = {k: tf.constant(v) for k, v in _batch().items()}

    def loss_and_grads(text, image):
        with tf.GradientTape() as tape:
            parts = task.losses(text, image, training=False)
            value = sum(task.loss_weights[n] * p.numerator / p.denominator for n, p in parts.items()
                        if not n.endswith("accuracy"))
        return value, tape.gradient(value, m.trainable_variables)

    # XLA reorders float32 sums (the MLP's 4 x 32 = 128 terms; gradients sum over B x (L + N)
    # = 72 positions) and has its own exp / erf / rsqrt; forward then backward.
    assert_xla_matches_eager(loss_and_grads, batch["text_ids"], batch["image_tokens"],
                             rtol=reordered_sum_rtol(128, steps=2, chained_ops=16))
    # Sampling draws integers only (mmt.backend): the same codes either way.
    run = lambda t: sample_image_tokens(m, t, FixedSeed(tf.constant([5, 0])), top_p=0.9)  # noqa: E731
    assert_xla_matches_eager(run, batch["text_ids"], rtol=0.0)
    # The task's hook (what generation, evaluation and reranking call), compiled or not.
    compiled = task.text_to_image_tokens(_batch()["text_ids"], seed=2, top_k=4)
    task.compile_inference = False
    np.testing.assert_array_equal(compiled, task.text_to_image_tokens(_batch()["text_ids"], seed=2, top_k=4))
    assert compiled.shape == (B, *GRID) and compiled.dtype == np.int32


# -- gin configs ----------------------------------------------------------------------------------------


def test_tiny_gin_config_loss_decreases_in_a_few_steps():
    from mmt import config as mmt_config

    mmt_config.parse([str(REPO / "gin" / "dalle_tiny.gin")], [
        "DATA_DIR = 'unused'", f"GRID = {GRID}", f"IMAGE_VOCAB_SIZE = {V_I}", f"TEXT_VOCAB_SIZE = {V_T}",
        f"TEXT_LENGTH = {L}", "WARMUP_STEPS = 2", "TRAIN_STEPS = 10", "PEAK_LEARNING_RATE = 3e-3",
        "Trainer.mode = 'graph'", "Trainer.progress_bar = False"])
    from mmt import configurables

    trainer = configurables.Trainer()
    assert isinstance(trainer.optimizer_factory(), keras.optimizers.AdamW) and trainer.clip_grad_norm == 4.0
    trainer.build()
    assert set(trainer.streams) == {"paired"} and trainer.task.loss_weights["text"] == 0.125
    assert trainer.task.model.layer_pattern == [ROW, COLUMN, ROW, CONV]
    batch = {"paired": tf.nest.map_structure(tf.constant, _batch())}
    losses = [float(trainer.train_step(batch)[0]["total_loss/model"]) for _ in range(10)]
    assert losses[-1] < 0.9 * losses[0], losses


def test_12b_config_dry_run_counts_12_billion_parameters(tmp_path, capsys):
    from mmt import train

    with pytest.warns(UserWarning, match="from their shapes"):
        assert train.main(["--gin_file=gin/dalle_12b.gin", "--gin_param=DATA_DIR='unused'",
                           f"--workdir={tmp_path}", "--dry_run"]) == 0
    out = capsys.readouterr().out
    total = int(next(line for line in out.splitlines() if line.startswith("total")).split()[1].replace(",", ""))
    assert abs(total - 12e9) / 12e9 < 0.05, total  # §2.2: "a 12-billion parameter sparse transformer"
    transformer = int(next(line for line in out.splitlines() if line.startswith("transformer")).split()[1]
                      .replace(",", ""))
    d = 3968  # App. B.1: 64 layers, 62 heads of 64
    assert transformer == 64 * (12 * d * d + 13 * d) + 2 * d
    assert "BPE_DROPOUT = 0.1" in out and "paired/StreamSpec.bpe_dropout = %BPE_DROPOUT" in out  # §2.2 fn. 5


# -- the command-line chain on real records --------------------------------------------------------------


@pytest.mark.slow
def test_train_then_generate_pngs_and_samples_from_the_command_line(tiny_data, tmp_path):
    from PIL import Image

    from mmt.restore import load_trained
    from token_records import make_token_records

    records = make_token_records(tmp_path, tiny_data["vocabulary"], {"paired": 16})
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    workdir = tmp_path / "run"
    train = [sys.executable, "-m", "mmt.train", "--gin_file=gin/dalle_tiny.gin", f"--workdir={workdir}",
             *records["gin_params"], "--gin_param=SIZE_OVERRIDES={'width': 32, 'depth': 2, 'heads': 2}",
             "--gin_param=BATCH_SIZE=4", "--gin_param=DALLETask.compile_inference=False"]
    result = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "completed at step 2" in result.stdout

    generate = [sys.executable, "-m", "mmt.generate", f"--workdir={workdir}", "--prompt=a red circle",
                "--prompt=two blue squares", "--unconditional=2", "--temperature=0.5", "--top_k=8"]
    result = subprocess.run(generate, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("000_a_red_circle.png", "001_two_blue_squares.png", "unconditional_001.png"):
        with Image.open(workdir / "generated" / name) as image:
            assert image.size == (32, 32)

    task, step = load_trained(workdir)
    assert step == 2
    images, codes = task.sample_images(["a red circle", "a green triangle"], num_samples=3, seed=1)
    assert images.shape == (2, 3, 32, 32, 3) and images.dtype == np.uint8 and codes.shape == (2, 3, 4, 4)
    assert len({codes[0, i].tobytes() for i in range(3)}) > 1  # independent draws per caption
