"""ITIT inference: T2I parallel decoding with guidance, I2T greedy / beam decoding (App. B).

Pure functions over an `ITIT` network and `mmt.sampling`; the same functions synthesize
the pseudo images and captions of the training cycles (ITIT §3.2).
"""

from __future__ import annotations

from keras import ops

from mmt.layers import padding_mask

from mmt.sampling import autoregressive, parallel_decode


def image_logits_fn(model, text_ids, training: bool = False, drop_masked: bool = True):
    """`tokens int32 [B, K] -> logits [B, K, V_i]` conditioned on `text_ids` [B, L].

    While every row has at least `model.num_dropped` masked positions (the early steps
    of parallel decoding), the encoder drops that many of them, as in training (the
    masking ratio there is always >= drop_ratio), which also makes those steps cheaper;
    afterwards -- or with `drop_masked=False` -- it sees all K positions in place,
    [MASK] where unknown. The choice is a runtime `cond` with static shapes on both
    sides, so it compiles inside the decoding loop.
    """
    features, valid = model.encode_text(text_ids, training=training)

    def logits_at(tokens, mask, order=None):
        z, z_valid = model.encode(model.embed_image(tokens, mask=mask, order=order), features, valid,
                                  training=training)
        return model.image_logits(z, z_valid, order, training=training)

    def logits_fn(tokens):
        mask = ops.equal(tokens, model.mask_id)  # embed_image gives these the [MASK] embedding
        if not drop_masked or model.num_dropped == 0:
            return logits_at(tokens, mask)
        enough = ops.all(ops.sum(ops.cast(mask, "int32"), axis=-1) >= model.num_dropped)
        # keep_order without a seed: a fixed order, so decoding stays a function of its seed.
        return ops.cond(enough, lambda: logits_at(tokens, mask, model.keep_order(mask)),
                        lambda: logits_at(tokens, mask))

    return logits_fn


def generate_images(model, text_ids, seed, *, num_steps: int = 24, guidance_scale: float = 2.0,
                    choice_temperature: float = 32.0, schedule: str = "cosine", sampling_temperature: float = 1.0,
                    drop_masked: bool = True):
    """Text -> image tokens by MaskGIT/Muse parallel decoding (ITIT App. B).

    Guidance `l = (1 + λ) l_c − λ l_u` with the unconditional logits from the empty
    caption (trained by the I2I loss); confidence noised by Gumbel noise of
    temperature t (paper: 24 steps, λ = 2.0, t = 32); tokens drawn from the guided logits
    at `sampling_temperature` (1.0 as the paper; 0 takes the argmax). `drop_masked`:
    see `image_logits_fn`.

    Args:
      text_ids: int32 [B, L].
    Returns:
      int32 [B, K] image tokens (reshape to the grid for the detokenizer).
    """
    batch = ops.shape(text_ids)[0]
    cond = image_logits_fn(model, text_ids, drop_masked=drop_masked)
    uncond = image_logits_fn(model, model.empty_text(batch), drop_masked=drop_masked) if guidance_scale else None
    start = ops.full((batch, model.num_image_tokens), model.mask_id, "int32")
    return parallel_decode.decode(cond, start, model.mask_id, num_steps, seed, schedule=schedule,
                                  choice_temperature=choice_temperature, guidance_scale=guidance_scale,
                                  sampling_temperature=sampling_temperature, uncond_logits_fn=uncond)


def _caption_logits_fn(model, image_tokens, training: bool = False):
    """Fixed-buffer logits function of the text decoder for `mmt.sampling.autoregressive`."""
    batch = ops.shape(image_tokens)[0]
    features, valid = model.encode_text(model.empty_text(batch), training=training)
    z, z_valid = model.encode(model.embed_image(image_tokens), features, valid, training=training)

    def logits_fn(tokens, index):
        # tokens: [B', L + 1] = [BOS, t_1, ...]; the decoder reads its first L.
        repeats = ops.shape(tokens)[0] // batch
        zz = ops.repeat(z, repeats, axis=0) if repeats != 1 else z
        vv = ops.repeat(z_valid, repeats, axis=0) if repeats != 1 else z_valid
        logits = model.text_logits(zz, vv, tokens[:, : model.text_length], training=training)
        return ops.take(logits, index, axis=1)

    return logits_fn


def _cached_caption_fn(model, image_tokens, training: bool = False):
    """KV-cached logits function: the image features are prefilled once, then each step
    runs the text decoder on one token (GIT's mask: text attends to all features and
    earlier text). Returns `(logits_fn, cache)` for `mmt.sampling.autoregressive`.
    """
    batch = ops.shape(image_tokens)[0]
    features, valid = model.encode_text(model.empty_text(batch), training=training)
    z, z_valid = model.encode(model.embed_image(image_tokens), features, valid, training=training)
    prefix = model.text_decoder_projection(z)  # [B, P, D]
    p = ops.shape(prefix)[1]
    key_valid = ops.concatenate([z_valid, ops.ones((batch, model.text_length), "bool")], axis=1)  # [B, P + L]
    cache = model.text_decoder.init_cache(batch, p + model.text_length, dtype=prefix.dtype)
    _, cache = model.text_decoder(prefix, mask=padding_mask(key_valid), cache=cache, cache_index=0,
                                  training=training)

    def logits_fn(token, index, cache):
        repeats = ops.shape(token)[0] // batch
        keys = ops.repeat(key_valid, repeats, axis=0) if repeats != 1 else key_valid
        x = model.text_decoder_position(model.text_embedding(token), offset=index)
        x, cache = model.text_decoder(ops.cast(x, prefix.dtype), mask=padding_mask(keys), cache=cache,
                                      cache_index=p + index, training=training)
        return model.text_embedding.attend(x)[:, 0], cache

    return logits_fn, cache


def _start(model, batch):
    return ops.full((batch, 1), model.bos_id, "int32")


def greedy_captions(model, image_tokens, cached: bool = True):
    """Image tokens int32 [B, K] -> caption ids int32 [B, L] (ids, EOS, padding).

    `cached` uses the KV cache (one decoder step per token); False recomputes the
    whole sequence each step (the reference the tests compare against).
    """
    batch = ops.shape(image_tokens)[0]
    if cached:
        logits_fn, cache = _cached_caption_fn(model, image_tokens)
    else:
        logits_fn, cache = _caption_logits_fn(model, image_tokens), None
    out = autoregressive.greedy_decode(logits_fn, _start(model, batch), model.text_length + 1, model.eos_id,
                                       model.pad_id, cache=cache)
    return out[:, 1:]


def beam_captions(model, image_tokens, beam_size: int = 4, length_penalty: float = 0.6, cached: bool = True):
    """Beam search (GIT / ITIT: beam 4): int32 [B, K] -> int32 [B, L]."""
    batch = ops.shape(image_tokens)[0]
    if cached:
        logits_fn, cache = _cached_caption_fn(model, image_tokens)
    else:
        logits_fn, cache = _caption_logits_fn(model, image_tokens), None
    out, _ = autoregressive.beam_search(logits_fn, _start(model, batch), model.text_length + 1, model.eos_id,
                                        model.pad_id, beam_size=beam_size, length_penalty=length_penalty,
                                        cache=cache, cache_batch_axis=1)
    return out[:, 1:]
