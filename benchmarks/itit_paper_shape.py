"""ITIT at the paper's shapes, as a smoke run: what only breaks at paper shapes breaks here first.

    python benchmarks/itit_paper_shape.py [--workdir=/tmp/itit_paper_shape] [--steps=3]

`gin/itit_b.gin` unchanged except for what this machine cannot hold or read: a random
T5 preset of T5-base's shape (v1.1: 12 layers, width 768, MLP 2,048 gated-GELU, 12 heads
of 64, 32,128 pieces) instead of T5-XXL, a batch of 2 per stream, the cycles from step 0
and a 1-step warm-up. Everything else is Table 1/3's ITIT-B: 16x16 grids of 8,192
codes, text length 64, dropout 0.1, Adafactor with momentum, both full cycles (with the
config's `synthesis_steps`), XLA. The run trains `--steps` steps through
`python -m mmt.train`, is preempted (SIGTERM: a checkpoint at the step boundary) once
step 1 is logged, and is resumed by the same command in a second process; then it
generates both ways from the export (24 guided parallel-decoding steps from T5 ids,
decoded by the tokenizer; greedy captions from tokens). Data and tokenizer are random,
of the right shapes.

Prints its command, each stage's wall time, the step time after compilation and the peak
memory of the training processes, and ends with one JSON line of those figures.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common

REPO = Path(__file__).resolve().parents[1]
T5_BASE = dict(vocabulary_size=32128, num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=2048,
               key_value_dim=64, activation="gelu", use_gated_activation=True, dropout=0.0)
GRID, CODES, LENGTH, RECORDS = (16, 16), 8192, 64, 16


def make_inputs(root: Path) -> dict:
    """A random T5-base-shaped preset, a random 16x16 / 8,192-code VQGAN, token records."""
    import keras
    import keras_hub

    from mmt.data import manifests, schema
    from mmt.tokenizers.vqgan import VQGAN

    keras.utils.set_random_seed(0)
    keras_hub.models.T5Backbone(**T5_BASE).save_to_preset(str(root / "t5_base"))
    tokenizer = VQGAN(image_size=64, filters=8, channel_multipliers=(1, 1, 1), num_res_blocks=1, embedding_dim=8,
                      codebook_size=CODES, code_dim=8, num_groups=4)
    tokenizer.build_for_images()
    tokenizer.save(root / "tokenizer")
    rng = np.random.default_rng(0)
    data = root / "data"
    splits = {}
    for split in ("paired", "text_only", "image_only"):
        def records(split=split):
            for i in range(RECORDS):
                length = int(rng.integers(8, LENGTH))
                ids = np.concatenate([rng.integers(3, T5_BASE["vocabulary_size"], length - 1), [1]])
                yield f"{split}-{i}", schema.encode_example(
                    f"{split}-{i}", image_tokens=None if split == "text_only" else rng.integers(0, CODES, GRID),
                    text_ids=None if split == "image_only" else ids)
        splits[split] = schema.write_split(data, split, records(), 2)
    manifests.write_manifest(data, splits=splits,
                            image_tokenizer=manifests.ImageTokenizerInfo(tokenizer.fingerprint(), GRID, CODES),
                            text_vocab=manifests.TextVocabInfo("sha256:random-ids", T5_BASE["vocabulary_size"]))
    return {"preset": str(root / "t5_base"), "tokenizer": str(root / "tokenizer"), "data": str(data)}


def train(files: dict, workdir: Path, steps: int, stop_after: int | None = None) -> tuple[float, str]:
    """Runs `python -m mmt.train`; with `stop_after`, SIGTERMs it once that step is logged (preemption)."""
    command = [sys.executable, "-m", "mmt.train", "--gin_file=gin/itit_b.gin", f"--workdir={workdir}",
               f"--gin_param=DATA_DIR='{files['data']}'", f"--gin_param=TEXT_ENCODER='{files['preset']}'",
               f"--gin_param=IMAGE_TOKENIZER='{files['tokenizer']}'", f"--gin_param=TRAIN_STEPS={steps}",
               "--gin_param=PAIRED_BATCH=2", "--gin_param=TEXT_ONLY_BATCH=2", "--gin_param=IMAGE_ONLY_BATCH=2",
               "--gin_param=WARMUP_STEPS=1", "--gin_param=ITITTask.cycle_start_step=0",
               "--gin_param=Trainer.checkpoint_every=1000", "--gin_param=Trainer.log_every=1",
               "--gin_param=Trainer.progress_bar=False"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if stop_after is not None and line.startswith(f"step {stop_after}/"):
            process.send_signal(signal.SIGTERM)
    stderr = process.stderr.read()
    process.wait()
    elapsed = time.perf_counter() - start
    if process.returncode:
        sys.exit(f"error: {' '.join(command)} failed ({process.returncode}):\n{stderr[-4000:]}")
    return elapsed, "".join(lines)


def step_times(workdir: Path) -> list[float]:
    """Seconds per step from metrics.jsonl's steps_per_s (logged every step)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [1.0 / r["steps_per_s"] for r in rows if r.get("steps_per_s")]


def generate(export: Path, files: dict) -> dict:
    from keras import ops

    from mmt.tasks import exports
    from mmt.models import itit_inference
    from mmt.tokenizers.loading import load_image_tokenizer

    # The random preset has no SentencePiece model: ids in, ids out; images through the tokenizer.
    task, step = exports.load_task(export)
    task._tokenizers = (load_image_tokenizer(files["tokenizer"]), None)
    ids = np.zeros((2, LENGTH), np.int32)
    ids[:, :5] = [[100, 200, 300, 400, 1], [500, 600, 700, 1, 0]]
    start = time.perf_counter()
    tokens = ops.convert_to_numpy(itit_inference.generate_images(task.model, ops.convert_to_tensor(ids), 0,
                                                                 num_steps=24, guidance_scale=2.0))
    t2i = time.perf_counter() - start
    start = time.perf_counter()
    captions = ops.convert_to_numpy(itit_inference.greedy_captions(task.model, ops.convert_to_tensor(tokens)))
    i2t = time.perf_counter() - start
    assert tokens.shape == (2, GRID[0] * GRID[1]) and tokens.min() >= 0 and tokens.max() < CODES, tokens.shape
    assert captions.shape == (2, LENGTH) and captions.max() < T5_BASE["vocabulary_size"]
    images = task.tokenizers()[0].decode(tokens.reshape(-1, *GRID).astype(np.int32))
    assert images.shape == (2, 64, 64, 3)
    return {"export_step": step, "t2i_24_steps_s": round(t2i, 1), "i2t_greedy_s": round(i2t, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/itit_paper_shape")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    common.print_command(argv)
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    start = time.perf_counter()
    files = make_inputs(root)
    figures = {"inputs_s": round(time.perf_counter() - start, 1)}
    run = root / "run"
    # Preempted once step 1 is logged (SIGTERM: a checkpoint at the next step boundary),
    # then the same command again: it resumes and completes, writing the export.
    figures["train_s"], out = train(files, run, args.steps, stop_after=1)
    figures["preempted"] = "SIGTERM received" in out
    times = step_times(run)
    figures["first_step_s"] = round(times[0], 1) if times else None  # includes compilation
    figures["step_s_after_compile"] = round(float(np.median(times[1:])), 2) if len(times) > 1 else None
    figures["resume_s"], out = train(files, run, args.steps)
    resumed = re.search(r"resumed from checkpoint at step (\d+)", out)
    figures["resumed_from_step"] = int(resumed.group(1)) if resumed else None
    figures["resumed"] = bool(resumed) and figures["resumed_from_step"] < args.steps
    figures["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
    figures.update(generate(run / "export", files))
    for key, value in figures.items():
        print(f"{key:24s} {value}")
    common.report("itit_paper_shape", figures, argv)
    return 0 if figures["resumed"] and figures["preempted"] else 1


if __name__ == "__main__":
    sys.exit(main())
