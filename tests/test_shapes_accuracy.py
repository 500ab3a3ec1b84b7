"""Attribute accuracy read back by the shapes detector and parser."""

import numpy as np
import pytest

from mmt.data import shapes
from mmt.evaluation import shapes_accuracy


def _examples(n=12):
    return list(shapes.generate(shapes.ShapesConfig(resolution=32, seed=4), "eval", n))


def test_perfect_generators_score_one():
    examples = _examples()
    by_caption = {e.caption: e.image for e in examples}
    scores = shapes_accuracy.t2i_accuracy(lambda caps: np.stack([by_caption[c] for c in caps]),
                                          [e.caption for e in examples], batch_size=5)
    assert scores["attribute"] == 1.0 and scores["exact"] == 1.0 and scores["num_examples"] == 12
    images = np.stack([e.image for e in examples])
    by_image = {e.image.tobytes(): e.caption for e in examples}
    scores, captions = shapes_accuracy.i2t_accuracy(lambda ims: [by_image[i.tobytes()] for i in ims], images,
                                                    [e.objects for e in examples], batch_size=5)
    assert scores["attribute"] == 1.0 and captions == [e.caption for e in examples]


def test_blank_images_and_unreadable_captions_score_zero():
    examples = _examples(4)
    blank = lambda caps: np.zeros((len(caps), 32, 32, 3), np.uint8)
    assert shapes_accuracy.t2i_accuracy(blank, [e.caption for e in examples])["attribute"] == 0.0
    scores, _ = shapes_accuracy.i2t_accuracy(lambda ims: ["zzz"] * len(ims), np.stack([e.image for e in examples]),
                                             [e.objects for e in examples])
    assert scores["attribute"] == 0.0 and scores["exact"] == 0.0


def test_one_wrong_colour_costs_a_quarter_of_an_object():
    objects = (shapes.ShapeObject("circle", "red", "large", 0),)
    wrong = (shapes.ShapeObject("circle", "blue", "large", 0),)
    scores = shapes_accuracy._summary([wrong], [objects])
    assert scores["attribute"] == pytest.approx(0.75) and scores["exact"] == 0.0


def test_every_generator_call_gets_one_batch_shape_and_padding_is_never_scored(tmp_path):
    """The last batch is padded to `batch_size` (so a compiled sampler compiles once); the
    padded results reach neither the scores nor the grid, even with fewer examples than
    the grid's half."""
    examples = _examples(7)
    by_caption = {e.caption: e.image for e in examples}
    by_image = {e.image.tobytes(): e.caption for e in examples}
    sizes = []

    class Task:
        def text_to_image(self, captions, seed=0):
            sizes.append(len(captions))
            return np.stack([by_caption[c] for c in captions]), None

        def image_to_text(self, images):
            sizes.append(len(images))
            return [by_image[i.tobytes()] for i in images]

    result = shapes_accuracy.evaluate_generation(Task(), examples, batch_size=5, grid_path=tmp_path / "g.png",
                                                 grid_samples=16)
    assert sizes == [5, 5, 5, 5]
    assert result["t2i"]["num_examples"] == 7 and result["t2i"]["attribute"] == 1.0
    assert result["i2t"]["num_examples"] == 7 and result["i2t"]["attribute"] == 1.0
    assert (tmp_path / "g.png").exists() and len(result["samples"]) == 14
