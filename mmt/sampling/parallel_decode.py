"""MaskGIT iterative parallel decoding with classifier-free guidance.

One function, `decode`, serves every masked-token generator in mmt:

- ITIT T2I (App. B "T2I Inference"): all image tokens start masked, the text lives in
  `logits_fn`'s closure, `uncond_logits_fn` is the same decoder with the empty text,
  and the guided logits are `(1 + lambda) l_c - lambda l_u` (24 steps, t = 32, lambda = 2).
- UPGen (§3 "Iterative cross-modality generation"): one sequence [image; text] where
  the given modality is conditioning and the other starts masked; `token_range` keeps
  image positions on image codes of the union vocabulary.
- MaskGIT / Muse: the plain loop (`choice_temperature` 4.5, cosine schedule).

Each step (MaskGIT `parallel_decode.decode`): sample every masked position from the
(guided) logits, score each sample by its log-probability plus Gumbel noise scaled by
`choice_temperature * (1 - (step + 1) / num_steps)`, keep the most confident, re-mask the
rest. Positions that were given, and tokens fixed at an earlier step, never change.

`keras.ops` only, static shapes, one `fori_loop`: compiles under XLA on any backend.
"""

from __future__ import annotations

from typing import Callable

from keras import ops

from mmt import backend
from mmt.sampling.mask_schedule import masked_counts

# Logits of excluded tokens (outside token_range, the mask token): finite, so that
# softmax never sees inf - inf.
_EXCLUDED = -1e9


def decode(
    logits_fn: Callable,
    tokens,
    mask_id: int,
    num_steps: int,
    seed,
    *,
    schedule: str = "cosine",
    choice_temperature: float = 4.5,
    sampling_temperature: float = 1.0,
    guidance_scale: float = 0.0,
    uncond_logits_fn: Callable | None = None,
    guidance_schedule: str = "constant",
    token_range=None,
    order: str = "confidence",
    return_history: bool = False,
):
    """Generates the masked positions of `tokens` in `num_steps` parallel steps.

    Args:
      logits_fn: int32 `[B, N]` tokens -> float `[B, N, V]` logits (conditional).
      tokens: int `[B, N]`; positions equal to `mask_id` are generated, all others are
        conditioning and come back unchanged. Examples may have different numbers of
        masked positions; each follows the schedule over its own count.
      mask_id: the mask token. It is never sampled (its logit is excluded when it lies
        inside the vocabulary), so no `mask_id` remains after the last step.
      num_steps: static number of steps (ITIT 24, MaskGIT 8-12).
      seed: an int or a `keras.random.SeedGenerator` (e.g. `mmt.tasks.base.StepSeed`);
        one draw is taken from it, per-step seeds are derived from that draw.
      schedule: mask schedule method (see `mask_schedule.schedule`); the number of
        tokens revealed per step follows `mask_schedule.masked_counts`.
      choice_temperature: scale of the Gumbel noise added to the confidences, annealed
        linearly to 0 at the last step (MaskGIT 4.5, UPGen 20, ITIT 32).
      sampling_temperature: the candidates are drawn from `softmax(logits / T)`; 0
        means argmax. Confidences use the untempered (guided) log-probabilities.
      guidance_scale: lambda of classifier-free guidance; 0 disables it (and
        `uncond_logits_fn` is never called). A Python float, or a float scalar tensor
        (then guidance is always computed).
      uncond_logits_fn: like `logits_fn`, for the unconditional model; required when
        guidance is on.
      guidance_schedule: "constant" (lambda every step) or "linear" (Muse-style ramp:
        step `s` uses `lambda * (s + 1) / num_steps`).
      token_range: optional `(lo, hi)`: only token ids `lo <= id < hi` may be sampled.
        `lo`/`hi` are ints or int tensors broadcasting against `[B, N]` (e.g. `[N]`
        per position: UPGen's image codes at image positions, word pieces at text ones).
      order: which masked positions a step keeps: "confidence" (MaskGIT: the most
        confident samples), or "left_to_right" (the leftmost masked positions, whatever
        their confidence; with `num_steps` equal to the number of masked positions this
        is autoregressive decoding in the masked model -- UPGen §3's other extreme).
      return_history: also return the tokens after every step.

    Returns:
      int32 `[B, N]`, or `(tokens, history)` with history int32 `[num_steps, B, N]`
      (`history[s]`: tokens after step `s`, `mask_id` where still masked;
      `history[-1]` is the result).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if order not in ("confidence", "left_to_right"):
        raise ValueError(f"unknown order {order!r} (confidence, left_to_right).")
    if guidance_schedule not in ("constant", "linear"):
        raise ValueError(f"unknown guidance_schedule {guidance_schedule!r} (constant, linear).")
    guided = not (isinstance(guidance_scale, (int, float)) and guidance_scale == 0)
    if guided and uncond_logits_fn is None:
        raise ValueError("guidance_scale != 0 needs uncond_logits_fn.")

    tokens = ops.cast(tokens, "int32")
    batch, length = tokens.shape
    if batch is None or length is None:
        raise ValueError("tokens needs a static shape [B, N] (e.g. drop_remainder=True).")
    total = ops.sum(ops.cast(tokens == mask_id, "int32"), axis=-1)  # [B]
    counts = masked_counts(num_steps, total, schedule)  # [S, B] still masked after step s
    step_seeds = backend.step_seeds(seed, num_steps)  # [S, 2]

    def guided_logits(current, step):
        logits = ops.cast(logits_fn(current), "float32")  # [B, N, V]
        if guided:
            scale = ops.cast(guidance_scale, "float32")
            if guidance_schedule == "linear":
                scale = scale * ops.cast(step + 1, "float32") / num_steps
            uncond = ops.cast(uncond_logits_fn(current), "float32")
            logits = (1.0 + scale) * logits - scale * uncond  # ITIT App. B, Muse eq. 1
        return ops.where(_allowed_tokens(logits.shape[-1], mask_id, token_range), logits, _EXCLUDED)

    def step_fn(step, state):
        current = state[0]  # [B, N]
        step_seed = backend.seed_at(step_seeds, step)
        logits = guided_logits(current, step)  # [B, N, V]
        unknown = current == mask_id
        sampled = backend.categorical(logits, step_seed, sampling_temperature)
        sampled = ops.where(unknown, sampled, current)
        if order == "left_to_right":  # keep the leftmost: confidence falls with the position
            confidence = ops.broadcast_to(-ops.cast(ops.arange(length), "float32")[None], (batch, length))
        else:
            log_probs = ops.log_softmax(logits, axis=-1)
            chosen = ops.take_along_axis(log_probs, sampled[..., None], axis=-1)[..., 0]  # [B, N]
            # MaskGIT's annealed randomness in the choice of which samples to keep.
            anneal = 1.0 - ops.cast(step + 1, "float32") / num_steps
            noise = backend.gumbel((batch, length), step_seed)
            confidence = chosen + choice_temperature * anneal * noise
        confidence = ops.where(unknown, confidence, float("inf"))  # fixed: never re-masked
        # Re-mask the `remask` least confident positions: exact counts via ranks.
        remask = ops.take(counts, step, axis=0)  # [B]
        ranks = ops.argsort(ops.argsort(confidence, axis=-1), axis=-1)
        new = ops.where(ranks < remask[:, None], mask_id, sampled)
        if not return_history:
            return (new,)
        zero = ops.zeros((), "int32")
        history = ops.slice_update(state[1], (ops.cast(step, "int32"), zero, zero), new[None])
        return new, history

    state = (tokens,)
    if return_history:
        state += (ops.zeros((num_steps, batch, length), "int32"),)
    state = ops.fori_loop(0, num_steps, step_fn, state)
    return tuple(state) if return_history else state[0]


def _allowed_tokens(vocab_size: int, mask_id: int, token_range):
    """bool broadcasting against `[B, N, V]`: which ids may be sampled."""
    ids = ops.arange(vocab_size, dtype="int32")
    allowed = ids != mask_id  # [V]
    if token_range is None:
        return allowed
    lo, hi = (ops.cast(bound, "int32")[..., None] for bound in token_range)
    return ops.logical_and(allowed, ops.logical_and(ids >= lo, ids < hi))
