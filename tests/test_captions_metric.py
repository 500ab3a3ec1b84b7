"""Caption metrics (pycocoevalcap, PTB tokenizer rules) on a case computed by hand, and
`mmt.evaluate captions` / `fid` on workdirs: bad paths and the wrong model kind."""

import json
import math
import shutil

import pytest

from mmt.evaluation import captions

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer needs Java")

REFERENCES = {1: ["A cat sits on the mat."], 2: ["A dog runs in the park"]}
CANDIDATES = {1: "a cat on the MAT", 2: "A dog runs in the park."}  # case and punctuation go in tokenizing


def _coco(tmp_path):
    data = {"images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}],
            "annotations": [{"image_id": i, "id": 10 + i, "caption": c} for i, cs in REFERENCES.items() for c in cs]}
    path = tmp_path / "captions_test.json"
    path.write_text(json.dumps(data))
    return path


def _expected():
    """By hand. Candidate 1 'a cat on the mat' vs 'a cat sits on the mat'; candidate 2 exact."""
    # BLEU-4, corpus level: clipped n-gram matches / candidate n-grams summed over both images,
    # 1-grams 11/11, 2-grams (3 + 5)/(4 + 5), 3-grams (1 + 4)/(3 + 4), 4-grams (0 + 3)/(2 + 3);
    # brevity penalty exp(1 - 12/11) (candidate length 11, closest reference lengths 6 + 6).
    bleu4 = (1.0 * 8 / 9 * 5 / 7 * 3 / 5) ** 0.25 * math.exp(1 - 12 / 11)
    # ROUGE-L (beta 1.2): LCS 5, precision 5/5, recall 5/6 for image 1; 1 for image 2.
    p, r, b2 = 1.0, 5 / 6, 1.2**2
    rouge = ((1 + b2) * p * r / (r + b2 * p) + 1.0) / 2
    # CIDEr-D: IDF log(2 / df) over the 2 reference sets ('a', 'the' occur in both -> weight 0;
    # every other n-gram weight w = log 2, which cancels in the cosine). Image 1:
    #   n=1: hyp {cat, on, mat}, ref {cat, sits, on, mat}: 3 / (sqrt 3 * 2)
    #   n=2: hyp 4 bigrams, ref 5, 3 shared: 3 / (2 * sqrt 5)
    #   n=3: 1 shared of 3 and 4: 1 / (sqrt 3 * 2);  n=4: none shared: 0
    #   length penalty exp(-(4 - 5)^2 / (2 * 6^2)) (lengths counted in bigrams), x 10, mean over n.
    cider1 = 10 * math.exp(-1 / 72) * (3 / (2 * math.sqrt(3)) + 3 / (2 * math.sqrt(5)) + 1 / (2 * math.sqrt(3))) / 4
    cider = (cider1 + 10.0) / 2  # image 2: identical, cosine 1 for every n
    return bleu4, rouge, cider


@needs_java
def test_metrics_equal_hand_computed_values():
    scores = captions.caption_metrics(REFERENCES, CANDIDATES, meteor=False)
    bleu4, rouge, cider = _expected()
    assert scores["BLEU-4"] == pytest.approx(bleu4, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(rouge, abs=1e-6)
    assert scores["CIDEr-D"] == pytest.approx(cider, abs=1e-6)
    assert scores["BLEU-1"] == pytest.approx(math.exp(1 - 12 / 11), abs=1e-6)
    assert "SPICE" in scores["skipped"] and scores["num_images"] == 2


@needs_java
def test_evaluate_captions_cli_from_predictions(tmp_path):
    from mmt import evaluate

    references = _coco(tmp_path)
    predictions = tmp_path / "pred.json"
    predictions.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in CANDIDATES.items()]))
    assert evaluate.main(["captions", "--references", str(references), "--predictions", str(predictions),
                          "--output", str(tmp_path / "out.json")]) == 0
    record = json.loads((tmp_path / "out.json").read_text())
    bleu4, rouge, cider = _expected()
    assert record["CIDEr-D"] == pytest.approx(cider, abs=1e-6) and record["BLEU-4"] == pytest.approx(bleu4, abs=1e-6)
    assert "METEOR" in record or "METEOR" in record["skipped"]  # run when Java is present, else said why


def test_bad_paths_and_wrong_model_kind_name_them(tmp_path, capsys, monkeypatch):
    from mmt import errors, evaluate
    from mmt import restore

    references = _coco(tmp_path)
    missing = tmp_path / "no_such_predictions.json"
    assert errors.run_main(evaluate.main, ["captions", "--references", str(references),
                                           "--predictions", str(missing)]) == errors.EXIT_USER_ERROR
    assert str(missing) in capsys.readouterr().err
    not_a_workdir = tmp_path / "empty_dir"
    not_a_workdir.mkdir()
    (tmp_path / "images").mkdir()
    for name in ("1.png", "2.png"):
        (tmp_path / "images" / name).write_bytes(b"")
    argv = ["captions", "--references", str(references), "--workdir", str(not_a_workdir),
            "--image_dir", str(tmp_path / "images")]
    assert errors.run_main(evaluate.main, argv) == errors.EXIT_USER_ERROR
    assert f"{not_a_workdir} is not a training workdir" in capsys.readouterr().err

    # A workdir whose task cannot caption (e.g. a tokenizer or UPGen run) is named with its task.
    (not_a_workdir / "operative_config.gin").write_text("")

    class TokenizerOnlyTask:
        pass

    monkeypatch.setattr(restore, "load_task", lambda workdir: (TokenizerOnlyTask(), 7))
    assert errors.run_main(evaluate.main, argv) == errors.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert str(not_a_workdir) in err and "TokenizerOnlyTask" in err and "image to text" in err
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    (tmp_path / "w.npz").write_bytes(b"")
    fid_argv = ["fid", "--workdir", str(not_a_workdir), "--captions", str(tmp_path / "prompts.txt"),
                "--reference_stats", str(tmp_path / "ref.npz"), "--inception_weights", str(tmp_path / "w.npz")]
    assert errors.run_main(evaluate.main, fid_argv) == errors.EXIT_USER_ERROR
    assert f"reference statistics {tmp_path / 'ref.npz'} not found" in capsys.readouterr().err
    (tmp_path / "ref.npz").write_bytes(b"")
    assert errors.run_main(evaluate.main, fid_argv) == errors.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert str(not_a_workdir) in err and "TokenizerOnlyTask" in err and "text to image" in err


def test_karpathy_split_to_coco_format(tmp_path):
    from mmt.evaluation import coco

    dataset = {"images": [
        {"cocoid": 5, "filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": [{"raw": "x"},
                                                                                                 {"raw": "y"}]},
        {"cocoid": 6, "filepath": "val2014", "filename": "b.jpg", "split": "restval", "sentences": [{"raw": "z"}]},
        {"cocoid": 7, "filepath": "train2014", "filename": "c.jpg", "split": "train", "sentences": [{"raw": "w"}]}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(dataset))
    argv = [str(tmp_path / "dataset_coco.json"), "--split", "test", "--output", str(tmp_path / "t.json")]
    assert coco.main(argv) == 0
    references, files = captions.read_coco_references(tmp_path / "t.json")
    assert references == {5: ["x", "y"]} and files == {5: "val2014/a.jpg"}
    train = coco.karpathy_to_coco(dataset, "train")
    assert [i["id"] for i in train["images"]] == [6, 7]  # restval goes with train


def test_read_captions_txt_and_coco_with_seeded_subset(tmp_path):
    from mmt.evaluation.commands import read_captions

    assert read_captions(str(_coco(tmp_path))) == ["A cat sits on the mat.", "A dog runs in the park"]  # first per image
    (tmp_path / "c.txt").write_text("one\n\n two \nthree\n")
    assert read_captions(str(tmp_path / "c.txt")) == ["one", "two", "three"]
    subset = read_captions(str(tmp_path / "c.txt"), limit=2, seed=1)
    assert len(subset) == 2 and set(subset) < {"one", "two", "three"}
    assert subset == read_captions(str(tmp_path / "c.txt"), limit=2, seed=1)  # reproducible (FID-30K's sample)
