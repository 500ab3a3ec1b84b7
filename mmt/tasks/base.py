"""The contract between a model and the one trainer (DESIGN.md §5, STYLE.md: orbit tasks).

A task is a single-replica view of training: it owns the Keras model and says how to
compute named losses from one replica's batch. The trainer owns everything else --
strategy, optimizers, schedules, gradient clipping, mixed precision, checkpoints,
summaries -- so no model grows a training loop of its own.

This module is backend-neutral (no TensorFlow import): model code builds tasks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
from keras import ops

from mmt.backend import StepSeed, compile_function  # noqa: F401  (StepSeed re-exported: the seed tasks receive)


class Ratio(NamedTuple):
    """A loss whose normaliser is summed over all replicas before dividing.

    A masked-token loss is `sum(ce * mask) / sum(mask)`; per replica the mask counts
    differ, so dividing on each replica and averaging would weight replicas unequally
    and make the update depend on the replica count. Return
    `Ratio(sum(ce * mask), sum(mask))` and the trainer divides by the global sum.
    """

    numerator: Any  # float scalar
    denominator: Any  # float scalar, > 0 summed over replicas


@dataclasses.dataclass(frozen=True)
class OptimizerGroup:
    """One optimizer over a disjoint set of variables (a GAN has two).

    Attributes:
      name: the group's name: selects its optimizer and schedule in gin, names its
        summaries (`grad_norm/<name>`), and its slots in checkpoints.
      losses: names of the losses whose weighted sum this group minimises; empty means
        every loss.
      variable_prefixes: a trainable variable belongs to the group when its path
        (`variable.path`) starts with one of these; empty means every trainable
        variable not claimed by another group.
    """

    name: str
    losses: tuple[str, ...] = ()
    variable_prefixes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DataExpectations:
    """What a task's model needs from its data; None skips a check.

    Attributes:
      image_vocab_size: image token ids must lie in [0, image_vocab_size).
      grid: (h, w) of the image token grid.
      text_vocab_size: text ids (data and special ids) must lie in [0, text_vocab_size).
      text_length: the model's text length (every text stream must pad to it).
      special_text_ids: name -> id of the special text ids the model uses (eos, pad, bos).
      image_tokenizer_fingerprint, text_vocab_fingerprint: of the configured tokenizers.
      bindings: attribute name above -> the gin binding that sets it, for messages
        (e.g. "ITITTask.network['image_vocab_size']"; a macro behind it is found by
        `mmt.errors.describe_binding` when a message names it).
    """

    image_vocab_size: int | None = None
    grid: tuple[int, int] | None = None
    text_vocab_size: int | None = None
    text_length: int | None = None
    special_text_ids: Mapping[str, int] = dataclasses.field(default_factory=dict)
    image_tokenizer_fingerprint: str | None = None
    text_vocab_fingerprint: str | None = None
    bindings: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StackPass:
    """One transformer stack run with gradients during a step (`Task.activation_passes`; `mmt.training.memory` sizes it)."""

    name: str
    batch: int
    tokens: int
    width: int
    depth: int
    heads: int


class CompiledInference:
    """Inference hooks run compiled with the backend's XLA (CLIP, DALL-E, ITIT, UPGen).

    The task sets `compile_inference` from its argument of that name: False runs the
    hooks eagerly (no compile time: quicker for a handful of samples from a tiny model).
    """

    compile_inference: bool = True

    def _run(self, name: str, fn, *args):
        """`fn(*args)` on arrays, compiled once per `name` (options included) and argument
        shapes: samplers need static shapes, which a relaxed retrace would lose."""
        args = tuple(np.asarray(a) for a in args)
        if not self.compile_inference:
            return fn(*(ops.convert_to_tensor(a) for a in args))
        compiled = self.__dict__.setdefault("_compiled", {})
        key = (name, *(a.shape for a in args))
        if key not in compiled:
            compiled[key] = compile_function(fn)
        return compiled[key](*args)


def seed_array(seed: int):
    """The int32 `[2]` array a compiled sampler takes for the integer `seed` (`FixedSeed`)."""
    return np.array([int(seed), 0], np.int32)


class TokenizerFiles:
    """A task whose data was made with a saved image tokenizer and a text vocabulary (ITIT, UPGen).

    The task sets `image_tokenizer_path` / `text_vocab_path` from its `image_tokenizer` /
    `text_vocab` arguments (None skips a check). The data must carry their fingerprints;
    generation loads them once, through `mmt.tokenizers.loading` like every other user.
    The messages name the gin bindings `<TaskClass>.<argument>`.
    """

    image_tokenizer_path: str | None = None
    text_vocab_path: str | None = None
    _tokenizers: tuple[Any, Any] | None = None

    @property
    def image_tokenizer_fingerprint(self) -> str | None:
        from mmt.tokenizers.loading import image_tokenizer_fingerprint

        return image_tokenizer_fingerprint(self.image_tokenizer_path)

    @property
    def text_vocab_fingerprint(self) -> str | None:
        from mmt.tokenizers.loading import text_vocab_fingerprint

        return text_vocab_fingerprint(self.text_vocab_path)

    def tokenizers(self) -> tuple[Any, Any]:
        """(image tokenizer, text tokenizer), loaded once; needs both paths."""
        if self._tokenizers is None:
            from mmt.tokenizers.loading import load_image_tokenizer, load_text_vocab

            if not (self.image_tokenizer_path and self.text_vocab_path):
                name = type(self).__name__
                raise ValueError(f"{name}.image_tokenizer and {name}.text_vocab must be set to generate")
            self._tokenizers = (load_image_tokenizer(self.image_tokenizer_path),
                                load_text_vocab(self.text_vocab_path))
        return self._tokenizers

    def network_data_expectations(self, special_text_ids: Mapping[str, int],
                                  text_vocab_binding: str | None = None) -> DataExpectations:
        """What the network `self.model` needs from the data (checked against manifests before step 1).

        `special_text_ids`: the ids the network uses; `text_vocab_binding`: what sets its
        text vocabulary size when not `<TaskClass>.network['text_vocab_size']`.
        """
        m, network = self.model, f"{type(self).__name__}.network"
        return DataExpectations(
            image_vocab_size=m.image_vocab_size, grid=m.grid, text_vocab_size=m.text_vocab_size,
            text_length=m.text_length, special_text_ids=dict(special_text_ids),
            image_tokenizer_fingerprint=self.image_tokenizer_fingerprint,
            text_vocab_fingerprint=self.text_vocab_fingerprint,
            bindings={"image_vocab_size": f"{network}['image_vocab_size']", "grid": f"{network}['grid']",
                      "text_vocab_size": text_vocab_binding or f"{network}['text_vocab_size']",
                      "text_length": f"{network}['text_length']",
                      "image_tokenizer_fingerprint": f"{type(self).__name__}.image_tokenizer",
                      "text_vocab_fingerprint": f"{type(self).__name__}.text_vocab"})


def task_arguments(local_variables: Mapping[str, Any]) -> dict[str, Any]:
    """A task's constructor arguments from `locals()` taken first thing in its `__init__`."""
    return {k: v for k, v in local_variables.items() if k not in ("self", "__class__")}


class Task:
    """Base class of everything the trainer trains. Subclasses set `model` in `__init__`.

    Required:
      model: a `keras.Model` (or Layer) holding every variable.
      build(): creates all variables without reading data (so `--dry_run` and
        checkpoint restoring work before the first batch).
      compute_losses(batch, step, seed): see below.

    Optional hooks have working defaults.
    """

    model: Any = None
    #: loss name -> weight in the total; a loss missing here has weight 1.0. Weight 0
    #: keeps a loss in the summaries without training on it.
    loss_weights: Mapping[str, float] = {}

    def build(self) -> None:
        """Creates the model's variables (e.g. by calling it on zeros of the right shape)."""
        raise TypeError(f"{type(self).__name__} must implement build()")

    def compute_losses(self, batch: Mapping[str, Any], step: Any, seed: Any) -> Mapping[str, Any]:
        """One replica's losses.

        Args:
          batch: this replica's batch, `{stream: {field: tensor}}` as produced by
            `mmt.data.pipeline` (string fields removed).
          step: int64 scalar, the global step being computed (0-based).
          seed: a `StepSeed` unique to (run seed, step, replica): pass it as the
            `seed` of `keras.random` calls; each draw gets fresh numbers.

        Returns:
          name -> float32 scalar (the mean over this replica's batch) or `Ratio`.
        """
        raise TypeError(f"{type(self).__name__} must implement compute_losses()")

    #: Set by the trainer while it traces a step: the index of the phase (see
    #: `phase_boundaries`) the step belongs to, a Python int; None outside the trainer.
    trace_phase: int | None = None

    def phase_boundaries(self) -> Sequence[int]:
        """Steps at which the loss graph changes (e.g. ITIT's cycle warm-up end), sorted.

        The trainer compiles one step function per phase and calls the one for the
        current step, so `compute_losses` can branch in Python on `self.trace_phase`
        instead of a `cond` on the step tensor: before the boundary nothing of the later
        phase is computed, and XLA never sees a step-dependent conditional (which made it
        recompile the ITIT step at every step). Default: one phase.
        """
        return ()

    def optimizer_groups(self) -> Sequence[OptimizerGroup]:
        """The optimizer groups; by default one group, `model`, over everything."""
        return (OptimizerGroup("model"),)

    def image_summaries(self, batch: Mapping[str, Any], step: int) -> Mapping[str, Any]:
        """name -> uint8 [N, H, W, 3] images for TensorBoard (runs eagerly, outside the step)."""
        return {}

    def histogram_summaries(self, batch: Mapping[str, Any], step: int) -> Mapping[str, Any]:
        """name -> 1-D array for TensorBoard histograms (e.g. code usage); same cadence as images."""
        return {}

    #: The constructor's arguments (`task_arguments(locals())` first thing in `__init__`):
    #: what an export records to rebuild the task without gin or a `Trainer`.
    arguments: Mapping[str, Any] | None = None

    def export(self, directory: str, step: int | None = None) -> None:
        """Writes the trained artefact when the run completes.

        Default: the model's weights and the task's arguments (`mmt.tasks.exports`), which
        `mmt.generate` / `mmt.evaluate` load under any Keras backend. Tokenizer tasks
        write the tokenizer instead (`ImageTokenizer.save`). With
        `Trainer.iterate_averaging` the trainer calls this (and `evaluate`,
        `image_summaries`, `histogram_summaries`) while the model holds the averaged
        weights, so a task needs no code of its own for it.
        """
        from mmt.tasks import exports

        exports.save_task(self, directory, step)

    def evaluate(self, step: int) -> Mapping[str, float]:
        """Periodic evaluation: name -> scalar, written to the summaries."""
        return {}

    def frozen_parts(self) -> Mapping[str, Any]:
        """Parts loaded from outside files and never trained: name -> layer.

        A frozen part has `source` (the file or directory it was loaded from) and
        `fingerprint` (of what was loaded). Checkpoints and exports leave its weights
        out and record its source and fingerprint instead (a frozen T5-XXL encoder is
        19 GB per checkpoint otherwise); resuming refuses a part whose fingerprint
        changed. Default: none.
        """
        return {}

    def component_layers(self) -> Mapping[str, Any]:
        """Top-level components for the parameter breakdown of `--dry_run`."""
        layers = getattr(self.model, "_layers", None) or getattr(self.model, "layers", [])
        return {layer.name: layer for layer in layers}


def parameter_breakdown(components: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(name, trainable, non-trainable) parameter counts per component."""
    rows = []
    for name, layer in components.items():
        trainable = sum(int(_size(v)) for v in layer.trainable_variables)
        frozen = sum(int(_size(v)) for v in layer.non_trainable_variables)
        rows.append((name, trainable, frozen))
    return rows


def _size(variable) -> int:
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size
