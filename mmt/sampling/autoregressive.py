"""Autoregressive decoding: greedy, sampling (DALL-E §2.6), beam search (ITIT App. B, beam 4).

Every decoder works on a fixed-length buffer int32 `[B, max_length]`: the start tokens
(e.g. `[BOS]` for ITIT's GIT-style text decoder, the text for DALL-E) fill the first `S`
positions, pad the rest, and step `index` (from `S - 1` to `max_length - 2`) writes the
token at `index + 1`. After a row's EOS only `pad_id` follows. Shapes are static (greedy
and sampled decoding stop early once every row has ended), so everything compiles under
XLA on any backend.

Two `logits_fn` interfaces, chosen by whether a `cache` is passed:

- fixed buffer: `logits_fn(tokens int32 [B, max_length], index) -> float [B, V]`, the
  logits of position `index + 1` given `tokens[:, :index + 1]`. Later positions hold
  pad, so the model must be causal.
- cached: `logits_fn(token int32 [B, 1], index, cache) -> (float [B, V], cache)`: the
  token at `index` goes in, its keys/values land in the cache at `index` (e.g.
  `mmt.layers.TransformerStack` with `cache_index=index`). The start tokens are fed one
  step at a time first (their logits are discarded). The cache may be any nest of
  tensors (a stacked `[depth, B, 2, max_len, H, Dh]` cache, a list of per-layer
  `[B, 2, max_len, H, Dh]` caches); `logits_fn` must return it in the same structure.

Beam search calls `logits_fn` with `B * beam_size` rows, example-major (row
`b * beam_size + k` is beam `k` of example `b`): per-example context in the closure
(ITIT's image features) must be repeated with `ops.repeat(x, beam_size, axis=0)`.
"""

from __future__ import annotations

from typing import Callable

import keras
from keras import ops

from mmt import backend

_NEG = -1e9  # score of an impossible hypothesis: finite, so sums never give NaN


def greedy_decode(
    logits_fn: Callable, start_tokens, max_length: int, eos_id, pad_id: int, *, cache=None
):
    """Greedy decoding; see the module docstring for `logits_fn` and `cache`.

    Args:
      start_tokens: int `[B, S]`, `1 <= S < max_length`.
      max_length: static length of the output buffer.
      eos_id: end-of-sequence id, or None for fixed-length generation (DALL-E images).
      pad_id: written after EOS.

    Returns:
      int32 `[B, max_length]`: the start tokens followed by the generated ones.
    """
    return _decode(logits_fn, start_tokens, max_length, eos_id, pad_id, cache, _argmax)


def sample_decode(
    logits_fn: Callable,
    start_tokens,
    max_length: int,
    eos_id,
    pad_id: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed=None,
    cache=None,
):
    """Ancestral sampling from `softmax(logits / temperature)`, optionally top-k / top-p truncated.

    Args as `greedy_decode`, plus:
      temperature: 0 is greedy (DALL-E samples at 1.0, §2.6).
      top_k: sample among the `top_k` most likely tokens only (ties with the k-th kept).
      top_p: nucleus sampling (Holtzman et al., 2020): sample among the smallest set of
        most likely tokens whose probability under `softmax(logits / temperature)`
        reaches `top_p` (ties with the last one kept); applied after `top_k`.
      seed: an int or a `keras.random.SeedGenerator`; one draw is taken from it. The
        numbers used for position `index + 1` do not depend on the interface, so the
        fixed-buffer and cached runs of one model sample the same sequence.

    Returns:
      int32 `[B, max_length]`.
    """
    if isinstance(temperature, (int, float)) and temperature == 0:
        return greedy_decode(logits_fn, start_tokens, max_length, eos_id, pad_id, cache=cache)
    if seed is None:
        raise ValueError("sample_decode needs a seed when temperature != 0.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    table = backend.step_seeds(seed, max_length)  # [T, 2], row = index

    def choose(logits, index):
        if top_k is not None:
            kth = ops.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
            logits = ops.where(logits < kth, _NEG, logits)
        if top_p is not None:
            logits = top_p_filter(logits, top_p, temperature)
        return backend.categorical(logits, backend.seed_at(table, index), temperature)

    return _decode(logits_fn, start_tokens, max_length, eos_id, pad_id, cache, choose)


def beam_search(
    logits_fn: Callable,
    start_tokens,
    max_length: int,
    eos_id,
    pad_id: int,
    *,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    cache=None,
    cache_batch_axis: int = 0,
    return_all_beams: bool = False,
):
    """Beam search with GNMT length normalisation (ITIT I2T: beam 4, as GIT).

    Each step expands the `beam_size` live beams into their `2 * beam_size` best
    continuations by log-probability. An EOS continuation ranked within the first
    `beam_size` becomes a finished hypothesis with score `log p / ((5 + L) / 6) ** alpha`
    (`L` generated tokens, EOS included; Wu et al. 2016); the best non-EOS ones stay
    live. An example stops once it has `beam_size` finished hypotheses (fairseq's rule,
    so `beam_size=1` is exactly greedy decoding); at `max_length` its live beams are
    scored as if finished. Finished hypotheses keep their tokens and scores.

    Args as `greedy_decode`, plus:
      beam_size: static number of beams `K`.
      length_penalty: alpha; 0 ranks by raw log-probability.
      cache: optional initial cache (cached interface) whose batch axis has `B` rows
        (repeated per beam here) or already `B * K`; reordered with the beams each step.
      cache_batch_axis: the batch axis of every cache tensor (0 for per-layer
        `[B, 2, max_len, H, Dh]`, 1 for a stacked `[depth, B, 2, max_len, H, Dh]`).
      return_all_beams: return every finished hypothesis instead of the best.

    Returns:
      `(tokens int32 [B, max_length], score float32 [B])`, or with `return_all_beams`
      `(tokens int32 [B, K, max_length], scores float32 [B, K])`, best first (a missing
      hypothesis scores -1e9).
    """
    beams = beam_size
    start_tokens = ops.cast(start_tokens, "int32")
    batch, start = start_tokens.shape
    buffer = _init_buffer(start_tokens, max_length, pad_id)
    alive_seqs = ops.repeat(buffer[:, None], beams, axis=1)  # [B, K, T]
    # Only beam 0 is live at first, so the first expansion yields K distinct beams.
    first = ops.cast(ops.arange(beams) == 0, "float32")
    alive_logp = ops.broadcast_to((1.0 - first) * _NEG, (batch, beams))
    state = {
        "alive_seqs": alive_seqs,
        "alive_logp": alive_logp,
        "fin_seqs": alive_seqs,
        "fin_scores": ops.full((batch, beams), _NEG, "float32"),
        "fin_count": ops.zeros((batch,), "int32"),
    }
    if cache is not None:
        cache = keras.tree.map_structure(
            lambda c: _tile_beams(c, batch, beams, cache_batch_axis), cache
        )
        flat = ops.reshape(alive_seqs, (batch * beams, max_length))
        state["cache"] = _prefill(logits_fn, flat, start, cache)
    flat_base = ops.arange(batch, dtype="int32")[:, None] * beams  # [B, 1]
    ranks = ops.arange(2 * beams, dtype="int32")[None]  # [1, 2K]

    def step_fn(index, state):
        flat = ops.reshape(state["alive_seqs"], (batch * beams, max_length))
        logits, new_cache = _call(logits_fn, flat, index, state.get("cache"))
        log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
        vocab = log_probs.shape[-1]
        scores = state["alive_logp"][:, :, None] + ops.reshape(log_probs, (batch, beams, vocab))
        top_logp, top_index = ops.top_k(ops.reshape(scores, (batch, beams * vocab)), 2 * beams)
        top_index = ops.cast(top_index, "int32")
        parent, token = top_index // vocab, top_index % vocab  # [B, 2K]
        valid = top_logp > _NEG / 2
        seqs = ops.take_along_axis(state["alive_seqs"], parent[:, :, None], axis=1)  # [B, 2K, T]
        seqs = _write(seqs, index + 1, token[:, :, None])
        is_eos = _is_eos(token, eos_id)
        done = state["fin_count"] >= beams
        # fairseq: an EOS continuation finishes when it ranks within the top K.
        finishing = is_eos & valid & (ranks < beams) & ~done[:, None]
        generated = ops.cast(index + 2 - start, "float32")  # tokens after the start, EOS included
        new_scores = ops.where(finishing, top_logp / _penalty(generated, length_penalty), _NEG)
        fin_scores, fin_seqs = _best(
            ops.concatenate([state["fin_scores"], new_scores], axis=1),
            ops.concatenate([state["fin_seqs"], seqs], axis=1),
            beams,
        )
        alive_logp, alive_pick = ops.top_k(ops.where(is_eos, _NEG, top_logp), beams)
        new_state = {
            "alive_seqs": ops.take_along_axis(seqs, alive_pick[:, :, None], axis=1),
            "alive_logp": alive_logp,
            "fin_seqs": fin_seqs,
            "fin_scores": fin_scores,
            "fin_count": state["fin_count"] + ops.sum(ops.cast(finishing, "int32"), axis=-1),
        }
        if new_cache is not None:
            rows = ops.reshape(flat_base + ops.take_along_axis(parent, alive_pick, axis=1), (-1,))
            new_state["cache"] = keras.tree.map_structure(
                lambda c: ops.take(c, rows, axis=cache_batch_axis), new_cache
            )
        return new_state

    state = ops.fori_loop(start - 1, max_length - 1, step_fn, state)
    # Examples without K finished hypotheses also rank their live beams, as if finished.
    done = state["fin_count"] >= beams
    alive_scores = state["alive_logp"] / _penalty(float(max_length - start), length_penalty)
    alive_scores = ops.where(done[:, None] | (state["alive_logp"] <= _NEG / 2), _NEG, alive_scores)
    scores, seqs = _best(
        ops.concatenate([state["fin_scores"], alive_scores], axis=1),
        ops.concatenate([state["fin_seqs"], state["alive_seqs"]], axis=1),
        beams,
    )
    if return_all_beams:
        return seqs, scores
    return seqs[:, 0], scores[:, 0]


def _decode(logits_fn, start_tokens, max_length, eos_id, pad_id, cache, choose):
    """The greedy / sampling loop; `choose(logits float32 [B, V], index) -> int32 [B]`."""
    start_tokens = ops.cast(start_tokens, "int32")
    batch, start = start_tokens.shape
    buffer = _init_buffer(start_tokens, max_length, pad_id)
    state = {"tokens": buffer, "finished": ops.zeros((batch,), "bool")}
    if cache is not None:
        state["cache"] = _prefill(logits_fn, buffer, start, cache)

    def step_fn(index, state):
        logits, new_cache = _call(logits_fn, state["tokens"], index, state.get("cache"))
        token = choose(ops.cast(logits, "float32"), index)
        token = ops.where(state["finished"], pad_id, token)
        new_state = {
            "tokens": _write(state["tokens"], index + 1, token[:, None]),
            "finished": state["finished"] | _is_eos(token, eos_id),
        }
        if new_cache is not None:
            new_state["cache"] = new_cache
        return new_state

    if eos_id is None:  # fixed-length generation: every position is needed
        return ops.fori_loop(start - 1, max_length - 1, step_fn, state)["tokens"]

    # Stop as soon as every row has emitted EOS: the rest of the buffer is already pad,
    # so the output is that of the full loop, and a batch of short captions costs its
    # longest caption's steps, not `max_length`'s (ITIT's I2T2I cycle decodes greedily
    # in every training step). Still one static-shape loop: XLA compiles it as a while.
    def cond(index, state):
        return ops.logical_and(index < max_length - 1, ops.logical_not(ops.all(state["finished"])))

    def body(index, state):
        return index + 1, step_fn(index, state)

    _, state = ops.while_loop(cond, body, (ops.convert_to_tensor(start - 1, "int32"), state),
                              maximum_iterations=max_length - start)
    return state["tokens"]


def top_p_filter(logits, top_p: float, temperature):
    """float32 `[B, V]` logits with every token outside the top-p nucleus set to `_NEG`.

    Sorted descending, a token is kept when the probability before it is below `top_p`
    (so the most likely token always is); the threshold is the last kept logit.
    """
    vocab = logits.shape[-1]
    ordered = ops.top_k(logits, vocab)[0]  # [B, V] descending
    probs = ops.softmax(ordered / temperature, axis=-1)
    before = ops.cumsum(probs, axis=-1) - probs
    kept = ops.sum(ops.cast(before < top_p, "int32"), axis=-1, keepdims=True)  # >= 1
    threshold = ops.take_along_axis(ordered, kept - 1, axis=-1)  # [B, 1]
    return ops.where(logits < threshold, _NEG, logits)


def _argmax(logits, index):
    # On log-probabilities, so that ties break exactly as in beam search's top_k.
    return ops.cast(ops.argmax(ops.log_softmax(logits, axis=-1), axis=-1), "int32")


def _init_buffer(start_tokens, max_length, pad_id):
    """int32 `[B, max_length]`: the start tokens, then pad."""
    batch, start = start_tokens.shape
    if batch is None or start is None:
        raise ValueError("start_tokens needs a static shape [B, S] (e.g. drop_remainder=True).")
    if not 1 <= start < max_length:
        raise ValueError(f"need 1 <= start length ({start}) < max_length ({max_length}).")
    padding = ops.full((batch, max_length - start), pad_id, "int32")
    return ops.concatenate([start_tokens, padding], axis=1)


def _call(logits_fn, tokens, index, cache):
    """Calls either interface at `index`; returns `(logits [rows, V], cache or None)`."""
    if cache is None:
        return logits_fn(tokens, index), None
    column = ops.take(tokens, index, axis=1)[:, None]  # [rows, 1]
    return logits_fn(column, index, cache)


def _prefill(logits_fn, tokens, start, cache):
    """Feeds the start tokens but the last through the cached `logits_fn`."""
    if start == 1:
        return cache
    return ops.fori_loop(0, start - 1, lambda i, c: _call(logits_fn, tokens, i, c)[1], cache)


def _write(tokens, position, values):
    """`tokens[..., position] = values[..., 0]` (position may be traced)."""
    zero = ops.zeros((), "int32")
    start = (zero,) * (len(tokens.shape) - 1) + (ops.cast(position, "int32"),)
    return ops.slice_update(tokens, start, ops.cast(values, "int32"))


def _is_eos(token, eos_id):
    if eos_id is None:
        return ops.zeros_like(token, "bool")
    return token == eos_id


def _penalty(length, alpha: float):
    """GNMT length normaliser `((5 + length) / 6) ** alpha` (Wu et al. 2016, eq. 14)."""
    if alpha == 0:
        return 1.0
    return ops.power((5.0 + length) / 6.0, alpha)


def _best(scores, seqs, k):
    """The `k` best of `scores [B, M]` with their `seqs [B, M, T]`, best first."""
    top, pick = ops.top_k(scores, k)
    return top, ops.take_along_axis(seqs, pick[:, :, None], axis=1)


def _tile_beams(tensor, batch, beams, axis):
    """Repeats a per-example cache tensor per beam, unless it already has B * K rows."""
    if tensor.shape[axis] == batch * beams:
        return tensor
    if tensor.shape[axis] != batch:
        raise ValueError(
            f"cache batch axis {axis} has {tensor.shape[axis]} rows; "
            f"expected {batch} or {batch * beams}."
        )
    return ops.repeat(tensor, beams, axis=axis)
