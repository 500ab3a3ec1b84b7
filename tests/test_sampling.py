"""Tests for mmt.sampling: mask schedules, MaskGIT parallel decoding, autoregressive decoders."""

import itertools
import math
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops
from scipy import stats

from mmt import layers
from mmt.sampling import autoregressive as ar
from mmt.sampling import mask_schedule as ms
from mmt.sampling import parallel_decode as pd
from mmt import backend as seeds
from mmt.tasks.base import StepSeed
import harness
from harness import assert_no_tensorflow, jax_check
from tolerances import reordered_sum_rtol

SAMPLING_DIR = pathlib.Path(__file__).resolve().parents[1] / "mmt" / "sampling"
np_ = ops.convert_to_numpy
assert_equal = np.testing.assert_array_equal
assert_close = np.testing.assert_allclose


# Decoders and samplers return ids (which must agree exactly) and float scores: log-probs
# summed over up to 8 decoding steps of a model whose longest float32 sum has 64 terms (the
# tiny LM's MLP), with XLA's own exp / log / erf (~16 per step): tests/tolerances.py.
SCORE_RTOL = reordered_sum_rtol(64, steps=8, chained_ops=16)


def assert_same_outputs(got, want, what=""):
    harness.assert_same_outputs(got, want, SCORE_RTOL, what)


def check_xla_matches_eager(run, *args):
    harness.assert_xla_matches_eager(run, *(tf.constant(a) for a in args), rtol=SCORE_RTOL)


# --------------------------------------------------------------------- mask schedules


def test_schedule_values_by_hand():
    r = np.array([0.0, 0.25, 0.5, 1.0], "float32")
    expected = {  # 1e-6 at r = 1: MaskGIT's clamp
        "cosine": [1.0, math.cos(math.pi / 8), math.sqrt(0.5), 1e-6],
        "linear": [1.0, 0.75, 0.5, 1e-6],
        "square": [1.0, 0.9375, 0.75, 1e-6],
        "sqrt": [1.0, 0.5, 1 - math.sqrt(0.5), 1e-6],
        "pow3": [1.0, 1 - 1 / 64, 0.875, 1e-6],
    }
    for method, values in expected.items():
        assert_close(np_(ms.schedule(r, method)), values, atol=1e-6, err_msg=method)
    assert_close(np_(ms.schedule(0.25, "log", 16)), 0.5, atol=1e-6)  # -log2(1/4) / log2(16)
    assert_close(np_(ms.schedule(0.5, "exp", 16)), 1 - 2.0**-2, atol=1e-6)
    for bad in [dict(method="log"), dict(method="bogus")]:
        with pytest.raises(ValueError):
            ms.schedule(0.5, **bad)


def test_masked_counts_by_hand():
    # floor(16 cos(pi/8)) = 14, floor(16 cos(pi/4)) = 11, floor(16 cos(3pi/8)) = 6, then 0.
    assert [ms.masked_count(s, 4, 16) for s in range(4)] == [14, 11, 6, 0]
    assert [ms.masked_count(s, 4, 16, "linear") for s in range(4)] == [12, 8, 4, 0]
    # 3 tokens: floor(3 * 0.92) = 2, clip(floor(3 * 0.71), 1, 2 - 1) = 1, 1 stays masked, 0.
    counts = np_(ms.masked_counts(4, np.array([16, 3, 1, 0])))
    assert_equal(counts.T, [[14, 11, 6, 0], [2, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
    # floor(40 cos(pi/48)) = floor(40 cos(pi/24)) = 39: a plateau still reveals one token.
    counts = np_(ms.masked_counts(24, 40))
    assert counts[0] == 39 and counts[1] == 38
    assert np.all(np.diff(np.concatenate([[40], counts])) <= -1)


def test_truncated_gaussian_matches_scipy():
    for low, high in [(0.5, 1.0), (0.5, 0.75)]:  # ITIT T2I and I2T
        x = np_(ms.truncated_gaussian_mask_ratio((20000,), seed=3, low=low, high=high))
        assert x.min() >= low and x.max() <= high
        dist = stats.truncnorm((low - 0.75) / 0.25, (high - 0.75) / 0.25, loc=0.75, scale=0.25)
        assert abs(x.mean() - dist.mean()) < 0.004
        assert abs(x.std() - dist.std()) < 0.004
        assert stats.kstest(x, dist.cdf).pvalue > 1e-3  # the whole distribution


def test_uniform_mask_ratio():
    x = np_(ms.uniform_mask_ratio((5000,), seed=StepSeed([1, 2])))
    assert 0.0 <= x.min() and x.max() < 1.0 and abs(x.mean() - 0.5) < 0.02


def test_random_mask_exact_counts():
    ratio = np.array([0.0, 0.1, 0.5, 0.75, 1.0], "float32")
    assert_equal(np_(ms.random_mask((5, 20), ratio, seed=0)).sum(-1), [1, 2, 10, 15, 20])
    candidates = np.arange(20)[None] < np.array([20, 10, 4, 8, 0])[:, None]
    mask = np_(ms.random_mask((5, 20), 0.5, seed=1, candidates=candidates))
    assert_equal(mask.sum(-1), [10, 5, 2, 4, 0])
    assert not np.any(mask & ~candidates)
    # Uniform over positions: each is masked about half the time.
    assert_close(np_(ms.random_mask((4000, 8), 0.5, seed=2)).mean(0), 0.5, atol=0.04)


# ------------------------------------------------------------------ parallel decoding

VOCAB, MASK = 12, 11


def constant_logits(table):
    """logits_fn returning float [N, V] `table` for every example, whatever the tokens."""
    table = ops.convert_to_tensor(np.asarray(table, "float32"))
    return lambda tokens: ops.broadcast_to(table[None], (tokens.shape[0], *table.shape))


def peaked(preferred, strength=8.0):
    return constant_logits(np.eye(VOCAB)[np.asarray(preferred)] * strength)


def test_decode_follows_schedule_and_never_remasks():
    logits = np.random.default_rng(0).normal(size=(20, VOCAB))
    tokens = np.full((2, 20), MASK, "int32")
    tokens[:, :4] = [[1, 2, 3, 4], [5, 6, 7, 8]]  # given conditioning (UPGen-style)
    out, history = pd.decode(constant_logits(logits), tokens, MASK, 4, seed=7, return_history=True)
    out, history = np_(out), np_(history)
    assert history.shape == (4, 2, 20)
    assert_equal((history == MASK).sum(-1).T, [[14, 11, 6, 0]] * 2)  # 16 to generate
    assert_equal(history[-1], out)
    assert_equal(out[:, :4], tokens[:, :4])
    for s in range(1, 4):  # a fixed token stays fixed, with the same value
        fixed = history[s - 1] != MASK
        assert_equal(history[s][fixed], history[s - 1][fixed])
    assert not np.any(out == MASK)


def test_decode_returns_preferred_tokens():
    preferred = np.arange(16) % 10
    out = pd.decode(peaked(preferred, 20.0), np.full((3, 16), MASK), MASK, 5, seed=StepSeed([3, 4]))
    assert_equal(np_(out), np.broadcast_to(preferred, (3, 16)))


def test_decode_never_samples_the_mask_token_and_respects_token_range():
    tokens = np.full((2, 8), MASK)
    assert not np.any(np_(pd.decode(peaked([MASK] * 8), tokens, MASK, 3, seed=0)) == MASK)
    out = np_(pd.decode(peaked([0] * 8), tokens, MASK, 3, seed=1, token_range=(3, 5)))
    assert np.all((out >= 3) & (out < 5))
    # Union vocabulary: ids [0, 6) at positions 0-3 and [6, 11) at 4-7, per position.
    lo, hi = np.array([0] * 4 + [6] * 4), np.array([6] * 4 + [11] * 4)
    flat = constant_logits(np.zeros((8, VOCAB)))
    out = np_(pd.decode(flat, np.full((64, 8), MASK), MASK, 3, seed=1, token_range=(lo, hi)))
    assert np.all((out >= lo) & (out < hi))
    assert len(np.unique(out[:, 0])) == 6 and len(np.unique(out[:, 7])) == 5  # whole range


def test_guidance():
    # Two positions. Conditional: token 1 (2.0) slightly over token 2 (1.5); unconditional
    # strongly prefers token 1 (3.0). l_g = (1 + lam) l_c - lam l_u.
    cond, uncond = np.zeros((2, VOCAB)), np.zeros((2, VOCAB))
    cond[:, 1], cond[:, 2], uncond[:, 1] = 2.0, 1.5, 3.0
    cond_fn, uncond_fn = constant_logits(cond), constant_logits(uncond)
    tokens = np.full((4000, 2), MASK)

    def run(steps, **kwargs):
        out = pd.decode(cond_fn, tokens, MASK, steps, seed=5, choice_temperature=1.0, **kwargs)
        return np_(out)

    plain = run(2)
    assert_equal(plain, run(2, guidance_scale=0.0, uncond_logits_fn=uncond_fn))
    # lam = 1: token 1 -> 2 * 2 - 3 = 1, token 2 -> 2 * 1.5 = 3, others 0. In one step each
    # position is sampled once from exactly that distribution (the mask id excluded).
    expected = np.exp([0.0, 1.0, 3.0] + [0.0] * 8)
    expected /= expected.sum()
    one_step = run(1, guidance_scale=1.0, uncond_logits_fn=uncond_fn)
    assert_close([np.mean(one_step == t) for t in (0, 1, 2)], expected[:3], atol=0.02)
    guided = run(2, guidance_scale=1.0, uncond_logits_fn=uncond_fn)
    assert np.mean(plain == 2) < 0.3 and np.mean(guided == 2) > 0.55
    assert np.mean(guided == 1) < np.mean(plain == 1) / 3
    # Linear ramp (lam / 2, then lam): in between.
    ramp = run(2, guidance_scale=1.0, uncond_logits_fn=uncond_fn, guidance_schedule="linear")
    assert np.mean(plain == 2) + 0.1 < np.mean(ramp == 2) < np.mean(guided == 2) - 0.05
    with pytest.raises(ValueError):
        run(2, guidance_scale=1.0)


def test_decode_xla_matches_eager():
    table = ops.convert_to_tensor(np.random.default_rng(1).normal(size=(VOCAB, VOCAB)), "float32")

    def fn(t):  # depends on the current tokens, like a real model
        rows = ops.take(table, t, axis=0)
        return rows + ops.mean(rows, axis=1, keepdims=True)

    def run(t):
        return pd.decode(
            fn, t, MASK, 6, seed=11, guidance_scale=0.5, uncond_logits_fn=lambda t: fn(t) * 0.5,
            return_history=True,
        )

    tokens = np.full((3, 10), MASK, "int32")
    tokens[0, :3] = [1, 2, 3]
    check_xla_matches_eager(run, tokens)


# ------------------------------------------------------------- autoregressive decoding

PAD, EOS, BOS = 0, 1, 2


def markov(log_probs, cached=False):
    """A Markov chain as logits_fn: next-token log-probs depend on the token at `index`."""
    table = ops.convert_to_tensor(np.asarray(log_probs, "float32"))
    if cached:  # the cache counts calls per row
        return lambda token, index, cache: (ops.take(table, token[:, 0], axis=0), cache + 1)
    return lambda tokens, index: ops.take(table, ops.take(tokens, index, axis=1), axis=0)


def chain(rows):
    """log-probs [V, V] from unnormalised rows of probabilities."""
    p = np.asarray(rows, "float64")
    return np.log(np.maximum(p / p.sum(-1, keepdims=True), 1e-12))


# V = 5: pad, eos, bos, a = 3, b = 4. BOS -> a .6 / b .4; a -> a .35 / b .35 / eos .3;
# b -> eos .9. Greedy takes a; the best sequence is BOS b EOS.
GREEDY_TRAP = chain([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0.6, 0.4],
                     [0, 0.3, 0, 0.35, 0.35], [0, 0.9, 0, 0.05, 0.05]])


def test_greedy_decode_markov_chain_and_pads_after_eos():
    # BOS -> a (.7) -> b (.7) -> EOS (.8); a row starting at b ends at once.
    rows = chain([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0.7, 0.3],
                  [0, 0.1, 0, 0.2, 0.7], [0, 0.8, 0, 0.1, 0.1]])
    start = np.array([[BOS], [4]])
    out = np_(ar.greedy_decode(markov(rows), start, 7, EOS, PAD))
    assert_equal(out, [[BOS, 3, 4, EOS, PAD, PAD, PAD], [4, EOS] + [PAD] * 5])
    cached = ar.greedy_decode(markov(rows, True), start, 7, EOS, PAD, cache=ops.zeros((2,)))
    assert_equal(np_(cached), out)
    # Without EOS the buffer fills up.
    out = np_(ar.greedy_decode(markov(GREEDY_TRAP), np.array([[BOS]]), 5, None, PAD))
    assert_equal(out, [[BOS, 3, 3, 3, 3]])


def test_greedy_decode_stops_once_every_row_has_ended():
    # Eagerly the loop body runs once per step: count the model calls. Both rows end by
    # index 2 (EOS written at position 3), so 3 calls, not max_length - 1 = 11.
    rows = chain([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0.7, 0.3],
                  [0, 0.1, 0, 0.2, 0.7], [0, 0.8, 0, 0.1, 0.1]])
    calls, fn = [], markov(rows)
    out = np_(ar.greedy_decode(lambda t, i: calls.append(1) or fn(t, i), np.array([[BOS], [4]]), 12, EOS, PAD))
    assert_equal(out, [[BOS, 3, 4, EOS] + [PAD] * 8, [4, EOS] + [PAD] * 10])
    assert len(calls) == 3


def brute_force_best(log_probs, start_token, max_length, alpha):
    """Best GNMT-normalised score over all continuations (EOS-terminated, or full length)."""
    gen_len, best = max_length - 1, (-np.inf, None)
    for length in range(1, gen_len + 1):
        for body in itertools.product(range(len(log_probs)), repeat=length):
            if EOS in body[:-1] or (length < gen_len and body[-1] != EOS):
                continue
            seq = (start_token,) + body
            logp = sum(log_probs[a][b] for a, b in zip(seq[:-1], seq[1:]))
            best = max(best, (logp / ((5.0 + length) / 6.0) ** alpha, seq))
    score, seq = best
    return score, np.array(list(seq) + [PAD] * (max_length - len(seq)))


def test_beam_search_beats_greedy_and_matches_brute_force():
    fn, start = markov(GREEDY_TRAP), np.array([[BOS]])
    greedy = np_(ar.greedy_decode(fn, start, 5, EOS, PAD))[0]
    best_score, best_seq = brute_force_best(GREEDY_TRAP, BOS, 5, 0.6)
    assert_equal(best_seq, [BOS, 4, EOS, PAD, PAD])
    assert not np.array_equal(greedy, best_seq)  # the example is a real trap
    seq, score = ar.beam_search(fn, start, 5, EOS, PAD, beam_size=4)
    assert_equal(np_(seq)[0], best_seq)
    assert_close(np_(score)[0], best_score, rtol=1e-5)
    # All beams come back, best first, each a distinct sequence.
    seqs, scores = ar.beam_search(fn, start, 5, EOS, PAD, beam_size=3, return_all_beams=True)
    assert np.all(np.diff(np_(scores)[0]) <= 0)
    assert len({tuple(s) for s in np_(seqs)[0]}) == 3


def test_beam_one_equals_greedy():
    rng = np.random.default_rng(3)
    for _ in range(4):
        fn = markov(np.log(rng.dirichlet(np.full(6, 0.3), size=6)))
        start = rng.integers(2, 6, size=(5, 2))
        greedy = np_(ar.greedy_decode(fn, start, 9, EOS, PAD))
        assert_equal(np_(ar.beam_search(fn, start, 9, EOS, PAD, beam_size=1)[0]), greedy)


def test_sample_decode_statistics_and_top_k():
    fn = markov(chain([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0.2, 0, 0.5, 0.3],
                       [0, 1, 0, 0, 0], [0, 1, 0, 0, 0]]))
    start = np.full((3000, 1), BOS)
    out = np_(ar.sample_decode(fn, start, 4, EOS, PAD, seed=StepSeed([5, 6])))
    assert_close([np.mean(out[:, 1] == t) for t in (EOS, 3, 4)], [0.2, 0.5, 0.3], atol=0.03)
    assert np.all(out[out[:, 1] == EOS][:, 2:] == PAD)
    top2 = np_(ar.sample_decode(fn, start, 4, EOS, PAD, top_k=2, seed=1))
    assert set(np.unique(top2[:, 1])) == {3, 4}
    assert_close(np.mean(top2[:, 1] == 3), 0.5 / 0.8, atol=0.03)


class TinyCausalLM:
    """Embedding + learned positions + causal TransformerStack + Dense head."""

    def __init__(self, vocab=7, length=8, dim=16):
        keras.utils.set_random_seed(0)
        self.length = length
        self.embed = layers.TokenEmbedding(vocab, dim)
        self.pos = layers.LearnedPositionEmbedding(length, dim)
        self.stack = layers.TransformerStack(2, num_heads=2, mlp_dim=32)
        self.head = keras.layers.Dense(vocab)
        self.full(ops.zeros((1, length), "int32"), 0)  # builds everything

    def full(self, tokens, index):  # fixed-buffer interface
        h = self.stack(self.pos(self.embed(tokens)), mask=layers.causal_mask(self.length))
        return self.head(ops.take(h, index, axis=1)) * 3.0

    def cached(self, token, index, cache):  # cached interface
        x = self.pos(self.embed(token), offset=index)
        h, cache = self.stack(x, cache=cache, cache_index=index)
        return self.head(h[:, 0]) * 3.0, cache


@pytest.fixture(scope="module")
def tiny_lm():
    return TinyCausalLM()


@pytest.mark.parametrize("stacked", [True, False])
def test_cached_equals_fixed_buffer(tiny_lm, stacked):
    start, length = np.array([[2, 3], [4, 4], [5, 2]]), tiny_lm.length
    cache = tiny_lm.stack.init_cache(len(start), length)  # [depth, B, 2, T, H, Dh]
    if not stacked:
        cache = list(ops.unstack(cache, axis=0))  # per layer [B, 2, T, H, Dh]
    for decoder, kwargs in [
        (ar.greedy_decode, {}),
        (ar.sample_decode, dict(seed=4, temperature=1.5)),
        (ar.beam_search, dict(beam_size=3, cache_batch_axis=1 if stacked else 0)),
    ]:
        fixed = decoder(tiny_lm.full, start, length, EOS, PAD, **kwargs)
        cached = decoder(tiny_lm.cached, start, length, EOS, PAD, cache=cache, **kwargs)
        assert_same_outputs(cached, fixed, decoder.__name__)


def test_autoregressive_xla_matches_eager(tiny_lm):
    # A real model through the cached interface (stacked cache, batch axis 1) ...
    cache = tiny_lm.stack.init_cache(2, tiny_lm.length)
    check_xla_matches_eager(
        lambda s: ar.beam_search(
            tiny_lm.cached, s, tiny_lm.length, EOS, PAD, beam_size=3, cache=cache,
            cache_batch_axis=1,
        ),
        np.array([[2, 3], [4, 4]]),
    )
    # ... and the fixed-buffer interface on the greedy trap (cheap to compile).
    fn, start = markov(GREEDY_TRAP), np.array([[BOS], [3]])
    check_xla_matches_eager(
        lambda s: ar.beam_search(fn, s, 6, EOS, PAD, beam_size=2, return_all_beams=True), start
    )
    check_xla_matches_eager(lambda s: ar.sample_decode(fn, s, 6, EOS, PAD, seed=3, top_k=3), start)
    check_xla_matches_eager(lambda s: ar.greedy_decode(fn, s, 6, EOS, PAD), start)


def test_gumbel_is_standard():
    g = np_(seeds.gumbel((50000,), seeds.FixedSeed(np.array([1, 2]))))
    assert_close([g.mean(), g.std()], [np.euler_gamma, math.pi / math.sqrt(6)], atol=0.03)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_categorical_samples_the_tempered_softmax_and_never_an_excluded_id(temperature):
    logits = np.array([1.0, 2.0, -1e9, 0.0, -np.inf, 2.5, -1e9], "float32")  # ids 2, 4, 6 excluded
    n = 40000
    draws = np_(seeds.categorical(np.tile(logits, (n, 1)), seeds.FixedSeed(np.array([3, 4])), temperature))
    p = np.where(logits > -1e8, np.exp(logits / temperature), 0.0)
    assert_close(np.bincount(draws, minlength=7) / n, p / p.sum(), atol=0.01)
    assert not np.isin(draws, [2, 4, 6]).any()
    flat = np.full((5, 7), -1e9, "float32")  # every id excluded: still a valid index
    drawn = np_(seeds.categorical(flat, 1))
    assert np.all((drawn >= 0) & (drawn < 7))
    rng = np.random.default_rng(0)
    check_xla_matches_eager(lambda x: seeds.categorical(x, seeds.FixedSeed(np.array([5, 6])), temperature),
                            rng.normal(size=(64, 33)).astype("float32") * 3)


# ------------------------------------------------------------------ backend neutrality


def test_sampling_imports_no_tensorflow():
    # Importing mmt.sampling must not import TensorFlow (JAX hosts have none); a function
    # may use it lazily when Keras runs on the TensorFlow backend (mmt.backend).
    modules = [f"mmt.sampling.{path.stem}" for path in SAMPLING_DIR.glob("*.py")]
    assert "mmt.sampling.parallel_decode" in assert_no_tensorflow(modules=modules)


# Run by the JAX worker (tests/harness.py): eager and jax.jit draw the same integers.
_JAX_SCRIPT = """
import jax
import numpy as np
from keras import ops
table = np.random.default_rng(0).normal(size=(6, 6)).astype("float32")
fn = lambda t: ops.take(table, t, axis=0)
tokens = np.full((2, 8), 5, "int32")
run = lambda t: parallel_decode.decode(fn, t, 5, 3, seed=1, guidance_scale=1.0, uncond_logits_fn=fn)
assert np.array_equal(np.asarray(run(tokens)), np.asarray(jax.jit(run)(tokens)))
step = lambda t, i: ops.take(table, ops.take(t, i, axis=1), axis=0)
beam = lambda s: autoregressive.beam_search(step, s, 6, 1, 0, beam_size=2)[0]
start = np.array([[2], [3]])
assert np.array_equal(np.asarray(beam(start)), np.asarray(jax.jit(beam)(start)))
"""


@jax_check(modules=["mmt.sampling.autoregressive", "mmt.sampling.parallel_decode"], code=_JAX_SCRIPT)
def test_runs_under_jax_without_tensorflow():
    """Decoding under jax.jit, without TensorFlow."""

