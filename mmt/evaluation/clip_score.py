"""CLIP score: how well images match their captions, by a trained CLIP (`mmt/tasks/clip.py`).

    python -m mmt.evaluate clip_score --clip=/tmp/clip_tiny --workdir=/tmp/dalle_tiny --captions=captions.txt
    python -m mmt.evaluate clip_score --clip=/tmp/clip_tiny --images=DIR --captions=captions.json
    python -m mmt.evaluate fid --workdir=/tmp/dalle_tiny --captions=captions.txt --clip=/tmp/clip_tiny ...

**The score.** For a caption c and an image x, with the CLIP's unit embeddings (its
projections L2-normalised: `CLIPTask.embed_texts`, `embed_images`),

    CLIP score(c, x) = 100 * cos(text(c), image(x))          in [-100, 100],

not clipped at 0. The figure reported is its mean over the captions (one image each),
with a 95% Student-t interval over them, mean ± t(0.975, n - 1) s / sqrt(n) (s the
sample standard deviation), the count, and the CLIP's step.

*Why 100 and not the reranker's scale.* `CLIPTask.score`, the score `mmt.generate
--rerank_with` ranks by, is the temperature-scaled logit of the contrastive loss,
`logit_scale * cos`, with the learned logit_scale = 1 / temperature <= 100 (CLIP §2.5).
The evaluation fixes the multiplier at 100, the scale of the "CLIP score" of the
text-to-image literature (Hessel et al., 2021 write 2.5 * cos): the learned temperature
moves between checkpoints and runs and says nothing about how well an image matches its
caption, so a fixed multiplier keeps one CLIP's scores comparable across generators and
steps. Per pair it is the reranker's score times 100 / logit_scale (a positive constant,
so the same ranking; the same number once the temperature reaches its clip, logit_scale
= 100); the record carries `logit_scale` for the conversion. *Why not clipped.* Hessel
et al. and torchmetrics report max(100 cos, 0); clipping biases the mean of poor pairings
upwards (a shuffled baseline most of all) and makes the interval's normal approximation
worse, so mmt reports the plain cosine and `negative_fraction`, the share of pairs a clip
at 0 would change.

A score is meaningful only for the CLIP that made it: a tiny shapes CLIP's numbers are not
comparable with papers' figures from OpenAI's CLIP.

**What the CLIP reads** is what the reranker reads (`mmt.tasks.reranking.score_samples`):
a generator's samples through their codes when the CLIP reads the generator's tokenizer,
else the decoded images (pixel-repeated to a pixel CLIP's side, or re-encoded by a token
CLIP's own tokenizer). A folder's images are centre-cropped and resized (PIL bicubic) to
the CLIP's input side, as `fid --image_size` does, then read as pixels or encoded by the
CLIP's image tokenizer. The pairing of a folder with its captions file is
`mmt.evaluation.commands.read_pairs`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from mmt.errors import UserError

#: The fixed multiplier of the cosine (the literature's CLIP score scale).
SCALE = 100.0
DEFINITION = ("100 x cosine of the CLIP's unit caption and image embeddings, not clipped at 0; mean over captions, "
              "95% Student-t interval")


def load_clip(workdir: str, flag: str = "--clip"):
    """(CLIPTask, step) of a CLIP workdir (its export, else its newest checkpoint) or an export directory.

    A missing path or a workdir of another model is a `UserError` naming `flag` and the path.
    """
    from pathlib import Path

    from mmt.restore import load_trained
    from mmt.tasks.clip import CLIPTask

    if "://" not in workdir and not Path(workdir).is_dir():
        raise UserError(f"{flag} {workdir}: no such workdir (give a CLIP run's workdir, e.g. trained with "
                        "gin/clip_tiny.gin)")
    clip, step = load_trained(workdir)
    if not isinstance(clip, CLIPTask):
        raise UserError(f"{flag} {workdir} holds a {type(clip).__name__}, not a CLIP: train one with "
                        "gin/clip_tiny.gin (codes) or gin/clip_tiny_pixels.gin (pixels) on the same paired data")
    return clip, step


def input_size(clip) -> int:
    """The image side the CLIP reads: a pixel CLIP's `image_size`, a token CLIP's tokenizer's."""
    if clip.model.image_input == "pixels":
        return clip.model.image_size
    return clip.tokenizers()[0].image_size


def summarize(scores: Sequence[float]) -> dict:
    """Mean CLIP score of n pairs with its 95% Student-t interval (None for one pair).

    Returns:
      {"clip_score", "clip_score_ci95": [low, high] | None, "num_captions", "negative_fraction"}.
    """
    import scipy.stats

    s = np.asarray(scores, np.float64)
    if s.size == 0:
        raise ValueError("no scores to summarize")
    mean = float(s.mean())
    interval = None
    if s.size > 1:
        half = float(scipy.stats.t.ppf(0.975, s.size - 1)) * float(s.std(ddof=1)) / math.sqrt(s.size)
        interval = [mean - half, mean + half]
    return {"clip_score": mean, "clip_score_ci95": interval, "num_captions": int(s.size),
            "negative_fraction": float(np.mean(s < 0))}


class CLIPScorer:
    """Collects the CLIP scores of (image, caption) pairs batch by batch.

    Args:
      clip: a trained `CLIPTask`.
      workdir: where it came from (named in errors and the record).
      step: its training step.
    """

    def __init__(self, clip, workdir: str, step: int | None):
        from keras import ops

        self.clip, self.workdir, self.step = clip, workdir, step
        self.logit_scale = float(ops.convert_to_numpy(clip.model.logit_scale()))
        self.scores: list[np.ndarray] = []

    def _add(self, reranker_scores) -> np.ndarray:
        # logit_scale x cos -> 100 x cos (module docstring).
        scores = np.asarray(reranker_scores, np.float64) * (SCALE / self.logit_scale)
        self.scores.append(scores)
        return scores

    def add_generated(self, generator, images, codes, captions: Sequence[str]) -> np.ndarray:
        """float64 [N] scores of a generator's samples (uint8 images, their codes or None), read as the
        reranker reads them (`mmt.tasks.reranking.score_samples`)."""
        from mmt.tasks.reranking import score_samples

        return self._add(score_samples(generator, self.clip, images, codes, captions, self.workdir))

    def add_images(self, images, captions: Sequence[str]) -> np.ndarray:
        """float64 [N] scores of uint8 [N, S, S, 3] images at the CLIP's input side (`input_size`)."""
        return self._add(self.clip.score_images(np.asarray(images, np.uint8), list(captions)))

    def record(self) -> dict:
        """`summarize` of every score so far, with the CLIP's path, step and logit_scale."""
        return {**summarize(np.concatenate(self.scores)), "clip": self.workdir, "clip_step": self.step,
                "logit_scale": self.logit_scale, "score": DEFINITION}

    def line(self) -> str:
        """One printed line: mean, interval, count, the CLIP."""
        r = summarize(np.concatenate(self.scores))
        interval = ("" if r["clip_score_ci95"] is None else
                    " (95% interval {:.2f} to {:.2f})".format(*r["clip_score_ci95"]))
        return (f"CLIP score {r['clip_score']:.2f}{interval} over {r['num_captions']} captions; CLIP {self.workdir} "
                f"at step {self.step}")


__all__ = ["CLIPScorer", "DEFINITION", "SCALE", "input_size", "load_clip", "summarize"]
