"""Contrastive reranking of any text-to-image task's samples by a trained CLIP (DALL-E §2.6).

`sample_and_score` draws N images per caption from a generator task (anything with
`text_to_image(captions, seed=, **options) -> (uint8 images, codes)`: DALL-E, UPGen,
ITIT) and scores each (caption, image) pair with a `CLIPTask`; `mmt.sampling.rerank.select`
then keeps the best k. `python -m mmt.generate --rerank_with=<clip workdir>` and
`benchmarks/dalle_shapes.py` both go through it; `score_samples` scores samples already drawn
(`python -m mmt.evaluate clip_score` / `fid --clip`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mmt.errors import UserError


def scores_codes(generator, clip) -> bool:
    """Whether `clip` scores the generator's codes directly (a token CLIP of the same tokenizer).

    Otherwise it scores the decoded images: a pixel CLIP reads them as they are, a
    token CLIP of another tokenizer re-encodes them with its own.
    """
    if clip.model.image_input != "tokens":
        return False
    theirs = getattr(generator, "image_tokenizer_fingerprint", None)
    return theirs is not None and theirs == clip.image_tokenizer_fingerprint


def _fit(images: np.ndarray, size: int, clip_workdir: str) -> np.ndarray:
    """uint8 [N, R, R, 3] -> [N, size, size, 3] by pixel repetition (size a multiple of R)."""
    factor, rest = divmod(size, images.shape[1])
    if rest or not factor:
        raise UserError(f"the CLIP {clip_workdir} reads {size}x{size} images, the generator makes "
                        f"{images.shape[1]}x{images.shape[1]}: train the CLIP at a multiple of the generator's "
                        "resolution, or on its tokens")
    return np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)


def sample_and_score(generator, clip, captions: Sequence[str], num_samples: int, seed: int = 0,
                     prompts_per_call: int = 8, clip_workdir: str = "the CLIP", **options):
    """N samples per caption and the CLIP's score of each, in draw order.

    Args:
      generator: a task with `text_to_image(captions, seed=, **options)`.
      clip: a trained `CLIPTask`.
      captions: P caption strings.
      num_samples: N draws per caption.
      seed: base seed; call `i` (of `prompts_per_call` captions) uses `seed + i`.
      prompts_per_call: captions per generator call (`prompts_per_call * N` images at once;
        the last call is padded so one compiled shape serves every call).
      **options: the generator's sampling options (temperature, ...).

    Returns:
      (uint8 [P, N, H, W, 3] images, float32 [P, N] scores).
    """
    if num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {num_samples}")
    captions = list(captions)
    images, scores = [], []
    for i in range(0, len(captions), prompts_per_call):
        chunk = captions[i:i + prompts_per_call]
        padded = chunk + chunk[-1:] * (prompts_per_call - len(chunk))
        drawn, codes = generator.text_to_image(list(np.repeat(padded, num_samples)), seed=seed + i, **options)
        keep = len(chunk) * num_samples  # caption-major: row c * N + j is sample j of caption c
        drawn = np.asarray(drawn)[:keep]
        codes = None if codes is None else np.asarray(codes)[:keep]
        chunk_scores = score_samples(generator, clip, drawn, codes, list(np.repeat(chunk, num_samples)), clip_workdir)
        images.append(drawn.reshape(len(chunk), num_samples, *drawn.shape[1:]))
        scores.append(chunk_scores.reshape(len(chunk), num_samples))
    return np.concatenate(images), np.concatenate(scores)


def score_samples(generator, clip, images, codes, captions: Sequence[str],
                  clip_workdir: str = "the CLIP") -> np.ndarray:
    """The CLIP's score of each of N generated (image, caption) pairs, as the reranker sees them.

    A CLIP over the generator's own tokenizer scores `codes`; a pixel CLIP scores
    `images` (pixel-repeated to its resolution); a token CLIP of another tokenizer
    re-encodes `images` with its own.

    Args:
      generator: the task that drew them (for its `image_tokenizer_fingerprint`).
      clip: a trained `CLIPTask`.
      images: uint8 [N, H, W, 3] decoded samples.
      codes: int [N, h, w] their codes (read only by a CLIP of the same tokenizer), or None.
      captions: N caption strings, caption i for sample i.

    Returns:
      float32 [N]: logit_scale x cosine (`CLIPTask.score`).
    """
    captions = list(captions)
    if scores_codes(generator, clip):
        _, vocab = clip.tokenizers()
        ids = np.asarray(vocab.encode(captions, clip.model.text_length), np.int32)
        scores = clip.score(np.asarray(codes), ids)
    elif clip.model.image_input == "pixels":
        scores = clip.score_images(_fit(np.asarray(images), clip.model.image_size, clip_workdir), captions)
    else:
        scores = clip.score_images(np.asarray(images), captions)
    return np.asarray(scores, np.float32)
