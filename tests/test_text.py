"""Text vocabulary: training, loading, conventions, eager == tf.data ids, fingerprint."""

import hashlib
import io

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from mmt.data import text_ids
from mmt.tokenizers import text

CAPTIONS = [
    "a large red circle in the top left and a small blue square at the bottom",
    "there is a little green triangle in the center",
    "an image of a big yellow diamond on the right",
    "a small purple square in the upper right corner, a big cyan circle at the bottom",
] * 40


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "shapes.model"
    return text.train_sentencepiece(CAPTIONS, path, vocab_size=64)


def test_conventions(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.bos_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size <= 64
    assert tokenizer.special_ids == (0, 1, 3)


def test_training_is_deterministic(tokenizer, tmp_path):
    again = text.train_sentencepiece(CAPTIONS, tmp_path / "again.model", vocab_size=64)
    assert again.fingerprint() == tokenizer.fingerprint()
    other = text.train_sentencepiece(CAPTIONS[:3] * 30, tmp_path / "other.model", vocab_size=40)
    assert other.fingerprint() != tokenizer.fingerprint()


def test_fingerprint_is_hash_of_model_bytes(tokenizer):
    expected = hashlib.sha256(open(tokenizer.source, "rb").read()).hexdigest()
    assert tokenizer.fingerprint() == "sha256:" + expected


def test_terminate_and_pad_by_hand():
    ids = [[5, 6, 7], [8], []]
    expected = np.array([[5, 6, 1], [8, 1, 0], [1, 0, 0]], np.int32)
    np.testing.assert_array_equal(text_ids.terminate_and_pad_numpy(ids, 3, eos_id=1, pad_id=0), expected)
    ragged = tf.ragged.constant(ids, dtype=tf.int64)
    out = text_ids.terminate_and_pad(ragged, 3, eos_id=1, pad_id=0)
    assert out.dtype == tf.int32 and out.shape[1] == 3
    np.testing.assert_array_equal(out.numpy(), expected)


def test_eager_and_tf_data_give_the_same_ids(tokenizer):
    texts = CAPTIONS[:4] + [
        "",  # empty caption: just EOS
        "a large red circle " * 10,  # over-long: truncated, EOS kept
        "Ünïcode, ZEBRAS & digits 123",  # out-of-vocabulary characters
    ]
    length = 16
    eager = tokenizer.encode(texts, length)
    assert eager.shape == (len(texts), length) and eager.dtype == np.int32
    ds = tf.data.Dataset.from_tensor_slices(texts).batch(3).map(lambda t: tokenizer.tf_encode(t, length))
    assert ds.element_spec.shape.as_list() == [None, length]
    in_graph = np.concatenate([b.numpy() for b in ds])
    np.testing.assert_array_equal(eager, in_graph)
    # Truncation keeps the EOS in the last position.
    assert eager[5, -1] == tokenizer.eos_id
    assert (eager[4] == [tokenizer.eos_id] + [tokenizer.pad_id] * (length - 1)).all()


def test_decode_round_trip(tokenizer):
    encoded = tokenizer.encode(CAPTIONS[:4], 128)
    assert tokenizer.decode(encoded) == CAPTIONS[:4]
    # Ragged input and ids after EOS are ignored.
    assert tokenizer.decode([list(encoded[0]) + [7, 7]]) == CAPTIONS[:1]


def _t5_style_model() -> bytes:
    """A SentencePiece model with T5's id layout: pad 0, EOS 1, unk 2, no BOS."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS), model_writer=model, vocab_size=48,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    return model.getvalue()


def test_loads_t5_spiece_model_from_a_directory(tmp_path):
    (tmp_path / "spiece.model").write_bytes(_t5_style_model())
    tok = text.TextTokenizer.from_file(tmp_path)
    assert tok.source.endswith("spiece.model")
    # No BOS in T5's vocabulary: the decoder starts from pad, T5's convention.
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 0)
    ids = tok.encode(["a big red circle"], 8)
    assert ids[0, list(ids[0]).index(1) + 1 :].tolist() == [0] * (8 - list(ids[0]).index(1) - 1)


def test_loads_keras_hub_preset_layout(tmp_path):
    preset = tmp_path / "preset" / "assets" / "tokenizer"
    preset.mkdir(parents=True)
    (preset / "vocabulary.spm").write_bytes(_t5_style_model())
    tok = text.TextTokenizer.from_file(tmp_path / "preset")
    assert tok.vocab_size > 10


def test_bad_model_files_are_named(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="bad.model"):
        text.TextTokenizer.from_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        text.TextTokenizer.from_file(tmp_path / "missing.model")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        text.TextTokenizer.from_file(empty_dir)


def test_save_round_trip(tokenizer, tmp_path):
    saved = text.TextTokenizer.from_file(tokenizer.save(tmp_path / "copy.model"))
    assert saved.fingerprint() == tokenizer.fingerprint()
