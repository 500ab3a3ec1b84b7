"""How close mmt's train step comes to the machine's matmul ceiling, against stock Keras.

    python benchmarks/train_step.py                      # widths 512 and 256
    python benchmarks/train_step.py --widths 512 --steps 20 --precision mixed_bfloat16
    python benchmarks/train_step.py --widths 512 --profile /tmp/step_profile   # + top ops

For each width it trains, on one fixed batch of 8 x 256 tokens (masked-token objective,
depth 4, MLP 4x, vocabulary 1024):

* **mmt**: `mmt.layers` (fused-QKV attention, pre-LN blocks) through mmt's own
  `Trainer.train_step` -- the same compiled step every model trains with: two-phase
  update with non-finite guard, gradient clipping by global norm, Adafactor.
* **stock Keras**: `keras.layers.MultiHeadAttention` / `Dense` / `LayerNormalization`
  blocks, trained with `model.compile(jit_compile=True)` + `train_on_batch` (what
  `model.fit` runs per step) and `keras.optimizers.Adam`.
* **dots only**: the same matmuls (mmt's shapes, forward and backward) with nothing
  else -- no normalisation, softmax, activation or optimizer beyond SGD. XLA's GEMMs
  on these shapes run well below the 2048^2 rate, so this row is the bound that layer
  code can approach, and `mmt / dots only` is how close mmt comes to it.

With `--profile DIR` it also traces a few of mmt's steps with the TensorFlow profiler
and prints the ops that took the most self time (from the trace's host threads: TF ops,
and XLA's thunks where the runtime reports them), so the gap to the ceiling has names.

It prints achieved GFLOP/s (analytic FLOPs of a training step: 3x the forward matmuls),
the same run's fp32 matmul ceiling (the better of XLA and plain `tf.matmul` on
2048x2048), and their ratio. Machines differ (AVX2 / AVX-512), so only the ratios of one
run mean anything.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import re
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from mmt.layers import TransformerStack
from mmt.optimizers import Adafactor, Constant
from mmt.tasks.base import Ratio, Task
from mmt.training.trainer import Trainer

import common

BATCH, TOKENS, DEPTH, VOCAB = 8, 256, 4, 1024
MASK_ID = VOCAB - 1


def train_flops(width: int) -> float:
    """Analytic FLOPs of one training step (forward x 3), matmuls only."""
    per_token_layer = 24 * width**2 + 4 * TOKENS * width  # QKV+out (8D^2), MLP (16D^2), QK^T and AV
    per_token = DEPTH * per_token_layer + 2 * width * VOCAB  # + logits
    return 3.0 * BATCH * TOKENS * per_token


def matmul_ceiling(n: int = 2048, repeats: int = 20) -> dict[str, float]:
    """fp32 GFLOP/s of an n x n matmul, with and without XLA."""
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    results = {}
    for name, jit in (("xla", True), ("tf", False)):
        fn = tf.function(lambda x, y: tf.matmul(x, y), jit_compile=jit)
        fn(a, b).numpy()
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                out = fn(a, b)
            out.numpy()
            best = min(best, (time.perf_counter() - start) / repeats)
        results[name] = 2 * n**3 / best / 1e9
    return results


class _BenchTask(Task):
    """Masked-token prediction with mmt's layers (a UPGen-shaped encoder)."""

    def __init__(self, width: int):
        tokens = keras.Input((TOKENS,), dtype="int32")
        x = keras.layers.Embedding(VOCAB, width, name="embed")(tokens)
        x = TransformerStack(DEPTH, num_heads=width // 64, mlp_dim=4 * width, name="encoder")(x)
        logits = keras.layers.Dense(VOCAB, name="logits", dtype="float32")(x)
        self.model = keras.Model(tokens, logits)

    def build(self):
        self.model(ops.zeros((1, TOKENS), "int32"))

    def compute_losses(self, batch, step, seed):
        ids, mask = batch["tokens"]["ids"], batch["tokens"]["mask"]
        logits = self.model(ops.where(mask > 0, MASK_ID, ids), training=True)
        ce = keras.losses.sparse_categorical_crossentropy(ids, logits, from_logits=True)
        return {"masked_ce": Ratio(ops.sum(ce * mask), ops.sum(mask))}


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB - 1, (BATCH, TOKENS)).astype(np.int32)
    mask = (rng.random((BATCH, TOKENS)) < 0.5).astype(np.float32)
    return ids, mask


def top_ops(logdir: str, count: int = 12) -> list[tuple[str, float, int]]:
    """(op name, share of traced self time, occurrences) of the ops in a TF profile, largest first.

    Reads the newest `*.xplane.pb` under `logdir` (what `tf.profiler.experimental` writes).
    Trace events nest on each thread line; an op's self time is its duration minus that
    of the events nested inside it, so no time is counted twice.
    """
    import collections
    import glob

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {logdir}/plugins/profile")
    space = xplane_pb2.XSpace()
    with open(files[-1], "rb") as f:
        space.ParseFromString(f.read())
    self_ps, calls = collections.Counter(), collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:"):
            continue
        names = {key: (meta.display_name or meta.name) for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            events = sorted(((e.offset_ps, e.duration_ps, names.get(e.metadata_id, "?")) for e in line.events),
                            key=lambda e: (e[0], -e[1]))
            stack = []  # [end_ps, name, self_ps]
            for start, duration, name in events:
                while stack and stack[-1][0] <= start:
                    _, done, own = stack.pop()
                    self_ps[done] += own
                if stack:
                    stack[-1][2] -= duration
                stack.append([start + duration, name, duration])
                calls[name] += 1
            for _, done, own in stack:
                self_ps[done] += own
    # Waits and executor containers are not ops; HLO instances (dot.10, MatMul.132,
    # copy_multiply_fusion.3) are grouped by kind.
    grouped_ps, grouped_calls = collections.Counter(), collections.Counter()
    for name, ps in self_ps.items():
        if ps <= 0 or any(word in name for word in _NOT_OPS):
            continue
        kind = re.sub(r"([._]\d+)+$", "", name)
        grouped_ps[kind] += ps
        grouped_calls[kind] += calls[name]
    total = sum(grouped_ps.values())
    ranked = sorted(((kind, ps / total, grouped_calls[kind]) for kind, ps in grouped_ps.items()), key=lambda r: -r[1])
    return ranked[:count]


#: Trace events that wait or contain other events rather than compute.
_NOT_OPS = ("BlockUntilReady", "ThunkExecutor", "Execute", "function", "Wait", "Sleep", "Compile")


def profile_mmt(width: int, steps: int, precision: str, logdir: str) -> None:
    """Traces `steps` of mmt's XLA train step and prints the top ops by self time."""
    trainer, step = _mmt_step(width, steps, precision, jit=True)
    try:
        for _ in range(3):
            step()
        tf.profiler.experimental.start(logdir)
        for _ in range(steps):
            step()
        tf.profiler.experimental.stop()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    print(f"  width {width}: top ops by self time over {steps} traced steps ({logdir}):")
    for name, share, count in top_ops(logdir):
        print(f"    {100 * share:5.1f}%  {count:>6}x  {name[:90]}")
    print()


def _time(step, steps: int) -> float:
    """Seconds per step (after 3 warm-up steps), best of 3 rounds."""
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def _mmt_step(width: int, steps: int, precision: str, jit: bool):
    """(trainer, step()) for mmt's train step on the fixed batch."""
    trainer = Trainer(
        task=functools.partial(_BenchTask, width),
        streams={},
        train_steps=steps,
        optimizer=functools.partial(Adafactor, learning_rate=Constant(1e-3), beta_1=0.9, beta_2=0.96,
                                    multiply_by_parameter_scale=False, weight_decay=0.045),
        clip_grad_norm=3.0,
        precision=precision,
        mode="xla" if jit else "graph",
    )
    trainer.build()
    ids, mask = _batch()
    batch = {"tokens": {"ids": tf.constant(ids), "mask": tf.constant(mask)}}

    def step():
        metrics, _ = trainer.train_step(batch)
        metrics["loss/masked_ce"].numpy()

    return trainer, step


def bench_mmt(width: int, steps: int, precision: str, jit: bool) -> float:
    _, step = _mmt_step(width, steps, precision, jit)
    try:
        return _time(step, steps)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def bench_stock(width: int, steps: int, precision: str, jit: bool) -> float:
    keras.mixed_precision.set_global_policy(precision)
    try:
        tokens = keras.Input((TOKENS,), dtype="int32")
        x = keras.layers.Embedding(VOCAB, width)(tokens)
        for _ in range(DEPTH):
            y = keras.layers.LayerNormalization(epsilon=1e-6)(x)
            y = keras.layers.MultiHeadAttention(width // 64, 64)(y, y)
            x = x + y
            y = keras.layers.LayerNormalization(epsilon=1e-6)(x)
            y = keras.layers.Dense(4 * width, activation="gelu")(y)
            x = x + keras.layers.Dense(width)(y)
        x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        logits = keras.layers.Dense(VOCAB, dtype="float32")(x)
        model = keras.Model(tokens, logits)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
        ids, mask = _batch()
        inputs = np.where(mask > 0, MASK_ID, ids)
        return _time(lambda: model.train_on_batch(inputs, ids, sample_weight=mask), steps)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def bench_dots(width: int, steps: int, precision: str, jit: bool) -> float:
    """Seconds per step of the same dots and nothing else: the bound XLA's GEMMs set.

    The step's matmuls with mmt's shapes -- embedding gather, fused QKV, QK^T and AV
    (no softmax), output projection, MLP (no activation), logits -- forward and
    backward, and a plain SGD update: no LayerNorm, softmax, GELU, loss, clipping or
    Adafactor. What it reaches is what any layer code could reach with these GEMMs.
    """
    heads, dtype = width // 64, tf.bfloat16 if precision == "mixed_bfloat16" else tf.float32
    rng = np.random.default_rng(0)

    def variable(*shape):
        return tf.Variable(rng.normal(scale=0.02, size=shape).astype(np.float32))

    blocks = [[variable(width, 3 * width), variable(width, width), variable(width, 4 * width),
               variable(4 * width, width)] for _ in range(DEPTH)]
    embed, head = variable(VOCAB, width), variable(width, VOCAB)
    params = [embed, head, *(v for block in blocks for v in block)]
    ids = tf.constant(_batch()[0])

    def step_fn(ids):
        with tf.GradientTape() as tape:
            x = tf.cast(tf.gather(embed, ids), dtype)
            for qkv_w, out_w, up_w, down_w in blocks:
                qkv = tf.reshape(x @ tf.cast(qkv_w, dtype), (BATCH, TOKENS, 3, heads, 64))
                scores = tf.einsum("bqhd,bkhd->bhqk", qkv[:, :, 0], qkv[:, :, 1]) * 0.01
                attended = tf.reshape(tf.einsum("bhqk,bkhd->bqhd", scores, qkv[:, :, 2]), (BATCH, TOKENS, width))
                x = x + attended @ tf.cast(out_w, dtype)
                x = x + (x @ tf.cast(up_w, dtype)) @ tf.cast(down_w, dtype)
            loss = tf.reduce_mean(tf.cast(x @ tf.cast(head, dtype), tf.float32))
        for param, grad in zip(params, tape.gradient(loss, params)):
            param.assign_sub(1e-6 * tf.convert_to_tensor(grad))
        return loss

    compiled = tf.function(step_fn, jit_compile=jit)
    return _time(lambda: compiled(ids).numpy(), steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (3 rounds, best kept)")
    parser.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16"])
    parser.add_argument("--no_xla", action="store_true", help="also time both models without XLA")
    parser.add_argument("--profile", metavar="DIR", help="also trace mmt's XLA step into DIR and print its top ops")
    args = parser.parse_args(argv)
    common.print_command(argv)

    ceiling = matmul_ceiling()
    best_ceiling = max(ceiling.values())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"tensorflow {tf.__version__}, keras {keras.__version__}; "
          f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default (on)')}")
    print(f"fp32 matmul 2048^2 ceiling: {best_ceiling:.1f} GFLOP/s (xla {ceiling['xla']:.1f}, tf {ceiling['tf']:.1f})")
    print(f"batch {BATCH} x {TOKENS} tokens, depth {DEPTH}, vocab {VOCAB}, precision {args.precision}\n")
    header = f"{'model':<12} {'width':>5} {'xla':>4} {'ms/step':>8} {'GFLOP/s':>8} {'% ceiling':>9}"
    print(header)
    print("-" * len(header))
    modes = [True, False] if args.no_xla else [True]
    figures = {"ceiling_gflops": round(best_ceiling, 1)}  # TF/XLA 2048^2, beside report's NumPy one
    for width in args.widths:
        flops = train_flops(width)
        results = {}
        for jit in modes:
            for name, bench in (("mmt", bench_mmt), ("stock keras", bench_stock), ("dots only", bench_dots)):
                seconds = bench(width, args.steps, args.precision, jit)
                gflops = flops / seconds / 1e9
                results[(name, jit)] = gflops
                print(f"{name:<12} {width:>5} {'on' if jit else 'off':>4} {seconds * 1e3:>8.1f} {gflops:>8.1f} "
                      f"{100 * gflops / best_ceiling:>8.1f}%", flush=True)
        vs_stock = results[('mmt', True)] / results[('stock keras', True)]
        vs_dots = results[('mmt', True)] / results[('dots only', True)]
        print(f"  width {width}: mmt / stock keras (XLA) = {vs_stock:.2f}x; mmt / dots only (XLA) = {vs_dots:.2f}x\n")
        figures[f"width_{width}"] = {f"{n.replace(' ', '_')}{'' if jit else '_no_xla'}_of_ceiling":
                                     round(g / best_ceiling, 4) for (n, jit), g in results.items()}
        figures[f"width_{width}"].update(mmt_vs_stock_keras=round(vs_stock, 3), mmt_vs_dots_only=round(vs_dots, 3))
        if args.profile:
            profile_mmt(width, 5, args.precision, os.path.join(args.profile, f"width{width}"))
    common.report("train_step", figures, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
