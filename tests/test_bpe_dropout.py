"""BPE vocabularies and BPE dropout (DALL-E §2.2, Provilkov et al. 2019) in tf.data.

The dropout distribution is checked against exact probabilities computed here by
enumerating every drop pattern of Provilkov et al.'s algorithm on single words; plain
BPE (p = 0) against the sentencepiece package's ids.
"""

import functools
import itertools
import math

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from mmt.data import manifests, pipeline, shapes
from mmt.data.bpe_dropout import BPEDropout, NotBPEVocabularyError
from mmt.data.shapes.records import write_shapes_records
from mmt.errors import EXIT_USER_ERROR, UserError, run_main
from mmt.tokenizers import text

SPACE = "\u2581"
RATE = 0.1


def processor(vocab) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=vocab.model_proto)


def shapes_captions(n, split="paired", start=0):
    return [e.caption for e in shapes.generate(shapes.ShapesConfig(resolution=32), split, n, start)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "bpe.model"
    return text.train_sentencepiece(shapes_captions(400), path, vocab_size=200, model_type="bpe")


@pytest.fixture(scope="module")
def dropout(bpe):
    return BPEDropout(bpe)


# -- the vocabulary ------------------------------------------------------------------------


def test_model_type_is_read_from_the_model(bpe, tmp_path):
    assert bpe.model_type == "bpe"
    unigram = text.train_sentencepiece(shapes_captions(100), tmp_path / "u.model", vocab_size=100)
    assert unigram.model_type == "unigram"
    # A BPE model segments with its merges: whole frequent words become one piece.
    assert bpe.tokenize("a red circle") == [[processor(bpe).PieceToId(SPACE + w) for w in ("a", "red", "circle")]]


def test_lowercase_vocabulary_folds_case(tmp_path):
    captions = [c.upper() if i % 2 else c for i, c in enumerate(shapes_captions(200))]
    folded = text.train_sentencepiece(captions, tmp_path / "lc.model", vocab_size=120, model_type="bpe",
                                      lowercase=True)
    assert folded.tokenize("A Large RED circle") == folded.tokenize("a large red circle")
    assert folded.decode(folded.encode(["A Large RED circle"], 16)) == ["a large red circle"]
    # No upper-case piece was learned.
    assert all(p == p.lower() for p in (processor(folded).IdToPiece(i) for i in range(folded.vocab_size)))


def test_command_line_trains_a_bpe_vocabulary(tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(shapes_captions(200)) + "\n")
    out = tmp_path / "v" / "bpe.model"
    argv = [f"--input={captions}", f"--output={out}", "--model_type=bpe", "--vocab_size=100", "--lowercase"]
    assert run_main(text.main, argv) == 0
    vocab = text.TextTokenizer.from_file(out)
    assert vocab.model_type == "bpe" and vocab.vocab_size <= 100
    assert "bpe" in capsys.readouterr().out
    assert run_main(text.main, [f"--input={tmp_path}/none*.txt", f"--output={out}"]) == EXIT_USER_ERROR
    assert "matches no file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own check of --model_type
        text.main([f"--input={captions}", f"--output={out}", "--model_type=wordpiece"])
    assert exit_info.value.code == 2


# -- BPE dropout against references --------------------------------------------------------


def test_rate_zero_is_sentencepiece_bpe(bpe, dropout):
    texts = shapes_captions(300, start=1000) + [
        "", "x", "Ünïcode, ZEBRAS & digits 123", "  two   spaces  ", "ÿÿ zz ÿ unknown runs ÿÿÿ", "q" * 40,
    ]
    got = dropout.tokenize(tf.constant(texts), 0.0, [0, 0]).to_list()
    assert got == bpe.tokenize(texts)


def test_rate_one_gives_characters(bpe, dropout):
    texts = ["a red circle", "Zebra ÿÿ!"]
    got = dropout.tokenize(tf.constant(texts), 1.0, [0, 1]).to_list()
    sp = processor(bpe)
    for caption, ids in zip(texts, got):
        expected = []
        for piece in (sp.IdToPiece(i) for i in bpe.tokenize(caption)[0]):
            for char in ([piece] if piece == "<unk>" else piece):
                i = sp.PieceToId(char)
                if not (i == bpe.unk_id and expected and expected[-1] == bpe.unk_id):
                    expected.append(i)
        assert ids == expected


def exact_distribution(word: str, vocab: dict, p: float) -> dict:
    """Probability of every segmentation of `word` under Provilkov et al.'s BPE dropout.

    At each step every available merge (adjacent symbols whose concatenation is a
    piece) is kept with probability 1 - p; the best kept one (score, then leftmost) is
    applied; with none kept the segmentation ends. Enumerates every drop pattern.
    """

    @functools.lru_cache(maxsize=None)
    def dist(symbols: tuple) -> dict:
        candidates = [(-vocab[a + b], k) for k, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in vocab]
        out = {}
        for kept in itertools.product((False, True), repeat=len(candidates)):
            prob = math.prod((1 - p) if keep else p for keep in kept)
            chosen = [c for c, keep in zip(candidates, kept) if keep]
            if not chosen:
                out[symbols] = out.get(symbols, 0.0) + prob
                continue
            _, k = min(chosen)
            merged = symbols[:k] + (symbols[k] + symbols[k + 1],) + symbols[k + 2:]
            for segmentation, q in dist(merged).items():
                out[segmentation] = out.get(segmentation, 0.0) + prob * q
        return out

    return dist(tuple(word))


def piece_scores(bpe):
    sp = processor(bpe)
    return {sp.IdToPiece(i): sp.GetScore(i) for i in range(bpe.vocab_size)
            if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i))}


def test_dropout_matches_the_exact_distribution_on_words(bpe, dropout):
    vocab = piece_scores(bpe)
    sp = processor(bpe)
    n = 4000
    for word in ("triangle", "yellow"):
        exact = exact_distribution(SPACE + word, vocab, RATE)
        assert abs(sum(exact.values()) - 1) < 1e-9
        ids = dropout.tokenize(tf.constant([word] * n), RATE, [7, 11]).to_list()
        counts = {}
        for row in ids:
            key = tuple(sp.IdToPiece(i) for i in row)
            counts[key] = counts.get(key, 0) + 1
        assert set(counts) <= set(exact), f"segmentations outside the support: {set(counts) - set(exact)}"
        for segmentation, prob in exact.items():
            # Binomial count: 4.5 standard deviations (all categories of both words at once
            # exceed it with probability < 1e-3), plus one count for rounding.
            tolerance = 4.5 * math.sqrt(n * prob * (1 - prob)) + 1
            assert abs(counts.get(segmentation, 0) - n * prob) <= tolerance, (word, segmentation, prob)
        # The plain segmentation is the single most likely one, and far from certain.
        plain = tuple(sp.IdToPiece(i) for i in bpe.tokenize(word)[0])
        assert max(exact, key=exact.get) == plain and exact[plain] < 0.9


def test_captions_vary_as_predicted_and_decode_unchanged(bpe, dropout):
    captions = shapes_captions(600, start=2000)
    plain = bpe.tokenize(captions)
    got = dropout.tokenize(tf.constant(captions), RATE, [3, 5]).to_list()
    # Every segmentation spells the same caption.
    assert bpe.decode([row + [bpe.eos_id] for row in got]) == bpe.decode([row + [bpe.eos_id] for row in plain])
    # Words are segmented independently: a caption keeps its plain segmentation with the
    # product of its words' exact probabilities of doing so.
    vocab = piece_scores(bpe)
    sp = processor(bpe)

    @functools.lru_cache(maxsize=None)
    def p_plain(word):
        exact = exact_distribution(word, vocab, RATE)
        return exact.get(tuple(sp.IdToPiece(i) for i in bpe.tokenize(word.replace(SPACE, " "))[0]), 0.0)

    keep = [math.prod(p_plain(SPACE + w) for w in c.split()) for c in captions]
    differing = sum(list(a) != list(b) for a, b in zip(got, plain))
    expected = sum(1 - q for q in keep)
    sigma = math.sqrt(sum(q * (1 - q) for q in keep))
    assert abs(differing - expected) <= 4.5 * sigma + 1, (differing, expected, sigma)
    assert 0.2 * len(captions) < differing < len(captions)  # plausible for 10%: most, not all, captions change
    assert np.mean([len(r) for r in got]) > np.mean([len(r) for r in plain])


def test_same_seed_same_ids(dropout):
    texts = tf.constant(shapes_captions(64, start=3000))
    first = dropout.tokenize(texts, RATE, [1, 2]).to_list()
    assert dropout.tokenize(texts, RATE, [1, 2]).to_list() == first
    assert dropout.tokenize(texts, RATE, [1, 3]).to_list() != first


def test_non_bpe_vocabulary_is_refused(tmp_path):
    unigram = text.train_sentencepiece(shapes_captions(100), tmp_path / "u.model", vocab_size=100)
    with pytest.raises(NotBPEVocabularyError, match="unigram") as info:
        BPEDropout(unigram)
    assert isinstance(info.value, UserError)


# -- in the input pipeline -----------------------------------------------------------------

LENGTH = 96  # room for every dropout segmentation of a shapes caption: decoding compares whole captions
BATCH = 16


def write_data(root, vocab, n=96):
    config = shapes.ShapesConfig(resolution=32)
    examples = {"text_only": list(shapes.generate(config, "text_only", n))}
    write_shapes_records(root, config, examples, text_tokenizer=vocab, num_shards=2)
    return str(root)


@pytest.fixture(scope="module")
def data_dir(bpe, tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("bpe_data"), bpe)


def spec(data_dir, rate, **kwargs):
    fields = kwargs.pop("fields", ("key", "text_ids", "caption"))
    return pipeline.StreamSpec(data_dir, "text_only", BATCH, fields=fields, text_length=LENGTH, bpe_dropout=rate,
                               shuffle_buffer=64, **kwargs)


def batches(stream_spec, n, **kwargs):
    dataset = pipeline.stream_dataset(stream_spec, seed=kwargs.pop("seed", 0), eos_id=1, pad_id=0, **kwargs)
    return [{k: v.numpy() for k, v in b.items()} for b in dataset.take(n)]


def test_manifest_names_the_vocabulary(bpe, data_dir):
    assert manifests.read_manifest(data_dir).options["text_vocab"] == bpe.source


def test_stream_without_dropout_reads_the_stored_ids_and_rate_zero_reproduces_them(bpe, dropout, data_dir):
    stored = batches(spec(data_dir, 0.0), 6, repeat=False, shuffle=False)
    for batch in stored:
        again = dropout.tokenize(tf.constant(batch["caption"]), 0.0, [0, 0])
        np.testing.assert_array_equal(pipeline.terminate_and_pad(again, LENGTH, 1, 0).numpy(), batch["text_ids"])
        np.testing.assert_array_equal(batch["text_ids"], bpe.encode([c.decode() for c in batch["caption"]], LENGTH))


def test_training_stream_drops_merges_reproducibly(bpe, data_dir):
    stream = spec(data_dir, RATE)
    got = batches(stream, 6)
    differing = 0
    for batch in got:
        captions = [c.decode() for c in batch["caption"]]
        plain = bpe.encode(captions, LENGTH)
        assert batch["text_ids"].shape == (BATCH, LENGTH) and batch["text_ids"].dtype == np.int32
        # EOS then padding, as stored ids are laid out (captions fit in LENGTH - 1 pieces).
        for row in batch["text_ids"]:
            end = list(row).index(1)
            assert (row[end + 1:] == 0).all() and (row[:end] > 3).all()
        assert bpe.decode(batch["text_ids"]) == bpe.decode(plain)
        differing += sum((a != b).any() for a, b in zip(batch["text_ids"], plain))
    assert 0.2 * 6 * BATCH < differing < 6 * BATCH
    # Same seed, same draws; another seed, others.
    again = batches(stream, 6)
    for a, b in zip(got, again):
        np.testing.assert_array_equal(a["text_ids"], b["text_ids"])
    other = batches(stream, 6, seed=1)
    assert any((a["text_ids"] != b["text_ids"]).any() for a, b in zip(got, other) if (a["key"] == b["key"]).all()) \
        or any((a["key"] != b["key"]).any() for a, b in zip(got, other))
    # The same caption read in another epoch gets another segmentation.
    seen = {}
    for batch in batches(stream, 12, shuffle=False):
        for key, row in zip(batch["key"], batch["text_ids"]):
            seen.setdefault(key, []).append(tuple(row))
    twice = [rows[:2] for rows in seen.values() if len(rows) >= 2]
    assert len(twice) > len(seen) // 2
    assert sum(a != b for a, b in twice) > len(twice) // 4


def test_resumed_iterator_draws_the_same_segmentations(data_dir, tmp_path):
    specs = {"text": spec(data_dir, RATE, fields=("text_ids",))}
    kwargs = dict(seed=3, eos_id=1, pad_id=0)
    uninterrupted = pipeline.InputIterator.from_specs(specs, **kwargs)
    expected = [next(uninterrupted)["text"]["text_ids"].numpy() for _ in range(7)]
    first = pipeline.InputIterator.from_specs(specs, **kwargs)
    for _ in range(4):
        next(first)
    path = tf.train.Checkpoint(iterator=first.checkpointable).write(str(tmp_path / "ckpt"))
    resumed = pipeline.InputIterator.from_specs(specs, **kwargs)
    tf.train.Checkpoint(iterator=resumed.checkpointable).read(path).assert_consumed()
    for want in expected[4:]:
        np.testing.assert_array_equal(next(resumed)["text"]["text_ids"].numpy(), want)


def test_evaluation_never_drops(bpe, data_dir):
    for kwargs in ({"repeat": False}, {"training": False}):
        for batch in batches(spec(data_dir, RATE), 4, shuffle=False, **kwargs):
            np.testing.assert_array_equal(batch["text_ids"], bpe.encode([c.decode() for c in batch["caption"]], LENGTH))


def test_bad_settings_are_user_errors(bpe, data_dir, tmp_path):
    for bad in (-0.1, 1.5, "0.1x"):
        with pytest.raises(pipeline.BPEDropoutConfigError, match="bpe_dropout"):
            spec(data_dir, bad)
    with pytest.raises(pipeline.BPEDropoutConfigError, match="text_ids"):
        spec(data_dir, RATE, fields=("caption",))
    # A unigram vocabulary cannot drop merges.
    unigram = text.train_sentencepiece(shapes_captions(200), tmp_path / "u.model", vocab_size=100)
    unigram_dir = write_data(tmp_path / "unigram_data", unigram, n=32)
    with pytest.raises(NotBPEVocabularyError, match="BPE vocabulary") as info:
        pipeline.stream_dataset(spec(unigram_dir, RATE), seed=0, eos_id=1, pad_id=0)
    assert isinstance(info.value, UserError) and "bpe_dropout" in str(info.value)
    # Another vocabulary than the data's.
    with pytest.raises(manifests.FingerprintMismatchError, match="text_vocab"):
        pipeline.stream_dataset(spec(data_dir, RATE, text_vocab=unigram.source), seed=0, eos_id=1, pad_id=0)
    # No vocabulary named anywhere.
    nameless = tmp_path / "nameless"
    write_data(nameless, bpe, n=32)
    manifest = manifests.read_manifest(nameless)
    options = {k: v for k, v in manifest.options.items() if k != "text_vocab"}
    manifests.write_manifest(nameless, splits=manifest.splits, text_vocab=manifest.text_vocab, options=options)
    with pytest.raises(pipeline.BPEDropoutConfigError, match="StreamSpec.text_vocab"):
        pipeline.stream_dataset(spec(str(nameless), RATE), seed=0, eos_id=1, pad_id=0)
    assert batches(spec(str(nameless), RATE, text_vocab=bpe.source), 1)  # named in the spec: works
    # A vocabulary that is not where the spec (or manifest) says.
    with pytest.raises(UserError, match="StreamSpec.text_vocab"):
        pipeline.stream_dataset(spec(data_dir, RATE, text_vocab=str(tmp_path / "moved.model")), seed=0, eos_id=1,
                                pad_id=0)


def test_quickstart_data_with_a_bpe_vocabulary_feeds_a_dropout_stream(tmp_path):
    from mmt import quickstart

    summary = quickstart.run(str(tmp_path / "qs"), shapes.ShapesConfig(resolution=32),
                             {"paired": 32, "text_only": 64}, vocab_size=120, vocab_model_type="bpe",
                             num_shards=1, grid_samples=2, show_progress=False)
    vocab = text.TextTokenizer.from_file(summary["vocabulary"])
    assert vocab.model_type == "bpe"
    # No StreamSpec.text_vocab: the manifest names the vocabulary.
    stream = pipeline.StreamSpec(summary["data_dir"], "paired", 8, fields=("text_ids", "caption"),
                                 text_length=LENGTH, bpe_dropout=RATE, shuffle_buffer=32)
    for batch in batches(stream, 3):
        captions = [c.decode() for c in batch["caption"]]
        assert vocab.decode(batch["text_ids"]) == captions
