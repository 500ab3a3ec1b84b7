"""BPE dropout (Provilkov et al. 2019) in TensorFlow, seeded, for tf.data.

DALL-E §2.2 (footnote 5) trains with 10% BPE dropout on its BPE-encoded captions.
BPE dropout segments a word as BPE does -- start from characters, repeatedly apply the
best-ranked merge available -- except that at every merge step each available merge
is dropped with probability p (Provilkov et al. §3, Algorithm 1); when every available
merge of a word is dropped, that word's segmentation stops. p = 0 is plain BPE, p = 1
gives characters. Inference (and evaluation) uses plain BPE. At p = 0.1 a shapes
caption (BPE vocabulary of 256) grows from 18.9 to 24.1 pieces on average, and 95% of
captions differ from their plain segmentation: a stream's `text_length` needs room.

Why not tensorflow-text's `SentencepieceTokenizer(nbest_size=-1, alpha=p)`: for a BPE
model it does sample BPE dropout, but its random generator is SentencePiece's own
thread-local one, with no seed argument: with `tf.random.set_seed(0)` and the
sentencepiece package's `set_random_generator_seed(0)`, two processes draw different
segmentations of the same captions (checked 2026-12-03), so a resumed run would draw
other segmentations than the run it resumes. Here every draw is `tf.random.stateless_uniform` keyed by the caller's seed
and the merge step, so the same (seed, captions) always give the same ids. (Its
sampling is also SentencePiece's variant, which skips a merge for good once drawn,
rather than redrawing at every step.)

The merge rule is SentencePiece's BPE encoder's (`bpe_model.cc`): any two adjacent
symbols whose concatenation is a normal piece of the vocabulary may merge; the highest
score wins, ties go to the leftmost pair. Characters come from the caption's plain
segmentation (so normalization -- dummy prefix, whitespace, case folding -- is the
model's own), pieces unknown to the vocabulary stay as they are and never merge, and
runs of unknown pieces collapse into one, as `SentencePieceProcessor::Encode` does. With
p = 0 the ids equal SentencePiece's (tests/test_bpe_dropout.py).

Cost: words are merged in parallel, one merge per word per loop step; each step costs
O(batch x characters) string concatenations and hash lookups, for as many steps as the
longest word has merges. Measured in tf.data on 2 loaded cores (load average 11):
shapes captions, batches of 16 / 64 / 256, 10 / 42 / 145 ms per batch (1 / 2 / 6 ms
reading the stored ids).
"""

from __future__ import annotations

import numpy as np
import sentencepiece as spm
import tensorflow as tf

from mmt import backend
from mmt.data.vocab_files import proto_model_type
from mmt.errors import UserError

_NO_RANK = np.iinfo(np.int32).max
# SentencePiece's whitespace symbol: a piece that starts with it starts a word.
_SPACE = "\u2581"


class NotBPEVocabularyError(UserError, ValueError):
    """BPE dropout was asked of a vocabulary that is not a BPE model."""


class BPEDropout:
    """Re-tokenizes captions with BPE dropout, inside tf.data.

    Build it from a BPE SentencePiece model (its bytes, or a
    `mmt.tokenizers.text.TextTokenizer`); call `tokenize(texts, rate, seed)` in a
    `Dataset.map`.
    """

    def __init__(self, vocabulary, source: str = "", where: str = ""):
        """Args:
          vocabulary: the model's serialized bytes, or an object with `model_proto`
            (and `source`), such as a `TextTokenizer`.
          source: where the model came from, for errors.
          where: names the configuration in errors.
        """
        model_proto = bytes(getattr(vocabulary, "model_proto", vocabulary))
        source = source or getattr(vocabulary, "source", "<bytes>")
        model_type = proto_model_type(model_proto)
        if model_type != "bpe":
            raise NotBPEVocabularyError(
                f"{where + ': ' if where else ''}BPE dropout needs a BPE vocabulary, but {source} is a "
                f"SentencePiece {model_type} model; set bpe_dropout to 0, or train a BPE vocabulary "
                "(mmt.tokenizers.text.train_sentencepiece(..., model_type='bpe'), "
                "`python -m mmt.tokenizers.text --model_type=bpe`) and tokenize the data with it"
            )
        import tensorflow_text as tf_text

        # The plain segmentation, as `TextTokenizer.tf_tokenize` makes it.
        self._plain = tf_text.SentencepieceTokenizer(model=model_proto, out_type="int32", add_bos=False,
                                                     add_eos=False)
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(model_proto)
        size = sp.GetPieceSize()
        pieces = [sp.IdToPiece(i) for i in range(size)]
        # Only normal pieces are merge results (bpe_model.cc looks merges up in the
        # model's piece map, which holds no control, unknown, byte or unused pieces).
        normal = [not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i) or sp.IsByte(i)) for i in range(size)]
        scores = np.array([sp.GetScore(i) for i in range(size)], np.float64)
        # Dense rank of the score, 0 = best: a merge's priority (equal scores tie).
        distinct = np.unique(scores[normal])[::-1]
        rank = np.searchsorted(-distinct, -scores)
        keys = [p for p, n in zip(pieces, normal) if n]
        ids = np.array([i for i, n in enumerate(normal) if n], np.int64)
        self.unk_id = int(sp.unk_id())
        # Words are independent when no piece holds a space after its start (trained with
        # SentencePiece's default split_by_whitespace).
        self._split_words = not any(_SPACE in p[1:] for p, n in zip(pieces, normal) if n)
        self._pieces = tf.constant(pieces)  # string [V]
        self._frozen_id = tf.constant([not n for n in normal])  # bool [V]
        self._piece_ids = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(keys), tf.constant(ids)), default_value=self.unk_id)
        self._piece_ranks = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(keys), tf.constant(rank[ids], tf.int32)),
            default_value=_NO_RANK)

    def tokenize(self, texts: tf.Tensor, rate: float | tf.Tensor, seed: tf.Tensor) -> tf.RaggedTensor:
        """Pieces of each text with BPE dropout.

        Args:
          texts: string [B].
          rate: the probability of dropping each available merge at each step (DALL-E:
            0.1); 0 gives the plain BPE segmentation.
          seed: int32 / int64 [2], a stateless seed; the same seed and texts give the
            same pieces.

        Returns:
          int32 ragged [B, None] piece ids without EOS or padding, as
          `TextTokenizer.tf_tokenize` returns them.
        """
        symbols, frozen = self._characters(texts)  # string / bool ragged [B, None]
        merged, merged_frozen = self._merge(symbols, frozen, tf.convert_to_tensor(rate, tf.float32), seed)
        return self._ids(merged, merged_frozen)

    # -- steps -------------------------------------------------------------------------

    def _characters(self, texts: tf.Tensor) -> tuple[tf.RaggedTensor, tf.RaggedTensor]:
        """The plain segmentation split into characters; unknown pieces kept whole."""
        ids = tf.cast(self._plain.tokenize(texts), tf.int64)  # ragged [B, P]
        flat_ids = ids.flat_values  # (sum P,)
        piece_frozen = tf.gather(self._frozen_id, flat_ids)  # (sum P,)
        chars = tf.strings.unicode_split(tf.gather(self._pieces, flat_ids), "UTF-8")  # ragged [sum P, C]
        first = tf.ragged.range(chars.row_lengths()).flat_values == 0  # (sum C,)
        frozen_char = tf.repeat(piece_frozen, chars.row_lengths())  # (sum C,)
        keep = first | ~frozen_char
        # A frozen piece stays one symbol (it never merges and keeps the unknown id).
        flat = tf.boolean_mask(chars.flat_values, keep)
        flat_frozen = tf.boolean_mask(frozen_char, keep)
        counts = tf.where(piece_frozen, tf.ones_like(chars.row_lengths()), chars.row_lengths())  # (sum P,)
        per_text = tf.math.unsorted_segment_sum(counts, ids.value_rowids(), ids.nrows())  # (B,)
        return (tf.RaggedTensor.from_row_lengths(flat, per_text),
                tf.RaggedTensor.from_row_lengths(flat_frozen, per_text))

    def _merge(self, symbols: tf.RaggedTensor, frozen: tf.RaggedTensor, rate: tf.Tensor,
               seed: tf.Tensor) -> tuple[tf.RaggedTensor, tf.RaggedTensor]:
        """Merges until no word has a merge left (or left undropped); returns (symbols, frozen).

        Words are segmented independently, as BPE dropout is defined (Provilkov et al.
        §3): at each step every word still going applies its best undropped merge, and
        a word whose available merges are all dropped stops there. A vocabulary whose
        pieces never span a word boundary gives the same plain segmentation word by
        word as over the whole caption; one whose pieces may (trained without
        `split_by_whitespace`) is treated as one word per caption.
        """
        lengths = tf.cast(symbols.row_lengths(), tf.int32)  # (B,)
        width = tf.maximum(symbols.bounding_shape(1, out_type=tf.int32), 2)
        batch = tf.cast(symbols.nrows(), tf.int32)
        shape = tf.stack([batch, width])
        dense = symbols.to_tensor(default_value="", shape=shape)  # (B, T)
        dense_frozen = frozen.to_tensor(default_value=True, shape=shape)  # (B, T)
        positions = tf.range(width)[None, :]  # (1, T)
        if self._split_words:
            starts = tf.strings.substr(dense, 0, len(_SPACE.encode()), unit="BYTE") == _SPACE  # (B, T)
            word = tf.cumsum(tf.cast(starts, tf.int32), axis=1)  # (B, T): word index within the caption
        else:
            word = tf.zeros_like(positions) + tf.zeros([batch, 1], tf.int32)
        # One segment per (caption, word): a caption has at most T + 1 word indices.
        word = word + tf.range(batch)[:, None] * (width + 1)  # (B, T)
        segments = batch * (width + 1)
        seed = tf.cast(seed, tf.int64)
        no_key = tf.constant(np.iinfo(np.int64).max, tf.int64)

        def step(i, dense, dense_frozen, word, going, lengths, _):
            joined = tf.strings.join([dense[:, :-1], dense[:, 1:]])  # (B, T-1)
            ranks = self._piece_ranks.lookup(joined)
            pair_word = word[:, :-1]  # (B, T-1)
            valid = ((positions[:, 1:] < lengths[:, None]) & ~dense_frozen[:, :-1] & ~dense_frozen[:, 1:]
                     & (pair_word == word[:, 1:]) & going[:, :-1] & (ranks < _NO_RANK))
            # Every available merge is dropped with probability p, drawn afresh at every step.
            draws = backend.tf_data_uniform(tf.shape(ranks), seed, i)
            available = valid & (draws >= rate)
            # Per word: best rank first, then the leftmost pair (SentencePiece's agenda order).
            keys = tf.where(available, tf.cast(ranks, tf.int64) * tf.cast(width, tf.int64)
                            + tf.cast(positions[:, :-1], tf.int64), no_key)
            best = tf.math.unsorted_segment_min(tf.reshape(keys, [-1]), tf.reshape(pair_word, [-1]), segments)
            merge = available & (keys == tf.gather(best, pair_word))  # (B, T-1): merge k with k + 1
            # A word without an undropped merge stops (or is complete).
            word_merges = tf.math.unsorted_segment_max(
                tf.reshape(tf.cast(merge, tf.int32), [-1]), tf.reshape(pair_word, [-1]), segments)
            going = going & (tf.gather(word_merges, word) > 0)
            no_pair = tf.zeros([batch, 1], tf.bool)
            merge_left = tf.concat([merge, no_pair], axis=1)  # (B, T)
            absorbed = tf.concat([no_pair, merge], axis=1)  # (B, T): the right half of a merge
            dense = tf.where(merge_left, tf.concat([joined, tf.fill([batch, 1], "")], axis=1), dense)
            dense_frozen = dense_frozen & ~merge_left
            keep = ~absorbed & (positions < lengths[:, None])

            def compact(values, fill):
                return tf.ragged.boolean_mask(values, keep).to_tensor(default_value=fill, shape=shape)

            lengths = tf.reduce_sum(tf.cast(keep, tf.int32), axis=1)
            return (i + 1, compact(dense, ""), compact(dense_frozen, True), compact(word, 0),
                    compact(going, False), lengths, tf.reduce_any(merge))

        loop = tf.while_loop(
            lambda *state: state[-1], step,
            (tf.constant(0, tf.int32), dense, dense_frozen, word, tf.ones_like(dense_frozen), lengths,
             tf.constant(True)),
            shape_invariants=(tf.TensorShape([]), *[tf.TensorShape([None, None])] * 4, tf.TensorShape([None]),
                              tf.TensorShape([])),
        )
        dense, dense_frozen, lengths = loop[1], loop[2], loop[5]
        return (tf.RaggedTensor.from_tensor(dense, lengths=lengths),
                tf.RaggedTensor.from_tensor(dense_frozen, lengths=lengths))

    def _ids(self, merged: tf.RaggedTensor, frozen: tf.RaggedTensor) -> tf.RaggedTensor:
        """Symbols -> ids; a run of unknown pieces becomes one unknown id (sentencepiece's Encode)."""
        ids = self._piece_ids.lookup(merged.flat_values)  # (N,) int64, unk when not a normal piece
        ids = tf.where(frozen.flat_values, tf.constant(self.unk_id, tf.int64), ids)
        is_unk = ids == self.unk_id
        first = tf.ragged.range(merged.row_lengths()).flat_values == 0
        previous_unk = tf.concat([[False], is_unk[:-1]], axis=0)
        keep = ~(is_unk & previous_unk & ~first)
        kept = tf.boolean_mask(tf.cast(ids, tf.int32), keep)
        rows = tf.boolean_mask(merged.value_rowids(), keep)
        return tf.RaggedTensor.from_value_rowids(kept, rows, nrows=merged.nrows())

