"""UPGen training: masked token prediction over the three-stream mixture (UPGen §3, §4.1, App. A).

Each stream becomes one sequence layout of the same network (`upgen.py`):

| stream       | sequence        | mask ratio (per example)     | losses (weight)                         |
|--------------|-----------------|------------------------------|-----------------------------------------|
| `paired`     | [image; text]   | r ~ U(0, 1) over all N + K   | paired_image (1.0), paired_text (0.1)   |
| `text_only`  | [text]          | fixed 15% (BERT)             | unpaired_text (0.01)                    |
| `image_only` | [image]         | r ~ U(0, 1)                  | unpaired_image (1.0)                    |

A masked position gets the shared [MASK] id; the loss is the cross-entropy over the
union vocabulary at masked positions only (eq. 1), averaged over the masked positions
of each (stream, modality) in the global batch (`Ratio`) and weighted as in §4.1 /
Table 5. Masked-token accuracies (`*_accuracy`, weight 0) go to the summaries only
(§4.5 quotes ~37% text / ~15% image at the end of training).

The task holds no layers of its own: network, samplers (`upgen_inference.py`), losses
(`mmt.losses.cross_entropy`) and mask sampling (`mmt.sampling.mask_schedule`) are
shared with the rest of mmt.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from keras import ops

from mmt import backend
from mmt.backend import FixedSeed
from mmt.losses.cross_entropy import masked_cross_entropy
from mmt.models import upgen_inference
from mmt.models.upgen import TEXT, UPGen
from mmt.sampling.mask_schedule import random_mask, uniform_mask_ratio
from mmt.tasks.base import CompiledInference, Ratio, Task, TokenizerFiles, seed_array, task_arguments

#: UPGen §4.1 / Table 5: image 1.0, paired text 0.1, unpaired text 0.01. Unpaired images
#: (not used in the paper's main runs) count like paired ones.
DEFAULT_LOSS_WEIGHTS = {
    "paired_image": 1.0,
    "paired_text": 0.1,
    "unpaired_text": 0.01,
    "unpaired_image": 1.0,
    "paired_image_accuracy": 0.0,
    "paired_text_accuracy": 0.0,
    "unpaired_text_accuracy": 0.0,
    "unpaired_image_accuracy": 0.0,
}
PAIRED_MASKING = ("joint", "mixed")
DEFAULT_GENERATION = {
    # Text -> image and unconditional images (UPGen §4.5: choice temperature ~20).
    "num_steps": 12, "choice_temperature": 20.0, "sampling_temperature": 1.0, "guidance_scale": 0.0,
    "schedule": "cosine",
    # Image -> text; "text_order": "left_to_right" reveals one position after another.
    "text_num_steps": 12, "text_choice_temperature": 4.5, "text_sampling_temperature": 1.0,
    "text_order": "confidence",
}


class UPGenTask(CompiledInference, TokenizerFiles, Task):
    """UPGen's masked-token losses for the trainer. Network arguments go to `UPGen` unchanged.

    Args:
      network: keyword arguments of `mmt.models.upgen.UPGen` (size, vocabularies, grid, ...).
      mask_min, mask_max: per-example mask ratios of paired and image-only sequences are
        drawn from U(mask_min, mask_max) (UPGen §3: U(0, 1)); at least one token is masked.
      text_mask_ratio: the fixed ratio of unpaired text (§4.1: 15%).
      paired_masking: "joint" (UPGen §3: one ratio over the whole [image; text]
        sequence), or "mixed" (not in the paper): each paired example is, in equal
        parts, masked jointly, on its image only (text given, as in text-to-image
        decoding) or on its text only (image given, as in image-to-text decoding).
      mask_padding: text padding may be masked and predicted like any token (needed for
        image-to-text decoding to choose a caption length); False masks pieces and EOS only.
      loss_weights: name -> weight, merged over `DEFAULT_LOSS_WEIGHTS`.
      image_tokenizer: directory of the saved image tokenizer (`ImageTokenizer.save`):
        the data must carry its fingerprint; generation and probes use it.
      text_vocab: the SentencePiece model (file or directory) of the text ids.
      generation: defaults of `text_to_image` / `image_to_text` / `unconditional_images`,
        merged over `DEFAULT_GENERATION`.
      compile_inference: run generation and features compiled with the backend's XLA
        (once per option set and batch shape); False runs them eagerly (no compile
        time: quicker for a handful of samples from a tiny model).
    """

    def __init__(self, network: Mapping | None = None, mask_min: float = 0.0, mask_max: float = 1.0,
                 text_mask_ratio: float = 0.15, paired_masking: str = "joint", mask_padding: bool = True,
                 loss_weights: Mapping[str, float] | None = None, image_tokenizer: str | None = None,
                 text_vocab: str | None = None, generation: Mapping | None = None, compile_inference: bool = True):
        self.arguments = task_arguments(locals())
        if not 0.0 <= mask_min < mask_max <= 1.0:
            raise ValueError(f"UPGenTask needs 0 <= mask_min < mask_max <= 1, got {mask_min}, {mask_max}")
        if not 0.0 < text_mask_ratio <= 1.0:
            raise ValueError(f"UPGenTask.text_mask_ratio must be in (0, 1], got {text_mask_ratio}")
        if paired_masking not in PAIRED_MASKING:
            raise ValueError(f"UPGenTask.paired_masking must be one of {PAIRED_MASKING}, got {paired_masking!r}")
        unknown = set(loss_weights or {}) - set(DEFAULT_LOSS_WEIGHTS)
        if unknown:
            raise ValueError(f"UPGenTask.loss_weights: unknown losses {sorted(unknown)}; "
                             f"the losses are {sorted(DEFAULT_LOSS_WEIGHTS)}")
        unknown = set(generation or {}) - set(DEFAULT_GENERATION)
        if unknown:
            raise ValueError(f"UPGenTask.generation: unknown options {sorted(unknown)}; "
                             f"the options are {sorted(DEFAULT_GENERATION)}")
        self.model = UPGen(**dict(network or {}))
        self.mask_min, self.mask_max = float(mask_min), float(mask_max)
        self.text_mask_ratio, self.mask_padding = float(text_mask_ratio), bool(mask_padding)
        self.paired_masking = paired_masking
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **dict(loss_weights or {})}
        self.generation = {**DEFAULT_GENERATION, **dict(generation or {})}
        self.image_tokenizer_path, self.text_vocab_path = image_tokenizer, text_vocab
        self.pad_id, self.eos_id = self.model.pad_id, self.model.eos_id
        self.compile_inference = bool(compile_inference)

    def build(self):
        self.model.build_all()

    # -- masks and losses ------------------------------------------------------------

    def _candidates(self, ids, modalities):
        """bool [B, N]: positions that may be masked (all, or all but text padding)."""
        if self.mask_padding or TEXT not in modalities:
            return None
        pad = self.model.text_offset + self.pad_id
        is_text = ops.cast(self.model.type_ids(modalities), "bool")[None]  # TYPE_IDS[TEXT] == 1
        return ops.logical_not(ops.logical_and(is_text, ops.equal(ids, pad)))

    def uniform_mask(self, ids, modalities, seed):
        """bool [B, N]: a U(mask_min, mask_max) ratio of each sequence masked (UPGen §3).

        With `paired_masking="mixed"`, a paired example's ratio applies, with probability
        1/3 each, to the whole sequence, to its image only or to its text only.
        """
        batch, length = ids.shape
        ratio = uniform_mask_ratio((batch,), seed, self.mask_min, self.mask_max)
        candidates = self._candidates(ids, modalities)
        joint = random_mask((batch, length), ratio, seed, candidates)
        if self.paired_masking == "joint" or len(modalities) == 1:
            return joint
        allowed = ops.ones((batch, length), "bool") if candidates is None else candidates
        is_text = ops.cast(self.model.type_ids(modalities), "bool")[None]  # TYPE_IDS[TEXT] == 1
        image_only = random_mask((batch, length), ratio, seed, ops.logical_and(allowed, ops.logical_not(is_text)))
        text_only = random_mask((batch, length), ratio, seed, ops.logical_and(allowed, is_text))
        which = backend.randint((batch, 1), 0, 3, seed)
        return ops.where(which == 0, joint, ops.where(which == 1, image_only, text_only))

    def fixed_mask(self, ids, modalities, seed):
        """bool [B, N]: `text_mask_ratio` of each sequence masked (unpaired text, BERT's 15%)."""
        batch, length = ids.shape
        return random_mask((batch, length), self.text_mask_ratio, seed, self._candidates(ids, modalities))

    def masked_losses(self, ids, mask, modalities, training: bool = True) -> dict:
        """Cross-entropy at masked positions, per modality (eq. 1).

        Args:
          ids: int32 [B, N] union-vocabulary ids in `modalities`' layout (the targets).
          mask: bool [B, N], True where the input is replaced by [MASK] (and scored).

        Returns:
          modality -> ((CE sum, masked count), (correct predictions, masked count)).
        """
        m = self.model
        inputs = ops.where(mask, m.mask_id, ids)
        logits = m.split(m.logits(inputs, modalities, training=training), modalities)
        targets, weights = m.split(ids, modalities), m.split(mask, modalities)
        out = {}
        for modality in modalities:
            ce = masked_cross_entropy(logits[modality], targets[modality], weights[modality])
            right = ops.equal(ops.cast(ops.argmax(logits[modality], axis=-1), "int32"), targets[modality])
            correct = ops.sum(ops.cast(ops.logical_and(right, weights[modality]), "float32"))
            out[modality] = (ce, (correct, ce[1]))
        return out

    # -- the trainer's contract ------------------------------------------------------

    def compute_losses(self, batch, step, seed):
        m = self.model
        losses = {}
        streams = (("paired", ("image_tokens", "text_ids"), "paired_", self.uniform_mask),
                   ("image_only", ("image_tokens",), "unpaired_", self.uniform_mask),
                   ("text_only", ("text_ids",), "unpaired_", self.fixed_mask))
        for stream, fields, prefix, make_mask in streams:
            data = batch.get(stream)
            if data is None:
                continue
            ids, modalities = m.sequence(*(data[f] if f in fields else None for f in ("image_tokens", "text_ids")))
            mask = make_mask(ids, modalities, seed)
            for modality, (ce, accuracy) in self.masked_losses(ids, mask, modalities).items():
                losses[prefix + modality] = Ratio(*ce)
                losses[prefix + modality + "_accuracy"] = Ratio(*accuracy)
        if not losses:
            raise ValueError(f"UPGenTask got none of the streams paired / image_only / text_only: {sorted(batch)}")
        return losses

    def component_layers(self):
        return {layer.name: layer for layer in self.model._layers if hasattr(layer, "trainable_variables")}

    # -- data (tokenizers, fingerprints: `TokenizerFiles`) ------------------------------

    def data_expectations(self):
        """What the network needs from the data (checked against manifests before step 1)."""
        return self.network_data_expectations({"eos_id": self.model.eos_id, "pad_id": self.model.pad_id})

    # -- generation and features: compiled once per option set ------------------------

    def _image_options(self, options) -> dict:
        opts = {k: self.generation[k] for k in ("num_steps", "choice_temperature", "sampling_temperature",
                                                 "guidance_scale", "schedule")}
        opts.update({k: v for k, v in options.items() if v is not None})
        return opts

    def text_to_image_tokens(self, text_ids, seed: int = 0, **options) -> np.ndarray:
        """int32 [N, L] text ids -> int32 [N, h, w] codes."""
        opts = self._image_options(options)
        fn = lambda ids, s: upgen_inference.text_to_image(self.model, ids, FixedSeed(s), **opts)  # noqa: E731
        tokens = self._run(f"t2i{sorted(opts.items())}", fn, np.asarray(text_ids, np.int32), seed_array(seed))
        return np.asarray(ops.convert_to_numpy(tokens), np.int32).reshape(-1, *self.model.grid)

    def image_tokens_to_text(self, image_tokens, seed: int = 0, **options) -> np.ndarray:
        """int32 [N, h, w] codes -> int32 [N, L] text ids (pieces, EOS, padding)."""
        opts = {"num_steps": self.generation["text_num_steps"],
                "choice_temperature": self.generation["text_choice_temperature"],
                "sampling_temperature": self.generation["text_sampling_temperature"],
                "order": self.generation["text_order"], "schedule": self.generation["schedule"]}
        opts.update({k: v for k, v in options.items() if v is not None})
        fn = lambda tokens, s: upgen_inference.image_to_text(self.model, tokens, FixedSeed(s), **opts)  # noqa: E731
        ids = self._run(f"i2t{sorted(opts.items())}", fn, np.asarray(image_tokens, np.int32), seed_array(seed))
        return np.asarray(ops.convert_to_numpy(ids), np.int32)

    def text_to_image(self, texts, seed: int = 0, **options):
        """Captions -> uint8 images [N, H, W, 3] (and the int32 [N, h, w] tokens).

        `options`: num_steps, choice_temperature, sampling_temperature, guidance_scale,
        schedule (defaults from `generation`).
        """
        image_tokenizer, text_tokenizer = self.tokenizers()
        grid = self.text_to_image_tokens(text_tokenizer.encode(list(texts), self.model.text_length), seed, **options)
        return image_tokenizer.decode(grid), grid

    def image_to_text(self, images, beam_size: int | None = None, seed: int = 0, **options):
        """uint8 images [N, H, W, 3] -> captions, by parallel decoding of the text positions.

        `options`: num_steps, choice_temperature, sampling_temperature, order (defaults
        from the `generation` entries `text_*`). UPGen has no beam search: `beam_size` must be
        None or 1 (the argument exists for `mmt.generate`).
        """
        if beam_size not in (None, 1):
            raise ValueError(f"UPGen decodes text in parallel (MaskGIT); beam_size={beam_size} is not supported")
        image_tokenizer, text_tokenizer = self.tokenizers()
        ids = self.image_tokens_to_text(image_tokenizer.encode(np.asarray(images, np.uint8)), seed, **options)
        return text_tokenizer.decode(ids)

    def unconditional_images(self, count: int, seed: int = 0, **options):
        """`count` images from nothing -> uint8 [N, H, W, 3] (and the int32 [N, h, w] tokens)."""
        image_tokenizer, _ = self.tokenizers()
        opts = self._image_options(options)
        opts.pop("guidance_scale")
        fn = lambda s: upgen_inference.unconditional_images(self.model, int(count), FixedSeed(s), **opts)  # noqa: E731
        tokens = self._run(f"uncond{count}{sorted(opts.items())}", fn, seed_array(seed))
        grid = np.asarray(ops.convert_to_numpy(tokens), np.int32).reshape(-1, *self.model.grid)
        return image_tokenizer.decode(grid), grid

    def image_features(self, images, all_layers: bool = False, batch_size: int = 64) -> np.ndarray:
        """uint8 images [N, H, W, 3] -> float32 [N, D] frozen features (mean-pooled image tokens, no text)."""
        image_tokenizer, _ = self.tokenizers()
        out = []
        for start in range(0, len(images), batch_size):
            tokens = image_tokenizer.encode(np.asarray(images[start:start + batch_size], np.uint8))
            fn = lambda t: upgen_inference.image_features(self.model, t, all_layers)  # noqa: E731
            out.append(np.asarray(ops.convert_to_numpy(self._run(f"features{all_layers}", fn, tokens)), np.float32))
        return np.concatenate(out, axis=0)


__all__ = ["DEFAULT_GENERATION", "DEFAULT_LOSS_WEIGHTS", "UPGenTask"]
