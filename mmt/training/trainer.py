"""The one trainer every mmt model trains with (DESIGN.md §5).

A `Task` (see `task.py`) gives one replica's named losses; the `Trainer` owns the rest:

* strategy (from `mmt.training.distribute`) and the XLA decision per strategy;
* losses reduced so the update does not depend on the replica count: a per-replica
  mean is divided by the number of replicas, a `Ratio` by its denominator summed over
  replicas; gradients are then summed across replicas once, by the trainer;
* one optimizer per `OptimizerGroup` over disjoint variables (a GAN's generator and
  discriminator), each with gradient clipping by global norm;
* a non-finite guard: a step whose losses or gradients are not finite leaves weights and
  optimizer slots untouched, is counted and logged; `max_consecutive_skips` in a row
  stop the run, the last good checkpoint intact;
* mixed precision (`mixed_bfloat16`: float32 variables, losses in float32;
  `mixed_float16`: the same with a dynamic loss scale, and optionally DALL-E's
  per-resblock gradient scales, see `mmt.layers.gradient_scaling`);
* exponentially weighted iterate averaging (`iterate_averaging`, DALL-E §2.2 / B.2):
  checkpoints hold the raw and the averaged weights; export, evaluation and image
  summaries use the averaged ones (`averaged_weights`), and so does `mmt.restore`;
* checkpoints of model, optimizer slots, step and input position (atomic, resumable,
  see `checkpoint.py`); random numbers are a pure function of (seed, step, replica), so
  a resumed run repeats the uninterrupted run exactly;
* SIGTERM / SIGINT: save at the next step boundary and return cleanly (preemption);
* summaries: every loss, learning rate, gradient norm, skipped steps, steps/s,
  examples/s to TensorBoard and `metrics.jsonl`, a console line, image summaries and
  evaluation from task hooks.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import keras
import tensorflow as tf

from mmt.data import integrity, manifests, pipeline
from mmt.errors import UserError
from mmt.tokenizers.text import EOS_ID, PAD_ID
from mmt.training.checkpoint import CheckpointError, CheckpointManager, model_variables, named_variables
from mmt.training import data_check
from mmt.training.summaries import MetricsWriter
from mmt import backend
from mmt.layers import gradient_scaling
from mmt.tasks.exports import frozen_record, frozen_variables, weight_names
from mmt.models.text_encoders import shape_only_frozen_encoders
from mmt.tasks.base import OptimizerGroup, Ratio, Task, parameter_breakdown

_log = logging.getLogger(__name__)

PRECISIONS = ("float32", "mixed_bfloat16", "bfloat16", "mixed_float16")
MODES = ("auto", "xla", "graph", "eager")
_STRING_FIELDS = ("key", "caption")


class TrainingError(UserError, RuntimeError):
    """A run stopped for a reason the user must act on (its checkpoints are intact)."""


@dataclasses.dataclass
class RunResult:
    """How `Trainer.run` ended."""

    status: str  # "completed", "preempted", "dry_run"
    step: int
    skipped_steps: int
    last_losses: dict[str, float]


class Trainer:
    """Trains one task. Every argument is gin-bindable (`Trainer.train_steps = 1000`).

    Args:
      task: a factory (class or function, called without arguments inside the
        strategy's scope) returning the `Task`.
      streams: stream name -> `StreamSpec`; global batch sizes.
      train_steps: the step at which the run ends.
      optimizer: factory of the optimizer of every group not in `group_optimizers`
        (e.g. `@Adafactor` in gin, learning rate bound on it).
      group_optimizers: group name -> optimizer factory.
      clip_grad_norm: clip each group's gradient to this global norm (ITIT: 3.0);
        None or 0 disables.
      seed: the run's seed: shuffling and every random draw of the model.
      precision: `float32`, `mixed_bfloat16` (float32 variables), `bfloat16`, or
        `mixed_float16` (float32 variables, dynamic loss scale `loss_scale`).
      mode: `auto` (XLA where the strategy allows it), `xla`, `graph` or `eager`.
      checkpoint_every: steps between checkpoints (and one at the end).
      keep_checkpoints: how many checkpoints to keep.
      log_every: steps between summary writes / console lines.
      image_every, eval_every: steps between the task's image summaries / evaluation
        hooks; 0 disables.
      max_consecutive_skips: non-finite steps in a row that stop the run.
      progress_bar: None decides by whether stdout is a terminal.
      iterate_averaging: the decay `d` of an exponentially weighted average of the
        weights after each applied update (DALL-E: "Adam with exponentially weighted
        iterate averaging"); None or 0 disables. See `_update_average` for the exact
        (bias-corrected) definition.
      loss_scale: under `mixed_float16`, (initial scale, finite steps before it doubles);
        it halves on a step whose gradients outside scaled resblocks are not finite.
      resblock_gradient_scaling: DALL-E's per-resblock gradient scaling (§2.4): every
        `TransformerBlock` of the task's model (built on `TransformerStack`) gets its own
        dynamic gradient scale on top of the loss scale; True, or a dict of
        `mmt.layers.gradient_scaling.GradientScaling` settings (`initial_scale`,
        `growth_interval`, ...). Meant for `mixed_float16`; exact (a no-op) in float32.
    """

    def __init__(
        self,
        task: Callable[[], Task],
        streams: Mapping[str, pipeline.StreamSpec],
        train_steps: int,
        optimizer: Callable[[], keras.optimizers.Optimizer],
        group_optimizers: Mapping[str, Callable[[], keras.optimizers.Optimizer]] | None = None,
        clip_grad_norm: float | None = None,
        seed: int = 0,
        precision: str = "float32",
        mode: str = "auto",
        checkpoint_every: int = 1000,
        keep_checkpoints: int = 3,
        log_every: int = 50,
        image_every: int = 0,
        eval_every: int = 0,
        max_consecutive_skips: int = 10,
        progress_bar: bool | None = None,
        iterate_averaging: float | None = None,
        loss_scale: tuple[float, int] = (2.0**15, 2000),
        resblock_gradient_scaling=False,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"Trainer.precision must be one of {PRECISIONS}, got {precision!r}")
        if mode not in MODES:
            raise ValueError(f"Trainer.mode must be one of {MODES}, got {mode!r}")
        for name, value, low in (
            ("train_steps", train_steps, 0),
            ("checkpoint_every", checkpoint_every, 1),
            ("keep_checkpoints", keep_checkpoints, 1),
            ("log_every", log_every, 1),
            ("max_consecutive_skips", max_consecutive_skips, 1),
        ):
            if int(value) < low:
                raise ValueError(f"Trainer.{name} must be at least {low}, got {value}")
        self.task_factory = task
        self.streams = {name: _without_strings(name, spec) for name, spec in streams.items()}
        self.train_steps = int(train_steps)
        self.optimizer_factory = optimizer
        self.group_optimizers = dict(group_optimizers or {})
        self.clip_grad_norm = clip_grad_norm or None
        self.seed = int(seed)
        self.precision = precision
        self.mode = mode
        self.checkpoint_every = int(checkpoint_every)
        self.keep_checkpoints = int(keep_checkpoints)
        self.log_every = int(log_every)
        self.image_every = int(image_every)
        self.eval_every = int(eval_every)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.progress_bar = progress_bar
        self.iterate_averaging = float(iterate_averaging or 0.0) or None
        if self.iterate_averaging is not None and not 0.0 < self.iterate_averaging < 1.0:
            raise ValueError(f"Trainer.iterate_averaging is the average's decay, in (0, 1) (e.g. 0.999), or None; "
                             f"got {iterate_averaging}")
        initial_scale, growth_interval = loss_scale
        if float(initial_scale) <= 0 or int(growth_interval) < 1:
            raise ValueError(f"Trainer.loss_scale is (initial scale > 0, growth interval >= 1), got {loss_scale}")
        self.loss_scale_config = (float(initial_scale), int(growth_interval))
        try:
            self.resblock_gradient_scaling = gradient_scaling.GradientScaling.of(resblock_gradient_scaling)
        except TypeError as e:
            raise ValueError(f"Trainer.resblock_gradient_scaling takes True/False or a dict of "
                             f"GradientScaling settings, got {resblock_gradient_scaling!r} ({e})") from None
        self.averaged: dict[str, Any] = {}
        self._stop_signal: int | None = None

    # -- building ------------------------------------------------------------------

    def build(self, strategy: tf.distribute.Strategy | None = None) -> None:
        """Builds task, model variables and optimizers under `strategy` (no data read)."""
        self.strategy = strategy or tf.distribute.get_strategy()
        keras.mixed_precision.set_global_policy(self.precision)
        # Initial weights (and tf.data's global seed) follow the run's seed: two runs of
        # one config start from the same weights, whatever the strategy.
        backend.seed_initial_weights(self.seed)
        with self.strategy.scope(), gradient_scaling.active(self.resblock_gradient_scaling):
            self.task = self.task_factory()
            self.task.build()
            self.scaled_blocks = gradient_scaling.scaled_blocks(self.task.model)
            self._block_of = {id(v): i for i, (_, variables) in enumerate(self.scaled_blocks) for v in variables}
            self.loss_scale = self.loss_scale_good_steps = None
            if self.precision == "mixed_float16":
                self.loss_scale = tf.Variable(self.loss_scale_config[0], dtype=tf.float32, trainable=False,
                                              name="loss_scale")
                self.loss_scale_good_steps = tf.Variable(0.0, dtype=tf.float32, trainable=False,
                                                         name="loss_scale_good_steps")
            self.groups = tuple(self.task.optimizer_groups())
            self.group_variables = _assign_variables(self.groups, self.task.model.trainable_variables)
            unknown = set(self.group_optimizers) - {g.name for g in self.groups}
            if unknown:
                raise ValueError(
                    f"Trainer.group_optimizers names groups {sorted(unknown)}; the task's groups are "
                    f"{[g.name for g in self.groups]}"
                )
            self.optimizers = {}
            for group in self.groups:
                factory = self.group_optimizers.get(group.name, self.optimizer_factory)
                opt = factory()
                opt.build(self.group_variables[group.name])
                backend.keep_replica_gradients(opt)  # the trainer sums them itself (before clipping)
                self.optimizers[group.name] = opt
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.skipped_total = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_total")
            self.skipped_in_row = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_in_row")
        loss_names = set(self.task.loss_weights)
        for group in self.groups:
            loss_names |= set(group.losses)
        self._declared_losses = loss_names
        self.jit_compile = {"auto": None, "xla": True, "graph": False, "eager": False}[self.mode]
        if self.jit_compile is None:
            from mmt.training.distribute import use_jit_compile

            self.jit_compile = use_jit_compile(self.strategy)
        self._boundaries = tuple(sorted(int(b) for b in self.task.phase_boundaries()))
        self._step_fns = {}

    def build_averaging(self) -> None:
        """Creates the iterate average (a copy of the trainable weights) and its update count.

        Separate from `build` so that loading a model for generation (`mmt.restore`)
        does not hold a second copy of the weights.
        """
        if self.iterate_averaging is None or self.averaged:
            return
        self._averaged_sources = averaged_sources(self.task)
        with self.strategy.scope():
            self.averaged = {name: tf.Variable(tf.identity(variable.value), trainable=False,
                                               name=f"average/{name}")
                             for name, variable in self._averaged_sources.items()}
            self.averaging_updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="averaging_updates")

    def _update_average(self) -> None:
        """One step of the iterate average, after an applied update (cross-replica context).

        With decay `d` and `t` applied updates (skipped steps do not count), the average
        is the bias-corrected exponentially weighted mean of the iterates `w_1 .. w_t`
        (the weights after each update; the initial weights are not included):

            avg_t = sum_k d^(t-k) (1 - d) w_k / (1 - d^t)

        computed recursively as `avg_t = avg_(t-1) + r_t (w_t - avg_(t-1))` with
        `r_t = (1 - d) / (1 - d^t)` (so `avg_1 = w_1`). The correction is Adam's: without
        it the first thousand steps of a `d = 0.999` average would be mostly initial
        weights.
        """
        t = tf.cast(self.averaging_updates.assign_add(1), tf.float64)
        decay = tf.constant(self.iterate_averaging, tf.float64)
        rate = tf.cast((1.0 - decay) / (1.0 - tf.pow(decay, t)), tf.float32)
        for name, average in self.averaged.items():
            variable = tf.cast(self._averaged_sources[name].value, average.dtype)
            average.assign_add(rate * (variable - average))

    @contextlib.contextmanager
    def averaged_weights(self):
        """Within the block the model holds the iterate average (no-op without averaging).

        What export, evaluation and image summaries see: the raw weights are restored on
        exit, bit for bit.
        """
        if not self.averaged:
            yield
            return
        raw = {name: tf.identity(v.value) for name, v in self._averaged_sources.items()}
        try:
            for name, average in self.averaged.items():
                self._averaged_sources[name].assign(tf.cast(average, self._averaged_sources[name].dtype))
            yield
        finally:
            for name, value in raw.items():
                self._averaged_sources[name].assign(value)

    def checkpoint_items(self) -> dict[str, Any]:
        """Everything a checkpoint holds besides the input position (see `run`)."""
        items = dict(
            model=model_variables(self.task.model, exclude=frozen_variables(self.task)),
            step=self.step,
            skipped_total=self.skipped_total,
            skipped_in_row=self.skipped_in_row,
            **{f"optimizer_{name}": opt for name, opt in self.optimizers.items()},
        )
        if self.averaged:
            items.update(averaged_model=named_variables(self.averaged), averaging_updates=self.averaging_updates)
        if self.loss_scale is not None:
            items.update(loss_scale=self.loss_scale, loss_scale_good_steps=self.loss_scale_good_steps)
        return items

    def memory_report(self, replicas: int | None = None) -> str:
        """Per-replica memory (parameters, gradients, slots, estimated activations); see `memory.py`."""
        from mmt.training import memory

        replicas = replicas or self.strategy.num_replicas_in_sync
        return memory.report(self.task, self.optimizers, {n: s.batch_size for n, s in self.streams.items()},
                             replicas, self.precision)

    def parameter_report(self) -> str:
        """The parameter breakdown by top-level component."""
        rows = [r for r in parameter_breakdown(self.task.component_layers()) if r[1] or r[2]]
        width = max([len(r[0]) for r in rows] + [9])
        lines = [f"{'component':<{width}}  {'trainable':>14}  {'frozen':>14}"]
        for name, trainable, frozen in rows:
            lines.append(f"{name:<{width}}  {trainable:>14,}  {frozen:>14,}")
        lines.append(f"{'total':<{width}}  {sum(r[1] for r in rows):>14,}  {sum(r[2] for r in rows):>14,}")
        return "\n".join(lines)

    # -- the step ------------------------------------------------------------------

    def _weight(self, name: str) -> float:
        return float(self.task.loss_weights.get(name, 1.0))

    def _group_losses(self, group: OptimizerGroup, names) -> list[str]:
        return list(group.losses) if group.losses else sorted(names)

    def _replica_gradients(self, batch, step):
        """One replica: losses, all-reduced and clipped gradients, norms, finiteness."""
        ctx = tf.distribute.get_replica_context()
        num_replicas = self.strategy.num_replicas_in_sync
        replica = tf.cast(ctx.replica_id_in_sync_group, tf.int64)
        seed = backend.for_step(self.seed, step, replica)
        # Per-resblock scales: the gradient "of" a scale is the count of non-finite
        # values its block filtered (`mmt.backend.gradient_scale_entry`).
        scale_variables = [scaler.scale.value for scaler, _ in self.scaled_blocks]
        with tf.GradientTape(persistent=len(self.groups) > 1) as tape, backend.scope(seed):
            for variable in scale_variables:
                tape.watch(variable)
            block_scales = [tf.convert_to_tensor(v) for v in scale_variables]
            raw = self.task.compute_losses(batch, step, seed)
            losses = {}
            for name, value in raw.items():
                if isinstance(value, Ratio):
                    denominator = ctx.all_reduce("sum", tf.stop_gradient(tf.cast(value.denominator, tf.float32)))
                    losses[name] = tf.cast(value.numerator, tf.float32) / tf.maximum(denominator, 1e-9)
                else:
                    # A per-replica mean; gradients are summed over replicas below.
                    losses[name] = tf.cast(value, tf.float32) / num_replicas
            group_totals = {}
            for group in self.groups:
                names = self._group_losses(group, losses)
                missing = [n for n in names if n not in losses]
                if missing:
                    raise KeyError(f"optimizer group {group.name!r} trains on losses {missing} that the task does not return")
                group_totals[group.name] = tf.add_n([self._weight(n) * losses[n] for n in names])
            loss_scale = None if self.loss_scale is None else tf.convert_to_tensor(self.loss_scale)
            targets = {k: v if loss_scale is None else v * loss_scale for k, v in group_totals.items()}
        grads, norms = {}, {}
        filtered = [tf.zeros((), tf.float32) for _ in scale_variables]
        block_finite = [tf.constant(True) for _ in scale_variables]
        other_finite = tf.constant(True)
        for group in self.groups:
            variables = self.group_variables[group.name]
            all_grads = tape.gradient(targets[group.name], [*variables, *scale_variables])
            group_grads = [tf.zeros_like(v) if g is None else g for g, v in zip(all_grads, variables)]
            counts = all_grads[len(variables):]
            filtered = [f if c is None else f + c for f, c in zip(filtered, counts)]
            # Undo the scales: loss scale and block scale are powers of two, so exactly.
            unscaled = []
            for g, v in zip(group_grads, variables):
                block = self._block_of.get(id(v))
                if loss_scale is not None:
                    g = g / loss_scale
                if block is not None:
                    g = g / block_scales[block]
                unscaled.append(g)
            group_grads = ctx.all_reduce("sum", unscaled)
            for g, v in zip(group_grads, variables):
                ok = tf.reduce_all(tf.math.is_finite(g))
                block = self._block_of.get(id(v))
                if block is None:
                    other_finite = tf.logical_and(other_finite, ok)
                else:
                    block_finite[block] = tf.logical_and(block_finite[block], ok)
            norms[group.name] = tf.linalg.global_norm(group_grads)
            if self.clip_grad_norm:
                group_grads, _ = tf.clip_by_global_norm(group_grads, self.clip_grad_norm, use_norm=norms[group.name])
            grads[group.name] = group_grads
        del tape
        losses = ctx.all_reduce("sum", losses)
        totals = ctx.all_reduce("sum", group_totals)
        finite = tf.reduce_all(
            [tf.math.is_finite(x) for x in [*norms.values(), *losses.values(), *totals.values()]]
        )
        metrics = {f"loss/{k}": v for k, v in losses.items()}
        metrics.update({f"total_loss/{k}": v for k, v in totals.items()})
        metrics.update({f"grad_norm/{k}": v for k, v in norms.items()})
        scaling = {}
        if loss_scale is not None:
            scaling["other_finite"] = other_finite
            metrics["loss_scale"] = loss_scale
        if scale_variables:
            filtered = ctx.all_reduce("sum", filtered)
            # A block's scale drops when it filtered anything or its own gradients overflowed.
            scaling["blocks_finite"] = [tf.logical_and(ok, n == 0) for ok, n in zip(block_finite, filtered)]
            metrics["resblock_scale/min"] = tf.reduce_min(block_scales)
            metrics["resblock_scale/max"] = tf.reduce_max(block_scales)
            metrics["resblock_filtered"] = tf.add_n(filtered)
        return grads, metrics, finite, scaling

    def _replica_apply(self, grads):
        for group in self.groups:
            self.optimizers[group.name].apply(grads[group.name], self.group_variables[group.name])

    def train_step(self, batch):
        """One step on `batch`: (metrics, applied). Compiled per phase of the task."""
        phase = bisect.bisect_right(self._boundaries, int(self.step.numpy())) if self._boundaries else 0
        if phase not in self._step_fns:
            fn = functools.partial(self._train_step, phase=phase)
            if self.mode != "eager":
                fn = tf.function(fn, jit_compile=self.jit_compile, reduce_retracing=True)
            self._step_fns[phase] = fn
        return self._step_fns[phase](batch)

    def _train_step(self, batch, phase: int = 0):
        self.task.trace_phase = phase
        grads, metrics, finite, scaling = self.strategy.run(self._replica_gradients,
                                                            args=(batch, self.step.read_value()))
        finite = self.strategy.experimental_local_results(finite)[0]
        metrics = {k: self.strategy.experimental_local_results(v)[0] for k, v in metrics.items()}
        scaling = tf.nest.map_structure(lambda v: self.strategy.experimental_local_results(v)[0], scaling)
        # Scales move whether or not the update is applied (a skipped step is what lowers them).
        if self.loss_scale is not None:
            scale, good = gradient_scaling.next_scale(self.loss_scale, self.loss_scale_good_steps,
                                                      tf.logical_not(scaling["other_finite"]),
                                                      self.loss_scale_config[1], 1.0, 2.0**64)
            self.loss_scale.assign(scale)
            self.loss_scale_good_steps.assign(good)
        for (scaler, _), ok in zip(self.scaled_blocks, scaling.get("blocks_finite", ())):
            scaler.update(tf.logical_not(ok))

        def apply():
            self.strategy.run(self._replica_apply, args=(grads,))
            if self.averaged:
                self._update_average()
            self.skipped_in_row.assign(0)
            return tf.constant(True)

        def skip():
            self.skipped_in_row.assign_add(1)
            self.skipped_total.assign_add(1)
            return tf.constant(False)

        applied = tf.cond(finite, apply, skip)
        self.step.assign_add(1)
        return metrics, applied

    # -- the loop ------------------------------------------------------------------

    def _handle_signal(self, signum, frame):  # pylint: disable=unused-argument
        self._stop_signal = signum

    def _learning_rates(self) -> dict[str, float]:
        return {f"learning_rate/{n}": float(keras.ops.convert_to_numpy(o.learning_rate)) for n, o in self.optimizers.items()}

    def run(self, workdir: str, *, strategy: tf.distribute.Strategy | None = None, dry_run: bool = False,
            allow_config_change: bool = False, check_config: Callable[[], None] | None = None,
            dry_run_replicas: int | None = None) -> RunResult:
        """Builds everything, resumes from the newest valid checkpoint, trains.

        Before anything is read or written: `check_config` (once the task is built; e.g.
        gin's unused bindings), every stream's manifest against the task's
        `data_expectations()`, and the resume check; the workdir's config files and
        `run_info.json` are written only after all of them and the restore passed.

        Args:
          workdir: the run's directory (checkpoints, summaries, records of the run).
          strategy: from `mmt.training.distribute.make_strategy`; None is the default strategy.
          dry_run: print the parameter breakdown (and the operative config, when given)
            and return without reading data.
          allow_config_change: resume even if gin's operative config (taken after the
            task is built, so it holds the model's bindings) differs from the one
            recorded in `workdir`.
          dry_run_replicas: the replica count the dry run's memory report splits the
            global batch over (default: the strategy's), e.g. a pod's core count.
          check_config: called once the task is built, before anything else (also in a
            dry run); raises to refuse the run.
        """
        previous_policy = keras.mixed_precision.global_policy()
        try:
            return self._run(workdir, strategy, dry_run, allow_config_change, check_config, dry_run_replicas)
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)

    def _run(self, workdir, strategy, dry_run, allow_config_change, check_config=None,
             dry_run_replicas=None) -> RunResult:
        # A dry run sizes frozen preset encoders from their configs without loading
        # them: a T5-XXL-shaped run is reported on a machine that cannot hold T5-XXL.
        with shape_only_frozen_encoders() if dry_run else contextlib.nullcontext():
            self.build(strategy)
        operative_config = _operative_config()
        if check_config is not None:
            check_config()
        if dry_run:
            print(self.parameter_report())
            print(self.memory_report(dry_run_replicas))
            print("\n# operative config\n" + operative_config)
            return RunResult("dry_run", 0, 0, {})
        workdir = os.fspath(workdir)
        chief, worker = _chief_and_worker(self.strategy)
        stream_manifests = self.check_data()
        if chief:
            self._check_resume(workdir, operative_config, allow_config_change)
        tf.io.gfile.makedirs(workdir)
        inputs = pipeline.InputIterator.from_specs(
            self.streams,
            strategy=self.strategy,
            seed=self.seed,
            eos_id=getattr(self.task, "eos_id", EOS_ID),
            pad_id=getattr(self.task, "pad_id", PAD_ID),
            expected_image_tokenizer=getattr(self.task, "image_tokenizer_fingerprint", None),
            expected_text_vocab=getattr(self.task, "text_vocab_fingerprint", None),
        )
        self.build_averaging()
        checkpoint = tf.train.Checkpoint(iterator=inputs.checkpointable, **self.checkpoint_items())
        manager = CheckpointManager(os.path.join(workdir, "checkpoints"), checkpoint, keep=self.keep_checkpoints)
        try:
            restored = manager.restore_latest()
        except CheckpointError as e:
            raise TrainingError(
                f"{e}\nIf the files are intact they were written by a run with another replica count or input "
                f"pipeline: resume with those. Otherwise move the damaged checkpoints out of {manager.directory} "
                "to start again from step 0, or train in another --workdir") from e
        if restored is not None:
            check_frozen_parts(self.task, manager, restored)
        if chief:
            # Only now, with the run's inputs, config and checkpoint accepted.
            self._record_run(workdir, operative_config, stream_manifests)
        if not chief:
            # Every worker takes part in saving (variables are read collectively), but
            # only the chief's copy is kept: the others write to their own scratch space.
            workdir = os.path.join(workdir, "workers", worker)
            manager = CheckpointManager(os.path.join(workdir, "checkpoints"), checkpoint, keep=1)
        start = int(self.step.numpy())
        if restored is not None:
            print(f"resumed from checkpoint at step {restored}", flush=True)
        examples_per_step = sum(spec.batch_size for spec in self.streams.values())
        writer = MetricsWriter(workdir, self.train_steps, start, progress_bar=self.progress_bar)
        handlers = {sig: signal.signal(sig, self._handle_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._stop_signal = None
        status, step, last = "completed", start, {}
        try:
            while step < self.train_steps:
                try:
                    batch = next(inputs)
                except tf.errors.InvalidArgumentError as e:
                    # The input pipeline's record checks (token counts, ids in range) name
                    # the records at fault.
                    raise TrainingError(f"bad input records at step {step + 1}: {integrity.error_summary(e)}; "
                                        "re-create the data or drop these records") from e
                metrics, applied = self.train_step(batch)
                step += 1
                if not bool(applied):
                    in_row = int(self.skipped_in_row.numpy())
                    writer.message(f"step {step}: non-finite losses or gradients; update skipped ({in_row} in a row)")
                    if in_row >= self.max_consecutive_skips:
                        writer.flush()
                        raise TrainingError(
                            f"{in_row} consecutive steps with non-finite losses or gradients (up to step {step}); "
                            f"stopped. The last checkpoint in {manager.directory} holds the last good weights "
                            f"(step {manager.latest_step()}). Lower the learning rate, check the data, or "
                            "raise Trainer.max_consecutive_skips."
                        )
                if step % self.log_every == 0 or step == self.train_steps or step == start + 1:
                    last = {k: float(v) for k, v in metrics.items()}
                    rate = writer.rates(step)
                    scalars = {**last, **self._learning_rates(),
                               "skipped_steps": float(self.skipped_total.numpy()),
                               "steps_per_s": rate, "examples_per_s": rate * examples_per_step}
                    writer.scalars(step, scalars)
                    writer.console(step, {k: v for k, v in last.items() if k.startswith("loss/")}, rate)
                if self.image_every and step % self.image_every == 0:
                    local = _first_replica(self.strategy, batch)
                    with self.averaged_weights():
                        writer.images(step, self.task.image_summaries(local, step))
                        for name, values in self.task.histogram_summaries(local, step).items():
                            writer.histogram(step, name, values)
                if self.eval_every and step % self.eval_every == 0:
                    with self.averaged_weights():
                        results = self.task.evaluate(step)
                    if results:
                        writer.scalars(step, {f"eval/{k}": v for k, v in results.items()})
                if step % self.checkpoint_every == 0 or step == self.train_steps or self._stop_signal is not None:
                    manager.save(step, metadata={"skipped_total": int(self.skipped_total.numpy()),
                                                 "frozen": frozen_record(self.task)})
                if self._stop_signal is not None:
                    name = signal.Signals(self._stop_signal).name
                    writer.message(f"{name} received: saved a checkpoint at step {step} and stopped")
                    status = "preempted"
                    break
            if status == "completed" and chief:
                with self.averaged_weights():
                    self.task.export(os.path.join(workdir, "export"), step=step)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            writer.close()
        return RunResult(status, step, int(self.skipped_total.numpy()), last)

    def check_data(self) -> dict[str, Any]:
        """Every stream's manifest against the task's `data_expectations()` (before step 1).

        Returns:
          stream name -> its manifest (recorded in `run_info.json`).

        Raises:
          data_check.DataMismatchError: naming the manifest, the gin binding and both
            values (vocabulary sizes, grid, text length, fingerprints, special ids).
          TrainingError: a stream's data directory or manifest is missing or unreadable.
        """
        expect = data_check.expectations_of(self.task)
        problems = [] if expect is None else data_check.special_id_problems(expect)
        stream_manifests = {}
        for name, spec in self.streams.items():
            binding = data_check.describe(f"{name}/StreamSpec.data_dir")
            if not tf.io.gfile.isdir(spec.data_dir):
                raise TrainingError(f"stream {name!r}: data directory {spec.data_dir} does not exist (set by "
                                    f"{binding}); give a directory written by mmt's data tools")
            try:
                manifest = manifests.read_manifest(spec.data_dir)
                manifest.split(spec.split)
            except (FileNotFoundError, ValueError) as e:
                raise TrainingError(f"stream {name!r} (data_dir from {binding}): {e}") from e
            stream_manifests[name] = manifest
            if expect is not None:
                problems += data_check.stream_problems(
                    expect, manifest, stream=name, fields=spec.fields, text_length=spec.text_length,
                    text_length_binding=f"{name}/StreamSpec.text_length")
        data_check.raise_if(problems)
        return stream_manifests

    def _check_resume(self, workdir: str, operative_config: str, allow_config_change: bool) -> None:
        """Refuses to resume a workdir recorded with another operative config (reads only)."""
        path = os.path.join(workdir, "operative_config.gin")
        if tf.io.gfile.exists(path) and tf.io.gfile.exists(os.path.join(workdir, "checkpoints")):
            with tf.io.gfile.GFile(path) as f:
                recorded = f.read()
            if recorded != operative_config:
                import difflib

                diff = "\n".join(
                    difflib.unified_diff(recorded.splitlines(), operative_config.splitlines(),
                                         "recorded", "now", lineterm="", n=0)
                )
                if not allow_config_change:
                    raise TrainingError(
                        f"{workdir} holds a run with a different operative config; resuming it with this "
                        f"config is refused (pass --allow_config_change to resume anyway):\n{diff}"
                    )
                _log.warning("resuming %s with a changed config:\n%s", workdir, diff)

    def _record_run(self, workdir: str, operative_config: str, stream_manifests: Mapping[str, Any]) -> None:
        """Writes the full and operative configs, git revision and data manifests into the workdir."""
        import gin

        for name, text in (("config.gin", gin.config_str()), ("operative_config.gin", operative_config)):
            path = os.path.join(workdir, name)
            with tf.io.gfile.GFile(path + ".tmp", "w") as f:
                f.write(text)
            tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
        stream_manifests = {name: {"data_dir": self.streams[name].data_dir, "split": self.streams[name].split,
                            **manifest.to_json()} for name, manifest in stream_manifests.items()}
        info = {
            "git": _git_revision(),
            "command": sys.argv,
            "strategy": type(self.strategy).__name__,
            "replicas": self.strategy.num_replicas_in_sync,
            "jit_compile": bool(self.jit_compile),
            "precision": self.precision,
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
            "data": stream_manifests,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with tf.io.gfile.GFile(os.path.join(workdir, "run_info.json"), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True, default=str)


def check_frozen_parts(task, manager, step: int) -> None:
    """Refuses to resume when a frozen part differs from the one the checkpoint was trained with."""
    recorded = next((c.metadata.get("frozen", {}) for c in manager.checkpoints() if c.step == step), {})
    current = frozen_record(task)
    for name in sorted(set(recorded) | set(current)):
        was, now = recorded.get(name), current.get(name)
        if was is None or now is None or was.get("fingerprint") != now.get("fingerprint"):
            raise TrainingError(
                f"the checkpoint at step {step} in {manager.directory} was trained with frozen part {name!r} = "
                f"{was or 'none'}, this run loads {now or 'none'}; point the config at the same files "
                "(e.g. the same T5 preset) or train in another --workdir")


def averaged_sources(task) -> dict[str, Any]:
    """name -> variable of every weight the iterate average covers: the trainable ones
    outside frozen parts, named as in checkpoints (`averaged_model/<name>`)."""
    return {name: v for name, v in weight_names(task.model, exclude=frozen_variables(task)).items() if v.trainable}


def _without_strings(name: str, spec: pipeline.StreamSpec) -> pipeline.StreamSpec:
    """Training steps are compiled: string fields (keys, captions) stay out of them."""
    fields = tuple(f for f in spec.fields if f not in _STRING_FIELDS)
    if not fields:
        raise ValueError(f"stream {name!r} reads only string fields {spec.fields}; a training stream needs ids or images")
    return dataclasses.replace(spec, fields=fields, name=name)


def _assign_variables(groups, variables) -> dict[str, list]:
    """Splits trainable variables into disjoint optimizer groups (see `OptimizerGroup`)."""
    names = [g.name for g in groups]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"optimizer groups need unique names, got {names}")
    assigned = {g.name: [] for g in groups}
    catch_all = [g for g in groups if not g.variable_prefixes]
    if len(catch_all) > 1:
        raise ValueError(f"at most one optimizer group may omit variable_prefixes, got {[g.name for g in catch_all]}")
    for variable in variables:
        owners = [g for g in groups if any(variable.path.startswith(p) for p in g.variable_prefixes)]
        if len(owners) > 1:
            raise ValueError(f"variable {variable.path} matches several optimizer groups: {[g.name for g in owners]}")
        owner = owners[0] if owners else (catch_all[0] if catch_all else None)
        if owner is None:
            raise ValueError(f"variable {variable.path} belongs to no optimizer group {names}")
        assigned[owner.name].append(variable)
    empty = [n for n, v in assigned.items() if not v]
    if empty:
        raise ValueError(f"optimizer groups {empty} have no trainable variables")
    return assigned


def _chief_and_worker(strategy) -> tuple[bool, str]:
    """Whether this process is the chief (owns the workdir), and its task name."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if resolver is None or not task_type or isinstance(strategy, tf.distribute.TPUStrategy):
        return True, "chief"
    task_id = int(resolver.task_id or 0)
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)
    return chief, f"{task_type}_{task_id}"


def _first_replica(strategy, batch):
    return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], batch)


def _operative_config() -> str:
    import gin

    return gin.operative_config_str()


def _git_revision() -> dict[str, Any]:
    """The mmt checkout's revision and whether it had local changes (or why unknown)."""
    root = Path(__file__).resolve().parents[2]
    try:
        revision = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return {"revision": revision, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError) as e:
        import mmt

        return {"revision": None, "mmt_version": getattr(mmt, "__version__", "unknown"), "why": str(e)[:200]}


__all__ = ["RunResult", "Trainer", "TrainingError", "averaged_sources"]
