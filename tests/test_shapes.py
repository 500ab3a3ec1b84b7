"""The embedded `shapes` data set: determinism, disjoint splits, captions, detector, tfds."""

import itertools

import numpy as np
import pytest
from PIL import Image

from mmt.data import shapes
from mmt.data.shapes import scene as shapes_scene
from harness import jax_check

SMALL = shapes.ShapesConfig(resolution=32)


def _scenes(config, split, n):
    return {shapes.scene_key(e.objects) for e in shapes.generate(config, split, n)}


# --- generation ------------------------------------------------------------------------


def test_examples_are_well_formed():
    for example in shapes.generate(shapes.ShapesConfig(), "paired", 50):
        assert example.image.shape == (64, 64, 3) and example.image.dtype == np.uint8
        assert 1 <= len(example.objects) <= 3
        assert list(example.objects) == sorted(example.objects)
        assert len({o.cell for o in example.objects}) == len(example.objects)
        assert example.key.startswith("shapes/paired/0/")
        assert shapes.split_of(example.objects, shapes.ShapesConfig()) == "paired"


def test_same_seed_same_examples_other_seed_other_examples():
    first = list(shapes.generate(SMALL, "eval", 20))
    again = list(shapes.generate(SMALL, "eval", 20))
    other = list(shapes.generate(shapes.ShapesConfig(resolution=32, seed=1), "eval", 20))
    for a, b in zip(first, again):
        assert a.key == b.key and a.caption == b.caption and a.objects == b.objects
        np.testing.assert_array_equal(a.image, b.image)
    assert [a.caption for a in first] != [c.caption for c in other]
    assert sum(not np.array_equal(a.image, c.image) for a, c in zip(first, other)) >= 15
    assert other[0].key == "shapes/eval/1/00000000"


def test_start_offset_yields_the_same_items_as_a_longer_run():
    whole = list(shapes.generate(SMALL, "text_only", 12))
    tail = list(shapes.generate(SMALL, "text_only", 5, start=7))
    assert [e.key for e in tail] == [e.key for e in whole[7:]]
    assert [e.caption for e in tail] == [e.caption for e in whole[7:]]
    for a, b in zip(tail, whole[7:]):
        np.testing.assert_array_equal(a.image, b.image)


def test_scene_and_caption_do_not_depend_on_the_resolution():
    at32 = list(shapes.generate(SMALL, "paired", 10))
    at128 = list(shapes.generate(shapes.ShapesConfig(resolution=128), "paired", 10))
    assert [(e.objects, e.caption) for e in at32] == [(e.objects, e.caption) for e in at128]
    assert at128[0].image.shape == (128, 128, 3)


def test_splits_are_disjoint_in_scenes():
    scenes = {split: _scenes(SMALL, split, 1500) for split in shapes.SPLITS}
    for a, b in itertools.combinations(shapes.SPLITS, 2):
        assert not scenes[a] & scenes[b], (a, b)


def test_split_shares_follow_the_fractions():
    config = shapes.ShapesConfig()
    rng = np.random.default_rng(0)
    counts = {s: 0 for s in shapes.SPLITS}
    for _ in range(20_000):
        counts[shapes.split_of(shapes.sample_objects(rng, config), config)] += 1
    for split, fraction in config.split_fractions:
        assert abs(counts[split] / 20_000 - fraction) < 0.02, counts


def test_held_out_combinations_only_in_eval():
    held_out = (("circle", "red"), ("triangle", "blue"))
    config = shapes.ShapesConfig(resolution=32, held_out_combinations=held_out)
    for split in ("paired", "image_only", "text_only"):
        for example in shapes.generate(config, split, 400):
            assert not {(o.shape, o.color) for o in example.objects} & set(held_out), example
    pairs = {(o.shape, o.color) for e in shapes.generate(config, "eval", 400) for o in e.objects}
    assert set(held_out) <= pairs


@pytest.mark.parametrize("kwargs, message", [
    (dict(resolution=48), "48"),
    (dict(max_objects=4), "max_objects=4"),
    (dict(min_objects=0), "min_objects=0"),
    (dict(min_objects=3, max_objects=2), "min_objects=3"),
    (dict(held_out_combinations=(("hexagon", "red"),)), "hexagon"),
    (dict(held_out_combinations=(("circle", "pink"),)), "pink"),
    (dict(split_fractions=(("paired", 0.5), ("eval", 0.5))), "split_fractions"),
    (dict(split_fractions=(("paired", 0.5), ("image_only", 0.5), ("text_only", 0.5), ("eval", 0.1))), "summing"),
    (dict(seed=-1), "seed"),
])  # fmt: skip
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        shapes.ShapesConfig(**kwargs)


def test_config_normalises_lists_and_generate_validates_arguments():
    config = shapes.ShapesConfig(held_out_combinations=[["circle", "red"]])
    assert config == shapes.ShapesConfig(held_out_combinations=(("circle", "red"),))
    with pytest.raises(ValueError, match="'train'"):
        shapes.generate(config, "train", 1)
    with pytest.raises(ValueError, match="-1"):
        shapes.generate(config, "eval", -1)
    empty = shapes.ShapesConfig(split_fractions=(("paired", 0.0), ("image_only", 0.5), ("text_only", 0.5),
                                                 ("eval", 0.0)))
    with pytest.raises(RuntimeError, match="paired"):
        next(shapes.generate(empty, "paired", 1))


@jax_check(modules=["mmt.data.shapes"], forbid=("tensorflow", "keras"))
def test_shapes_does_not_import_tensorflow():
    """Neither TensorFlow nor Keras: the data set generates anywhere."""


# --- rendering ---------------------------------------------------------------------------


def test_objects_stay_inside_their_cells_with_a_margin():
    for resolution in shapes.RESOLUTIONS:
        bounds = shapes_scene.cell_bounds(resolution)
        rng = np.random.default_rng(resolution)
        for shape, size, cell in itertools.product(shapes.SHAPES, shapes.SIZES, range(9)):
            for _ in range(3):
                image = shapes.render([shapes.ShapeObject(shape, "red", size, cell)], resolution, rng)
                ys, xs = np.nonzero(image[..., 0])
                row, col = divmod(cell, 3)
                assert xs.min() >= bounds[col] + 1 and xs.max() <= bounds[col + 1] - 2, (resolution, shape, size)
                assert ys.min() >= bounds[row] + 1 and ys.max() <= bounds[row + 1] - 2, (resolution, shape, size)


def test_every_shape_and_size_has_a_distinct_mask_at_every_subpixel_offset():
    # What makes the detector exact: no two (shape, size) pairs draw the same pixels.
    for resolution in shapes.RESOLUTIONS:
        half = int(shapes_scene.extent("large", resolution)) + 2
        y, x = np.mgrid[0: 2 * half, 0: 2 * half] + 0.5
        masks = {}
        for shape, size, fx, fy in itertools.product(shapes.SHAPES, shapes.SIZES, (0, 0.5), (0, 0.5)):
            mask = shapes_scene.shape_mask(shape, shapes_scene.extent(size, resolution), x - half - fx,
                                           y - half - fy)
            ys, xs = np.nonzero(mask)
            crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
            masks.setdefault((crop.shape, crop.tobytes()), set()).add((shape, size))
        assert all(len(owners) == 1 for owners in masks.values()), (resolution, masks.values())


def test_render_without_rng_centres_objects():
    image = shapes.render([shapes.ShapeObject("square", "green", "large", 4)], 64)
    ys, xs = np.nonzero(image[..., 1])
    assert (xs.min() + xs.max() + 1) / 2 == pytest.approx(32) and (ys.min() + ys.max() + 1) / 2 == pytest.approx(32)
    assert set(map(tuple, image.reshape(-1, 3))) == {(0, 0, 0), (0, 255, 0)}


# --- captions ----------------------------------------------------------------------------


def test_parser_is_exact_on_generated_captions():
    config = shapes.ShapesConfig(resolution=32, seed=3)
    count = 0
    for split in shapes.SPLITS:
        for example in shapes.generate(config, split, 2500):
            assert shapes.parse_caption(example.caption) == example.objects, example.caption
            assert len(example.caption.split()) <= 30, example.caption
            count += 1
    assert count == 10_000


def test_captions_are_varied():
    captions = [e.caption for e in shapes.generate(SMALL, "paired", 300)]
    words = {w for c in captions for w in c.split()}
    assert {"big", "little", "magenta", "disk", "rhombus", "upper", "there", "image", "is"} <= words
    assert any(c.split()[0] in ("in", "at", "on", "along") for c in captions)  # position first


def test_parser_handles_case_punctuation_and_paraphrases():
    expected = (shapes.ShapeObject("circle", "red", "large", 0), shapes.ShapeObject("square", "blue", "small", 7))
    for text in ["a large red circle in the top left and a small blue square at the bottom",
                 "A big red disk in the upper left, and a little blue square along the bottom.",
                 "at the bottom center is a small blue square and at the top left is a large red circle"]:
        assert shapes.parse_caption(text) == expected, text
    assert shapes.parse_caption("a small cyan diamond in the middle")[0].cell == 4
    assert shapes.parse_caption("a small cyan diamond on the right side")[0].cell == 5


@pytest.mark.parametrize("text", [
    "", "   ", "hello world", "a red circle in the top left", "a large red circle",
    "a large red blue circle at the top", "a large red circle and square at the top",
    "a large red circle in the top bottom", "a large red circle in the top left and",
])  # fmt: skip
def test_parser_rejects_garbage(text):
    with pytest.raises(ValueError, match="cannot parse caption"):
        shapes.parse_caption(text)


# --- detector ----------------------------------------------------------------------------


@pytest.mark.parametrize("resolution, count", [(32, 600), (64, 600), (128, 150)])
def test_detector_on_ground_truth(resolution, count):
    config = shapes.ShapesConfig(resolution=resolution, seed=11)
    examples = list(shapes.generate(config, "eval", count // 2)) + list(shapes.generate(config, "paired", count // 2))
    predicted = [shapes.detect(e.image) for e in examples]
    scores = shapes.attribute_accuracy(predicted, [e.objects for e in examples])
    assert scores["exact"] >= 0.995, scores


def test_detector_on_a_hand_built_scene():
    scene = (shapes.ShapeObject("circle", "red", "large", 0), shapes.ShapeObject("triangle", "yellow", "small", 4),
             shapes.ShapeObject("diamond", "cyan", "large", 8), shapes.ShapeObject("square", "purple", "small", 5))
    for resolution in shapes.RESOLUTIONS:
        assert shapes.detect(shapes.render(scene, resolution)) == tuple(sorted(scene))
        assert shapes.detect(shapes.render(scene, resolution, np.random.default_rng(0))) == tuple(sorted(scene))


def test_detector_survives_arbitrary_images():
    rng = np.random.default_rng(0)
    for resolution in shapes.RESOLUTIONS:
        images = [np.zeros((resolution, resolution, 3), np.uint8), np.full((resolution, resolution, 3), 255, np.uint8),
                  np.full((resolution, resolution, 3), (255, 0, 0), np.uint8),  # one colour everywhere
                  np.full((resolution, resolution, 3), (128, 90, 40), np.uint8),  # no palette colour
                  rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)]
        for image in images:
            found = shapes.detect(image)
            assert isinstance(found, tuple) and all(isinstance(o, shapes.ShapeObject) for o in found)
        assert shapes.detect(images[0]) == ()
        if resolution > 32:  # at 32 noise forms blobs as big as the smallest objects (documented)
            assert shapes.detect(images[-1]) == ()
    with pytest.raises(ValueError, match="float"):
        shapes.detect(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        shapes.detect(np.zeros((32, 48, 3), np.uint8))


def test_detector_degrades_gracefully_on_noisy_images():
    rng = np.random.default_rng(1)
    examples = list(shapes.generate(shapes.ShapesConfig(seed=5), "eval", 100))
    noisy = [np.clip(e.image + rng.normal(0, 40, e.image.shape), 0, 255).astype(np.uint8) for e in examples]
    scores = shapes.attribute_accuracy([shapes.detect(x) for x in noisy], [e.objects for e in examples])
    assert scores["exact"] >= 0.95 and scores["color"] >= 0.99, scores


def test_scores():
    a = shapes.ShapeObject("circle", "red", "large", 0)
    b = shapes.ShapeObject("square", "blue", "small", 4)
    assert shapes.exact_match((a, b), (b, a)) and not shapes.exact_match((a,), (a, b))
    perfect = shapes.object_scores((b, a), (a, b))
    assert all(v == 1.0 for v in perfect.values())
    moved = shapes.object_scores((shapes.ShapeObject("circle", "red", "large", 1),), (a, b))
    assert moved == {"exact": 0.0, "count": 0.0, "shape": 0.5, "color": 0.5, "size": 0.5, "cell": 0.0, "object": 0.0}
    assert shapes.object_scores((), ())["exact"] == 1.0 and shapes.object_scores((), (a,))["color"] == 0.0
    mean = shapes.attribute_accuracy([(a,), ()], [(a,), (a,)])
    assert mean["exact"] == 0.5 and mean["num_examples"] == 2


# --- output ------------------------------------------------------------------------------


def test_save_grid_writes_a_png_of_the_expected_size(tmp_path):
    examples = list(shapes.generate(SMALL, "paired", 6))
    path = tmp_path / "sub" / "grid.png"
    shapes.save_grid([e.image for e in examples], [e.caption for e in examples], path, columns=4, scale=3)
    grid = Image.open(path)
    assert grid.format == "PNG" and grid.mode == "RGB"
    tile, gap = 32 * 3, shapes._GRID_GAP
    assert grid.width == gap + 4 * (tile + gap)
    assert grid.height > gap + 2 * (tile + gap) + 2 * 10  # two rows, each with caption lines
    # the first tile is the first image, upscaled by nearest neighbour
    first = np.asarray(grid)[gap: gap + tile, gap: gap + tile]
    np.testing.assert_array_equal(first[::3, ::3], examples[0].image)
    with pytest.raises(ValueError, match="captions"):
        shapes.save_grid([examples[0].image], [], path)
    # A batch as `text_to_image` returns it (uint8 [N, R, R, 3]) works like a list.
    batch = np.stack([e.image for e in examples])
    shapes.save_grid(batch, [e.caption for e in examples], tmp_path / "batch.png", columns=4, scale=3)
    assert (tmp_path / "batch.png").read_bytes() == path.read_bytes()


def test_tfds_builder_works_offline(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from mmt.data.shapes import tfds as shapes_tfds

    config = shapes_tfds.builder_config(32, name="tiny", examples_per_split={"paired": 6, "eval": 3}, seed=2)
    ds = tfds.load("mmt_shapes", split="paired", data_dir=tmp_path, builder_kwargs={"config": config})
    truth = {e.key: e for e in shapes.generate(config.shapes, "paired", 6)}
    seen = 0
    for record in tfds.as_numpy(ds):
        key, caption = record["key"].decode(), record["caption"].decode()
        assert record["image"].shape == (32, 32, 3)
        np.testing.assert_array_equal(record["image"], truth[key].image)
        objects = record["objects"]
        stored = tuple(shapes.ShapeObject(shapes.SHAPES[s], tuple(shapes.COLORS)[c], shapes.SIZES[z], int(cell))
                       for s, c, z, cell in zip(objects["shape"], objects["color"], objects["size"], objects["cell"]))
        assert shapes.parse_caption(caption) == stored == truth[key].objects
        seen += 1
    assert seen == 6
    builder = tfds.builder("mmt_shapes", data_dir=tmp_path, config=config)
    assert builder.info.splits["eval"].num_examples == 3
    assert tfds.builder("mmt_shapes", data_dir=tmp_path).builder_config.shapes.resolution == 64
