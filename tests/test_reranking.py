"""Reranking a generator's samples by a CLIP: `mmt.tasks.reranking` and `mmt.generate --rerank_with`."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from mmt.tasks import reranking
from mmt.sampling.rerank import select


class _Generator:
    """Image i of a call is filled with the value 10 * call + i (call order, caption-major)."""

    image_tokenizer_fingerprint = "gen-tok"

    def __init__(self):
        self.calls = []

    def text_to_image(self, captions, seed=0, **options):
        self.calls.append((list(captions), seed, options))
        n = len(captions)
        values = (10 * (len(self.calls) - 1) + np.arange(n)) % 256
        images = np.broadcast_to(values[:, None, None, None], (n, 4, 4, 3)).astype(np.uint8)
        return images, values.reshape(n, 1, 1).astype(np.int32)


class _Clip:
    """Scores an image by its pixel value (pixels) or a code by its value (tokens)."""

    def __init__(self, image_input, fingerprint=None):
        self.model = SimpleNamespace(image_input=image_input, text_length=4, image_size=8)
        self.image_tokenizer_fingerprint = fingerprint
        self.scored = []

    def tokenizers(self):
        return None, SimpleNamespace(encode=lambda texts, length: np.zeros((len(texts), length), np.int32))

    def score(self, codes, ids):
        self.scored.append(("codes", np.asarray(codes).shape))
        return np.asarray(codes).reshape(len(codes), -1)[:, 0].astype(np.float32)

    def score_images(self, images, captions):
        self.scored.append(("images", np.asarray(images).shape))
        return np.asarray(images)[:, 0, 0, 0].astype(np.float32)


def test_scores_follow_draw_order_and_select_keeps_the_best():
    generator, clip = _Generator(), _Clip("pixels")
    captions = ["a", "b", "c"]
    images, scores = reranking.sample_and_score(generator, clip, captions, num_samples=3, seed=5,
                                                prompts_per_call=2, temperature=0.5)
    assert images.shape == (3, 3, 4, 4, 3) and scores.shape == (3, 3)  # as drawn (the CLIP sees them at 8x8)
    # Call 0: captions a, b (6 images, values 0..5); call 1: c padded to 2 prompts (values 10..15, first 3 kept).
    np.testing.assert_array_equal(scores, [[0, 1, 2], [3, 4, 5], [10, 11, 12]])
    assert [c[1] for c in generator.calls] == [5, 7]  # seed + first caption index
    assert generator.calls[1][0] == ["c"] * 6 and generator.calls[0][2] == {"temperature": 0.5}
    best = select(images, scores, 2)
    np.testing.assert_array_equal(best.scores, [[2, 1], [5, 4], [12, 11]])
    np.testing.assert_array_equal(best.samples[:, 0, 0, 0, 0], [2, 5, 12])


@pytest.mark.parametrize("input_kind, fingerprint, scored", [
    ("tokens", "gen-tok", "codes"),  # the generator's own tokenizer: the sampled codes
    ("tokens", "other", "images"),  # another tokenizer: re-encode the decoded images
    ("pixels", None, "images"),
])
def test_what_the_clip_scores(input_kind, fingerprint, scored):
    clip = _Clip(input_kind, fingerprint)
    reranking.sample_and_score(_Generator(), clip, ["a"], num_samples=2, prompts_per_call=1)
    assert clip.scored[0][0] == scored


def test_a_pixel_clip_of_a_resolution_the_images_do_not_divide_is_a_user_error():
    from mmt.errors import UserError

    clip = _Clip("pixels")
    clip.model.image_size = 6
    with pytest.raises(UserError, match="multiple of the generator's resolution"):
        reranking.sample_and_score(_Generator(), clip, ["a"], num_samples=2)


@pytest.mark.slow
def test_generate_reranks_dalle_samples_with_a_clip(tiny_data, tmp_path, capsys):
    from dalle_exports import make_exports
    from mmt import generate
    from mmt.errors import UserError

    runs = make_exports(tiny_data["vocabulary"], tmp_path)
    out = tmp_path / "out"
    prompts = ["a large red circle", "a small blue square"]
    assert generate.main([f"--workdir={runs['dalle']}", f"--rerank_with={runs['clip']}", "--keep=2",
                          f"--output={out}", *(f"--prompt={p}" for p in prompts)]) == 0
    record = json.loads((out / "prompts.json").read_text())
    assert len(record) == 4 and sorted({r["prompt"] for r in record.values()}) == sorted(prompts)
    for i, prompt in enumerate(prompts):
        first, second = (record[n] for n in sorted(record) if n.startswith(f"{i:03d}_"))
        assert first["of"] == 4  # DALLETask.rerank_samples
        assert first["clip_score"] >= second["clip_score"] and first["sample"] != second["sample"]
    assert "reranked by the CLIP" in capsys.readouterr().out
    with pytest.raises(UserError, match="need --rerank_with"):
        generate.main([f"--workdir={runs['dalle']}", "--prompt=x", "--keep=2"])
