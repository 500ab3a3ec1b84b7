"""What the cycles cost: ITIT train steps/s for the seven rows of ITIT Table 4, in one run.

    python benchmarks/itit_cycle_cost.py                     # tiny and B-width shallow
    python benchmarks/itit_cycle_cost.py --sizes tiny --steps 5 --mode graph

Rows: 1 no cycle; 2-4 half cycles (T2I2T, I2T2I, both); 5-7 full cycles. Each row is
timed through mmt's own train step (the trainer's compiled step, Adafactor, clipping)
on fixed synthetic batches with Table 3's stream proportions (T2I + I2T halves of the
paired batch, text-only, image-only), after the cycle warm-up. The paper's ratio
no-cycle / full-cycle is 3.41 / 1.47 = 2.3x (256 TPUv4); the target here is <= 2.0x.

Table 4 states that *all* its rows use a total batch of 2048. A no-cycle run has no
unpaired streams, so it fills that batch with pairs; row "1*" times that (paired batch
= the four streams together), and the summary gives the full-cycle ratio against both
baselines: row 1 (the same paired batch, unpaired data left unused) and row 1* (the
same number of examples per step, the paper's comparison).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import numpy as np
import tensorflow as tf

from mmt.tasks.itit import ITITTask
from mmt.optimizers import Adafactor, Constant
from mmt.training.trainer import Trainer

import common

ROWS = {  # Table 4: (t2i2t, i2t2i)
    1: ("off", "off"), 2: ("half", "off"), 3: ("off", "half"), 4: ("half", "half"),
    5: ("full", "off"), 6: ("off", "full"), 7: ("full", "full"),
}
SIZES = {
    # name: (network, batch per stream)
    "tiny": (dict(size="tiny", image_vocab_size=256, grid=(16, 16), text_vocab_size=256, text_length=24), 8),
    "B-shallow": (dict(size="B", image_vocab_size=1024, grid=(16, 16), text_vocab_size=1024, text_length=32,
                       size_overrides={"encoder_depth": 2, "text_decoder_depth": 1, "image_decoder_depth": 2,
                                       "text_encoder_width": 768, "text_encoder_depth": 1}), 4),
}


def _batch(network, per_stream, seed=0, paired=None):
    rng = np.random.default_rng(seed)
    k, length = network["grid"][0] * network["grid"][1], network["text_length"]
    vocab, codes = network["text_vocab_size"], network["image_vocab_size"]

    def text(n):
        ids = rng.integers(4, vocab, (n, length)).astype(np.int32)
        ids[:, length // 2] = 1  # EOS, then padding
        ids[:, length // 2 + 1:] = 0
        return ids

    tokens = lambda n: rng.integers(0, codes, (n, k)).astype(np.int32)
    paired = 2 * per_stream if paired is None else paired
    return {"paired": {"image_tokens": tokens(paired), "text_ids": text(paired)},
            "text_only": {"text_ids": text(per_stream)}, "image_only": {"image_tokens": tokens(per_stream)}}


def steps_per_second(network, per_stream, row, steps, mode, synthesis_steps, synthesis_guidance=0.0):
    """Row `row` of ROWS, or "1*": no cycle with the total batch as paired examples."""
    equal_total = row == "1*"
    t2i2t, i2t2i = ROWS[1 if equal_total else row]
    trainer = Trainer(
        task=functools.partial(ITITTask, network=network, t2i2t=t2i2t, i2t2i=i2t2i, cycle_start_step=0,
                               synthesis_steps=synthesis_steps, synthesis_guidance=synthesis_guidance),
        streams={}, train_steps=steps, mode=mode, clip_grad_norm=3.0,
        optimizer=functools.partial(Adafactor, learning_rate=Constant(1e-4), beta_1=0.9, beta_2=0.96,
                                    multiply_by_parameter_scale=False, weight_decay=0.045))
    trainer.build()
    batch = _batch(network, per_stream, paired=4 * per_stream if equal_total else None)
    if equal_total:
        batch = {"paired": batch["paired"]}
    batch = tf.nest.map_structure(tf.constant, batch)
    start = time.perf_counter()
    trainer.train_step(batch)[1].numpy()  # compile
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        applied = trainer.train_step(batch)[1]
    applied.numpy()
    return steps / (time.perf_counter() - start), compile_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--mode", default="xla", choices=["xla", "graph"])
    parser.add_argument("--no_equal_total", action="store_true",
                        help="skip row 1* (no cycle, the total batch as paired examples)")
    parser.add_argument("--synthesis_steps", type=int, default=8, help="T2I decoding steps inside T2I2T")
    parser.add_argument("--synthesis_guidance", type=float, default=0.0,
                        help="classifier-free guidance of that synthesis (ITIT §3.2 uses the T2I inference "
                        "pipeline: 24 steps, 2.0)")
    args = parser.parse_args(argv)
    common.print_command(argv)
    print(f"mode {args.mode}, {args.steps} timed steps per row, T2I2T synthesis in {args.synthesis_steps} steps, "
          f"guidance {args.synthesis_guidance}\n")
    figures = {"synthesis_steps": args.synthesis_steps, "synthesis_guidance": args.synthesis_guidance}
    for size in args.sizes:
        network, per_stream = SIZES[size]
        print(f"{size}: batch {per_stream} per stream (T2I {per_stream}, I2T {per_stream}, "
              f"text-only {per_stream}, image-only {per_stream})")
        print(f"{'row':>3} {'T2I2T':>6} {'I2T2I':>6} {'steps/s':>8} {'vs row 1':>8} {'compile s':>9}")
        rates = {}
        rows = [*args.rows, *(["1*"] if 1 in args.rows and not args.no_equal_total else [])]
        for row in rows:
            rate, compile_s = steps_per_second(network, per_stream, row, args.steps, args.mode, args.synthesis_steps,
                                               args.synthesis_guidance)
            rates[row] = rate
            ratio = rates[1] / rate if 1 in rates else float("nan")
            cycles = ("off", "off") if row == "1*" else ROWS[row]
            print(f"{row:>3} {cycles[0]:>6} {cycles[1]:>6} {rate:>8.2f} {ratio:>7.2f}x {compile_s:>9.1f}", flush=True)
        if 1 in rates and 7 in rates:
            print(f"  {size}: no-cycle / full-cycle = {rates[1] / rates[7]:.2f}x at the same paired batch", end="")
            if "1*" in rates:
                print(f", {rates['1*'] / rates[7]:.2f}x at the same total batch (row 1*, Table 4's setup)", end="")
            print(" -- paper 2.3x, target <= 2.0x\n")
            figures[f"{size}_full_vs_row1"] = round(rates[1] / rates[7], 3)
            if "1*" in rates:
                figures[f"{size}_full_vs_row1_equal_total"] = round(rates["1*"] / rates[7], 3)
    common.report("itit_cycle_cost", figures, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
