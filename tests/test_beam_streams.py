"""Text-only and image-only streams, and the command lines (tokenize, verify) end to end."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import beam_helpers as h
from beam_pipelines import tokenize, verify
from mmt.data import manifests, pipeline, schema
from mmt.tokenizers.text import TextTokenizer

TESTS = Path(__file__).parent


def _records(out, split):
    import tensorflow as tf

    manifest = manifests.read_manifest(out)
    return [schema.decode_example(r) for path in manifest.shard_paths(split)
            for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]


def test_text_only_stream(tmp_path):
    h.make_vocab(tmp_path / "spm.model")
    (tmp_path / "captions.txt").write_text("\n".join(h.CAPTIONS[:9]) + "\n\n   \n")
    stats = tokenize.run(["--source=text", f"--input={tmp_path / 'captions.txt'}", f"--output_dir={tmp_path / 'out'}",
                          f"--text_vocab={tmp_path / 'spm.model'}", "--num_shards=2", *h.beam_args()])
    assert (stats["split"], stats["inputs"], stats["written"]) == ("text_only", 9, 9)
    manifest = manifests.read_manifest(tmp_path / "out")
    assert manifest.image_tokenizer is None and manifest.text_vocab is not None
    vocab = TextTokenizer.from_file(tmp_path / "spm.model")
    for record in _records(tmp_path / "out", "text_only"):
        assert set(record) == {"key", "text/caption", "text/ids"}
        np.testing.assert_array_equal(record["text/ids"], vocab.tokenize(record["text/caption"])[0])
    spec = pipeline.StreamSpec(str(tmp_path / "out"), "text_only", batch_size=3, fields=("text_ids",), text_length=16)
    batches = list(pipeline.stream_dataset(spec, seed=0, eos_id=1, pad_id=0, repeat=False, shuffle=False))
    assert len(batches) == 3 and batches[0]["text_ids"].shape == (3, 16)
    assert verify.verify(str(tmp_path / "out"), text_vocab=str(tmp_path / "spm.model")) == {"text_only": 9}


def test_image_only_stream(tmp_path):
    h.make_tokenizer(tmp_path / "tok")
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(5):
        (images / f"{i}.png").write_bytes(h.encode(h.smooth_image(i), "PNG"))
    (images / "copy.png").write_bytes((images / "3.png").read_bytes())
    (images / os.fsdecode(b"latin-1 caf\xe9.png")).write_bytes(h.encode(h.smooth_image(9), "PNG"))
    stats = tokenize.run(["--source=image_folder", f"--input={images}/*.png", f"--output_dir={tmp_path / 'out'}",
                          f"--image_tokenizer={tmp_path / 'tok'}", "--num_shards=2", "--min_image_side=16",
                          *h.beam_args("multi_threading")])
    assert (stats["split"], stats["inputs"], stats["written"]) == ("image_only", 7, 5)
    assert stats["filtered_by_reason"] == {"dedupe/duplicate_image": 1}
    assert stats["dead_lettered_by_reason"] == {"read/invalid_utf8": 1}
    letters = [json.loads(line) for p in (tmp_path / "out" / "dead_letter").glob("*.jsonl")
               for line in p.read_text().splitlines()]
    assert sorted(d["key"] for d in letters) == ["copy.png", "latin-1 caf\\xe9.png"]
    manifest = manifests.read_manifest(tmp_path / "out")
    assert manifest.text_vocab is None and manifest.image_tokenizer.grid == (4, 4)
    records = _records(tmp_path / "out", "image_only")
    assert sorted(r["key"] for r in records) == ["0.png", "1.png", "2.png", "3.png", "4.png"]
    assert all(set(r) == {"key", "image/tokens", "image/grid"} for r in records)
    assert verify.verify(str(tmp_path / "out"), image_tokenizer=str(tmp_path / "tok")) == {"image_only": 5}


def _python(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_lines_on_shapes_with_worker_processes(tmp_path):
    """`python -m beam_pipelines.tokenize` (multi_processing workers import the tokenizer) and `verify`."""
    h.make_tokenizer(tmp_path / "tok")
    h.make_vocab(tmp_path / "spm.model")
    command = ["-m", "beam_pipelines.tokenize", "--source=shapes", "--num_examples=40", "--shapes_resolution=32",
               "--output_dir=out", "--image_tokenizer=tok", "--text_vocab=spm.model", "--num_shards=2",
               "--import_modules=beam_test_tokenizer", "--no_dedupe",  # shapes repeats scenes
               "--direct_running_mode=multi_processing",
               "--direct_num_workers=2"]
    result = _python(*command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[0])
    assert summary == {"split": "paired", "inputs": 40, "written": 40, "filtered": 0, "dead_lettered": 0}
    result = _python("-m", "beam_pipelines.verify", "out", "--image_tokenizer=tok", "--text_vocab=spm.model",
                     "--import_modules=beam_test_tokenizer", cwd=tmp_path)
    assert result.returncode == 0 and "paired 40 records" in result.stdout, result.stderr[-3000:]
    again = _python(*command, cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_pixels_without_an_image_tokenizer(tmp_path):
    """`--store_image` alone (M3AE reads pixels): image/encoded, no VQ tokens, no image fingerprint."""
    h.make_vocab(tmp_path / "spm.model")
    images = tmp_path / "imgs"
    images.mkdir()
    rows = ["caption,path"]
    for i in range(5):
        (images / f"{i}.jpg").write_bytes(h.encode(h.smooth_image(i), "JPEG", quality=95))
        rows.append(f"{h.CAPTIONS[i]},imgs/{i}.jpg")
    (images / "copy.jpg").write_bytes((images / "3.jpg").read_bytes())
    rows += ["a copy of picture three,imgs/copy.jpg", "a missing picture,imgs/missing.jpg"]
    (tmp_path / "corpus.csv").write_text("\n".join(rows) + "\n")
    stats = tokenize.run(["--source=csv", f"--input={tmp_path / 'corpus.csv'}", "--image_column=path",
                          f"--output_dir={tmp_path / 'out'}", f"--text_vocab={tmp_path / 'spm.model'}",
                          "--store_image=png", "--image_size=24", "--min_image_side=16", "--num_shards=2",
                          *h.beam_args()])
    assert (stats["inputs"], stats["written"]) == (7, 5)
    assert stats["filtered_by_reason"] == {"dedupe/duplicate_image": 1}
    assert stats["dead_lettered_by_reason"] == {"load/missing_file": 1}
    manifest = manifests.read_manifest(tmp_path / "out")
    assert manifest.image_tokenizer is None and manifest.text_vocab is not None
    assert manifest.options["image_size"] == 24 and manifest.options["modalities"] == ["image", "text"]
    vocab = TextTokenizer.from_file(tmp_path / "spm.model")
    for record in _records(tmp_path / "out", "paired"):
        assert set(record) == {"key", "image/encoded", "text/caption", "text/ids"}
        assert record["image/encoded"].startswith(b"\x89PNG")
        np.testing.assert_array_equal(record["text/ids"], vocab.tokenize(record["text/caption"])[0])
    assert verify.verify(str(tmp_path / "out"), text_vocab=str(tmp_path / "spm.model")) == {"paired": 5}

    # Training reads pixels and ids; only the vocabulary's fingerprint is checked.
    spec = pipeline.StreamSpec(str(tmp_path / "out"), "paired", batch_size=5, fields=("image", "text_ids"),
                               text_length=16, random_resized_crop=(0.2, 1.0), horizontal_flip=True)
    batch = next(iter(pipeline.stream_dataset(
        spec, seed=0, eos_id=1, pad_id=0, expected_image_tokenizer="sha256:any tokenizer",
        expected_text_vocab=vocab.fingerprint())))
    assert batch["image"].shape == (5, 24, 24, 3) and batch["image"].dtype == "uint8"
    with pytest.raises(manifests.FingerprintMismatchError, match="text vocabulary"):
        pipeline.stream_dataset(spec, seed=0, eos_id=1, pad_id=0, expected_text_vocab="sha256:another")
    # A pixels-only split read for VQ tokens is refused by name.
    with pytest.raises(ValueError, match="no image tokenizer"):
        pipeline.stream_dataset(dataclasses.replace(spec, fields=("image_tokens",), random_resized_crop=None,
                                                    horizontal_flip=False), seed=0, eos_id=1, pad_id=0)
