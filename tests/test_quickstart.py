"""The quickstart, end to end at its tiny size, as a user runs it (a subprocess)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mmt.data import manifests, schema, shapes
from mmt.tokenizers.text import TextTokenizer


@pytest.mark.slow
def test_quickstart_tiny_end_to_end(tmp_path):
    """The whole chain at a few steps per training stage: every stage runs and hands its
    outputs to the next (the quality figures are measured by the full-size run)."""
    workdir = tmp_path / "qs"
    result = subprocess.run(
        [sys.executable, "-m", "mmt.quickstart", "--gin_file=quickstart_tiny.gin",
         f"--workdir={workdir}", "--no_progress"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in range(1, 10):
        assert f"[{stage}/9]" in result.stdout

    summary = json.loads((workdir / "summary.json").read_text())
    for split in ("paired", "image_only", "text_only"):
        stats = json.loads((workdir / "tokens" / split / "stats.json").read_text())
        assert stats["written"] == summary["records"][split]  # nothing dropped on the way
        assert (workdir / "tokens" / split / "COMPLETED").exists()
    assert (workdir / "vqgan" / "export" / "config.json").is_file()
    assert (workdir / "itit" / "checkpoints").is_dir()
    metrics = json.loads((workdir / "metrics.json").read_text())
    for direction in ("t2i", "i2t"):
        assert 0.0 <= metrics[direction]["attribute"] <= 1.0
    assert summary["t2i_attribute_accuracy"] == round(metrics["t2i"]["attribute"], 4)
    assert Image.open(workdir / "generated.png").width > 32
    assert (workdir / "operative_config.gin").read_text().count("quickstart.eval_examples = 4") == 1

    # `mmt.generate` on the trained ITIT: an image from a prompt, a caption from an image.
    image_path = tmp_path / "scene.png"
    Image.fromarray(next(shapes.generate(shapes.ShapesConfig(resolution=32), "eval", 1)).image).save(image_path)
    result = subprocess.run(
        [sys.executable, "-m", "mmt.generate", f"--workdir={workdir / 'itit'}", "--prompt=a red circle",
         f"--image={image_path}", "--num_steps=3", "--beam_size=2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = workdir / "itit" / "generated"
    assert Image.open(out / "000_a_red_circle.png").size == (32, 32)
    assert json.loads((out / "captions.json").read_text()).keys() == {str(image_path)}


def test_quickstart_data_stages(tmp_path):
    workdir = tmp_path / "qs"
    result = subprocess.run(
        [sys.executable, "-m", "mmt.quickstart", "--gin_file=quickstart_tiny.gin", "--data_only",
         f"--workdir={workdir}", "--no_progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert stage in result.stdout

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["records"] == {"paired": 64, "image_only": 64, "text_only": 64, "eval": 32}
    assert (workdir / "config.gin").is_file() and (workdir / "operative_config.gin").is_file()
    assert "quickstart.num_shards = 2" in (workdir / "operative_config.gin").read_text()

    grid = Image.open(workdir / "samples.png")
    assert grid.width > 64 and grid.height > 64

    vocab = TextTokenizer.from_file(summary["vocabulary"])
    data_dir = workdir / "data"
    manifest = manifests.read_manifest(data_dir)
    manifests.check_fingerprints(data_dir, text_vocab=vocab.fingerprint())

    # Paired records carry a PNG that decodes to the generated image, and ids of the caption.
    config = shapes.ShapesConfig(resolution=32)
    truth = {e.key: e for e in shapes.generate(config, "paired", 64)}
    files = sorted(str(data_dir / f) for f in manifest.splits["paired"].shards)
    seen = 0
    for record in tf.data.TFRecordDataset(files):
        example = schema.decode_example(record.numpy())
        expected = truth[example["key"]]
        image = np.asarray(Image.open(__import__("io").BytesIO(example["image/encoded"])))
        np.testing.assert_array_equal(image, expected.image)
        assert example["text/caption"] == expected.caption
        assert list(example["text/ids"]) == vocab.tokenize(expected.caption)[0]
        seen += 1
    assert seen == 64
