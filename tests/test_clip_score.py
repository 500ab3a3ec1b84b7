"""`python -m mmt.evaluate clip_score` and `fid --clip` (mmt/evaluation/clip_score.py): the score is
100 x the cosine of the CLIP's unit embeddings (numpy reference), its t-interval by hand, one generation
pass scored by `clip_score --workdir`, `fid --clip` and `clip_score --images` alike, a trained CLIP
scores the right pairing above a shuffled one, and bad inputs are one `error:` line naming them."""

import json
import math

import numpy as np
import pytest

from mmt import errors, evaluate
from mmt.evaluation import clip_score
from tolerances import reordered_sum_rtol

TEXT_LENGTH = 16  # tests/dalle_exports.py
SMALL = {"width": 16, "depth": 1, "heads": 2, "text_width": 16, "text_depth": 1, "text_heads": 2, "embed_dim": 8}
CAPTIONS = ["a large red circle in the top left", "a small blue square", "a green triangle at the bottom"]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Untrained exports: a token CLIP over a dVAE's codes (32x32 -> 8x8 of 16) and a tiny UPGen over
    the same dVAE (2 decoding steps: cheap), a pixel CLIP (32x32), a DALL-E; a captions file."""
    from dalle_exports import make_exports
    from mmt.tasks import exports
    from mmt.tasks.upgen import UPGenTask
    from mmt.tokenizers.text import TextTokenizer

    root, vocab = tmp_path_factory.mktemp("clip_score"), tiny_data["vocabulary"]
    token = make_exports(vocab, root / "token")
    pixel = make_exports(vocab, root / "pixel", pixel_clip=True)
    network = dict(size="tiny", image_vocab_size=16, grid=(8, 8), text_length=TEXT_LENGTH,
                   text_vocab_size=TextTokenizer.from_file(vocab).vocab_size,
                   size_overrides={"width": 16, "depth": 1, "heads": 2})
    upgen = UPGenTask(network=network, image_tokenizer=str(token["dvae"]), text_vocab=vocab,
                      generation={"num_steps": 2}, compile_inference=False)
    upgen.build()
    exports.save_task(upgen, root / "upgen" / "export", step=5)
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    return {"token_clip": str(token["clip"]), "pixel_clip": str(pixel["clip"]), "dalle": str(token["dalle"]),
            "upgen": str(root / "upgen"), "captions": str(root / "captions.txt")}


def _pixel_clip(vocab, log_logit_scale=None):
    import keras

    from mmt.tasks.clip import CLIPTask
    from mmt.tokenizers.text import TextTokenizer

    keras.utils.set_random_seed(0)
    network = dict(image_input="pixels", image_size=32, patch_size=8, text_length=TEXT_LENGTH,
                   text_vocab_size=TextTokenizer.from_file(vocab).vocab_size, size_overrides=SMALL)
    task = CLIPTask(network=network, text_vocab=vocab, compile_inference=False)
    task.build()
    if log_logit_scale is not None:
        task.model.log_logit_scale.assign(log_logit_scale)
    return task


def test_score_is_100_times_the_cosine_of_the_normalised_embeddings(tiny_data, monkeypatch):
    from mmt.models import clip as clip_model
    from mmt.tokenizers.text import TextTokenizer

    vocab = tiny_data["vocabulary"]
    task = _pixel_clip(vocab, log_logit_scale=math.log(20.0))  # not 100: the scale must be replaced, not kept
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    captions = [*CAPTIONS, "two circles", "a yellow square in the middle"]
    scorer = clip_score.CLIPScorer(task, "tiny", step=7)
    assert scorer.logit_scale == pytest.approx(20.0, rel=1e-6)
    got = scorer.add_images(images, captions)

    # Reference: the projections before normalisation (the model's own `_unit` made the identity),
    # normalised and compared in float64 by numpy.
    ids = TextTokenizer.from_file(vocab).encode(captions, TEXT_LENGTH)
    monkeypatch.setattr(clip_model, "_unit", lambda x: x)
    raw_i = np.asarray(task.model.encode_image(images), np.float64)
    raw_t = np.asarray(task.model.encode_text(ids), np.float64)
    assert np.linalg.norm(raw_i, axis=1).min() > 1e-2 and np.linalg.norm(raw_t, axis=1).min() > 1e-2  # eps negligible
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    want = 100.0 * np.sum(unit(raw_i) * unit(raw_t), axis=1)
    # float32 in the model: each unit vector's norm (a sum of E squares, sqrt, divide: (E-1)/2 + 2 u per
    # component, twice), the E-term dot product ((E - 1) u, the terms' magnitudes summing to <= 1 by
    # Cauchy-Schwarz), x logit_scale and / logit_scale (a few u, exp compiled or not): on a cosine of
    # magnitude <= 1 that is 2 (E - 1) u + 8 u in absolute terms, x 100 here.
    tol = 100.0 * reordered_sum_rtol(SMALL["embed_dim"], chained_ops=8)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    assert np.abs(want).max() > 1.0  # a real comparison, not of zeros

    record = scorer.record()
    assert record["num_captions"] == 5 and record["clip_step"] == 7 and record["clip"] == "tiny"
    assert record["clip_score"] == pytest.approx(want.mean(), abs=tol)
    assert record["negative_fraction"] == np.mean(want < 0)


def test_interval_is_the_student_t_interval_by_hand():
    # n = 4: mean 2.5, s = sqrt(5/3), t(0.975, 3) = 3.182446305284263 (tables).
    summary = clip_score.summarize([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5.0 / 3.0) / 2.0
    assert summary["clip_score"] == 2.5 and summary["num_captions"] == 4 and summary["negative_fraction"] == 0.0
    assert summary["clip_score_ci95"] == pytest.approx([2.5 - half, 2.5 + half], rel=1e-12)
    assert clip_score.summarize([-3.0])["clip_score_ci95"] is None  # one caption: no interval
    assert clip_score.summarize([-3.0])["negative_fraction"] == 1.0


def _fake_fid(monkeypatch, tmp_path):
    """fid with its Inception and distance replaced: the generated batches are consumed as FID would."""
    from mmt.evaluation import fid, fid_inception

    class Extractor:
        def __init__(self, model, resolution, batch_size):
            pass

        def statistics(self, batches):
            stats = fid.FeatureStatistics(2)
            for images in batches:
                stats.update(images.reshape(len(images), -1)[:, :2])
            return stats

    monkeypatch.setattr(fid_inception.FIDInception, "from_file", classmethod(lambda cls, path: None))
    monkeypatch.setattr(fid, "FIDExtractor", Extractor)
    monkeypatch.setattr(fid, "frechet_distance", lambda *a: 1.5)
    (tmp_path / "inception.npz").write_bytes(b"")
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2), sigma=np.eye(2), count=np.int64(10))
    return ["--inception_weights", str(tmp_path / "inception.npz"), "--reference_stats", str(tmp_path / "ref.npz")]


def _cosines(clip, images, captions) -> np.ndarray:
    """float64 [N]: cosines of the CLIP's unit embeddings, in the command's batches of 2 (same shapes)."""
    if clip.model.image_input == "tokens":
        ids = clip.tokenizers()[1].encode(captions, TEXT_LENGTH)
    else:
        from mmt.tokenizers.loading import load_text_vocab

        ids = load_text_vocab(clip.text_vocab_path).encode(captions, TEXT_LENGTH)
    return np.concatenate([np.sum(clip.embed_images(images[i:i + 2]).astype(np.float64)
                                  * clip.embed_texts(ids[i:i + 2]), axis=1) for i in range(0, len(ids), 2)])


@pytest.mark.slow
def test_generated_fid_and_folder_modes_score_the_same_images(runs, tmp_path, monkeypatch):
    from PIL import Image

    from mmt.restore import load_trained

    clip, upgen, captions = runs["pixel_clip"], runs["upgen"], runs["captions"]
    common = ["--captions", captions, "--batch_size", "2"]
    # clip_score --workdir: a UPGen generates one image per caption (2 calls: seeds 3, 4), a pixel
    # CLIP scores the decoded images; --save_images keeps them.
    out = tmp_path / "generated.json"
    assert evaluate.main(["clip_score", "--clip", clip, "--workdir", upgen, *common, "--seed", "3",
                          "--save_images", str(tmp_path / "gen"), "--output", str(out)]) == 0
    generated = json.loads(out.read_text())
    assert generated["num_captions"] == 3 and generated["step"] == 5 and generated["clip_step"] == 0
    assert generated["clip"] == clip and len(generated["clip_score_ci95"]) == 2

    # Its value: 100 x the mean cosine of the CLIP's unit embeddings (float32 rounding: the score is
    # logit_scale x cosine divided by logit_scale again, a few u on a cosine of magnitude <= 1).
    task, _ = load_trained(clip)
    images = np.stack([np.asarray(Image.open(tmp_path / "gen" / f"{i:06d}.png")) for i in range(3)])
    tol = 100.0 * reordered_sum_rtol(SMALL["embed_dim"], chained_ops=8)
    assert generated["clip_score"] == pytest.approx(100.0 * _cosines(task, images, CAPTIONS).mean(), abs=tol)

    # The saved images paired line by line with the captions file: the same pairs, the same score.
    out = tmp_path / "folder.json"
    assert evaluate.main(["clip_score", "--clip", clip, "--images", str(tmp_path / "gen"), *common,
                          "--output", str(out)]) == 0
    folder = json.loads(out.read_text())
    assert folder["clip_score"] == generated["clip_score"] and folder["image_size"] == 32

    # fid --clip: one generation pass gives FID (its network stubbed) and the same CLIP score.
    fid_flags = _fake_fid(monkeypatch, tmp_path)
    assert evaluate.main(["fid", "--workdir", upgen, *common, "--seed", "3", "--clip", clip,
                          "--output", str(tmp_path / "fid.json"), *fid_flags]) == 0
    with_fid = json.loads((tmp_path / "fid.json").read_text())
    assert with_fid["fid"] == 1.5 and with_fid["num_images"] == 3 and with_fid["step"] == 5
    for key in ("clip_score", "clip_score_ci95", "num_captions", "clip_step", "clip"):
        assert with_fid[key] == generated[key], key

    # A token CLIP over the generator's own tokenizer scores the sampled codes (seed + batch index).
    out = tmp_path / "codes.json"
    assert evaluate.main(["clip_score", "--clip", runs["token_clip"], "--workdir", upgen, *common, "--seed", "3",
                          "--output", str(out)]) == 0
    generator, _ = load_trained(upgen)
    codes = np.concatenate([generator.text_to_image(CAPTIONS[:2], seed=3)[1],
                            generator.text_to_image(CAPTIONS[2:], seed=4)[1]])
    token_clip, _ = load_trained(runs["token_clip"])
    assert json.loads(out.read_text())["clip_score"] == pytest.approx(
        100.0 * _cosines(token_clip, codes, CAPTIONS).mean(), abs=tol)

    # The same CLIP on the saved images: it encodes them with its own tokenizer first (batches of 2).
    out = tmp_path / "encoded.json"
    assert evaluate.main(["clip_score", "--clip", runs["token_clip"], "--images", str(tmp_path / "gen"), *common,
                          "--output", str(out)]) == 0
    encode = token_clip.tokenizers()[0].encode
    encoded = np.concatenate([encode(images[:2]), encode(images[2:])])
    assert json.loads(out.read_text())["clip_score"] == pytest.approx(
        100.0 * _cosines(token_clip, encoded, CAPTIONS).mean(), abs=tol)


@pytest.mark.slow
def test_a_trained_clip_scores_the_right_pairing_above_a_shuffled_one(tiny_data, tmp_path):
    import keras
    import tensorflow as tf
    from PIL import Image

    from mmt.data import shapes
    from mmt.tasks import exports
    from mmt.tokenizers.text import TextTokenizer

    vocab = tiny_data["vocabulary"]
    captions = [e.caption for e in shapes.generate(shapes.ShapesConfig(resolution=32, seed=11), "paired", 8)]
    assert len(set(captions)) == len(captions)
    # Noise images: far apart in pixel space, so a few steps tell them apart (shapes images, mostly
    # black background, take hundreds).
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    task = _pixel_clip(vocab)
    # Memorise the 8 pairs (CLIP's own loss, Adam, full batch): a discriminative CLIP in 40 steps.
    batch = {"paired": {"image": tf.constant(images),
                        "text_ids": tf.constant(TextTokenizer.from_file(vocab).encode(captions, TEXT_LENGTH))}}
    optimizer = keras.optimizers.Adam(1e-3)
    variables = task.model.trainable_variables

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = task.compute_losses(batch, 0, None)["contrastive"]
            loss = loss.numerator / loss.denominator
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    for _ in range(40):
        loss = float(step())
    assert loss < 0.5, loss  # log(8) = 2.08 at chance
    exports.save_task(task, tmp_path / "clip" / "export", step=40)

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    scores = {}
    for name, shift in (("right", 0), ("shuffled", 3)):
        pairs = {f"{i}.png": captions[(i + shift) % 8] for i in range(8)}
        (tmp_path / f"{name}.json").write_text(json.dumps(pairs))
        assert evaluate.main(["clip_score", "--clip", str(tmp_path / "clip"), "--images", str(folder),
                              "--captions", str(tmp_path / f"{name}.json"),
                              "--output", str(tmp_path / f"{name}_score.json")]) == 0
        scores[name] = json.loads((tmp_path / f"{name}_score.json").read_text())
    assert scores["right"]["clip_step"] == 40 and scores["right"]["num_captions"] == 8
    # Every image's own caption is its best: the right pairing's interval lies above the shuffled mean.
    assert scores["right"]["clip_score_ci95"][0] > scores["shuffled"]["clip_score"], scores


def _error(argv, capsys) -> str:
    assert errors.run_main(evaluate.main, argv) == errors.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_inputs_are_user_errors_naming_them(runs, tmp_path, capsys):
    clip, dalle, captions = runs["pixel_clip"], runs["dalle"], runs["captions"]
    # --clip of another model kind; --workdir that cannot generate images.
    err = _error(["clip_score", "--clip", dalle, "--workdir", dalle, "--captions", captions], capsys)
    assert dalle in err and "DALLETask, not a CLIP" in err
    err = _error(["clip_score", "--clip", clip, "--workdir", clip, "--captions", captions], capsys)
    assert clip in err and "CLIPTask, which cannot text to image" in err
    missing = tmp_path / "no_such_clip"
    assert str(missing) in _error(["clip_score", "--clip", str(missing), "--workdir", dalle, "--captions", captions],
                                  capsys)
    # A missing captions file, in both modes.
    missing = tmp_path / "no_captions.txt"
    for source in (["--workdir", dalle], ["--images", str(tmp_path)]):
        err = _error(["clip_score", "--clip", clip, *source, "--captions", str(missing)], capsys)
        assert f"captions file {missing} not found" in err
    # A folder that does not match its captions: counts (a .txt), names (a JSON), COCO file names.
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / f"{i:06d}.png")
    err = _error(["clip_score", "--clip", clip, "--images", str(folder), "--captions", captions], capsys)
    assert f"{folder} holds 2 images but {captions} gives 3 captions" in err
    (tmp_path / "pairs.json").write_text(json.dumps({"000000.png": "a red circle", "missing.png": "a square"}))
    err = _error(["clip_score", "--clip", clip, "--images", str(folder), "--captions", str(tmp_path / "pairs.json")],
                 capsys)
    assert "'missing.png'" in err and str(folder) in err
    coco = {"images": [{"id": 5, "file_name": "000001.png"}, {"id": 9}],
            "annotations": [{"image_id": 5, "caption": "a"}, {"image_id": 9, "caption": "b"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    err = _error(["clip_score", "--clip", clip, "--images", str(folder), "--captions", str(tmp_path / "coco.json")],
                 capsys)
    assert "image 9 has no 'file_name'" in err
    # One source, not both or neither; fid --clip needs generated images.
    assert "exactly one of" in _error(["clip_score", "--clip", clip, "--captions", captions], capsys)
    assert "exactly one of" in _error(["clip_score", "--clip", clip, "--captions", captions, "--workdir", dalle,
                                       "--images", str(folder)], capsys)
    err = _error(["fid", "--images", str(folder), "--reference_stats", str(tmp_path / "r.npz"), "--clip", clip],
                 capsys)
    assert "fid --clip" in err and "--workdir" in err


def test_coco_and_mapping_pairings(tmp_path):
    from mmt.evaluation.commands import read_captions, read_pairs

    folder = tmp_path / "val2014"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (folder / name).write_bytes(b"")
    coco = {"images": [{"id": 3, "file_name": "c.png"}, {"id": 1, "file_name": "a.png"},
                       {"id": 2, "file_name": "b.png"}],
            "annotations": [{"image_id": 2, "caption": "second "}, {"image_id": 1, "caption": "first"},
                            {"image_id": 3, "caption": "third"}, {"image_id": 1, "caption": "first, again"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    files, captions = read_pairs(str(folder), str(tmp_path / "coco.json"))
    assert [f.name for f in files] == ["a.png", "b.png", "c.png"] and captions == ["first", "second", "third"]
    # --num_images takes the subset fid --workdir would generate from (read_captions'), in the same order.
    files, captions = read_pairs(str(folder), str(tmp_path / "coco.json"), limit=2, seed=4)
    assert captions == read_captions(str(tmp_path / "coco.json"), 2, 4)
    assert [f.name for f in files] == [{"first": "a.png", "second": "b.png", "third": "c.png"}[c] for c in captions]
    # A mapping, e.g. mmt.generate's prompts.json: by file name.
    (tmp_path / "prompts.json").write_text(json.dumps({"b.png": {"prompt": "bee"}, "a.png": "ay"}))
    files, captions = read_pairs(str(folder), str(tmp_path / "prompts.json"))
    assert [f.name for f in files] == ["a.png", "b.png"] and captions == ["ay", "bee"]
