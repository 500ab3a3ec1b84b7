"""tf.data mixtures: structure, static shapes, text padding, determinism, resuming, replicas."""

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mmt.data import manifests, pipeline, schema

GRID = (2, 3)  # not square, so a swapped h / w shows
IMAGE_VOCAB, TEXT_VOCAB = 16, 32
EOS, PAD = 1, 0
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pixels(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_split(data_dir, split, n, num_shards, image=True, text=True, grid=GRID):
    rng = np.random.default_rng(len(split))

    def records():
        for i in range(n):
            key = f"{split}-{i:03d}"
            yield key, schema.encode_example(
                key,
                image_tokens=rng.integers(0, IMAGE_VOCAB, grid) if image else None,
                image_encoded=png(pixels(i)) if image else None,
                caption=f"caption {i}" if text else None,
                text_ids=rng.integers(4, TEXT_VOCAB, rng.integers(1, 9)) if text else None,
            )

    return schema.write_split(data_dir, split, records(), num_shards)


def write_manifest(data_dir, splits):
    manifests.write_manifest(
        data_dir,
        splits=splits,
        image_tokenizer=manifests.ImageTokenizerInfo("sha256:image", GRID, IMAGE_VOCAB),
        text_vocab=manifests.TextVocabInfo("sha256:text", TEXT_VOCAB),
        options={"image_size": 8},
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("data"))
    write_manifest(data_dir, {
        "paired": write_split(data_dir, "paired", 48, 4),
        "image_only": write_split(data_dir, "image_only", 48, 2, text=False),
        "text_only": write_split(data_dir, "text_only", 48, 2, image=False),
        "one_shard": write_split(data_dir, "one_shard", 20, 1),
    })
    return data_dir


def mixture_specs(data_dir, paired=8, image_only=4, text_only=4):
    return {
        "paired": pipeline.StreamSpec(
            data_dir, "paired", paired, fields=("key", "image_tokens", "text_ids", "caption"), text_length=6
        ),
        "image_only": pipeline.StreamSpec(data_dir, "image_only", image_only, fields=("key", "image_tokens")),
        "text_only": pipeline.StreamSpec(data_dir, "text_only", text_only, fields=("key", "text_ids"), text_length=5),
    }


def mixture(data_dir, seed=0, **kwargs):
    return pipeline.mixture_dataset(mixture_specs(data_dir), seed=seed, eos_id=EOS, pad_id=PAD, **kwargs)


def take(iterator, n):
    return tf.nest.map_structure(lambda t: t.numpy(), [next(iterator) for _ in range(n)])


def assert_same(a, b):
    tf.nest.map_structure(np.testing.assert_array_equal, a, b)


def test_mixture_structure_and_static_shapes(data_dir):
    spec = mixture(data_dir).element_spec
    assert spec == {
        "paired": {
            "key": tf.TensorSpec([8], tf.string),
            "image_tokens": tf.TensorSpec([8, *GRID], tf.int32),
            "text_ids": tf.TensorSpec([8, 6], tf.int32),
            "caption": tf.TensorSpec([8], tf.string),
        },
        "image_only": {"key": tf.TensorSpec([4], tf.string), "image_tokens": tf.TensorSpec([4, *GRID], tf.int32)},
        "text_only": {"key": tf.TensorSpec([4], tf.string), "text_ids": tf.TensorSpec([4, 5], tf.int32)},
    }
    batch = next(iter(mixture(data_dir)))
    assert batch["paired"]["image_tokens"].shape == (8, *GRID)
    assert all(k.startswith(b"text_only-") for k in batch["text_only"]["key"].numpy())


def test_batches_hold_the_records(data_dir):
    truth = {}
    for path in manifests.read_manifest(data_dir).shard_paths("paired"):
        for record in tf.data.TFRecordDataset(path):
            example = schema.decode_example(record.numpy())
            truth[example["key"]] = example
    batch = next(iter(mixture(data_dir)))["paired"]
    for i, key in enumerate(batch["key"].numpy()):
        example = truth[key.decode()]
        np.testing.assert_array_equal(batch["image_tokens"][i], example["image/tokens"])
        assert batch["caption"][i].numpy().decode() == example["text/caption"]


def test_text_termination_and_padding_by_hand(tmp_path):
    ids = {"a": [5, 6, 7], "b": [8], "c": [9, 10, 11, 12, 13, 14]}
    records = [(k, schema.encode_example(k, text_ids=v)) for k, v in ids.items()]
    manifests.write_manifest(tmp_path, splits={"t": schema.write_split(tmp_path, "t", records, 1)},
                            text_vocab=manifests.TextVocabInfo("v", TEXT_VOCAB))
    spec = pipeline.StreamSpec(str(tmp_path), "t", 3, fields=("key", "text_ids"), text_length=4)
    dataset = pipeline.stream_dataset(spec, seed=0, eos_id=EOS, pad_id=PAD, repeat=False, shuffle=False)
    (batch,) = list(dataset)
    got = dict(zip([k.decode() for k in batch["key"].numpy()], batch["text_ids"].numpy().tolist()))
    assert got == {"a": [5, 6, 7, 1], "b": [8, 1, 0, 0], "c": [9, 10, 11, 1]}
    assert batch["text_ids"].dtype == tf.int32


def test_images_are_decoded_and_resized(data_dir):
    for resolution in (None, 4):  # None: the manifest's image_size (8), the stored size
        spec = pipeline.StreamSpec(data_dir, "image_only", 4, fields=("key", "image"), image_resolution=resolution)
        dataset = pipeline.stream_dataset(spec, seed=0, eos_id=EOS, pad_id=PAD)
        size = resolution or 8
        assert dataset.element_spec["image"] == tf.TensorSpec([4, size, size, 3], tf.uint8)
        batch = next(iter(dataset))
        if resolution is None:
            for key, image in zip(batch["key"].numpy(), batch["image"].numpy()):
                np.testing.assert_array_equal(image, pixels(int(key.decode().split("-")[1])))


def test_determinism_and_per_stream_seeds(data_dir):
    first = take(iter(mixture(data_dir, seed=3)), 4)
    assert_same(first, take(iter(mixture(data_dir, seed=3)), 4))
    other = take(iter(mixture(data_dir, seed=4)), 4)
    assert not np.array_equal(first[0]["paired"]["key"], other[0]["paired"]["key"])
    # A stream's order depends on the seed and its own name only, not on the other streams.
    alone = pipeline.mixture_dataset(
        {"paired": mixture_specs(data_dir)["paired"]}, seed=3, eos_id=EOS, pad_id=PAD
    )
    assert_same([b["paired"] for b in first], [b["paired"] for b in take(iter(alone), 4)])


def test_checkpointed_iterator_resumes_with_the_same_batches(data_dir, tmp_path):
    original = pipeline.InputIterator(mixture(data_dir), files=[])
    take(original, 7)  # past the first epoch of `paired` (48 records / 8), shuffle state included
    path = tf.train.Checkpoint(iterator=original.checkpointable).save(str(tmp_path / "ckpt"))
    expected = take(original, 5)

    resumed = pipeline.InputIterator(mixture(data_dir), files=[])
    tf.train.Checkpoint(iterator=resumed.checkpointable).restore(path).assert_consumed()
    assert_same(expected, take(resumed, 5))
    fresh = take(pipeline.InputIterator(mixture(data_dir), files=[]), 5)
    assert not np.array_equal(fresh[0]["paired"]["key"], expected[0]["paired"]["key"])


@pytest.mark.parametrize("split", ["paired", "one_shard"])  # file sharding, record sharding
def test_input_pipelines_read_disjoint_records(data_dir, split):
    keys = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=2)
        spec = pipeline.StreamSpec(data_dir, split, batch_size=2, fields=("key",))
        dataset = pipeline.stream_dataset(spec, seed=0, eos_id=EOS, pad_id=PAD, input_context=context,
                                          repeat=False)
        assert dataset.element_spec["key"].shape == [1]  # per-replica batch
        keys.append({k for batch in dataset for k in batch["key"].numpy()})
    assert not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == manifests.read_manifest(data_dir).splits[split].num_records


def test_wrong_token_count_names_the_record(tmp_path):
    good = write_split(tmp_path, "paired", 7, 1)
    bad = ("bad-record", schema.encode_example("bad-record", image_tokens=np.zeros((2, 2), np.int64)))
    records = [(schema.decode_example(r.numpy())["key"], r.numpy()) for r in
               tf.data.TFRecordDataset(str(tmp_path / good.shards[0]))] + [bad]
    write_manifest(tmp_path, {"mixed": schema.write_split(tmp_path, "mixed", records, 1)})
    spec = pipeline.StreamSpec(str(tmp_path), "mixed", 8, fields=("image_tokens",))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)2x3=6 tokens.*bad-record"):
        list(pipeline.stream_dataset(spec, seed=0, eos_id=EOS, pad_id=PAD, repeat=False))


def test_image_only_records_in_a_text_stream_are_named(data_dir):
    spec = pipeline.StreamSpec(data_dir, "image_only", 4, fields=("text_ids",))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)without text/ids.*image_only-0"):
        next(iter(pipeline.stream_dataset(spec, seed=0, eos_id=EOS, pad_id=PAD)))


def test_fingerprints_are_checked_for_the_ids_a_stream_reads(data_dir):
    specs = mixture_specs(data_dir)
    with pytest.raises(manifests.FingerprintMismatchError, match="sha256:image.*sha256:new"):
        pipeline.stream_dataset(specs["image_only"], seed=0, eos_id=EOS, pad_id=PAD,
                                expected_image_tokenizer="sha256:new")
    # The text-only stream reads no image tokens, so another image tokenizer is fine.
    pipeline.stream_dataset(specs["text_only"], seed=0, eos_id=EOS, pad_id=PAD,
                            expected_image_tokenizer="sha256:new", expected_text_vocab="sha256:text")


def test_spec_validation(data_dir):
    with pytest.raises(ValueError, match="fields"):
        pipeline.StreamSpec(data_dir, "paired", 8, fields=("pixels",))
    with pytest.raises(ValueError, match="no split 'nope'"):
        pipeline.stream_dataset(pipeline.StreamSpec(data_dir, "nope", 8), seed=0, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="named 'other'"):
        pipeline.mixture_dataset({"paired": pipeline.StreamSpec(data_dir, "paired", 8, name="other")},
                                 seed=0, eos_id=EOS, pad_id=PAD)


# Runs in a fresh interpreter: logical devices must be configured before TensorFlow
# initialises its devices, which this test process has long done.
DISTRIBUTED = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[2])
    from test_pipeline import mixture_specs, EOS, PAD
    from mmt.data import pipeline

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    specs = mixture_specs(sys.argv[1])
    local = lambda value: [t.numpy() for t in strategy.experimental_local_results(value)]

    # distribute_datasets_from_function: each replica gets half of every global batch.
    from_function = iter(pipeline.distribute(strategy, specs, seed=0, eos_id=EOS, pad_id=PAD))
    batch = next(from_function)
    for name, spec in specs.items():
        keys = local(batch[name]["key"])
        assert [len(k) for k in keys] == [spec.batch_size // 2] * 2, (name, keys)
        assert not set(keys[0]) & set(keys[1])
    assert [t.shape for t in local(batch["paired"]["image_tokens"])] == [(4, 2, 3)] * 2
    try:
        pipeline.InputIterator(pipeline.distribute(strategy, specs, seed=0, eos_id=EOS, pad_id=PAD)).checkpointable
        raise AssertionError("a distributed dataset's iterator is not checkpointable")
    except TypeError as e:
        assert "from_specs" in str(e)

    # The checkpointable iterator hands the replicas the same batches.
    make = lambda: pipeline.InputIterator.from_specs(specs, strategy=strategy, seed=0, eos_id=EOS, pad_id=PAD)
    iterator = make()
    first = [next(iterator) for _ in range(3)]
    expected_first = [batch] + [next(from_function) for _ in range(2)]
    for a, b in zip(first, expected_first):
        for name in specs:
            for x, y in zip(local(a[name]["key"]), local(b[name]["key"])):
                np.testing.assert_array_equal(x, y)

    # ... and resumes exactly from a checkpoint.
    path = tf.train.Checkpoint(iterator=iterator.checkpointable).save(sys.argv[3])
    expected = [local(next(iterator)["paired"]["text_ids"]) for _ in range(4)]
    resumed = make()
    tf.train.Checkpoint(iterator=resumed.checkpointable).restore(path).assert_consumed()
    got = [local(next(resumed)["paired"]["text_ids"]) for _ in range(4)]
    np.testing.assert_array_equal(np.array(expected), np.array(got))

    result = strategy.run(lambda b: tf.shape(b["text_only"]["text_ids"])[0], args=(next(resumed),))
    assert [int(r) for r in local(result)] == [2, 2]
    print("DISTRIBUTED OK")
""")


def test_distribute_over_two_logical_cpus(data_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", DISTRIBUTED, data_dir, os.path.dirname(os.path.abspath(__file__)),
         str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=240, cwd=REPO_ROOT,
    )
    assert result.returncode == 0 and "DISTRIBUTED OK" in result.stdout, result.stdout + result.stderr[-5000:]
