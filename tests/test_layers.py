"""Tests for mmt.layers: masks, attention, blocks, embeddings, heads."""

import pathlib

import keras
import numpy as np
import pytest
from keras import ops

import mmt.layers as L
from mmt import backend
from harness import assert_no_tensorflow, assert_xla_matches_eager, check_layer, jax_check, mixed_bfloat16
from tolerances import assert_close_to_scale, reordered_sum_rtol

LAYERS_DIR = pathlib.Path(L.__file__).parent
RNG = np.random.default_rng(0)


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def randn(*shape):
    return RNG.standard_normal(shape).astype("float32")


# --------------------------------------------------------------------------- masks


def test_full_causal_padding_combine():
    np.testing.assert_array_equal(np_(L.full_mask(3)), np.ones((3, 3), bool))
    np.testing.assert_array_equal(np_(L.full_mask(2, 4)), np.ones((2, 4), bool))
    np.testing.assert_array_equal(np_(L.causal_mask(4)), np.tril(np.ones((4, 4), bool)))
    valid = np.array([[1, 1, 0], [1, 0, 0]])
    pad = np_(L.padding_mask(valid))
    assert pad.shape == (2, 1, 3) and pad.dtype == bool
    combined = np_(L.combine_masks(L.causal_mask(3), None, L.padding_mask(valid)))
    expected = np.tril(np.ones((3, 3), bool))[None] & valid[:, None, :].astype(bool)
    np.testing.assert_array_equal(combined, expected)
    assert L.combine_masks(None, None) is None


def test_prefix_mask_literal():
    expected = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(np_(L.prefix_mask(2, 5)), expected)
    np.testing.assert_array_equal(np_(L.prefix_mask(0, 4)), np.tril(np.ones((4, 4), bool)))


def _dalle_reference(text_len, h, w, image_rule):
    """Loop implementation in 2-D coordinates, independent of the library's formulas."""
    n = text_len + h * w
    mask = np.zeros((n, n), bool)
    for q in range(n):
        for k in range(q + 1):
            if k < text_len:
                mask[q, k] = True
            elif q >= text_len:
                qr, qc = divmod(q - text_len, w)
                kr, kc = divmod(k - text_len, w)
                mask[q, k] = image_rule(qr, qc, kr, kc)
    return mask


def _conv_wrap_reference(text_len, h, w, kernel):
    n = text_len + h * w
    s = kernel // 2
    mask = np.tril(np.ones((n, n), bool))
    mask[text_len:, text_len:] = False
    for qi in range(h * w):
        for dr in range(s + 1):
            for dc in range(-s, s + 1):
                ki = qi - dr * w - dc
                if 0 <= ki <= qi:
                    mask[text_len + qi, text_len + ki] = True
    return mask


@pytest.mark.parametrize("text_len,h,w", [(3, 4, 4), (2, 3, 5), (0, 5, 3)])
def test_dalle_masks_match_loop_reference(text_len, h, w):
    grid = (h, w)
    # Row: the rest of the current row up to the query, plus the previous row from the
    # query's column on, i.e. the previous w + 1 tokens in raster order.
    def row_rule(qr, qc, kr, kc):
        return (kr == qr and kc <= qc) or (kr == qr - 1 and kc >= qc)

    row = _dalle_reference(text_len, h, w, row_rule)
    np.testing.assert_array_equal(np_(L.dalle_row_mask(text_len, grid)), row)
    column = _dalle_reference(text_len, h, w, lambda qr, qc, kr, kc: kc == qc and kr <= qr)
    np.testing.assert_array_equal(np_(L.dalle_column_mask(text_len, grid)), column)
    for kernel in (1, 3, 5):
        s = kernel // 2
        clipped = _dalle_reference(
            text_len,
            h,
            w,
            lambda qr, qc, kr, kc: 0 <= qr - kr <= s and abs(qc - kc) <= s,
        )
        got = np_(L.dalle_conv_mask(text_len, grid, kernel=kernel, wraparound=False))
        np.testing.assert_array_equal(got, clipped)
        got = np_(L.dalle_conv_mask(text_len, grid, kernel=kernel))
        np.testing.assert_array_equal(got, _conv_wrap_reference(text_len, h, w, kernel))


def test_dalle_masks_literal_rows():
    # 1 text token, 4x4 grid as in DALL-E Fig. 11 (which has 6 text tokens).
    def image_keys(mask, qi):
        row = np_(mask)[1 + qi]
        assert row[0]  # every image token sees the text
        return [int(k) - 1 for k in np.nonzero(row[1:])[0] + 1]

    # Token 8 = (row 2, col 0): previous 5 tokens incl. itself; furthest = (1, 0).
    assert image_keys(L.dalle_row_mask(1, 4), 8) == [4, 5, 6, 7, 8]
    assert image_keys(L.dalle_column_mask(1, 4), 9) == [1, 5, 9]
    # 3x3 kernel at (1, 1) = token 5: (1,0), (1,1) and (0,0..2).
    assert image_keys(L.dalle_conv_mask(1, 4, kernel=3), 5) == [0, 1, 2, 4, 5]
    # At (1, 0) = token 4 the raster window wraps to (0, 3) = token 3 ...
    assert image_keys(L.dalle_conv_mask(1, 4, kernel=3), 4) == [0, 1, 3, 4]
    # ... and the clipped one stops at the image border.
    assert image_keys(L.dalle_conv_mask(1, 4, kernel=3, wraparound=False), 4) == [0, 1, 4]
    with pytest.raises(ValueError):
        L.dalle_conv_mask(1, 4, kernel=4)


# ----------------------------------------------------------------------- attention


def _mha_reference(layer, x, mask=None):
    """Naive numpy multi-head attention with the layer's weights."""
    w = {v.path.split("/")[-1]: np_(v) for v in layer.weights}
    h = layer.num_heads
    dh = w["qkv_kernel"].shape[1] // (3 * h)
    qkv = (x @ w["qkv_kernel"] + w["qkv_bias"]).reshape(*x.shape[:2], 3, h, dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    b, t = x.shape[:2]
    out = np.zeros((b, t, h, dh), np.float64)
    for bi in range(b):
        for hi in range(h):
            logits = q[bi, :, hi] @ k[bi, :, hi].T / np.sqrt(dh)
            if mask is not None:
                m = np.broadcast_to(mask, (b, t, t))[bi]
                logits = np.where(m, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p = p / p.sum(-1, keepdims=True)
            out[bi, :, hi] = p @ v[bi, :, hi]
    return out.reshape(b, t, h * dh) @ w["output_kernel"] + w["output_bias"]


def test_attention_matches_numpy_reference():
    x = randn(2, 5, 12)
    layer = L.MultiHeadAttention(num_heads=3, bias_initializer="random_normal")
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    mask = np_(L.combine_masks(L.causal_mask(5), L.padding_mask(valid)))
    got = np_(layer(x, mask=mask))
    # numpy's float32 sums vs TensorFlow's, in five stages one after the other (QKV over
    # 12 inputs, q.k over 4, softmax and p.v over 5 keys, output over 12) plus exp
    # (tests/tolerances.py): the longest sum, 12 terms, bounds each stage.
    rtol = reordered_sum_rtol(12, steps=5, chained_ops=4)
    assert_close_to_scale([got], [_mha_reference(layer, x, mask)], rtol, "masked")
    assert_close_to_scale([np_(layer(x))], [_mha_reference(layer, x)], rtol, "unmasked")
    assert [v.shape for v in layer.weights][0] == (12, 36)  # one fused QKV matmul


def test_masked_keys_get_zero_weight_and_full_mask_rows_are_finite():
    logits = randn(2, 3, 4, 6)
    mask = np.ones((4, 6), bool)
    mask[:, 2] = False
    mask[1] = False  # a fully-masked row
    probs = np_(L.masked_softmax(logits, mask))
    assert probs.dtype == np.float32
    assert np.all(probs[..., 2][..., [0, 2, 3]] == 0.0)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)

    # Changing a masked key/value cannot change the output.
    x = randn(2, 6, 8)
    layer = L.MultiHeadAttention(num_heads=2)
    key_mask = L.padding_mask(np.array([[1, 1, 1, 1, 0, 0]] * 2))
    y1 = np_(layer(x, mask=key_mask))
    x2 = x.copy()
    x2[:, 4:] = 100.0 * randn(2, 2, 8)
    y2 = np_(layer(x2, mask=key_mask))
    # Exact: a masked key's weight is exactly 0, so its value adds exactly 0 in the same order.
    np.testing.assert_array_equal(y1[:, :4], y2[:, :4])
    # Every key masked: finite output.
    y = np_(layer(x, mask=np.zeros((6, 6), bool)))
    assert np.all(np.isfinite(y))


def test_cross_attention_and_mode_checks():
    x, ctx = randn(2, 4, 8), randn(2, 3, 6)
    layer = L.MultiHeadAttention(num_heads=2, head_dim=5)
    y = layer(x, context=ctx, mask=L.padding_mask(np.array([[1, 1, 0], [1, 1, 1]])))
    assert y.shape == (2, 4, 8)
    assert {v.path.split("/")[-1] for v in layer.weights} >= {"query_kernel", "kv_kernel"}
    with pytest.raises(ValueError, match="cross"):
        layer(x)


def test_attention_dropout_only_in_training():
    x = randn(2, 4, 8)
    layer = L.MultiHeadAttention(num_heads=2, dropout=0.5)
    np.testing.assert_array_equal(np_(layer(x)), np_(layer(x, training=False)))
    with backend.scope(backend.FixedSeed(np.array([1, 2]))):
        assert not np.allclose(np_(layer(x, training=True)), np_(layer(x)))


# -------------------------------------------------------------------- transformer


@pytest.mark.parametrize("stacked", [False, True])
def test_cached_decoding_matches_full_causal_forward(stacked):
    b, t, d = 2, 7, 16
    x = randn(b, t, d)
    stack = L.TransformerStack(depth=2, num_heads=4, mlp_dim=32)
    full = np_(stack(x, mask=L.causal_mask(t)))
    cache = stack.init_cache(b, t)
    if not stacked:
        cache = [cache[i] for i in range(2)]
    for i in range(t):
        out, cache = stack(x[:, i : i + 1], cache=cache, cache_index=i)
        assert_close_to_scale([np_(out)[:, 0]], [full[:, i]], _CACHED_RTOL, f"position {i}")
    assert isinstance(cache, list) != stacked


# One token against the cache vs the whole sequence: other matmul shapes, so other float32
# summation orders; the longest sum is the MLP's 32 terms, and two blocks chain, each with
# about six such stages (QKV, q.k, softmax, p.v, output, MLP): tests/tolerances.py.
_CACHED_RTOL = reordered_sum_rtol(32, steps=2 * 6, chained_ops=4)


def test_cached_prefix_prefill_matches_git_mask():
    # GIT-style decoding: prefill the image prefix with its bidirectional mask, then
    # decode text one token at a time.
    b, p, t, d = 2, 3, 7, 16
    x = randn(b, t, d)
    stack = L.TransformerStack(depth=2, num_heads=2, mlp_dim=32)
    full = np_(stack(x, mask=L.prefix_mask(p, t)))
    cache = stack.init_cache(b, t)
    out, cache = stack(x[:, :p], mask=L.prefix_mask(p, t)[:p], cache=cache, cache_index=0)
    assert_close_to_scale([np_(out)], [full[:, :p]], _CACHED_RTOL, "prefix")
    for i in range(p, t):
        out, cache = stack(x[:, i : i + 1], cache=cache, cache_index=i)
        assert_close_to_scale([np_(out)[:, 0]], [full[:, i]], _CACHED_RTOL, f"position {i}")


def test_stack_per_layer_masks_and_cross_attention():
    x, ctx = randn(2, 1 + 9, 8), randn(2, 4, 8)
    masks = [L.dalle_row_mask(1, 3), L.dalle_column_mask(1, 3), L.dalle_conv_mask(1, 3, 3)]
    stack = L.TransformerStack(depth=3, num_heads=2, mlp_dim=16, cross_attention=True)
    ctx_mask = L.padding_mask(np.array([[1, 1, 1, 0]] * 2))
    y = stack(x, mask=masks, context=ctx, context_mask=ctx_mask)
    assert y.shape == x.shape
    with pytest.raises(ValueError, match="masks"):
        stack(x, mask=masks[:2], context=ctx)
    # Causality: changing the last token leaves every earlier output unchanged.
    x2 = x.copy()
    x2[:, -1] += 1.0
    y2 = stack(x2, mask=masks, context=ctx, context_mask=ctx_mask)
    # Exact: the last token's keys get weight exactly 0 at every earlier position.
    np.testing.assert_array_equal(np_(y)[:, :-1], np_(y2)[:, :-1])


def test_drop_path_and_dropout_only_in_training():
    x = randn(4, 5, 8)
    block = L.TransformerBlock(num_heads=2, mlp_dim=16, dropout=0.1, drop_path=0.5)
    np.testing.assert_array_equal(np_(block(x)), np_(block(x, training=False)))
    with backend.scope(backend.FixedSeed(np.array([1, 2]))):
        assert not np.allclose(np_(block(x, training=True)), np_(block(x)))
    stack = L.TransformerStack(depth=3, num_heads=2, mlp_dim=16, drop_path=0.2)
    assert [blk.drop_path for blk in stack.blocks] == pytest.approx([0.0, 0.1, 0.2])


def test_mlp_activation_choices():
    x = randn(2, 3, 4)
    exact = L.Mlp(8, approximate_gelu=False)
    approx = L.Mlp(8)
    approx(x)
    exact(x)
    approx.set_weights(exact.get_weights())
    np.testing.assert_allclose(np_(approx(x)), np_(exact(x)), atol=1e-2)
    relu = L.Mlp(8, output_dim=6, activation="relu")
    assert relu(x).shape == (2, 3, 6)


# ---------------------------------------------------------------------- embeddings


def test_sinusoidal_positions():
    got = np_(L.sinusoidal_positions(5, 6))
    pos = np.arange(5)[:, None]
    inv = 1.0 / 10_000 ** (np.arange(0, 6, 2) / 6)
    want = np.zeros((5, 6))
    want[:, 0::2] = np.sin(pos * inv)
    want[:, 1::2] = np.cos(pos * inv)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_sinusoidal_positions_2d_code_row_then_column():
    got = np_(L.sinusoidal_positions_2d(2, 3, 8))  # a 2 x 3 grid, row-major
    rows, cols = np_(L.sinusoidal_positions(2, 4)), np_(L.sinusoidal_positions(3, 4))
    assert got.shape == (6, 8)
    for r in range(2):
        for c in range(3):
            np.testing.assert_allclose(got[r * 3 + c], np.concatenate([rows[r], cols[c]]), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        L.sinusoidal_positions_2d(2, 2, 6)


def test_embeddings_and_tied_logits():
    ids = np.array([[1, 4, 2], [0, 3, 3]])
    emb = L.TokenEmbedding(5, 6, use_bias=True)
    e = np_(emb(ids))
    table = np_(emb.embeddings)
    np.testing.assert_array_equal(e, table[ids])
    emb.bias.assign(np.arange(5, dtype="float32"))
    np.testing.assert_allclose(np_(emb.attend(e)), e @ table.T + np.arange(5), rtol=1e-5, atol=1e-5)

    head = L.LogitsHead(5, tie_embeddings=True)
    logits = head(e, embedding=emb)
    np.testing.assert_allclose(np_(logits), e @ table.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="embedding"):
        head(e)

    x = randn(2, 3, 6)
    pos = L.LearnedPositionEmbedding(8, 6)
    added = np_(pos(x) - x)
    table = np_(pos.embeddings)
    np.testing.assert_allclose(added, np.broadcast_to(table[:3], (2, 3, 6)), atol=1e-6)
    shifted = np_(pos(x[:, :1], offset=4) - x[:, :1])
    np.testing.assert_allclose(shifted[0, 0], table[4], atol=1e-6)
    picked = np_(pos(x, positions=np.array([7, 0, 2])) - x)
    np.testing.assert_allclose(picked[1], table[[7, 0, 2]], atol=1e-6)

    types = L.ModalityEmbedding(2, 6)
    tids = np.array([0, 0, 1])
    np.testing.assert_allclose(np_(types(x, tids) - x)[0], np_(types.embeddings)[tids], atol=1e-6)


# -------------------------------------------------------------------- serialization


# One rtol for every layer below: XLA reorders float32 sums (the longest: an MLP's
# 4 x 16 = 64 terms) and brings its own exp / erf / rsqrt (~16 per block); at most two
# blocks in a row (tests/tolerances.py).
LAYER_XLA_RTOL = reordered_sum_rtol(64, steps=2, chained_ops=16)


def test_standard_checks_every_layer():
    """Config round trip, eager == XLA and mixed_bfloat16 (tests/harness.py), layer by layer."""
    x, ctx, ids = randn(2, 4, 8), randn(2, 3, 6), np.array([[1, 2, 3, 0]] * 2)
    rtol = LAYER_XLA_RTOL
    check_layer(lambda: L.MultiHeadAttention(2, head_dim=3, dropout=0.1), x, mask=L.causal_mask(4), xla_rtol=rtol)
    check_layer(lambda: L.MultiHeadAttention(2, use_bias=False, output_dim=5), x, context=ctx, xla_rtol=rtol)

    def built_mha():
        mha = L.MultiHeadAttention(2)
        mha(x)
        return mha

    mha = built_mha()  # the cache in the compute dtype: float32 here, bfloat16 under the policy
    check_layer(built_mha, x[:, :1], cache=mha.init_cache(2, 4), cache_index=1, xla_rtol=rtol, mixed_dtype=None)
    check_layer(lambda: L.Mlp(16, output_dim=4, activation="relu"), x, xla_rtol=rtol)
    check_layer(lambda: L.TransformerBlock(2, 16, cross_attention=True, drop_path=0.1), x, context=ctx,
                xla_rtol=rtol)
    check_layer(lambda: L.TransformerStack(2, 2, 16, final_norm=False, head_dim=8), x, mask=L.causal_mask(4),
                xla_rtol=rtol)
    # The former test_jit_compile_matches_eager: a prefix mask and cross-attention.
    check_layer(lambda: L.TransformerStack(2, 2, 16, cross_attention=True), randn(2, 5, 8),
                mask=L.prefix_mask(2, 5), context=randn(2, 3, 8), xla_rtol=rtol)
    emb, _ = check_layer(lambda: L.TokenEmbedding(5, 8, use_bias=True), ids, xla_rtol=rtol)
    check_layer(lambda: L.LearnedPositionEmbedding(6, 8), x, offset=2, xla_rtol=rtol)
    check_layer(lambda: L.ModalityEmbedding(2, 8), x, type_ids=np.array([0, 0, 1, 1]), xla_rtol=rtol)
    # Logits in float32 under mixed precision, unless output_dtype=None.
    check_layer(lambda: L.LogitsHead(5, hidden_dim=12), x, xla_rtol=rtol, mixed_dtype="float32")
    check_layer(lambda: L.LogitsHead(5, norm=True, output_dtype=None), x, xla_rtol=rtol)
    check_layer(lambda: L.LogitsHead(5, tie_embeddings=True), x, embedding=emb, xla_rtol=rtol,
                mixed_dtype="float32")
    check_layer(lambda: L.LogitsHead(5, tie_embeddings=True), x, embedding=emb.embeddings.value, xla_rtol=rtol,
                mixed_dtype="float32")


def test_keras_file_save_load(tmp_path):
    ids = keras.Input((6,), dtype="int32")
    types = keras.Input((6,), dtype="int32")
    ctx = keras.Input((3, 8))
    h = L.TokenEmbedding(11, 16)(ids)
    h = L.LearnedPositionEmbedding(6, 16)(h)
    h = L.ModalityEmbedding(2, 16)(h, type_ids=types)
    h = L.TransformerStack(2, 2, 32, cross_attention=True)(h, context=ctx)
    logits = L.LogitsHead(11, hidden_dim=16)(h)
    model = keras.Model([ids, types, ctx], logits)
    inputs = [RNG.integers(0, 11, (2, 6)), np.array([[0, 0, 0, 1, 1, 1]] * 2), randn(2, 3, 8)]
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(np_(loaded(inputs)), np_(model(inputs)))  # same weights and ops: exact


# ------------------------------------------------------------------ mixed precision


@pytest.fixture
def bf16_policy():
    with mixed_bfloat16():
        yield


def test_mixed_bfloat16(bf16_policy):
    ids = np.array([[1, 2, 3, 4]])
    emb = L.TokenEmbedding(6, 8)
    stack = L.TransformerStack(1, 2, 16, cross_attention=True)
    head = L.LogitsHead(6, hidden_dim=8)
    h = emb(ids)
    assert keras.backend.standardize_dtype(h.dtype) == "bfloat16"
    h = L.LearnedPositionEmbedding(4, 8)(h)
    h = stack(h, mask=L.causal_mask(4), context=ops.cast(randn(1, 2, 8), "bfloat16"))
    assert keras.backend.standardize_dtype(h.dtype) == "bfloat16"
    logits = head(h)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert keras.backend.standardize_dtype(emb.attend(h).dtype) == "float32"
    for layer in (emb, stack, head):
        assert all(v.dtype == "float32" for v in layer.weights)
    # Softmax statistics in float32 even for bfloat16 logits: float32 probabilities
    # whose rows sum to 1 to float32 precision (bf16 would be off by ~1e-2).
    probs = L.masked_softmax(ops.cast(randn(1, 1, 2, 300), "bfloat16"))
    assert keras.backend.standardize_dtype(probs.dtype) == "float32"
    np.testing.assert_allclose(np_(ops.sum(probs, -1)), 1.0, rtol=1e-6)
    # Cached decoding keeps the cache in the compute dtype.
    cache = stack.init_cache(1, 4)
    assert keras.backend.standardize_dtype(cache.dtype) == "bfloat16"


# -------------------------------------------------------------------------- XLA


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.function test")
def test_cached_step_jit_compile_matches_eager():
    # The uncached stacks are compiled in test_standard_checks_every_layer.
    import tensorflow as tf

    self_stack = L.TransformerStack(2, 2, 16)
    self_stack(randn(2, 5, 8))
    cache = self_stack.init_cache(2, 5)
    step = lambda x, cache, i: self_stack(x, cache=cache, cache_index=i)  # noqa: E731
    assert_xla_matches_eager(step, tf.constant(randn(2, 1, 8)), cache, tf.constant(2), rtol=LAYER_XLA_RTOL,
                             what="cached step")
    assert step(randn(2, 1, 8), cache, 2)[1].shape == cache.shape


# ------------------------------------------------------------ no TensorFlow import


def test_layers_do_not_import_tensorflow_or_gin():
    files = [str(path.relative_to(LAYERS_DIR.parents[1])) for path in sorted(LAYERS_DIR.glob("*.py"))]
    assert "mmt.layers.attention" in assert_no_tensorflow(files, ["mmt.layers"])


@jax_check(modules=["mmt.layers"], rtol=LAYER_XLA_RTOL)
def test_layers_run_under_jax_without_tensorflow():
    return L.TransformerStack(1, 2, 8), (randn(1, 3, 4),), {"mask": L.causal_mask(3)}


@jax_check(modules=["mmt.layers"], rtol=LAYER_XLA_RTOL)
def test_stack_and_logits_head_equal_under_jax():
    model = keras.Sequential([L.TransformerStack(1, 2, 8), L.LogitsHead(7, hidden_dim=8)])
    return model, (randn(2, 3, 4),), {}
