"""Text vocabularies: SentencePiece models, trained here or loaded from disk.

One class, `TextTokenizer`, serves every model in mmt, eagerly (the `sentencepiece`
package) and inside tf.data (tensorflow-text); both paths give the same ids, which the
tests check. The id conventions live here and nowhere else:

* Models trained by `train_sentencepiece` follow T5's layout -- pad 0, EOS 1, unk 2 --
  and add BOS 3 (GIT-style decoders start from BOS).
* Any other SentencePiece model (a T5 `spiece.model`, a keras-hub preset's
  `vocabulary.spm`) keeps its own ids. A model without BOS uses pad as the decoder start
  token, which is T5's convention.
* An encoded sequence follows `mmt.data.text_ids`: `pieces[:length - 1] + [EOS] + [pad]...`;
  truncation always keeps the EOS.

TensorFlow is imported lazily, so the eager path works under any Keras backend.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import sentencepiece as spm

from mmt.data.text_ids import terminate_and_pad, terminate_and_pad_numpy
from mmt.data.vocab_files import VocabularyNotFoundError, proto_model_type, resolve_model_file, vocab_fingerprint
from mmt.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

# Ids of the models that `train_sentencepiece` writes (T5's layout plus a BOS).
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BOS_ID = 3


# What `train_sentencepiece` trains; `TextTokenizer.model_type` may also read "word" / "char".
MODEL_TYPES = ("unigram", "bpe")


class VocabularyOptionError(UserError, ValueError):
    """A vocabulary-training option (model type, size, input) is invalid."""


def train_sentencepiece(
    texts: Iterable[str],
    output_path: str | os.PathLike,
    *,
    vocab_size: int = 256,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    max_sentences: int = 1_000_000,
    seed: int = 0,
    lowercase: bool = False,
) -> "TextTokenizer":
    """Trains a SentencePiece model on `texts` and writes it to `output_path`.

    Args:
      texts: training sentences (captions); empty strings are skipped.
      output_path: where the `.model` file goes (parent directories are created).
      vocab_size: upper bound on the vocabulary size. Small corpora (the shapes
        grammar) may support fewer pieces; training then stops below the bound rather
        than failing (`hard_vocab_limit=False`).
      model_type: "unigram" (T5's choice) or "bpe" (DALL-E §2.2 BPE-encodes captions;
        only a BPE vocabulary supports BPE dropout, `mmt.data.bpe_dropout`).
      character_coverage: fraction of characters covered by the vocabulary.
      max_sentences: at most this many sentences are used (sampled with `seed`).
      seed: seeds SentencePiece's sampling, so the same captions give the same model.
      lowercase: case-fold every text before it is split into pieces (SentencePiece's
        `nmt_nfkc_cf` normalization), both in training and whenever the model encodes:
        DALL-E §2.2 encodes the lowercased caption. Decoding then gives lowercase text.

    Returns:
      The trained tokenizer, loaded from the written file.
    """
    if model_type not in MODEL_TYPES:
        raise VocabularyOptionError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if vocab_size < 8:
        raise VocabularyOptionError(f"vocab_size must be at least 8, got {vocab_size}")
    sentences = [t for t in texts if t.strip()]
    if not sentences:
        raise VocabularyOptionError("train_sentencepiece got no non-empty training text")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type=model_type,
        character_coverage=character_coverage,
        # The model stores its normalization rule, so encoding folds case as training did.
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        # One thread: SentencePiece's multi-threaded EM is not bit-reproducible.
        num_threads=1,
        minloglevel=2,
    )
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, output_path)
    return TextTokenizer.from_file(output_path)


class TextTokenizer:
    """A SentencePiece vocabulary with mmt's BOS / EOS / PAD conventions.

    Build it with `TextTokenizer.from_file(path)` (a `.model` file or a directory that
    holds one) or `train_sentencepiece(...)`.
    """

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
        self._proto = bytes(model_proto)
        self.source = source
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as e:  # sentencepiece raises bare RuntimeError / OSError
            raise ValueError(f"{source} is not a valid SentencePiece model: {e}") from e
        self._tf_tokenizer = None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TextTokenizer":
        model_file = resolve_model_file(path)
        return cls(model_file.read_bytes(), source=str(model_file))

    # -- ids ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def pad_id(self) -> int:
        pad = int(self._sp.pad_id())
        if pad < 0:
            raise ValueError(f"{self.source} defines no padding id; mmt needs one")
        return pad

    @property
    def eos_id(self) -> int:
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise ValueError(f"{self.source} defines no EOS id; mmt needs one")
        return eos

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    @property
    def bos_id(self) -> int:
        """The decoder's start token: the model's BOS, else pad (T5's convention)."""
        bos = int(self._sp.bos_id())
        return bos if bos >= 0 else self.pad_id

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(sorted({self.pad_id, self.eos_id, self.bos_id}))

    @property
    def model_type(self) -> str:
        """The SentencePiece algorithm that made this model: "unigram", "bpe", "word" or "char"."""
        return proto_model_type(self._proto)

    def fingerprint(self) -> str:
        """A stable id of this vocabulary: the SHA-256 of the model file's bytes."""
        return vocab_fingerprint(self._proto)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the model bytes to `path` (atomically) and returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self._proto)
        os.replace(tmp, path)
        return path

    @property
    def model_proto(self) -> bytes:
        return self._proto

    # -- eager -----------------------------------------------------------------------

    def tokenize(self, texts: str | Sequence[str]) -> list[list[int]]:
        """Piece ids of each text, without EOS or padding."""
        if isinstance(texts, str):
            texts = [texts]
        return [list(ids) for ids in self._sp.EncodeAsIds(list(texts))]

    def encode(self, texts: str | Sequence[str], length: int) -> np.ndarray:
        """Tokenizes, terminates and pads: int32 [batch, length]."""
        return terminate_and_pad_numpy(self.tokenize(texts), length, self.eos_id, self.pad_id)

    def decode(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        """Texts of int [batch, length] ids: stops at the first EOS, drops pad and BOS."""
        specials = set(self.special_ids) - {self.eos_id}
        texts = []
        for row in ids:
            pieces = []
            for i in np.asarray(row).tolist():
                if i == self.eos_id:
                    break
                if i not in specials and 0 <= i < self.vocab_size:
                    pieces.append(int(i))
            texts.append(self._sp.DecodeIds(pieces))
        return texts

    # -- inside tf.data ----------------------------------------------------------------

    def tf_tokenize(self, texts: "tf.Tensor") -> "tf.RaggedTensor":
        """string [batch] -> int32 ragged [batch, None] piece ids (no EOS, no padding)."""
        if self._tf_tokenizer is None:
            import tensorflow_text as tf_text

            self._tf_tokenizer = tf_text.SentencepieceTokenizer(
                model=self._proto, out_type="int32", add_bos=False, add_eos=False
            )
        return self._tf_tokenizer.tokenize(texts)

    def tf_encode(self, texts: "tf.Tensor", length: int) -> "tf.Tensor":
        """string [batch] -> int32 [batch, length], the same ids as `encode`."""
        return terminate_and_pad(self.tf_tokenize(texts), length, self.eos_id, self.pad_id)

    def __repr__(self) -> str:
        return f"TextTokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


# -- command line ------------------------------------------------------------------------


def _read_caption_files(patterns: str) -> list[str]:
    import glob

    paths = []
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise VocabularyOptionError(f"--input {pattern!r} matches no file; give text files of one caption a line")
        paths += matched
    if not paths:
        raise VocabularyOptionError("--input is required: text files of one caption a line (comma-separated globs)")
    captions = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            captions += [line.rstrip("\n") for line in f]
    return captions


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mmt.tokenizers.text --input=captions.txt --output=vocab.model --model_type=bpe`.

    Trains a vocabulary with `train_sentencepiece` on text files of one caption a line.
    DALL-E's (§2.2): `--model_type=bpe --vocab_size=16384 --lowercase`.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmt.tokenizers.text", description=main.__doc__.splitlines()[0])
    parser.add_argument("--input", default="", help="text files (comma-separated globs), one caption a line")
    parser.add_argument("--output", required=True, help="the .model file to write")
    parser.add_argument("--model_type", default="unigram", choices=MODEL_TYPES)
    parser.add_argument("--vocab_size", type=int, default=256, help="upper bound on the number of pieces")
    parser.add_argument("--lowercase", action="store_true", help="case-fold captions (DALL-E §2.2)")
    parser.add_argument("--character_coverage", type=float, default=1.0)
    parser.add_argument("--max_sentences", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    args = parser.parse_args(argv)
    tokenizer = train_sentencepiece(
        _read_caption_files(args.input), args.output, vocab_size=args.vocab_size, model_type=args.model_type,
        character_coverage=args.character_coverage, max_sentences=args.max_sentences, seed=args.seed,
        lowercase=args.lowercase,
    )
    print(f"wrote {args.output}: {tokenizer.model_type}, {tokenizer.vocab_size} pieces, {tokenizer.fingerprint()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from mmt.errors import run_main

    raise SystemExit(run_main(main))
