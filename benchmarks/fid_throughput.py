"""Images per second through the FID feature extractor vs the bare Inception forward pass.

The extractor (`mmt.evaluation.fid.FIDExtractor.statistics`) takes uint8 images at
their own size, resizes them on the accelerator (pytorch-fid's bilinear protocol, two
small matrix products), runs the FID Inception and sums float64 statistics on a
worker thread. The bare pass feeds the same network already-resized float32 299x299
inputs and only waits for its features. Their ratio says whether resizing and
statistics slow the network down (target >= 0.9). Random weights: speed does not
depend on them. After one warm-up batch each (compilation), `--repeats` alternating
runs of each mode, the best of each counted; ends with one JSON line.

    python benchmarks/fid_throughput.py                      # batch 64, 256px inputs, 4 batches
    KERAS_BACKEND=jax python benchmarks/fid_throughput.py --batches=20   # on a GPU host

Measured on 2 CPU cores shared with other jobs (load average 4-6), one run each:

    $ python benchmarks/fid_throughput.py                     # TensorFlow backend, XLA
    bare 4.20 images/s, extractor 4.54 images/s, ratio 1.082
    $ KERAS_BACKEND=jax python benchmarks/fid_throughput.py   # JAX backend, jit
    bare 1.87 images/s, extractor 1.72 images/s, ratio 0.921

Above 1 is possible: the extractor ships uint8 256px batches where the bare pass ships
float32 299px ones, and the shared cores add noise of this size. No GPU was available
for these runs; a GPU figure is still to be measured (`KERAS_BACKEND=jax` on a GPU host).
"""

from __future__ import annotations

import argparse
import sys
import time

import keras
import numpy as np
from keras import ops

import common


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=256, help="side of the uint8 input images")
    parser.add_argument("--batches", type=int, default=4, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each mode (best counts)")
    args = parser.parse_args(argv)
    common.print_command(argv)

    from mmt.evaluation import fid, fid_inception
    from mmt.backend import compile_function

    keras.utils.set_random_seed(0)
    model = fid_inception.FIDInception()
    model.build()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8)
              for _ in range(args.batches)]

    # The bare forward pass: inputs already 299x299 float32 in [-1, 1].
    forward = compile_function(lambda x: model(x))
    resized = [np.asarray(ops.convert_to_numpy(fid_inception.preprocess(batch))) for batch in images]
    ops.convert_to_numpy(forward(resized[0]))  # compile
    extractor = fid.FIDExtractor(model, resolution=fid_inception.FID_RESOLUTION, batch_size=args.batch_size)
    extractor.features(images[0])  # compile

    def bare_run():
        start = time.perf_counter()
        for x in resized:
            ops.convert_to_numpy(forward(x))
        return args.batches * args.batch_size / (time.perf_counter() - start)

    def extractor_run():
        start = time.perf_counter()
        stats = extractor.statistics(images)
        return stats.count / (time.perf_counter() - start)

    # Alternating runs, best of each: on shared cores, the other jobs' load then hits both alike.
    bare_runs, through_runs = [], []
    for _ in range(args.repeats):
        bare_runs.append(bare_run())
        through_runs.append(extractor_run())
    bare, through = max(bare_runs), max(through_runs)

    print(f"backend {keras.backend.backend()}, batch {args.batch_size}, {args.image_size}px uint8 -> 299px, "
          f"{args.batches} batches x {args.repeats} alternating runs (best of each)")
    print(f"bare forward (299px float32 in):        {bare:8.1f} images/s")
    print(f"FID extractor (resize, network, stats):  {through:8.1f} images/s   ratio {through / bare:.3f}")
    common.report("fid_throughput", {
        "backend": keras.backend.backend(), "batch_size": args.batch_size, "image_size": args.image_size,
        "batches": args.batches, "repeats": args.repeats, "bare_images_per_s": round(bare, 2),
        "extractor_images_per_s": round(through, 2), "ratio": round(through / bare, 3)}, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
