"""ITIT training: paired T2I / I2T / I2I losses and the T2I2T / I2T2I cycles (ITIT §3, App. B).

The task composes the network (`itit.py`), the samplers (`itit_inference.py`) and the
estimators (`mmt.losses.estimators`); it holds no layers of its own. Streams:
`paired` (image tokens + text ids), `text_only` (text ids), `image_only` (image tokens).

Every row of ITIT Table 2 is a setting of `t2i`, `i2t` (booleans) and `t2i2t` /
`i2t2i` (each "off", "baseline" — T2T / I2I on the unpaired data —, "half" or "full").
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from keras import ops

from mmt.backend import FixedSeed
from mmt.losses.cross_entropy import masked_cross_entropy
from mmt.losses.estimators import gumbel_softmax, straight_through_softmax
from mmt.models import itit_inference
from mmt.models.itit import ITIT
from mmt.sampling.mask_schedule import random_mask, truncated_gaussian_mask_ratio
from mmt.tasks.base import (CompiledInference, Ratio, StackPass, Task, TokenizerFiles, seed_array,
                             task_arguments)

CYCLE_MODES = ("off", "baseline", "half", "full")
#: Inference (ITIT App. B): 24 steps, guidance 2.0, choice temperature 32, beam 4.
DEFAULT_GENERATION = {"num_steps": 24, "guidance_scale": 2.0, "choice_temperature": 32.0,
                      "sampling_temperature": 1.0, "beam_size": 4}


class ITITTask(CompiledInference, TokenizerFiles, Task):
    """ITIT's losses for the trainer. Network arguments go to `ITIT` unchanged.

    Args:
      network: keyword arguments of `mmt.models.itit.ITIT` (size, vocabularies, grid, ...).
      t2i, i2t: the paired losses (I2I is trained with I2T unless `i2i=False`).
      t2i2t, i2t2i: "off", "baseline", "half" or "full" (Table 2).
      cycle_start_step: cycles (and baselines) start here (Table 5: 25K).
      synthesis_steps, synthesis_guidance: parallel-decoding steps / guidance of the
        T2I synthesis inside the T2I2T cycle.
      gumbel_temperature: of the T2I2T Gumbel-softmax (App. B: strength 1.0).
      label_smoothing: of the I2T loss (0.1), encoder_gradient_scale: of I2T (0.1).
      mask_mode, mask_std, mask_min, t2i_mask_max, i2t_mask_max: the truncated
        Gaussian of masking ratios (Table 3: 0.75, 0.25, 0.5, 1.0, 0.75).
      loss_weights: name -> weight (t2i, i2t, i2i, t2i2t, i2t2i, t2t, i2i_unpaired).
      image_tokenizer: directory of the saved image tokenizer (`ImageTokenizer.save`):
        the data must carry its fingerprint; generation decodes tokens with it.
      text_vocab: the SentencePiece model (file or directory) of the text ids.
      generation: defaults of `text_to_image` / `image_to_text` (num_steps,
        guidance_scale, choice_temperature, sampling_temperature, beam_size), merged over
        `DEFAULT_GENERATION`.
      compile_inference: run generation compiled with the backend's XLA (once per option
        set and batch shape); False runs it eagerly.
    """

    def __init__(self, network: Mapping | None = None, t2i: bool = True, i2t: bool = True, i2i: bool = True,
                 t2i2t: str = "off", i2t2i: str = "off", cycle_start_step: int = 25_000,
                 synthesis_steps: int = 8, synthesis_guidance: float = 0.0, gumbel_temperature: float = 1.0,
                 label_smoothing: float = 0.1, encoder_gradient_scale: float = 0.1, mask_mode: float = 0.75,
                 mask_std: float = 0.25, mask_min: float = 0.5, t2i_mask_max: float = 1.0,
                 i2t_mask_max: float = 0.75, loss_weights: Mapping[str, float] | None = None,
                 image_tokenizer: str | None = None, text_vocab: str | None = None,
                 generation: Mapping | None = None, compile_inference: bool = True):
        self.arguments = task_arguments(locals())
        for name, mode in (("t2i2t", t2i2t), ("i2t2i", i2t2i)):
            if mode not in CYCLE_MODES:
                raise ValueError(f"ITITTask.{name} must be one of {CYCLE_MODES}, got {mode!r}")
        if not (t2i or i2t or t2i2t != "off" or i2t2i != "off"):
            raise ValueError("ITITTask: every loss is switched off")
        self.model = ITIT(**text_conventions(dict(network or {}), text_vocab))
        if mask_min < self.model.drop_ratio:
            raise ValueError(
                f"ITITTask.mask_min = {mask_min} is below the network's drop_ratio {self.model.drop_ratio}: the "
                f"encoder drops {self.model.num_dropped} masked image tokens per example, so at least that share "
                f"must be masked; lower ITITTask.network['drop_ratio'] or raise mask_min")
        self.t2i, self.i2t, self.i2i = t2i, i2t, i2i and i2t
        self.t2i2t, self.i2t2i = t2i2t, i2t2i
        self.cycle_start_step = int(cycle_start_step)
        self.synthesis_steps, self.synthesis_guidance = int(synthesis_steps), float(synthesis_guidance)
        self.gumbel_temperature = float(gumbel_temperature)
        self.label_smoothing, self.encoder_gradient_scale = float(label_smoothing), float(encoder_gradient_scale)
        self.mask = dict(mode=mask_mode, std=mask_std, low=mask_min)
        self.t2i_mask_max, self.i2t_mask_max = t2i_mask_max, i2t_mask_max
        self.loss_weights = dict(loss_weights or {})
        self.image_tokenizer_path, self.text_vocab_path = image_tokenizer, text_vocab
        self.generation = {**DEFAULT_GENERATION, **dict(generation or {})}
        self.pad_id, self.eos_id = self.model.pad_id, self.model.eos_id
        self.compile_inference = bool(compile_inference)

    # -- data and generation (tokenizers: `TokenizerFiles`) ------------------------------

    def data_expectations(self):
        """What the network needs from the data (checked against manifests before step 1)."""
        m = self.model
        return self.network_data_expectations(
            {"eos_id": m.eos_id, "pad_id": m.pad_id, "bos_id": m.bos_id},
            text_vocab_binding=None if m.text_encoder_spec == "trainable" else "ITITTask.network['text_encoder']")

    def text_to_image_tokens(self, text_ids, seed: int = 0, **options) -> np.ndarray:
        """int32 [N, L] text ids -> int32 [N, h, w] codes (options: num_steps, guidance_scale,
        choice_temperature, sampling_temperature; defaults from `generation`)."""
        opts = {k: self.generation[k] for k in ("num_steps", "guidance_scale", "choice_temperature",
                                                 "sampling_temperature")}
        opts.update({k: v for k, v in options.items() if v is not None})

        def fn(ids, s):
            return itit_inference.generate_images(self.model, ids, FixedSeed(s), **opts)

        tokens = self._run(f"t2i{sorted(opts.items())}", fn, np.asarray(text_ids, np.int32), seed_array(seed))
        return np.asarray(ops.convert_to_numpy(tokens), np.int32).reshape(-1, *self.model.grid)

    def image_tokens_to_text(self, image_tokens, beam_size: int | None = None) -> np.ndarray:
        """int32 [N, h, w] codes -> int32 [N, L] caption ids (beam search; beam 1 is greedy)."""
        beam = int(beam_size or self.generation["beam_size"])
        if beam == 1:
            fn = lambda tokens: itit_inference.greedy_captions(self.model, tokens)  # noqa: E731
        else:
            fn = lambda tokens: itit_inference.beam_captions(self.model, tokens, beam_size=beam)  # noqa: E731
        tokens = np.asarray(image_tokens, np.int32).reshape(len(image_tokens), -1)
        return np.asarray(ops.convert_to_numpy(self._run(f"i2t{beam}", fn, tokens)), np.int32)

    def text_to_image(self, texts, seed: int = 0, **options):
        """Captions -> uint8 images [N, H, W, 3] (and the int32 [N, h, w] tokens)."""
        image_tokenizer, text_tokenizer = self.tokenizers()
        grid = self.text_to_image_tokens(text_tokenizer.encode(list(texts), self.model.text_length), seed, **options)
        return image_tokenizer.decode(grid), grid

    def image_to_text(self, images, beam_size: int | None = None):
        """uint8 images [N, H, W, 3] -> captions (beam search; beam 1 is greedy)."""
        image_tokenizer, text_tokenizer = self.tokenizers()
        return text_tokenizer.decode(self.image_tokens_to_text(image_tokenizer.encode(images), beam_size))

    def build(self):
        self.model.build_all()

    # -- masks ---------------------------------------------------------------------------

    def _mask(self, batch: int, high: float, seed):
        """bool [B, K] masking a truncated-Gaussian ratio (Table 3) of the image tokens."""
        ratio = truncated_gaussian_mask_ratio((batch,), seed, high=high, **self.mask)
        return random_mask((batch, self.model.num_image_tokens), ratio, seed)

    # -- the paired losses (§3.1) --------------------------------------------------------

    def t2i_loss(self, tokens, text_features, text_valid, seed, *, encoder_stop_gradient=False):
        """Masked image-token CE given text (eq. 2). Returns (sum, count)."""
        m = self.model
        mask = self._mask(ops.shape(tokens)[0], self.t2i_mask_max, seed)
        order = m.keep_order(mask, seed)
        z, valid = m.encode(m.embed_image(tokens, mask=mask, order=order), text_features, text_valid, training=True)
        if encoder_stop_gradient:
            z = ops.stop_gradient(z)
        return masked_cross_entropy(m.image_logits(z, valid, order, training=True), tokens, mask)

    def i2t_losses(self, text_ids, seed, *, tokens=None, soft=None, with_i2i=False):
        """I2T LM loss (eq. 1; label smoothing, 0.1 gradient into the encoder) and I2I.

        The image is `tokens` int32 [B, K] or `soft` float [B, K, V_i]; the encoder gets
        the empty caption. Returns ((sum, count) of I2T, (sum, count) of I2I or None).
        """
        m = self.model
        batch = ops.shape(text_ids)[0]
        mask = self._mask(batch, self.i2t_mask_max, seed)
        order = m.keep_order(mask, seed)
        features, valid_t = m.encode_text(m.empty_text(batch), training=True)
        z, valid = m.encode(m.embed_image(tokens, soft=soft, mask=mask, order=order), features, valid_t, training=True)
        s = self.encoder_gradient_scale  # GIT / ITIT App. B: z = 0.1 z + sg(0.9 z)
        z_text = s * z + ops.stop_gradient((1.0 - s) * z)
        logits = m.text_logits(z_text, valid, m.text_decoder_inputs(text_ids), training=True)
        i2t = masked_cross_entropy(logits, text_ids, ops.not_equal(text_ids, self.pad_id), self.label_smoothing)
        i2i = None
        if with_i2i:  # App. B: I2I with the empty caption, so that guidance works
            target = tokens if tokens is not None else ops.argmax(soft, axis=-1)
            i2i = masked_cross_entropy(m.image_logits(z, valid, order, training=True), target, mask)
        return i2t, i2i

    def t2t_loss(self, text_ids, seed):
        """Table 2's T2T baseline: the text decoder on unpaired text, the image fully masked."""
        batch = ops.shape(text_ids)[0]
        m = self.model
        blank = ops.zeros((batch, m.num_image_tokens), "int32")  # every position is masked
        mask = ops.ones((batch, m.num_image_tokens), "bool")
        order = m.keep_order(mask, seed)
        features, valid_t = m.encode_text(m.empty_text(batch), training=True)
        z, valid = m.encode(m.embed_image(blank, mask=mask, order=order), features, valid_t, training=True)
        logits = m.text_logits(z, valid, m.text_decoder_inputs(text_ids), training=True)
        return masked_cross_entropy(logits, text_ids, ops.not_equal(text_ids, self.pad_id), self.label_smoothing)

    # -- the cycles (§3.2) -----------------------------------------------------------------

    def t2i2t_loss(self, text_ids, seed):
        """Text -> synthesized image I' -> reconstructed Ĩ (one T2I pass) -> text (eq. 3)."""
        m = self.model
        features, valid_t = m.encode_text(text_ids, training=True)
        synthesized = ops.stop_gradient(itit_inference.generate_images(
            m, text_ids, seed, num_steps=self.synthesis_steps, guidance_scale=self.synthesis_guidance))
        mask = self._mask(ops.shape(text_ids)[0], self.t2i_mask_max, seed)
        order = m.keep_order(mask, seed)
        z, valid = m.encode(m.embed_image(synthesized, mask=mask, order=order), features, valid_t, training=True)
        z = ops.stop_gradient(z)  # App. B: no gradient into the encoder's first pass
        logits = m.image_logits(z, valid, order, training=True)
        if self.t2i2t == "full":  # App. B: Gumbel-softmax, strength 1.0
            predicted = gumbel_softmax(logits, self.gumbel_temperature, seed, hard=True)
        else:  # half: the gradient stops at the argmax
            predicted = ops.stop_gradient(ops.one_hot(ops.argmax(logits, axis=-1), m.image_vocab_size))
        known = ops.one_hot(synthesized, m.image_vocab_size, dtype=predicted.dtype)
        reconstructed = ops.where(mask[..., None], predicted, known)
        (i2t, _) = self.i2t_losses(text_ids, seed, soft=reconstructed)
        return i2t

    def i2t2i_loss(self, tokens, seed):
        """Image -> synthesized caption T' -> re-predicted T̃ (one I2T pass) -> image (eq. 4)."""
        m = self.model
        batch = ops.shape(tokens)[0]
        caption = ops.stop_gradient(itit_inference.greedy_captions(m, tokens))
        caption_valid = ops.not_equal(caption, self.pad_id)
        mask = self._mask(batch, self.i2t_mask_max, seed)
        order = m.keep_order(mask, seed)
        features, valid_t = m.encode_text(m.empty_text(batch), training=True)
        z, valid = m.encode(m.embed_image(tokens, mask=mask, order=order), features, valid_t, training=True)
        z = ops.stop_gradient(z)  # App. B: no gradient into the encoder's first pass
        logits = m.text_logits(z, valid, m.text_decoder_inputs(caption), training=True)
        if self.i2t2i == "full":  # App. B: straight-through softmax
            predicted = straight_through_softmax(logits)
        else:
            predicted = ops.stop_gradient(ops.one_hot(ops.argmax(logits, axis=-1), m.text_vocab_size))
        padding = ops.one_hot(ops.full(ops.shape(caption), self.pad_id, "int32"), m.text_vocab_size,
                              dtype=predicted.dtype)
        predicted = ops.where(caption_valid[..., None], predicted, padding)
        text_features, text_valid = m.encode_soft_text(predicted, caption_valid, training=True)
        return self.t2i_loss(tokens, text_features, text_valid, seed)

    # -- the trainer's contract --------------------------------------------------------------

    def compute_losses(self, batch, step, seed):
        m = self.model
        losses = {}
        paired = batch.get("paired")
        if paired is not None and (self.t2i or self.i2t):
            tokens = _flat(paired["image_tokens"])
            ids = paired["text_ids"]
            # Table 3: separate T2I and I2T/I2I batches -- the two halves of the paired batch.
            half = ops.shape(ids)[0] // 2 if (self.t2i and self.i2t) else 0
            if self.t2i:
                t_tokens, t_ids = (tokens[:half], ids[:half]) if half else (tokens, ids)
                features, valid = m.encode_text(t_ids, training=True)
                losses["t2i"] = Ratio(*self.t2i_loss(t_tokens, features, valid, seed))
            if self.i2t:
                i_tokens, i_ids = (tokens[half:], ids[half:]) if half else (tokens, ids)
                i2t, i2i = self.i2t_losses(i_ids, seed, tokens=i_tokens, with_i2i=self.i2i)
                losses["i2t"] = Ratio(*i2t)
                if i2i is not None:
                    losses["i2i"] = Ratio(*i2i)
        if self.trace_phase is None:  # called outside the trainer: decide on the step tensor
            started = ops.cast(ops.greater_equal(step, self.cycle_start_step), "float32")
        else:  # the trainer compiles one step per phase (`phase_boundaries`)
            started = float(self.trace_phase >= 1 or not self.cycle_start_step)
        text_only, image_only = batch.get("text_only"), batch.get("image_only")
        if text_only is not None and self.t2i2t != "off":
            ids = text_only["text_ids"]
            fn = self.t2t_loss if self.t2i2t == "baseline" else self.t2i2t_loss
            name = "t2t" if self.t2i2t == "baseline" else "t2i2t"
            losses[name] = self._after_warmup(started, lambda: fn(ids, seed))
        if image_only is not None and self.i2t2i != "off":
            tokens = _flat(image_only["image_tokens"])
            if self.i2t2i == "baseline":
                losses["i2i_unpaired"] = self._after_warmup(
                    started, lambda: self.i2t_losses(m.empty_text(ops.shape(tokens)[0]), seed, tokens=tokens,
                                                     with_i2i=True)[1])
            else:
                losses["i2t2i"] = self._after_warmup(started, lambda: self.i2t2i_loss(tokens, seed))
        return losses

    def phase_boundaries(self):
        """Two phases when a cycle is on: before and after the cycles' warm-up (Table 5)."""
        cycles = self.t2i2t != "off" or self.i2t2i != "off"
        return (self.cycle_start_step,) if cycles and self.cycle_start_step > 0 else ()

    @staticmethod
    def _after_warmup(started, fn):
        """The cycle's (sum, count), computed only once the warm-up is over (Table 5).

        `started` is a Python float inside the trainer (one compiled step per phase) or
        a float tensor (a `cond`) when the losses are called directly.
        """
        if isinstance(started, float):
            if started:
                return Ratio(*fn())
            return Ratio(ops.zeros(()), ops.ones(()))  # 0/1: no gradient, a finite summary
        numerator, denominator = ops.cond(started > 0, fn, lambda: (ops.zeros(()), ops.zeros(())))
        # Before the warm-up ends the loss is 0/1: no gradient, a finite summary.
        return Ratio(numerator, denominator + (1.0 - started))

    def activation_passes(self, batch_sizes):
        """The stacks a step runs with gradients, at per-replica `batch_sizes` (see `mmt.training.memory`)."""
        m, c = self.model, self.model.cfg
        k, kept, length = m.num_image_tokens, m.num_image_tokens - m.num_dropped, m.text_length
        empty = m.empty_text_length  # the I2T / I2I passes see the empty caption only

        def encoder(name, b, text=length):
            return StackPass(f"{name} encoder", b, kept + text, c.encoder_width, c.encoder_depth, c.encoder_heads)

        def image_decoder(name, b, text=length):
            return StackPass(f"{name} image decoder", b, k + text, c.decoder_width, c.image_decoder_depth,
                             c.decoder_heads)

        def text_decoder(name, b):
            return StackPass(f"{name} text decoder", b, kept + empty + length, c.decoder_width, c.text_decoder_depth,
                             c.decoder_heads)

        def text_encoder(name, b):
            e = m.text_encoder
            if hasattr(e, "config_values"):  # T5: only where a gradient flows through it (soft text)
                t = e.config_values
                return [StackPass(f"{name} T5 encoder", b, length, t["hidden_dim"], t["num_layers"], t["num_heads"])]
            if getattr(e, "depth", 0):
                return [StackPass(f"{name} text encoder", b, length, e.width, e.depth, e.num_heads)]
            return []

        passes = []
        paired = batch_sizes.get("paired", 0)
        half = paired // 2 if (self.t2i and self.i2t) else paired
        if paired and self.t2i:
            trainable_text = [] if hasattr(m.text_encoder, "config_values") else text_encoder("T2I", half)
            passes += trainable_text + [encoder("T2I", half), image_decoder("T2I", half)]
        if paired and self.i2t:
            passes += [encoder("I2T", half, empty), text_decoder("I2T", half)]
            passes += [image_decoder("I2I", half, empty)] if self.i2i else []
        unpaired_text, unpaired_images = batch_sizes.get("text_only", 0), batch_sizes.get("image_only", 0)
        if unpaired_text and self.t2i2t in ("half", "full"):  # the first encoder pass is under stop_gradient
            passes += [image_decoder("T2I2T", unpaired_text), encoder("T2I2T I2T", unpaired_text, empty),
                       text_decoder("T2I2T I2T", unpaired_text)]
        if unpaired_images and self.i2t2i in ("half", "full"):
            passes += [text_decoder("I2T2I", unpaired_images), *text_encoder("I2T2I soft text", unpaired_images),
                       encoder("I2T2I T2I", unpaired_images), image_decoder("I2T2I T2I", unpaired_images)]
        return passes

    def frozen_parts(self):
        """The T5 text encoder when a preset is used: out of checkpoints and exports."""
        from mmt.models.text_encoders import T5TextEncoder

        encoder = self.model.text_encoder
        return {"text_encoder": encoder} if isinstance(encoder, T5TextEncoder) else {}

    def component_layers(self):
        return {layer.name: layer for layer in self.model._layers if hasattr(layer, "trainable_variables")}


#: T5's conventions (its SentencePiece model has no BOS): the decoder starts from pad.
T5_TEXT_IDS = {"pad_id": 0, "eos_id": 1, "bos_id": 0}


def text_conventions(network: dict, text_vocab: str | None) -> dict:
    """`network` with BOS / EOS / PAD taken from the text vocabulary in use.

    The vocabulary is `text_vocab`, else the T5 preset's own SentencePiece model; a T5
    preset without one follows T5's conventions. An id bound in `network` that differs
    from the vocabulary's is an error naming both: the decoder would start from, stop at
    or mask out an ordinary piece. Without any vocabulary (tests, toy runs) the network's
    own values stand.
    """
    from mmt.tokenizers.loading import load_text_vocab

    encoder = network.get("text_encoder", "trainable")
    source, ids = text_vocab, None
    if not source and encoder != "trainable":
        source = encoder
    if source:
        try:
            vocab = load_text_vocab(source)
        except FileNotFoundError:
            if source == text_vocab:
                raise
            source, ids = f"T5's conventions (no SentencePiece model in the preset {encoder})", dict(T5_TEXT_IDS)
        else:
            ids = {"pad_id": vocab.pad_id, "eos_id": vocab.eos_id, "bos_id": vocab.bos_id}
    if ids is None:
        return network
    for key, value in ids.items():
        if key in network and int(network[key]) != value:
            raise ValueError(f"ITITTask.network['{key}'] = {network[key]}, but the text vocabulary {source} has "
                             f"{key} = {value}; remove the binding (the vocabulary's ids are used) or use the "
                             "vocabulary the data was made with")
    return {**network, **ids}


def _flat(tokens):
    """int [B, h, w] (pipeline) or [B, K] -> int32 [B, K]."""
    shape = ops.shape(tokens)
    return ops.reshape(ops.cast(tokens, "int32"), (shape[0], -1))


__all__ = ["CYCLE_MODES", "DEFAULT_GENERATION", "ITITTask"]
