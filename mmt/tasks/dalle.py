"""DALL-E stage-two training: the transformer's text and image cross-entropies (DALL-E §2.2).

One stream, `paired` (`text_ids`, `image_tokens`): every caption slot and image is one
`[L + N]` sequence (`mmt/models/dalle.py`). §2.2: "We normalize the cross-entropy
losses for the text and image tokens by the total number of each kind in a batch of
data ... we multiply the cross-entropy loss for the text by 1/8 and the cross-entropy
loss for the image by 7/8." Each loss is a `Ratio` (summed CE, token count), so the
trainer divides by the count over the *global* batch, whatever the replica count;
text tokens are the caption's non-padding targets (pieces and EOS, positions 1 .. L-1),
image tokens all `N` codes. Next-token accuracies (`*_accuracy`, weight 0) go to the
summaries only.

BPE dropout (§2.2 footnote 5, 10%) acts in tf.data on the records' `text/caption`
(`StreamSpec.bpe_dropout`, `mmt.data`), so nothing here changes with it.

Hooks for generation and evaluation: `text_to_image(captions, seed=, **options)`
(what `mmt.generate --prompt` and `mmt.evaluation.shapes_accuracy` call),
`text_to_image_tokens(text_ids, seed=, **options)`, `sample_images(captions,
num_samples, seed=, **options)` (several samples per caption, for reranking, §2.6) and
`unconditional_images(count, seed=, **options)` (from an all-pad caption).
Options: temperature, top_k, top_p, use_cache (defaults from `generation`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from keras import ops

from mmt.backend import FixedSeed
from mmt.losses.cross_entropy import masked_cross_entropy
from mmt.models.dalle import DALLE, sample_image_tokens
from mmt.models.variants import dalle_size
from mmt.tasks.base import CompiledInference, Ratio, StackPass, Task, TokenizerFiles, seed_array, task_arguments

#: §2.2: text 1/8, image 7/8; accuracies are summaries only.
DEFAULT_LOSS_WEIGHTS = {"text": 1.0 / 8.0, "image": 7.0 / 8.0, "text_accuracy": 0.0, "image_accuracy": 0.0}
#: §2.6 samples at temperature 1 without truncation.
DEFAULT_GENERATION = {"temperature": 1.0, "top_k": None, "top_p": None, "use_cache": True}
#: Above this many parameters `--dry_run` counts the network from its shapes instead of
#: building it (the 12B model's float32 weights alone are 49 GB).
MATERIALIZE_LIMIT = 2_000_000_000


class DALLETask(CompiledInference, TokenizerFiles, Task):
    """DALL-E's weighted next-token losses for the trainer. Network arguments go to `DALLE` unchanged.

    Args:
      network: keyword arguments of `mmt.models.dalle.DALLE` (size, vocabularies, grid, ...).
      loss_weights: name -> weight, merged over `DEFAULT_LOSS_WEIGHTS`.
      eos_id: the text vocabulary's EOS id (checked against the data's manifest).
      image_tokenizer: directory of the saved image tokenizer (the dVAE's export): the
        data must carry its fingerprint; generation decodes with it.
      text_vocab: the SentencePiece model (file or directory) of the text ids.
      generation: defaults of the sampling hooks, merged over `DEFAULT_GENERATION`.
      compile_inference: run sampling compiled with the backend's XLA (once per option
        set and batch shape); False runs it eagerly.
      rerank_samples: candidates per prompt when generation is reranked by a CLIP
        (`mmt.generate --rerank_with`, §2.6; the paper draws 512).
    """

    def __init__(self, network: Mapping | None = None, loss_weights: Mapping[str, float] | None = None,
                 eos_id: int = 1, image_tokenizer: str | None = None, text_vocab: str | None = None,
                 generation: Mapping | None = None, compile_inference: bool = True, rerank_samples: int = 16):
        self.arguments = task_arguments(locals())
        unknown = set(loss_weights or {}) - set(DEFAULT_LOSS_WEIGHTS)
        if unknown:
            raise ValueError(f"DALLETask.loss_weights: unknown losses {sorted(unknown)}; "
                             f"the losses are {sorted(DEFAULT_LOSS_WEIGHTS)}")
        unknown = set(generation or {}) - set(DEFAULT_GENERATION)
        if unknown:
            raise ValueError(f"DALLETask.generation: unknown options {sorted(unknown)}; "
                             f"the options are {sorted(DEFAULT_GENERATION)}")
        network = dict(network or {})
        self.network = network
        self.shape_only = _dry_run() and _parameter_estimate(network) > MATERIALIZE_LIMIT
        # A shape-only dry run trains nothing: a one-block, 8-wide stand-in keeps the
        # trainer's plumbing working, `component_layers` reports the real shapes.
        stand_in = {"size_overrides": {**network.get("size_overrides", {}), "width": 8, "depth": 1, "heads": 1}}
        self.model = DALLE(**{**network, **stand_in}) if self.shape_only else DALLE(**network)
        if self.shape_only:
            import warnings

            warnings.warn(f"DALLETask: --dry_run counts the network's {_parameter_estimate(network):,} parameters "
                          "from their shapes without building them; the memory report's parameter, gradient and "
                          "optimizer-slot rows cover an 8-wide one-block stand-in (its activation row is the "
                          "network's)", stacklevel=2)
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **dict(loss_weights or {})}
        self.generation = {**DEFAULT_GENERATION, **dict(generation or {})}
        self.eos_id = int(eos_id)
        self.image_tokenizer_path, self.text_vocab_path = image_tokenizer, text_vocab
        self.compile_inference = bool(compile_inference)
        if int(rerank_samples) < 1:
            raise ValueError(f"DALLETask.rerank_samples must be >= 1, got {rerank_samples}")
        self.rerank_samples = int(rerank_samples)

    def build(self):
        self.model.build_all()

    # -- losses ----------------------------------------------------------------------

    def losses(self, text_ids, image_tokens, training: bool = True) -> dict:
        """name -> `Ratio`: text / image CE sums over their token counts, and accuracies.

        Args:
          text_ids: int `[B, L]` caption slots (pieces, EOS, pad).
          image_tokens: int `[B, N]` or `[B, h, w]` codes.
        """
        m = self.model
        tokens = m.sequence(text_ids, image_tokens)
        text_logits, image_logits = m.logits(tokens, training=training)
        text_targets = tokens[:, 1:m.text_length]
        image_targets = tokens[:, m.text_length:]
        text_weight = ops.not_equal(text_targets, m.pad_id)  # §2.2: only real text tokens count
        image_weight = ops.ones_like(image_targets, "bool")
        out = {}
        for name, logits, targets, weight in (("text", text_logits, text_targets, text_weight),
                                              ("image", image_logits, image_targets, image_weight)):
            ce, count = masked_cross_entropy(logits, targets, weight)
            right = ops.equal(ops.cast(ops.argmax(logits, axis=-1), "int32"), targets)
            correct = ops.sum(ops.cast(ops.logical_and(right, weight), "float32"))
            out[name] = Ratio(ce, count)
            out[name + "_accuracy"] = Ratio(correct, count)
        return out

    def compute_losses(self, batch, step, seed):
        data = batch.get("paired")
        if data is None:
            raise ValueError(f"DALLETask trains on a 'paired' stream (text_ids, image_tokens); got {sorted(batch)}")
        return self.losses(data["text_ids"], data["image_tokens"])

    def component_layers(self):
        if self.shape_only:
            return _shape_components(self.network)
        return {layer.name: layer for layer in self.model._layers if hasattr(layer, "trainable_variables")}

    def activation_passes(self, batch_sizes):
        """The one stack a step runs with gradients (see `mmt.training.memory`)."""
        m = self.model
        cfg = dalle_size(self.network.get("size", "tiny"), **self.network.get("size_overrides", {}))
        return [StackPass("transformer", batch_sizes.get("paired", 1), m.sequence_length, cfg.width, cfg.depth,
                          cfg.heads)]

    # -- data -------------------------------------------------------------------------

    def data_expectations(self):
        return self.network_data_expectations({"pad_id": self.model.pad_id, "eos_id": self.eos_id})

    # -- sampling hooks -----------------------------------------------------------------

    def _options(self, options) -> dict:
        unknown = set(options) - set(DEFAULT_GENERATION)
        if unknown:
            from mmt.errors import UserError

            raise UserError(f"DALL-E samples images left to right: its options are {sorted(DEFAULT_GENERATION)} "
                            f"(--temperature, --top_k, --top_p), not {sorted(unknown)}")
        return {**self.generation, **{k: v for k, v in options.items() if v is not None}}

    def text_to_image_tokens(self, text_ids, seed: int = 0, **options) -> np.ndarray:
        """int32 `[N, L]` caption slots -> int32 `[N, h, w]` sampled codes.

        `options`: temperature, top_k, top_p, use_cache (defaults from `generation`).
        """
        opts = self._options(options)
        text_ids = np.asarray(text_ids, np.int32)

        def fn(ids, s):
            return sample_image_tokens(self.model, ids, FixedSeed(s), **opts)

        tokens = self._run(f"t2i{sorted(opts.items())}", fn, text_ids, seed_array(seed))
        return np.asarray(ops.convert_to_numpy(tokens), np.int32)

    def encode_captions(self, texts) -> np.ndarray:
        """Captions -> int32 `[N, L]` caption slots with the configured vocabulary."""
        _, text_tokenizer = self.tokenizers()
        return np.asarray(text_tokenizer.encode(list(texts), self.model.text_length), np.int32)

    def text_to_image(self, texts, seed: int = 0, **options):
        """Captions -> (uint8 images `[N, H, W, 3]` decoded by the dVAE, int32 codes `[N, h, w]`)."""
        image_tokenizer, _ = self.tokenizers()
        grid = self.text_to_image_tokens(self.encode_captions(texts), seed, **options)
        return image_tokenizer.decode(grid), grid

    def unconditional_images(self, count: int, seed: int = 0, **options):
        """`count` images from an empty caption (every slot its learned pad, §2.2) ->
        (uint8 `[count, H, W, 3]`, int32 codes `[count, h, w]`)."""
        image_tokenizer, _ = self.tokenizers()
        empty = np.full((int(count), self.model.text_length), self.model.pad_id, np.int32)
        grid = self.text_to_image_tokens(empty, seed, **options)
        return image_tokenizer.decode(grid), grid

    def sample_images(self, texts, num_samples: int, seed: int = 0, **options):
        """`num_samples` images per caption (the candidates contrastive reranking ranks, §2.6).

        Returns:
          (uint8 `[P, S, H, W, 3]`, int32 codes `[P, S, h, w]`) for P captions and
          S = `num_samples`; the samples of one caption are independent draws.
        """
        image_tokenizer, _ = self.tokenizers()
        ids = self.encode_captions(texts)
        prompts = len(ids)
        grid = self.text_to_image_tokens(np.repeat(ids, int(num_samples), axis=0), seed, **options)
        images = image_tokenizer.decode(grid)
        return (images.reshape(prompts, int(num_samples), *images.shape[1:]),
                grid.reshape(prompts, int(num_samples), *grid.shape[1:]))


# -- shape-only dry runs ---------------------------------------------------------------------


def _dry_run() -> bool:
    """Inside the trainer's `--dry_run` build (`shape_only_frozen_encoders`)."""
    from mmt.models import text_encoders

    return bool(text_encoders._SHAPE_ONLY.get())  # pylint: disable=protected-access


def _shape_list(network: Mapping) -> dict[str, list[tuple[int, ...]]]:
    """component -> the shapes of its trainable variables, as `DALLE` creates them."""
    defaults = DALLE.__init__.__defaults__
    names = DALLE.__init__.__code__.co_varnames[1:1 + len(defaults)]
    args = {**dict(zip(names, defaults)), **dict(network)}
    cfg = dalle_size(args["size"], **dict(args.get("size_overrides") or {}))
    d, vt, vi, length = cfg.width, int(args["text_vocab_size"]), int(args["image_vocab_size"]), int(args["text_length"])
    h, w = (int(g) for g in args["grid"])
    mlp = cfg.mlp_ratio * d
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, mlp), (mlp,), (mlp, d), (d,)]
    return {"text_embedding": [(vt, d)], "text_position": [(length, d)], "pad_embedding": [(length, d)],
            "image_embedding": [(vi, d)], "row_embedding": [(h, d)], "column_embedding": [(w, d)],
            "transformer": block * cfg.depth + [(d,), (d,)], "text_head": [(d, vt), (vt,)],
            "image_head": [(d, vi), (vi,)]}


def _parameter_estimate(network: Mapping) -> int:
    return sum(int(np.prod(s)) for shapes in _shape_list(network).values() for s in shapes)


class _ShapeOnly:
    """A component of a network that is not built: its variables' shapes only."""

    class _Variable:
        def __init__(self, shape):
            self.shape, self.dtype = shape, "float32"

    def __init__(self, shapes):
        self.trainable_variables = [self._Variable(s) for s in shapes]
        self.non_trainable_variables = []


def _shape_components(network: Mapping) -> dict:
    return {name: _ShapeOnly(shapes) for name, shapes in _shape_list(network).items()}


__all__ = ["DEFAULT_GENERATION", "DEFAULT_LOSS_WEIGHTS", "DALLETask"]
