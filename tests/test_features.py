"""TFRecord schema: round trips, validation, deterministic sharding, manifest, corrupt shards."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mmt.data import integrity, manifests, pipeline, schema

GRID = (4, 4)


def png(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def paired_records(n: int, prefix: str = "r"):
    rng = np.random.default_rng(0)
    for i in range(n):
        key = f"{prefix}{i:04d}"
        yield key, schema.encode_example(
            key,
            image_tokens=rng.integers(0, 16, GRID),
            caption=f"caption number {i}",
            text_ids=rng.integers(4, 32, rng.integers(1, 8)),
        )


def write_data(data_dir, n=64, num_shards=4) -> manifests.Manifest:
    info = schema.write_split(data_dir, "paired", paired_records(n), num_shards)
    return manifests.write_manifest(
        data_dir,
        splits={"paired": info},
        image_tokenizer=manifests.ImageTokenizerInfo("sha256:image", GRID, 16),
        text_vocab=manifests.TextVocabInfo("sha256:text", 32),
        options={"source": "test"},
    )


# -- records ---------------------------------------------------------------------------


def test_round_trip_all_fields():
    tokens = np.arange(12).reshape(3, 4)
    image = png(0)
    serialized = schema.encode_example(
        "k1", image_tokens=tokens, image_encoded=image, caption="ein Bär ünd a cat", text_ids=[5, 6, 7]
    )
    out = schema.decode_example(serialized)
    assert out["key"] == "k1"
    np.testing.assert_array_equal(out["image/tokens"], tokens)
    assert out["image/grid"] == (3, 4)
    assert out["image/encoded"] == image
    assert out["text/caption"] == "ein Bär ünd a cat"
    np.testing.assert_array_equal(out["text/ids"], [5, 6, 7])


def test_round_trip_image_only_and_text_only():
    image_only = schema.decode_example(schema.encode_example(b"img", image_tokens=np.ones((2, 2), np.int32)))
    assert set(image_only) == {"key", "image/tokens", "image/grid"}
    assert image_only["key"] == "img"
    text_only = schema.decode_example(schema.encode_example("txt", caption=b"a red square", text_ids=np.array([9])))
    assert set(text_only) == {"key", "text/caption", "text/ids"}
    assert text_only["text/caption"] == "a red square"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(image_tokens=np.zeros(16, np.int64)), "image_tokens"),  # not 2-D
        (dict(image_tokens=np.zeros((4, 4), np.float32)), "image_tokens"),  # not integers
        (dict(image_tokens=-np.ones((2, 2), np.int64)), "image_tokens"),  # negative
        (dict(image_encoded=b"raw pixels"), "image_encoded"),  # neither PNG nor JPEG
        (dict(image_encoded=np.zeros((2, 2, 3), np.uint8)), "image_encoded"),
        (dict(caption="  "), "caption"),
        (dict(caption=b"\xff\xfe"), "caption"),  # not UTF-8
        (dict(caption=3), "caption"),
        (dict(text_ids=[]), "text_ids"),
        (dict(text_ids=[[1, 2]]), "text_ids"),
        (dict(text_ids=[1, -2]), "text_ids"),
    ],
)
def test_invalid_inputs_name_key_and_field(kwargs, field):
    with pytest.raises(ValueError) as error:
        schema.encode_example("the-key", **kwargs)
    assert "the-key" in str(error.value) and field in str(error.value)


def test_record_needs_a_key_and_a_modality():
    with pytest.raises(ValueError, match="key"):
        schema.encode_example("", caption="a cat")
    with pytest.raises(ValueError, match="'lonely'.*at least one modality"):
        schema.encode_example("lonely")


# -- writing -----------------------------------------------------------------------------


def test_sharding_by_key_hash_is_deterministic(tmp_path):
    first = schema.write_split(tmp_path / "a", "paired", paired_records(50), num_shards=3)
    second = schema.write_split(tmp_path / "b", "paired", paired_records(50), num_shards=3)
    assert first == second
    assert first.shards == tuple(f"paired-{i:05d}-of-00003.tfrecord" for i in range(3))
    assert first.num_records == sum(first.shard_records) == 50
    for name, size in zip(first.shards, first.shard_bytes):
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert a == b and len(a) == size
    assert sorted(os.listdir(tmp_path / "a")) == list(first.shards)  # no temporary files left
    # Every record sits in the shard its key hashes to.
    for index, name in enumerate(first.shards):
        for record in tf.data.TFRecordDataset(str(tmp_path / "a" / name)):
            assert schema.shard_index(schema.decode_example(record.numpy())["key"], 3) == index


def test_write_split_refuses_duplicate_keys_and_leaves_no_files(tmp_path):
    records = list(paired_records(3)) + [next(paired_records(1))]
    with pytest.raises(ValueError, match="duplicate record key 'r0000'"):
        schema.write_split(tmp_path, "paired", records, num_shards=2)
    assert os.listdir(tmp_path) == []


# -- manifest ----------------------------------------------------------------------------


def test_manifest_round_trip(tmp_path):
    written = write_data(tmp_path, n=20, num_shards=2)
    read = manifests.read_manifest(tmp_path)
    assert read == written
    assert read.format_version == manifests.FORMAT_VERSION
    assert read.image_tokenizer.grid == GRID and read.text_vocab.vocab_size == 32
    assert read.splits["paired"].num_records == 20
    assert read.shard_paths("paired") == [str(tmp_path / name) for name in read.splits["paired"].shards]
    assert read.options == {"source": "test"} and read.created
    with pytest.raises(ValueError, match="no split 'eval'.*paired"):
        read.split("eval")


def test_manifest_without_tokenizers(tmp_path):
    info = schema.write_split(tmp_path, "text_only", [("t", schema.encode_example("t", caption="hi"))], 1)
    manifests.write_manifest(tmp_path, splits={"text_only": info})
    manifest = manifests.read_manifest(tmp_path)
    assert manifest.image_tokenizer is None and manifest.text_vocab is None


def test_missing_manifest_names_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        manifests.read_manifest(tmp_path / "nowhere")


def test_fingerprint_mismatch_names_directory_and_both_fingerprints(tmp_path):
    write_data(tmp_path, n=8, num_shards=1)
    manifests.check_fingerprints(tmp_path, image_tokenizer="sha256:image", text_vocab="sha256:text")
    with pytest.raises(manifests.FingerprintMismatchError) as error:
        manifests.check_fingerprints(tmp_path, image_tokenizer="sha256:other-image")
    message = str(error.value)
    assert str(tmp_path) in message and "image tokenizer" in message
    assert "sha256:image" in message and "sha256:other-image" in message
    with pytest.raises(ValueError) as error:  # FingerprintMismatchError is a ValueError
        manifests.check_fingerprints(manifests.read_manifest(tmp_path), text_vocab="sha256:other-text")
    assert "text vocabulary" in str(error.value) and "sha256:text" in str(error.value)
    assert "sha256:other-text" in str(error.value)


def test_manifest_without_fingerprint_does_not_match_a_configured_one(tmp_path):
    info = schema.write_split(tmp_path, "t", [("t", schema.encode_example("t", caption="hi"))], 1)
    manifests.write_manifest(tmp_path, splits={"t": info})
    with pytest.raises(manifests.FingerprintMismatchError, match="None.*'sha256:text'"):
        manifests.check_fingerprints(tmp_path, text_vocab="sha256:text")


# -- corrupt shards --------------------------------------------------------------------------


def flip_middle(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def record_boundaries(path):
    """Byte offsets where the records of a TFRecord file end."""
    ends, position = [], 0
    for record in tf.data.TFRecordDataset(str(path)):
        position += len(record.numpy()) + 16
        ends.append(position)
    return ends


@pytest.fixture
def data_dir(tmp_path):
    write_data(tmp_path, n=64, num_shards=4)
    return tmp_path


def test_find_corrupt_shards(data_dir):
    paths = [data_dir / name for name in manifests.read_manifest(data_dir).splits["paired"].shards]
    assert integrity.find_corrupt_shards(paths) == []
    flip_middle(paths[1])
    ends = record_boundaries(paths[2])
    # Cut inside a record's data (TensorFlow raises DataLossError) ...
    paths[2].write_bytes(paths[2].read_bytes()[: ends[2] + 20])
    # ... and inside a record's header, which TensorFlow reads as a clean end of file.
    paths[3].write_bytes(paths[3].read_bytes()[: record_boundaries(paths[3])[1] + 5])
    found = dict(integrity.find_corrupt_shards(paths))
    assert sorted(found) == [str(p) for p in paths[1:]]
    assert "corrupted record" in found[str(paths[1])]
    assert "DataLossError" in found[str(paths[2])]
    assert "truncated" in found[str(paths[3])]
    missing = data_dir / "gone.tfrecord"
    assert integrity.find_corrupt_shards([missing]) == [(str(missing), "file does not exist")]


def spec(data_dir):
    return pipeline.StreamSpec(str(data_dir), "paired", batch_size=4, fields=("key", "image_tokens", "text_ids"))


def iterate(data_dir, steps=40, **kwargs):
    iterator = pipeline.InputIterator.from_specs({"paired": spec(data_dir)}, seed=0, eos_id=1, pad_id=0, **kwargs)
    for _ in range(steps):
        next(iterator)


def test_pipeline_names_the_corrupt_shard(data_dir):
    iterate(data_dir)  # intact data reads fine
    shard = data_dir / manifests.read_manifest(data_dir).splits["paired"].shards[2]
    flip_middle(shard)  # same size: only reading finds it
    with pytest.raises(integrity.CorruptShardError) as error:
        iterate(data_dir)
    assert str(shard) in str(error.value) and "corrupted record" in str(error.value)
    assert isinstance(error.value.__cause__, tf.errors.DataLossError)


def test_pipeline_names_a_truncated_shard(data_dir):
    shard = data_dir / manifests.read_manifest(data_dir).splits["paired"].shards[0]
    shard.write_bytes(shard.read_bytes()[: record_boundaries(shard)[1] + 30])
    # The manifest's byte sizes catch it before reading ...
    with pytest.raises(integrity.CorruptShardError, match=str(shard)):
        iterate(data_dir)
    # ... and without that check, reading does.
    with pytest.raises(integrity.CorruptShardError) as error:
        iterate(data_dir, check_shard_sizes=False)
    assert str(shard) in str(error.value)
