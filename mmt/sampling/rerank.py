"""Contrastive reranking (DALL-E §2.6, Fig. 6 / 9c): draw N samples per prompt, keep the top k.

DALL-E draws N samples from the transformer for each caption (N = 512 in the paper),
scores each (caption, sample) pair with a contrastive model, and keeps the k best. The
functions here know nothing about the generator or the scorer, so one reranker serves
any text-to-image model of mmt (DALL-E, UPGen, ITIT):

* `top_k_by_score(scores [B, N], k) -> int32 [B, k]`: pure `keras.ops`, XLA-compilable:
  indices of the highest scores, highest first, ties broken by the lower index (on every
  backend: the order is computed from pairwise comparisons, not a backend's top_k).
* `rerank(sample, score, text_ids, num_samples, k, seed)`: the eager driver. `sample(text_ids
  int32 [B, T], num_samples, seed) -> int [B, num_samples, ...]` draws the candidates
  (any trailing shape: `[L]` tokens, `[h, w]` grids); `score(samples int [M, ...], text_ids
  int32 [M, T]) -> float [M]` scores pairs (e.g. `CLIPTask.score`). Returns the k best
  samples per prompt with their scores.
* `repeat_sampler(text_to_tokens)`: a `sample` callable from a one-sample-per-prompt
  generator such as `UPGenTask.text_to_image_tokens(text_ids, seed) -> [M, h, w]` (ITIT's
  image generation wraps the same way).
* `decode_then_score(decode, score)`: a `score` callable for a pixel-space scorer and a
  generator of another tokenizer's codes (decode with that tokenizer first).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from keras import ops


def top_k_by_score(scores, k: int):
    """Indices of the `k` highest scores of each row, highest first, ties by lower index.

    Args:
      scores: float [B, N]; NaN counts as the lowest score.
      k: static, 1 <= k <= N.

    Returns:
      int32 [B, k].
    """
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"top_k_by_score needs 1 <= k <= N = {n}, got k={k}")
    s = ops.cast(scores, "float32")
    s = ops.where(ops.isnan(s), float("-inf"), s)
    # rank[b, i] = #{j : s_j > s_i} + #{j < i : s_j == s_i}: a permutation of 0..N-1 in
    # which a higher score, or an equal score at a lower index, comes first.
    above = ops.greater(s[:, None, :], s[:, :, None])  # [B, i, j]: s_j > s_i
    index = ops.arange(n)
    earlier = ops.logical_and(ops.equal(s[:, None, :], s[:, :, None]), (index[None, :] < index[:, None])[None])
    rank = ops.sum(ops.cast(ops.logical_or(above, earlier), "int32"), axis=-1)  # [B, N]
    # out[b, r] = the i whose rank is r (r < k).
    hits = ops.cast(ops.equal(rank[:, :, None], ops.arange(k)[None, None, :]), "int32")  # [B, N, k]
    return ops.sum(hits * ops.cast(index, "int32")[None, :, None], axis=1)


class Reranked(NamedTuple):
    """What `rerank` returns."""

    samples: np.ndarray  # int [B, k, ...]: the k best samples per prompt, best first
    scores: np.ndarray  # float32 [B, k]: their scores
    indices: np.ndarray  # int32 [B, k]: their positions among the prompt's N samples
    all_scores: np.ndarray  # float32 [B, N]: every sample's score, in draw order


def score_samples(score: Callable, samples, text_ids, batch_size: int = 256) -> np.ndarray:
    """float32 [B, N]: `score` of every (sample, prompt) pair, `batch_size` pairs per call.

    Args:
      samples: int [B, N, ...] candidates, N per prompt.
      text_ids: int [B, T] the prompts.
    """
    samples, text_ids = np.asarray(samples), np.asarray(text_ids)
    b, n = samples.shape[:2]
    if text_ids.shape[0] != b:
        raise ValueError(f"{b} prompts' samples but {text_ids.shape[0]} prompts")
    flat = samples.reshape(b * n, *samples.shape[2:])  # example-major: row i * N + j is sample j of prompt i
    texts = np.repeat(text_ids, n, axis=0)
    out = [np.asarray(ops.convert_to_numpy(score(flat[i:i + batch_size], texts[i:i + batch_size])), np.float32)
           for i in range(0, b * n, batch_size)]
    return np.concatenate(out).reshape(b, n)


def select(samples, scores, k: int) -> Reranked:
    """The `k` best of `samples` int [B, N, ...] by `scores` float [B, N] (`top_k_by_score`)."""
    samples, scores = np.asarray(samples), np.asarray(scores, np.float32)
    indices = np.asarray(ops.convert_to_numpy(top_k_by_score(ops.convert_to_tensor(scores), k)), np.int32)
    rows = np.arange(samples.shape[0])[:, None]
    return Reranked(samples[rows, indices], scores[rows, indices], indices, scores)


def rerank(sample: Callable, score: Callable, text_ids, num_samples: int, k: int = 1, seed: int = 0,
           score_batch_size: int = 256) -> Reranked:
    """Draws `num_samples` per prompt and keeps the `k` that `score` rates highest (DALL-E §2.6).

    Args:
      sample: `sample(text_ids int32 [B, T], num_samples, seed) -> int [B, num_samples, ...]`.
      score: `score(samples int [M, ...], text_ids int32 [M, T]) -> float [M]` (higher: better match).
      text_ids: int [B, T] prompts.
      num_samples: N, candidates per prompt (the paper: 512).
      k: kept per prompt, 1 <= k <= N.
      seed: passed to `sample`.

    Returns:
      `Reranked`: samples [B, k, ...] best first, their scores, indices and every score.
    """
    if not 1 <= k <= num_samples:
        raise ValueError(f"rerank needs 1 <= k <= num_samples, got k={k}, num_samples={num_samples}")
    text_ids = np.asarray(text_ids, np.int32)
    samples = np.asarray(ops.convert_to_numpy(sample(text_ids, num_samples, seed)))
    if samples.shape[:2] != (text_ids.shape[0], num_samples):
        raise ValueError(f"sample returned shape {samples.shape}, expected [{text_ids.shape[0]}, {num_samples}, ...]")
    return select(samples, score_samples(score, samples, text_ids, score_batch_size), k)


def repeat_sampler(text_to_tokens: Callable) -> Callable:
    """`sample(text_ids, num_samples, seed)` from `text_to_tokens(text_ids [M, T], seed) -> int [M, ...]`.

    Each prompt is repeated `num_samples` times in one call (example-major), so a
    generator that samples independently per row (MaskGIT decoding in UPGen / ITIT,
    DALL-E's autoregressive sampling) gives `num_samples` independent draws per prompt.
    """

    def sample(text_ids, num_samples: int, seed: int = 0):
        text_ids = np.asarray(text_ids, np.int32)
        out = np.asarray(ops.convert_to_numpy(text_to_tokens(np.repeat(text_ids, num_samples, axis=0), seed)))
        return out.reshape(text_ids.shape[0], num_samples, *out.shape[1:])

    return sample


def decode_then_score(decode: Callable, score: Callable) -> Callable:
    """`score(tokens, text_ids)` for a pixel-space scorer: `score(decode(tokens), text_ids)`.

    E.g. a pixel CLIP (`CLIP(image_input="pixels")`) reranking UPGen's VQ codes:
    `decode_then_score(vqgan.decode, clip_task.score)`.
    """
    return lambda tokens, text_ids: score(decode(np.asarray(tokens)), text_ids)


__all__ = ["Reranked", "decode_then_score", "repeat_sampler", "rerank", "score_samples", "select",
           "top_k_by_score"]
