"""MAE augmentation in tf.data (mmt.data.augment via StreamSpec): stateless, per element, resumable."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mmt.data import augment, manifests, pipeline, schema

EOS, PAD = 1, 0
STORED = 48  # side of the stored images
R = 24  # the streams' resolution: crops are taken from the stored image, then resized


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def ramp(side: int = STORED) -> np.ndarray:
    """uint8 [side, side, 3]: red = 5 * column, green = 5 * row: every pixel says where it is."""
    y, x = np.mgrid[0:side, 0:side]
    return np.stack([5 * x, 5 * y, np.full_like(x, 77)], -1).astype(np.uint8)


def noise(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (R, R, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """`same`: 64 records of one ramp image (only augmentation tells them apart); `noise`: 16 R x R images."""
    data_dir = str(tmp_path_factory.mktemp("augment"))
    same = [(f"same-{i:03d}", schema.encode_example(f"same-{i:03d}", image_encoded=png(ramp()), text_ids=[5]))
            for i in range(64)]
    noisy = [(f"noise-{i:03d}", schema.encode_example(f"noise-{i:03d}", image_encoded=png(noise(i))))
             for i in range(16)]
    text = [(f"text-{i}", schema.encode_example(f"text-{i}", text_ids=[5, 6])) for i in range(4)]
    manifests.write_manifest(data_dir, splits={
        "same": schema.write_split(data_dir, "same", same, 2),
        "noise": schema.write_split(data_dir, "noise", noisy, 1),
        "text": schema.write_split(data_dir, "text", text, 1),
    }, text_vocab=manifests.TextVocabInfo("sha256:text", 32), options={"image_size": STORED})
    return data_dir


def stream(data_dir, split="same", seed=0, batch_size=8, **kwargs):
    spec_args = {k: kwargs.pop(k) for k in ("random_resized_crop", "horizontal_flip") if k in kwargs}
    spec = pipeline.StreamSpec(data_dir, split, batch_size, fields=("key", "image"), image_resolution=R, **spec_args)
    return pipeline.stream_dataset(spec, seed=seed, eos_id=EOS, pad_id=PAD, **kwargs)


def images(dataset, n):
    iterator = iter(dataset)
    return np.stack([next(iterator)["image"].numpy() for _ in range(n)])  # (n, B, R, R, 3)


MAE = {"random_resized_crop": augment.MAE_CROP_SCALE, "horizontal_flip": True}


def test_shapes_are_static_and_uint8(data_dir):
    spec = stream(data_dir, **MAE).element_spec
    assert spec["image"] == tf.TensorSpec([8, R, R, 3], tf.uint8)


def test_same_seed_same_images_other_seed_other_images(data_dir):
    first = images(stream(data_dir, seed=3, **MAE), 3)
    np.testing.assert_array_equal(first, images(stream(data_dir, seed=3, **MAE), 3))
    assert not np.array_equal(first, images(stream(data_dir, seed=4, **MAE), 3))


def test_every_element_and_step_draws_its_own_crop(data_dir):
    # Every record holds the same picture: only the crop and flip tell the images apart.
    # Crops are whole-pixel boxes, so two of many draws may coincide by chance.
    batches = images(stream(data_dir, **MAE), 16).reshape(2, 64, -1)  # 2 epochs of 64 records
    assert len({row.tobytes() for row in batches[0, :32]}) >= 31  # 4 steps x 8 images
    # The same 64 records again in the second epoch: new crops, not the first epoch's.
    assert len({row.tobytes() for row in batches.reshape(128, -1)}) >= 124


def test_resumed_iterator_redraws_the_same_crops(data_dir, tmp_path):
    original = iter(stream(data_dir, **MAE))
    for _ in range(5):
        next(original)
    path = tf.train.Checkpoint(iterator=original).save(str(tmp_path / "ckpt"))
    expected = [next(original)["image"].numpy() for _ in range(4)]
    resumed = iter(stream(data_dir, **MAE))
    tf.train.Checkpoint(iterator=resumed).restore(path).assert_consumed()
    np.testing.assert_array_equal(expected, [next(resumed)["image"].numpy() for _ in range(4)])


def test_flip_mirrors_half_the_images_like_numpy(data_dir):
    dataset = stream(data_dir, "noise", batch_size=16, horizontal_flip=True, repeat=False, shuffle=False)
    flipped = 0
    for batch in dataset:
        for key, image in zip(batch["key"].numpy(), batch["image"].numpy()):
            original = noise(int(key.decode().split("-")[1]))
            if np.array_equal(image, original[:, ::-1]):
                flipped += 1
            else:
                np.testing.assert_array_equal(image, original)
    assert 3 <= flipped <= 13  # 16 fair coins


def test_off_is_identity(data_dir):
    plain = stream(data_dir, "noise", batch_size=16, repeat=False, shuffle=False)
    batch = next(iter(plain))
    for key, image in zip(batch["key"].numpy(), batch["image"].numpy()):
        np.testing.assert_array_equal(image, noise(int(key.decode().split("-")[1])))
    # A crop of the whole image at the stored size is the image (bicubic at scale 1 is exact).
    whole = stream(data_dir, "noise", batch_size=16, random_resized_crop=(1.0, 1.0), repeat=False, shuffle=False)
    np.testing.assert_array_equal(next(iter(whole))["image"].numpy(), batch["image"].numpy())


def test_crop_boxes_keep_area_and_aspect_ratio_in_range():
    for scale in ((0.2, 1.0), (0.3, 0.4)):
        areas = []
        for position in range(300):
            begin, size = augment.crop_box(tf.constant([64, 80, 3]), tf.constant([7, position], tf.int64), scale)
            (y, x, _), (h, w, _) = begin.numpy(), size.numpy()
            assert 0 <= y and y + h <= 64 and 0 <= x and x + w <= 80
            area = h * w / (64 * 80)
            assert scale[0] - 1e-6 <= area <= scale[1] + 1e-6, (scale, area)
            assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05, (h, w)  # whole pixels round the ratio
            areas.append(area)
        assert np.ptp(areas) > 0.5 * (scale[1] - scale[0])  # the range is used, not one value


def test_crop_region_measured_from_the_pixels(data_dir):
    """The ramp's red / green values give back each crop's columns / rows: its area is in range."""
    scale = (0.25, 0.5)
    batch = images(stream(data_dir, batch_size=16, random_resized_crop=scale), 1)[0].astype(float)
    # Bicubic reproduces a linear ramp away from the crop's border; the inner columns
    # give its slope: stored pixels per output pixel, times R, is the crop's side.
    inner = slice(4, R - 4)
    for image in batch:
        width = np.polyfit(np.arange(R)[inner], image[R // 2, inner, 0], 1)[0] / 5 * R
        height = np.polyfit(np.arange(R)[inner], image[inner, R // 2, 1], 1)[0] / 5 * R
        area = width * height / STORED**2
        assert scale[0] - 0.03 <= area <= scale[1] + 0.03, area
        assert 3 / 4 - 0.08 <= width / height <= 4 / 3 + 0.08


def test_pipeline_equals_the_eager_function_at_each_position(data_dir):
    dataset = stream(data_dir, "noise", batch_size=4, random_resized_crop=(0.2, 1.0), horizontal_flip=True,
                     repeat=False, shuffle=False)
    crop_key = pipeline.derive_seed(0, "noise", "random_resized_crop")
    flip_key = pipeline.derive_seed(0, "noise", "horizontal_flip")
    position = 0
    for batch in dataset:
        for key, image in zip(batch["key"].numpy(), batch["image"].numpy()):
            eager = augment.augment_image(
                tf.constant(noise(int(key.decode().split("-")[1]))), R, crop_scale=(0.2, 1.0), flip=True,
                crop_seed=tf.constant([crop_key, position], tf.int64),
                flip_seed=tf.constant([flip_key, position], tf.int64))
            np.testing.assert_array_equal(image, eager.numpy())
            position += 1
    assert position == 16


def test_input_pipelines_draw_disjoint_seeds(data_dir):
    """Two replicas reading the same records (record sharding) still crop them differently."""
    got = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=2)
        got.append(images(stream(data_dir, "noise", batch_size=8, random_resized_crop=(0.2, 1.0),
                                 input_context=context, shuffle=False), 2).reshape(8, -1))
    assert len({row.tobytes() for row in np.concatenate(got)}) == 16


def test_spec_validation(data_dir):
    for bad in ((0.0, 1.0), (0.5, 0.2), (0.2, 1.5), (0.2,), "big"):
        with pytest.raises(ValueError, match="random_resized_crop"):
            pipeline.StreamSpec(data_dir, "same", 8, fields=("image",), random_resized_crop=bad)
    with pytest.raises(ValueError, match="horizontal_flip must be True or False"):
        pipeline.StreamSpec(data_dir, "same", 8, fields=("image",), horizontal_flip=0.5)
    with pytest.raises(ValueError, match="does not read"):
        pipeline.StreamSpec(data_dir, "same", 8, fields=("text_ids",), horizontal_flip=True)
    # gin hands lists over; the spec keeps a tuple of floats.
    spec = pipeline.StreamSpec(data_dir, "same", 8, fields=("image",), random_resized_crop=[0.2, 1])
    assert spec.random_resized_crop == (0.2, 1.0) and spec.augments


def test_records_without_an_image_are_named(data_dir):
    spec = pipeline.StreamSpec(data_dir, "text", 2, fields=("image",), image_resolution=R)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)without image/encoded.*text-"):
        next(iter(pipeline.stream_dataset(spec, seed=0, eos_id=EOS, pad_id=PAD)))
