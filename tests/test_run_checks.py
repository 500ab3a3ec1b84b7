"""Checks before step 1 and run records, in-process: data expectations, metrics.jsonl on resume."""

import json
import types

import pytest

from mmt.data import manifests
from mmt.training import data_check
from mmt.training.summaries import truncate_jsonl


def _manifest(tmp_path, grid=(8, 8), image_vocab=256, text_vocab=74):
    return manifests.Manifest(
        data_dir=str(tmp_path), splits={}, options={}, created="",
        image_tokenizer=manifests.ImageTokenizerInfo("sha256:tok", grid, image_vocab),
        text_vocab=manifests.TextVocabInfo("sha256:vocab", text_vocab))


def test_every_disagreement_is_reported_with_both_values(tmp_path):
    expect = data_check.DataExpectations(image_vocab_size=128, grid=(16, 16), text_vocab_size=64, text_length=16,
                                         image_tokenizer_fingerprint="sha256:other",
                                         bindings={"grid": "Model.grid"})
    problems = data_check.stream_problems(expect, _manifest(tmp_path), stream="paired",
                                          fields=("image_tokens", "text_ids"), text_length=12,
                                          text_length_binding="paired/StreamSpec.text_length")
    text = "\n".join(problems)
    assert len(problems) == 5, text
    for expected in ("vocab_size 256", "is 128", "(8, 8)", "Model.grid is (16, 16)", "vocab_size 74", "is 64",
                     "pads text to 12", "is 16", "sha256:tok", "sha256:other", str(tmp_path / "manifest.json")):
        assert expected in text
    # A stream reading only text is not checked against the image tokenizer.
    assert len(data_check.stream_problems(expect, _manifest(tmp_path), stream="t", fields=("text_ids",),
                                          text_length=16, text_length_binding="t/StreamSpec.text_length")) == 1
    # Data vocabularies smaller than the model's are fine.
    fine = data_check.DataExpectations(image_vocab_size=512, grid=(8, 8), text_vocab_size=100, text_length=12)
    assert data_check.stream_problems(fine, _manifest(tmp_path), stream="p", fields=("image_tokens", "text_ids"),
                                      text_length=12, text_length_binding="p/StreamSpec.text_length") == []


def test_special_ids_must_lie_inside_the_model_vocabulary():
    expect = data_check.DataExpectations(text_vocab_size=10, special_text_ids={"eos_id": 1, "pad_id": 10})
    (problem,) = data_check.special_id_problems(expect)
    assert "pad_id = 10" in problem and "[0, 10)" in problem
    with pytest.raises(data_check.DataMismatchError, match="pad_id"):
        data_check.raise_if([problem])


def test_tokenizer_must_match_the_model_for_generation():
    expect = data_check.DataExpectations(image_vocab_size=256, grid=(8, 8))
    tokenizer = types.SimpleNamespace(vocab_size=128, grid_size=(8, 8))
    task = types.SimpleNamespace(data_expectations=lambda: expect, tokenizers=lambda: (tokenizer, None),
                                 image_tokenizer_path="/tok")
    with pytest.raises(data_check.DataMismatchError, match="/tok has 128 codes.*is 256"):
        data_check.check_tokenizers(task)
    tokenizer.vocab_size = 256
    data_check.check_tokenizers(task)


def test_resumed_metrics_drop_the_steps_to_be_replayed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": float(s)}) for s in range(1, 31)]
    path.write_text("\n".join(rows) + "\n" + '{"step": 31, "lo')  # killed mid-write
    assert truncate_jsonl(str(path), 28) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(1, 29))
    assert truncate_jsonl(str(path), 28) == 0
