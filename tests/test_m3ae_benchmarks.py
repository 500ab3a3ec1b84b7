"""Smoke tests of issue 19's benchmarks: m3ae_mask_speedup (the analytic FLOP count against a
hand count, the BEiT-style variant trains, the JSON line) and m3ae_shapes (two-step runs of
a shrunken network, probes, the JSON line)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SMALL = {"width": 32, "depth": 1, "heads": 2, "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2}


def _speedup_module():
    # By path: tests import no `benchmarks` module (tests/test_layout.py); the script imports `common`.
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("m3ae_mask_speedup", BENCHMARKS / "m3ae_mask_speedup.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def _run(script, *args, timeout=900):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("command: python ")
    return json.loads(lines[-1])


def test_train_flops_matches_a_hand_count():
    m = _speedup_module()
    # K=4 patches of 12 values, L=4 text over V=10, encoder 1 x 8, decoder 1 x 4, 1 + 1 kept.
    # visible, n = 3: patch 4*12*8 = 384, block 12*3*64 + 2*9*8 = 2448, projection 3*8*4 = 96,
    #   decoder (N = 9) 12*9*16 + 2*81*4 = 2376, heads 4*4*12 + 4*4*10 = 352 -> 5656 MACs.
    # full, n = 9: block 12*9*64 + 2*81*8 = 8208, projection 9*8*4 = 288 -> 11608 MACs.
    args = dict(num_patches=4, patch_dim=12, text_length=4, text_vocab=10, width=8, depth=1, decoder_width=4,
                decoder_depth=1, image_kept=1, text_kept=1)
    assert m.train_flops(**args) == 6 * 5656
    assert m.train_flops(**args, full=True) == 6 * 11608
    # MAE (no text): the text terms vanish.
    assert m.train_flops(**{**args, "text_length": 0}) == 6 * (384 + 12 * 2 * 64 + 2 * 4 * 8 + 2 * 8 * 4
                                                               + 12 * 5 * 16 + 2 * 25 * 4 + 4 * 4 * 12)


def test_flop_ratio_at_paper_scale_is_the_issues_2_4x():
    m = _speedup_module()
    from mmt.models.m3ae import M3AE

    model = M3AE(size="B", image_size=256, text_vocab_size=1024, text_length=32)
    ratio = m.model_train_flops(model, full=True) / m.model_train_flops(model)
    assert 2.3 < ratio < 2.45, ratio  # issue 19: "about 2.4x" (12 x 768 encoder, 8 x 512 decoder, 256 patches)


def test_full_encoder_task_trains_the_mask_token_and_sees_every_token():
    m = _speedup_module()
    import tensorflow as tf
    from mmt.tasks.base import StepSeed

    network = dict(size="tiny", image_size=16, text_vocab_size=40, text_length=8,
                   size_overrides={**SMALL, "patch_size": 4})
    visible, full = m.M3AETask(network=network), m.FullEncoderM3AETask(network=network)
    visible.build(), full.build()
    assert len(full.model.trainable_variables) == len(visible.model.trainable_variables) + 1
    batch = m.paired_batch(network, 2)
    seed = StepSeed(tf.constant([1, 2], tf.int64))
    model, data = full.model, batch["paired"]
    patches = model.patchify(full.normalise(data["image"]))
    image_keep, text_keep = model.random_keeps(data["text_ids"], 2, seed)
    z = full.encode_all(patches, data["text_ids"], image_keep, text_keep, training=False)
    assert tuple(z.shape) == (2, 1 + 16 + 8, 32)  # every token enters the encoder
    with tf.GradientTape() as tape:
        losses = full.compute_losses(batch, 0, seed)
        total = losses["image"].numerator / losses["image"].denominator
    grad = tape.gradient(total, full.model.encoder_mask_token.trainable_variables)[0]
    assert grad is not None and np.any(np.asarray(grad) != 0)
    # The same masks as the visible-only task: the same masked counts.
    ref = visible.compute_losses(batch, 0, seed)
    assert float(losses["image"].denominator) == float(ref["image"].denominator) == 2 * 12
    assert float(losses["text"].denominator) == float(ref["text"].denominator)


@pytest.mark.slow
def test_mask_speedup_reports_speedup_and_flop_ratio():
    line = _run("m3ae_mask_speedup.py", "--sizes", "tiny", "--steps", "1", "--rounds", "1", "--batch", "2",
                "--mode", "graph", "--size_overrides", json.dumps(SMALL))
    assert line["benchmark"] == "m3ae_mask_speedup"
    figures = line["figures"]["tiny"]
    assert {"speedup", "flop_ratio", "speedup_over_flop_ratio", "step_s", "train_gflop_per_step"} <= set(figures)
    assert figures["flop_ratio"] > 1 and figures["speedup"] > 0
    assert figures["encoder_tokens"] == {"visible": 1 + 16 + 8, "full": 1 + 64 + 32}


@pytest.mark.slow
def test_shapes_benchmark_trains_both_and_probes(tmp_path):
    args = ["--workdir", str(tmp_path), "--steps", "2", "--seeds", "0", "--probe_train", "40", "--probe_test", "30",
            f"--gin_param=SIZE_OVERRIDES={json.dumps(SMALL)}", "--gin_param=PAIRED_BATCH=4",
            "--gin_param=IMAGE_ONLY_BATCH=4"]
    line = _run("m3ae_shapes.py", *args)
    assert line["benchmark"] == "m3ae_shapes"
    figures = line["figures"]
    assert figures["steps"] == 2 and figures["seeds"] == [0]
    for pooling in ("cls", "mean"):
        rows = figures[pooling]
        assert {"m3ae", "mae", "m3ae_untrained", "mae_untrained", "chance", "m3ae_minus_mae"} <= set(rows)
        assert set(rows["m3ae"]) == {"shape", "color", "cell", "count", "mean"}
        assert all(0.0 <= v <= 1.0 for v in rows["mae"].values())
    record = json.loads((tmp_path / "m3ae_shapes.json").read_text())
    assert record["per_seed"]["m3ae_seed0"]["step"] == 2
    # A second call reuses the finished runs: no training.
    again = _run("m3ae_shapes.py", *args, "--data", str(tmp_path / "data"))
    assert again["figures"]["train_s"] == {}
