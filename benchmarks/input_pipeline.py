"""Throughput of the ITIT input mixture (paired / image-only / text-only) on this host.

    python benchmarks/input_pipeline.py [--records_per_stream=20000] [--steps=200]

Writes synthetic TFRecords in mmt's schema with ITIT-B's shapes -- 16x16 VQ tokens
(vocabulary 8192) and 10-30 SentencePiece ids (vocabulary 32000) -- into a temporary
directory, then times `mmt.data.pipeline.mixture_dataset` with the paper's batch sizes
(paired 1024, image-only 512, text-only 512; text length 64) over `--steps` steps after
`--warmup` steps, and prints examples per second summed over the streams, with the
command that produced the number.

Target: at least 100,000 examples/s on 2 CPU cores, so the input pipeline is never
the bottleneck of a host feeding accelerators.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import common

BATCH_SIZES = {"paired": 1024, "image_only": 512, "text_only": 512}  # ITIT §4
GRID = (16, 16)
IMAGE_VOCAB = 8192
TEXT_VOCAB = 32_000


def write_synthetic(data_dir: str, records_per_stream: int, num_shards: int, seed: int = 0) -> None:
    """Writes paired / image_only / text_only splits and the manifest into `data_dir`."""
    from mmt.data import manifests, schema

    rng = np.random.default_rng(seed)

    def records(split: str, image: bool, text: bool):
        for i in range(records_per_stream):
            key = f"{split}-{i:07d}"
            yield key, schema.encode_example(
                key,
                image_tokens=rng.integers(0, IMAGE_VOCAB, GRID) if image else None,
                text_ids=rng.integers(4, TEXT_VOCAB, rng.integers(10, 31)) if text else None,
            )

    splits = {
        "paired": schema.write_split(data_dir, "paired", records("paired", True, True), num_shards),
        "image_only": schema.write_split(data_dir, "image_only", records("image_only", True, False), num_shards),
        "text_only": schema.write_split(data_dir, "text_only", records("text_only", False, True), num_shards),
    }
    manifests.write_manifest(
        data_dir,
        splits=splits,
        image_tokenizer=manifests.ImageTokenizerInfo("synthetic-image", GRID, IMAGE_VOCAB),
        text_vocab=manifests.TextVocabInfo("synthetic-text", TEXT_VOCAB),
        options={"source": "benchmarks/input_pipeline.py", "records_per_stream": records_per_stream},
    )


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records_per_stream", type=int, default=20_000)
    parser.add_argument("--num_shards", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--text_length", type=int, default=64)
    parser.add_argument("--shuffle_buffer", type=int, default=10_000)
    parser.add_argument("--data_dir", default=None, help="reuse (or create) this directory instead of a temporary one")
    args = parser.parse_args(argv)
    common.print_command(argv)

    import tensorflow as tf

    from mmt.data import manifests, pipeline

    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mmt_input_bench_")
        data_dir = tmp.name
    if not os.path.exists(os.path.join(data_dir, manifests.MANIFEST_FILE)):
        start = time.perf_counter()
        write_synthetic(data_dir, args.records_per_stream, args.num_shards)
        print(f"wrote {3 * args.records_per_stream} records in {time.perf_counter() - start:.1f}s to {data_dir}")

    fields = {"paired": ("image_tokens", "text_ids"), "image_only": ("image_tokens",), "text_only": ("text_ids",)}
    specs = {
        name: pipeline.StreamSpec(
            data_dir=data_dir,
            split=name,
            batch_size=batch_size,
            fields=fields[name],
            text_length=args.text_length,
            shuffle_buffer=args.shuffle_buffer,
        )
        for name, batch_size in BATCH_SIZES.items()
    }
    dataset = pipeline.mixture_dataset(
        specs,
        seed=0,
        eos_id=1,
        pad_id=0,
        expected_image_tokenizer="synthetic-image",
        expected_text_vocab="synthetic-text",
    )
    iterator = pipeline.InputIterator(dataset, files=[])
    for _ in range(args.warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    # Touch the last batch so an asynchronous pipeline cannot finish early.
    assert batch["paired"]["image_tokens"].shape == (1024, *GRID)
    per_step = sum(BATCH_SIZES.values())
    rate = args.steps * per_step / elapsed
    print(
        f"input pipeline: {rate:,.0f} examples/s ({args.steps / elapsed:.1f} steps/s of {per_step} examples: "
        f"paired 1024 + image_only 512 + text_only 512), {args.steps} steps after {args.warmup} warm-up, "
        f"{os.cpu_count()} CPUs, tensorflow {tf.__version__}"
    )
    if tmp is not None:
        tmp.cleanup()
    common.report("input_pipeline", {"examples_per_s": round(rate, 1), "steps_per_s": round(args.steps / elapsed, 3)},
                  argv)
    return rate


if __name__ == "__main__":
    main()
