"""CLIP training: symmetric InfoNCE on paired images and captions (CLIP §2.3; DALL-E §2.6's reranker).

One stream, `paired`, with `image_tokens` (token CLIP) or `image` (pixel CLIP) and
`text_ids`. For a replica's batch of B pairs the dual encoder (`mmt/models/clip.py`) gives
the similarity logits `S = logit_scale * T I^T` (float32 [B texts, B images]) and the
loss is CLIP's symmetric cross-entropy

    contrastive = 1/2 (CE(S, caption -> its image) + CE(S^T, image -> its caption)),

summed over the replica's examples and divided by the global batch (`Ratio`).
Departure from CLIP (ours, for small synthetic vocabularies like shapes): captions whose
text ids are identical are all positives of each other -- the target row is uniform over
them -- so two pairs with the same caption are not pushed apart. With distinct captions
this is CLIP's loss exactly. `t2i_accuracy` / `i2t_accuracy` (the in-batch argmax is a
positive) and `logit_scale` are summaries (weight 0).

**Replicas.** The negatives are the replica's own: with N replicas each example is
contrasted with the B/N - 1 others of its shard, and a step is the mean of N per-shard
InfoNCE losses. CLIP itself gathers every replica's embeddings; mmt's task contract is
single-replica (the trainer owns the strategy), so it does not. Hence the usual mmt
equivalence "1 replica == 2 replicas on the same global batch" does *not* hold for this
loss: what holds (tests/test_clip.py) is that a 2-replica step equals one replica
stepping on the sum of the two shards' losses, each shard contrasted only within itself.
Larger per-replica batches give more negatives; the tiny configs run on one replica.

Inference hooks: `score(image_tokens, text_ids) -> float32 [N]` (logit_scale x cosine,
the reranker's score, `mmt/sampling/rerank.py`), `similarity` and `retrieval` (caption ->
image recall@k).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from keras import ops

from mmt.models.clip import CLIP
from mmt.tasks.base import CompiledInference, DataExpectations, Ratio, StackPass, Task, TokenizerFiles, task_arguments

#: contrastive 1; the rest are summaries.
DEFAULT_LOSS_WEIGHTS = {"contrastive": 1.0, "t2i_accuracy": 0.0, "i2t_accuracy": 0.0, "logit_scale": 0.0}


def contrastive_losses(logits, same_caption=None):
    """CLIP's symmetric InfoNCE on a similarity matrix, as sums over the rows.

    Args:
      logits: float32 [B, B], row i = caption i against every image (scaled cosines).
      same_caption: optional bool [B, B], True where captions i and j are identical
        (their diagonal True): every such image is a positive of caption i (and every
        such caption of image j), with equal target weight. None: the diagonal only.

    Returns:
      (loss sum, t2i correct, i2t correct): float32 scalars summed over the B examples;
      the loss of example i is (CE of row i + CE of column i) / 2.
    """
    b = logits.shape[0] or ops.shape(logits)[0]
    positives = ops.eye(b, dtype="float32") if same_caption is None else ops.cast(same_caption, "float32")
    targets = positives / ops.sum(positives, axis=-1, keepdims=True)  # symmetric: rows == columns

    def ce(x):  # [B, B] -> [B], cross-entropy of each row against its target row
        return -ops.sum(targets * ops.log_softmax(x, axis=-1), axis=-1)

    per_example = 0.5 * (ce(logits) + ce(ops.transpose(logits)))

    def correct(x):  # the row's argmax is a positive
        hit = ops.take_along_axis(positives, ops.argmax(x, axis=-1)[:, None], axis=-1)
        return ops.sum(hit)

    return ops.sum(per_example), correct(logits), correct(ops.transpose(logits))


def recall_at_k(similarity, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Caption -> image recall@k: the paired image (same index) is among the k best.

    Args:
      similarity: float [Q, N] (query caption q against image n); image q is the answer.
        A tie with the answer counts against it (its rank is the number of images
        scoring at least as high, less one).

    Returns:
      {"recall@k": fraction of queries} for each k.
    """
    s = np.asarray(similarity, np.float32)
    answer = s[np.arange(len(s)), np.arange(len(s))][:, None]
    rank = (s >= answer).sum(axis=1) - 1  # 0: the answer scores strictly highest
    return {f"recall@{k}": float(np.mean(rank < k)) for k in ks}


class CLIPTask(CompiledInference, TokenizerFiles, Task):
    """The contrastive dual encoder for the trainer; network arguments go to `CLIP` unchanged.

    Args:
      network: keyword arguments of `mmt.models.clip.CLIP` (size, image_input, vocabularies,
        grid, text_length, ...).
      identical_captions_positive: captions with identical ids are positives of each
        other (module docstring); False is CLIP's diagonal-only target.
      loss_weights: name -> weight, merged over `DEFAULT_LOSS_WEIGHTS`.
      image_tokenizer: directory of the saved image tokenizer whose codes the data holds
        (token CLIP): the data must carry its fingerprint; `score_images` uses it.
      text_vocab: the SentencePiece model of the text ids.
      compile_inference: run `score` / embeddings compiled with the backend's XLA (once per
        batch shape); False runs them eagerly.
    """

    def __init__(self, network: Mapping | None = None, identical_captions_positive: bool = True,
                 loss_weights: Mapping[str, float] | None = None, image_tokenizer: str | None = None,
                 text_vocab: str | None = None, compile_inference: bool = True):
        self.arguments = task_arguments(locals())
        unknown = set(loss_weights or {}) - set(DEFAULT_LOSS_WEIGHTS)
        if unknown:
            raise ValueError(f"CLIPTask.loss_weights: unknown losses {sorted(unknown)}; "
                             f"the losses are {sorted(DEFAULT_LOSS_WEIGHTS)}")
        self.model = CLIP(**dict(network or {}))
        self.identical_captions_positive = bool(identical_captions_positive)
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **dict(loss_weights or {})}
        self.image_tokenizer_path, self.text_vocab_path = image_tokenizer, text_vocab
        if self.model.image_input == "pixels" and image_tokenizer:
            raise ValueError("CLIPTask.image_tokenizer is for a token CLIP; this network reads pixels "
                             "(network['image_input'] = 'pixels'): leave it None")
        self.compile_inference = bool(compile_inference)

    def build(self):
        self.model.build_all()

    # -- the loss ------------------------------------------------------------------------

    def logits(self, images, text_ids, training=False):
        """float32 [B, B]: logit_scale x cosine, caption i (row) against image j (column)."""
        m = self.model
        return m.similarity(m.encode_image(images, training=training), m.encode_text(text_ids, training=training))

    def same_caption(self, text_ids):
        """bool [B, B]: captions i and j have identical ids (None when the option is off)."""
        if not self.identical_captions_positive:
            return None
        ids = ops.cast(text_ids, "int32")
        return ops.all(ops.equal(ids[:, None, :], ids[None, :, :]), axis=-1)

    def compute_losses(self, batch, step, seed):
        data = batch.get("paired")
        key = self.model.image_key
        if data is None or key not in data or "text_ids" not in data:
            raise ValueError(f"CLIPTask needs a 'paired' stream with fields {key!r} and 'text_ids'; got "
                             f"{ {k: sorted(v) for k, v in batch.items()} }")
        text_ids = data["text_ids"]
        logits = self.logits(data[key], text_ids, training=True)
        loss, t2i, i2t = contrastive_losses(logits, self.same_caption(text_ids))
        count = ops.cast(ops.shape(logits)[0], "float32")
        return {"contrastive": Ratio(loss, count), "t2i_accuracy": Ratio(t2i, count),
                "i2t_accuracy": Ratio(i2t, count), "logit_scale": self.model.logit_scale()}

    def activation_passes(self, batch_sizes):
        """The two encoders run with gradients on the paired batch (see `mmt.training.memory`)."""
        m, c = self.model, self.model.cfg
        b = sum(batch_sizes.values())
        image_tokens = m.num_image_positions + (1 if m.cls_token is not None else 0)
        return [StackPass("image encoder", b, image_tokens, c.width, c.depth, c.heads),
                StackPass("text encoder", b, m.text_length, c.text_width, c.text_depth, c.text_heads)]

    def component_layers(self):
        """`--dry_run`'s breakdown: each encoder, embedding and projection, and the temperature."""
        m = self.model
        out = {layer.name: layer for layer in m._layers if getattr(layer, "trainable_variables", None)}
        out["log_logit_scale"] = _Variables([m.log_logit_scale])
        return out

    # -- data ----------------------------------------------------------------------------

    def data_expectations(self):
        """What the network needs from the data (checked against manifests before step 1)."""
        m, network = self.model, "CLIPTask.network"
        tokens = m.image_input == "tokens"
        return DataExpectations(
            image_vocab_size=m.image_vocab_size if tokens else None, grid=m.grid if tokens else None,
            text_vocab_size=m.text_vocab_size, text_length=m.text_length, special_text_ids={"pad_id": m.pad_id},
            image_tokenizer_fingerprint=self.image_tokenizer_fingerprint if tokens else None,
            text_vocab_fingerprint=self.text_vocab_fingerprint,
            bindings={"image_vocab_size": f"{network}['image_vocab_size']", "grid": f"{network}['grid']",
                      "text_vocab_size": f"{network}['text_vocab_size']",
                      "text_length": f"{network}['text_length']",
                      "image_tokenizer_fingerprint": "CLIPTask.image_tokenizer",
                      "text_vocab_fingerprint": "CLIPTask.text_vocab"})

    # -- inference hooks -------------------------------------------------------------------

    def _images(self, images):
        m = self.model
        return np.asarray(images, np.int32 if m.image_input == "tokens" else np.uint8)

    def _batched(self, name, fn, arrays, batch_size):
        n = len(arrays[0])
        out = [np.asarray(ops.convert_to_numpy(self._run(name, fn, *(a[i:i + batch_size] for a in arrays))),
                          np.float32) for i in range(0, n, batch_size)]
        return np.concatenate(out, axis=0)

    def score(self, image_tokens, text_ids, batch_size: int = 256) -> np.ndarray:
        """float32 [N]: logit_scale x cosine of each (image, caption) pair (the reranker's score).

        Args:
          image_tokens: int [N, L] or [N, h, w] codes (token CLIP); for a pixel CLIP,
            uint8 [N, H, W, 3] images.
          text_ids: int [N, T] captions (pieces, EOS, padding).
        """
        images, text_ids = self._images(image_tokens), np.asarray(text_ids, np.int32)
        if len(images) != len(text_ids):
            raise ValueError(f"score needs as many images as captions, got {len(images)} and {len(text_ids)}")
        return self._batched("score", self.model.pair_scores, (images, text_ids), batch_size)

    def embed_images(self, images, batch_size: int = 256) -> np.ndarray:
        """float32 [N, E] unit embeddings of codes (or pixels, for a pixel CLIP)."""
        return self._batched("images", self.model.encode_image, (self._images(images),), batch_size)

    def embed_texts(self, text_ids, batch_size: int = 256) -> np.ndarray:
        """float32 [N, E] unit embeddings of text ids."""
        return self._batched("texts", self.model.encode_text, (np.asarray(text_ids, np.int32),), batch_size)

    def similarity(self, images, text_ids) -> np.ndarray:
        """float32 [Nt, Ni]: every caption against every image (logit_scale x cosine)."""
        scale = float(ops.convert_to_numpy(self.model.logit_scale()))
        return scale * self.embed_texts(text_ids) @ self.embed_images(images).T

    def retrieval(self, images, text_ids, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
        """Caption -> image recall@k over N pairs: caption i retrieves among all N images."""
        return recall_at_k(self.similarity(images, text_ids), ks)

    def score_images(self, images, captions, batch_size: int = 256) -> np.ndarray:
        """float32 [N]: scores of uint8 images [N, H, W, 3] against caption strings.

        Tokenizes with the task's tokenizers (a token CLIP encodes the images with its
        image tokenizer first).
        """
        m = self.model
        if m.image_input == "tokens":
            image_tokenizer, text_tokenizer = self.tokenizers()
            images = image_tokenizer.encode(np.asarray(images, np.uint8))
        else:
            if not self.text_vocab_path:
                raise ValueError("CLIPTask.text_vocab must be set to score caption strings")
            from mmt.tokenizers.loading import load_text_vocab

            text_tokenizer = load_text_vocab(self.text_vocab_path)
        return self.score(images, text_tokenizer.encode(list(captions), m.text_length), batch_size)


class _Variables:
    """Loose variables counted as one component of `--dry_run`'s breakdown."""

    def __init__(self, variables):
        self.trainable_variables = [v for v in variables if v.trainable]
        self.non_trainable_variables = [v for v in variables if not v.trainable]


__all__ = ["CLIPTask", "DEFAULT_LOSS_WEIGHTS", "contrastive_losses", "recall_at_k"]
