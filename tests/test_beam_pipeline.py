"""The whole tokenize pipeline on a poisoned corpus: nothing lost, deterministic, verifiable."""

import filecmp
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import beam_helpers as h
from beam_pipelines import decode, resources, tokenize, verify
from mmt.data import manifests, pipeline, schema
from mmt.tokenizers.image import ImageTokenizer
from mmt.tokenizers.text import TextTokenizer, train_sentencepiece

CONVERTED = {"palette.png": "red|white", "cmyk.jpg": "cyan", "png16.png": "grey", "anim.gif": "green"}


def _args(root, out, *extra, mode="in_memory"):
    return [f"--source=tsv", f"--input={root / 'corpus.tsv'}", f"--output_dir={out}",
            f"--image_tokenizer={root / 'tok'}", f"--text_vocab={root / 'spm.model'}", "--num_shards=3",
            "--dead_letter_shards=2", "--min_image_side=16", "--max_caption_chars=200", "--batch_size=4",
            "--store_image=png", *extra, *h.beam_args(mode)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("poisoned")
    expected = h.poisoned_corpus(root)
    h.make_tokenizer(root / "tok")
    h.make_vocab(root / "spm.model")
    stats = tokenize.run(_args(root, root / "out"))
    return root, expected, stats


def _records(out):
    manifest = manifests.read_manifest(out)
    records = []
    for path in manifest.shard_paths("paired"):
        import tensorflow as tf

        records += [schema.decode_example(r) for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]
    return {r["key"]: r for r in records}


def _lines(root):
    return (root / "corpus.tsv").read_bytes().decode("utf-8", "surrogateescape").splitlines()


def _dead_letters(out):
    letters = []
    for path in sorted((out / "dead_letter").glob("*.jsonl")):
        letters += [json.loads(line) for line in path.read_text().splitlines()]
    return {d["key"]: d for d in letters}


def test_every_input_accounted_for(run):
    root, expected, stats = run
    written = {k for k, v in expected.items() if v is None}
    dropped = {k: v for k, v in expected.items() if v is not None}
    assert stats["inputs"] == len(expected) == stats["written"] + stats["filtered"] + stats["dead_lettered"]
    assert set(_records(root / "out")) == written
    letters = _dead_letters(root / "out")
    assert {k: (d["stage"], d["reason"]) for k, d in letters.items()} == dropped
    for d in letters.values():
        assert d["source"].startswith(str(root / "corpus.tsv") + ":")
        assert d["outcome"] in ("filtered", "dead_letter")
    assert stats["filtered_by_reason"] == {"dedupe/duplicate_image": 1, "filter_caption/caption_too_long": 1,
                                           "filter_caption/empty_caption": 1, "filter_image/bad_aspect_ratio": 1,
                                           "filter_image/too_small": 1}
    assert sum(stats["dead_lettered_by_reason"].values()) == stats["dead_lettered"] == 7
    assert (root / "out" / "COMPLETED").exists()
    assert json.loads((root / "out" / "stats.json").read_text()) == stats


def test_tokens_and_ids_equal_direct_calls(run):
    root, _, _ = run
    tokenizer = ImageTokenizer.load(root / "tok")
    vocab = TextTokenizer.from_file(root / "spm.model")
    lines = _lines(root)
    records = _records(root / "out")
    keys = sorted(records)
    crops = []
    for key in keys:
        caption, ref = lines[int(key.split(":")[1]) - 1].split("\t")
        pixels, _ = decode.decode_image((root / ref).read_bytes(), draft_side=h.IMAGE_SIZE)
        crops.append(decode.resize_and_crop(pixels, h.IMAGE_SIZE))
        np.testing.assert_array_equal(records[key]["text/ids"], vocab.tokenize(caption)[0])
        assert records[key]["text/caption"] == caption
        stored = np.asarray(Image.open(io.BytesIO(records[key]["image/encoded"])))
        np.testing.assert_array_equal(stored, crops[-1])
    direct = tokenizer.encode(np.stack(crops))
    for key, tokens in zip(keys, direct):
        np.testing.assert_array_equal(records[key]["image/tokens"], tokens)
        assert records[key]["image/grid"] == tokenizer.grid_size


def test_convertible_images_written_with_the_right_colours(run):
    root, _, _ = run
    lines = _lines(root)
    by_file = {lines[int(k.split(":")[1]) - 1].split("\t")[1].split("/")[-1]: r
               for k, r in _records(root / "out").items()}
    images = {name: np.asarray(Image.open(io.BytesIO(by_file[name]["image/encoded"]))).astype(int)
              for name in CONVERTED}
    # palette: 40x32, left 20 columns opaque red, the rest transparent -> white; the
    # centre crop keeps columns 4..35, so 16 red and 16 white.
    np.testing.assert_array_equal(images["palette.png"][:, :14], np.broadcast_to([255, 0, 0], (32, 14, 3)))
    np.testing.assert_array_equal(images["palette.png"][:, 18:], np.full((32, 14, 3), 255))
    assert np.abs(images["cmyk.jpg"] - [0, 255, 255]).max() <= 2
    assert (images["png16.png"] == 128).all()
    assert (images["anim.gif"] == [0, 255, 0]).all()


def test_training_reads_the_output(run):
    root, _, stats = run
    manifest = manifests.read_manifest(root / "out")
    assert manifest.options["image_size"] == h.IMAGE_SIZE and manifest.options["source"] == "tsv"
    spec = pipeline.StreamSpec(str(root / "out"), "paired", batch_size=2,
                               fields=("key", "image_tokens", "text_ids", "image"))
    dataset = pipeline.stream_dataset(
        spec, seed=0, eos_id=1, pad_id=0, repeat=False, shuffle=False,
        expected_image_tokenizer=ImageTokenizer.load(root / "tok").fingerprint(),
        expected_text_vocab=TextTokenizer.from_file(root / "spm.model").fingerprint())
    keys = [k.decode() for batch in dataset for k in batch["key"].numpy()]
    assert len(keys) == stats["written"] // 2 * 2 and set(keys) <= set(_records(root / "out"))
    batch = next(iter(dataset))
    assert batch["image_tokens"].shape == (2, 4, 4) and batch["image"].shape == (2, 32, 32, 3)


def test_verify_passes_and_catches_tampering(run, tmp_path, capsys):
    root, _, _ = run
    modules = ("beam_test_tokenizer",)
    assert verify.verify(str(root / "out"), image_tokenizer=str(root / "tok"),
                         text_vocab=str(root / "spm.model"), modules=modules) == {"paired": 10}
    assert verify.main([str(root / "out")]) == 0

    tampered = tmp_path / "tampered"
    shutil.copytree(root / "out", tampered)
    shard = sorted(tampered.glob("paired-*.tfrecord"), key=lambda p: -p.stat().st_size)[0]
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify.main([str(tampered)]) == 2
    assert f"error: corrupt shard {shard}" in capsys.readouterr().err

    other = tmp_path / "other_tok"
    h.beam_test_tokenizer.BeamTestTokenizer(image_size=32, downsample=8, vocab_size=64, seed=99).save(other)
    with pytest.raises(verify.VerifyError, match="another image tokenizer"):
        verify.verify(str(root / "out"), image_tokenizer=str(other))
    train_sentencepiece(["a completely different vocabulary"] * 20, tmp_path / "other.model", vocab_size=40)
    with pytest.raises(verify.VerifyError, match="another text vocabulary"):
        verify.verify(str(root / "out"), text_vocab=str(tmp_path / "other.model"))

    (tampered / "COMPLETED").unlink()
    with pytest.raises(verify.VerifyError, match="no COMPLETED"):
        verify.verify(str(tampered))


def test_rerun_is_byte_identical_and_cleans_a_crashed_run(run, tmp_path):
    root, _, _ = run
    out = tmp_path / "again"
    shutil.copytree(root / "out", out)
    with pytest.raises(resources.OutputExistsError):
        tokenize.run(_args(root, out))
    # A crashed run: no COMPLETED, a stale manifest, a shard of another shard count,
    # a temporary file and a stray dead letter.
    (out / "COMPLETED").unlink()
    (out / "paired-00000-of-00007.tfrecord").write_bytes(b"stale")
    (out / "paired-00001-of-00003.tfrecord.tmp-abc").write_bytes(b"half")
    (out / "dead_letter" / "dead_letter-00000-of-00009.jsonl").write_text("{}\n")
    (out / "unrelated.txt").write_text("kept")
    tokenize.run(_args(root, out, mode="multi_threading"))
    names = sorted(p.name for p in out.glob("*"))
    assert names == sorted(p.name for p in (root / "out").glob("*")) + ["unrelated.txt"]
    for shard in (root / "out").glob("paired-*.tfrecord"):
        assert filecmp.cmp(shard, out / shard.name, shallow=False), shard.name
    for letters in (root / "out" / "dead_letter").glob("*.jsonl"):
        assert filecmp.cmp(letters, out / "dead_letter" / letters.name, shallow=False)
    assert sorted(p.name for p in (out / "dead_letter").glob("*")) == [
        "dead_letter-00000-of-00002.jsonl", "dead_letter-00001-of-00002.jsonl"]


def test_separate_processes_and_runners_write_identical_bytes(run, tmp_path):
    """Issue 17 item 4: protobuf's map order varies per process unless serialization is deterministic.

    Two fresh processes (other hash seeds), on two runners, against the fixture's run in
    this process: every shard and dead-letter file is byte-identical.
    """
    root, _, _ = run
    tests = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")])))
    env.pop("PYTHONHASHSEED", None)
    processes = {
        mode: subprocess.Popen([sys.executable, "-m", "beam_pipelines.tokenize",
                                *_args(root, tmp_path / mode, "--import_modules=beam_test_tokenizer", mode=mode)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tests.parent)
        for mode in ("in_memory", "multi_threading")}
    for mode, process in processes.items():
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, (mode, err.decode()[-3000:])
    names = sorted(p.relative_to(root / "out") for p in (root / "out").rglob("*.tfrecord")) + sorted(
        p.relative_to(root / "out") for p in (root / "out" / "dead_letter").glob("*.jsonl"))
    assert len(names) == 5
    for mode in processes:
        for name in names:
            assert (tmp_path / mode / name).read_bytes() == (root / "out" / name).read_bytes(), (mode, name)
