"""UPGen inference: MaskGIT decoding in both directions, unconditional images, features.

UPGen §3 "Iterative cross-modality generation" (Fig. 2): the given modality enters the
sequence unmasked, the other starts as [MASK] tokens, and `mmt.sampling.parallel_decode`
-- the sampler ITIT uses -- fills the masked positions in `num_steps` steps, keeping
the most confident predictions (MaskGIT). `token_range` restricts each position to
its own modality's part of the union vocabulary, so image positions only ever receive
image codes and text positions text ids. Pure functions over a `UPGen` network.
"""

from __future__ import annotations

from keras import ops

from mmt.models.upgen import IMAGE, IMAGE_ONLY, TEXT
from mmt.sampling import parallel_decode


def decode(model, ids, modalities, seed, *, num_steps: int = 12, choice_temperature: float = 20.0,
           sampling_temperature: float = 1.0, schedule: str = "cosine", order: str = "confidence",
           guidance_scale: float = 0.0, uncond_fn=None, return_history: bool = False):
    """Fills every [MASK] of a union-vocabulary sequence; the other positions come back unchanged.

    Args:
      ids: int32 [B, N] in `modalities`' layout, `model.mask_id` where to generate.
      modalities: the layout, e.g. ("image", "text").
      seed: an int or a `keras.random.SeedGenerator`.
      num_steps, choice_temperature, sampling_temperature, schedule, order: of
        `parallel_decode.decode` (UPGen §4.5: choice temperature ~20 is best for images;
        order "left_to_right" with one step per token is §3's autoregressive extreme).
      guidance_scale, uncond_fn: classifier-free guidance (not in the paper; 0 = off);
        `uncond_fn(tokens) -> tokens` blanks the conditioning for the unconditional logits.

    Returns:
      int32 [B, N] (or `(tokens, history)`, see `parallel_decode.decode`).
    """
    logits_fn = lambda tokens: model.logits(tokens, modalities)  # noqa: E731
    uncond = None
    if guidance_scale:
        uncond = lambda tokens: model.logits(uncond_fn(tokens), modalities)  # noqa: E731
    return parallel_decode.decode(logits_fn, ids, model.mask_id, num_steps, seed, schedule=schedule,
                                  choice_temperature=choice_temperature, sampling_temperature=sampling_temperature,
                                  guidance_scale=guidance_scale, uncond_logits_fn=uncond, order=order,
                                  token_range=model.token_range(modalities), return_history=return_history)


def text_to_image(model, text_ids, seed, **options):
    """Text ids int32 [B, L] -> image codes int32 [B, K] in [0, V_i) (image positions start masked).

    `options` go to `decode`; with `guidance_scale`, the unconditional logits see the
    same sequence with the whole text masked.
    """
    batch = ops.shape(text_ids)[0]
    k = model.num_image_tokens
    ids, modalities = model.sequence(model.masked_empty(batch, IMAGE), text_ids)  # [MASK]*K; text + V_i
    blank_text = model.masked_empty(batch, TEXT)
    options.setdefault("uncond_fn", lambda tokens: ops.concatenate([tokens[:, :k], blank_text], axis=1))
    out = decode(model, ids, modalities, seed, **options)
    if options.get("return_history"):
        return model.split(out[0], modalities)[IMAGE], out[1]
    return model.split(out, modalities)[IMAGE]


def image_to_text(model, image_tokens, seed, **options):
    """Image codes int [B, K] or [B, h, w] -> text ids int32 [B, L] in [0, V_t) (text starts masked).

    The ids hold pieces, EOS and padding as the model placed them; `TextTokenizer.decode`
    reads up to the first EOS.
    """
    ids, modalities = model.sequence(image_tokens, None)
    batch = ops.shape(ids)[0]
    ids = ops.concatenate([ids, model.masked_empty(batch, TEXT)], axis=1)
    modalities = modalities + (TEXT,)
    k = model.num_image_tokens
    blank_image = model.masked_empty(batch, IMAGE)
    options.setdefault("uncond_fn", lambda tokens: ops.concatenate([blank_image, tokens[:, k:]], axis=1))
    out = decode(model, ids, modalities, seed, **options)
    return model.split(out, modalities)[TEXT] - model.text_offset


def unconditional_images(model, batch_size: int, seed, **options):
    """Image codes int32 [B, K] from nothing: an image-only sequence, fully masked (UPGen Fig. 5)."""
    options.pop("guidance_scale", None)
    ids = model.masked_empty(batch_size, IMAGE)
    return decode(model, ids, IMAGE_ONLY, seed, **options)


def image_features(model, image_tokens, all_layers: bool = False):
    """Frozen image features for probes: the mean over image positions of an image-only pass.

    Args:
      image_tokens: int [B, K] or [B, h, w] codes, nothing masked, no text.
      all_layers: concatenate the mean-pooled output of every block (UPGen §4.2) instead
        of taking the final output only.

    Returns:
      float32 [B, D], or [B, depth * D] with `all_layers`.
    """
    ids, modalities = model.sequence(image_tokens, None)
    if not all_layers:
        return ops.cast(ops.mean(model.encode(ids, modalities), axis=1), "float32")
    pooled = [ops.mean(h, axis=1) for h in model.layer_outputs(ids, modalities)]
    return ops.cast(ops.concatenate(pooled, axis=-1), "float32")


__all__ = ["decode", "image_features", "image_to_text", "text_to_image", "unconditional_images"]
