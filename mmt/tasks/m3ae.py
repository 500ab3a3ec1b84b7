"""M3AE training: masked patch and token prediction over paired and unpaired streams (M3AE §3, §4.2).

| stream       | encoder sees                 | losses                                    |
|--------------|------------------------------|-------------------------------------------|
| `paired`     | CLS + 25% patches + 25% text | image (MSE), text (CE) [, contrastive]    |
| `image_only` | CLS + 25% patches            | image                                     |
| `text_only`  | CLS + 25% text               | text                                      |

* **image**: mean squared error of the predicted pixels of each *masked* patch (MAE §3,
  M3AE §3), averaged over the masked patches of every stream in the global batch
  (`Ratio`). Pixels are normalised with ImageNet's mean and std (MAE's input
  transform); the target is each patch normalised by its own mean and variance
  (MAE's `norm_pix_loss`, on by default: MAE Table 1d, +0.5 to +1 point).
* **text**: cross-entropy over the vocabulary at masked real tokens (never padding),
  averaged over them in the global batch; weight 0.5 (M3AE §4.2).
* **contrastive** (optional, off by default; M3AE §4.2's learnable temperature
  initialised at 0.01): CLIP's symmetric InfoNCE between the CLS features of the
  masked image and of the masked text, each encoded alone, over this replica's paired
  examples (the negatives are the replica's own: with several replicas the loss is a
  per-replica one, as in CLIP's original implementation).

A stream that is absent from a batch contributes 0 / 0 to its losses, which the trainer
turns into 0 (it divides by max(denominator, 1e-9)): no NaN.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from keras import ops

from mmt import backend
from mmt.losses.cross_entropy import masked_cross_entropy
from mmt.models.m3ae import M3AE
from mmt.tasks.base import DataExpectations, Ratio, StackPass, Task, task_arguments

#: M3AE §4.2: image 1, text 0.5; the optional contrastive loss 1 (not given: our choice).
DEFAULT_LOSS_WEIGHTS = {"image": 1.0, "text": 0.5, "contrastive": 1.0, "text_accuracy": 0.0}
#: MAE's input normalisation (ImageNet statistics, as MAE's data transforms).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("cls", "mean")


class M3AETask(Task):
    """M3AE's (and, with `network["use_text"] = False`, MAE's) losses for the trainer.

    Args:
      network: keyword arguments of `mmt.models.m3ae.M3AE` (size, image_size, text sizes,
        mask ratios, use_text, ...).
      norm_pix_loss: target each patch's pixels normalised by its own mean and std (MAE).
      contrastive: add the contrastive loss (M3AE §4.2; sets the network's `contrastive`).
      loss_weights: name -> weight, merged over `DEFAULT_LOSS_WEIGHTS`.
      text_vocab: the SentencePiece model of the text ids (the data must carry its
        fingerprint; `fill_caption` uses it). None skips the check.
      summary_images: images in each TensorBoard reconstruction grid.
    """

    def __init__(self, network: Mapping | None = None, norm_pix_loss: bool = True, contrastive: bool = False,
                 loss_weights: Mapping[str, float] | None = None, text_vocab: str | None = None,
                 summary_images: int = 4):
        self.arguments = task_arguments(locals())
        unknown = set(loss_weights or {}) - set(DEFAULT_LOSS_WEIGHTS)
        if unknown:
            raise ValueError(f"M3AETask.loss_weights: unknown losses {sorted(unknown)}; "
                             f"the losses are {sorted(DEFAULT_LOSS_WEIGHTS)}")
        self.model = M3AE(**{**dict(network or {}), "contrastive": bool(contrastive)})
        if contrastive and not self.model.use_text:
            raise ValueError("M3AETask.contrastive needs text: the network has use_text=False (MAE)")
        self.norm_pix_loss, self.contrastive = bool(norm_pix_loss), bool(contrastive)
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **dict(loss_weights or {})}
        self.text_vocab_path, self.summary_images = text_vocab, int(summary_images)
        self.image_resolution = self.model.image_size  # what `mmt.evaluate` / `mmt.generate` feed
        self._text_tokenizer = None

    def build(self):
        self.model.build_all()

    # -- pixels ------------------------------------------------------------------------

    def normalise(self, images):
        """uint8 [B, H, W, 3] -> float32, ImageNet mean / std (MAE's input transform)."""
        x = ops.cast(images, "float32") / 255.0
        return (x - ops.convert_to_tensor(IMAGENET_MEAN)) / ops.convert_to_tensor(IMAGENET_STD)

    def denormalise(self, x):
        """The inverse of `normalise`, to uint8."""
        x = x * ops.convert_to_tensor(IMAGENET_STD) + ops.convert_to_tensor(IMAGENET_MEAN)
        return ops.cast(ops.clip(ops.round(x * 255.0), 0, 255), "uint8")

    def pixel_targets(self, patches):
        """[B, K, p*p*3] normalised pixels -> the regression target (MAE §3, norm_pix_loss)."""
        if not self.norm_pix_loss:
            return patches
        mean = ops.mean(patches, axis=-1, keepdims=True)
        var = ops.var(patches, axis=-1, keepdims=True)
        return (patches - mean) / ops.sqrt(var + 1e-6)

    # -- losses ------------------------------------------------------------------------

    def stream_losses(self, images=None, text_ids=None, seed=None, training=True):
        """One stream's masked losses: {"image": (sum, count), "text": (sum, count), ...}.

        Args:
          images: uint8 [B, H, W, 3] or None; text_ids: int [B, L] or None.
          seed: the step's `SeedGenerator` (None: fixed order, for inference).
        """
        m = self.model
        text_ids = text_ids if m.use_text else None
        if images is None and text_ids is None:
            return {}  # a text-only stream for MAE: nothing it reads
        patches = None if images is None else m.patchify(self.normalise(images))
        batch = ops.shape(patches if patches is not None else text_ids)[0]
        image_keep, text_keep = m.random_keeps(text_ids, batch, seed, image=patches is not None)
        z, _ = m.encode(patches, text_ids, image_keep, text_keep, training=training)
        pixels, logits = m.decode(z, patches is not None, text_ids, image_keep, text_keep, training=training)
        out = self.masked_losses(pixels, logits, patches, text_ids, image_keep, text_keep)
        if self.contrastive and patches is not None and text_ids is not None:
            out["contrastive"] = self.contrastive_loss(patches, text_ids, image_keep, text_keep, training)
        return out

    def masked_losses(self, pixels, logits, patches, text_ids, image_keep, text_keep) -> dict:
        """The losses on masked positions only, as (sum, count) pairs (M3AE §3.2).

        `pixels` float [B, K, P] predicted patches, `logits` float [B, L, V]; `image_keep` /
        `text_keep` from `random_keeps` (None for an absent modality). Returns `image`
        (per-patch MSE), `text` (cross-entropy) and `text_accuracy` for the modalities present.
        """
        out = {}
        if patches is not None:
            error = ops.mean(ops.square(pixels - self.pixel_targets(patches)), axis=-1)  # [B, K] per patch
            weights = ops.cast(image_keep.masked, "float32")
            out["image"] = (ops.sum(error * weights), ops.sum(weights))
        if text_ids is not None:
            out["text"] = masked_cross_entropy(logits, text_ids, text_keep.masked)
            right = ops.equal(ops.cast(ops.argmax(logits, axis=-1), "int32"), ops.cast(text_ids, "int32"))
            correct = ops.sum(ops.cast(ops.logical_and(right, text_keep.masked), "float32"))
            out["text_accuracy"] = (correct, out["text"][1])
        return out

    def contrastive_loss(self, patches, text_ids, image_keep, text_keep, training):
        """CLIP's symmetric InfoNCE between CLS features of each modality encoded alone: (sum, count)."""
        m = self.model
        zi, _ = m.encode(patches, None, image_keep, None, training=training)
        zt, _ = m.encode(None, text_ids, None, text_keep, training=training)

        def unit(v):
            v = ops.cast(v[:, 0], "float32")
            return v / ops.sqrt(ops.sum(ops.square(v), axis=-1, keepdims=True) + 1e-12)

        sims = ops.matmul(unit(zi), ops.transpose(unit(zt))) / m.temperature()  # [B, B]
        labels = ops.arange(ops.shape(sims)[0])
        ce = lambda s: -ops.take_along_axis(ops.log_softmax(s, axis=-1), labels[:, None], axis=-1)[:, 0]  # noqa: E731
        per_example = 0.5 * (ce(sims) + ce(ops.transpose(sims)))
        return ops.sum(per_example), ops.cast(ops.shape(sims)[0], "float32")

    def compute_losses(self, batch, step, seed):
        totals: dict[str, list] = {}
        streams = (("paired", ("image", "text_ids")), ("image_only", ("image",)), ("text_only", ("text_ids",)))
        seen = False
        for stream, fields in streams:
            data = batch.get(stream)
            if data is None:
                continue
            seen = True
            args = {f: data.get(f) for f in fields}
            losses = self.stream_losses(args.get("image"), args.get("text_ids"), seed)
            for name, (num, den) in losses.items():
                totals.setdefault(name, []).append((num, den))
        if not seen:
            raise ValueError(f"M3AETask got none of the streams paired / image_only / text_only: {sorted(batch)}")
        zero = ops.zeros((), "float32")
        names = ["image"] + (["text", "text_accuracy"] if self.model.use_text else [])
        names += ["contrastive"] if self.contrastive else []
        # An absent modality is 0 / 0: the trainer's max(denominator, 1e-9) makes it 0, not NaN.
        return {name: Ratio(sum((p[0] for p in totals.get(name, [])), zero),
                            sum((p[1] for p in totals.get(name, [])), zero)) for name in names}

    def activation_passes(self, batch_sizes):
        """The stacks a step runs with gradients, at per-replica `batch_sizes` (see `mmt.training.memory`)."""
        m, c = self.model, self.model.cfg
        lengths = {"paired": (m.image_kept + (m.text_kept if m.use_text else 0),
                              m.num_patches + (m.text_length if m.use_text else 0)),
                   "image_only": (m.image_kept, m.num_patches), "text_only": (m.text_kept, m.text_length)}
        passes = []
        for stream, b in batch_sizes.items():
            enc, dec = lengths.get(stream, lengths["paired"])
            passes.append(StackPass(f"{stream} encoder", b, 1 + enc, c.width, c.depth, c.heads))
            passes.append(StackPass(f"{stream} decoder", b, 1 + dec, c.decoder_width, c.decoder_depth,
                                    c.decoder_heads))
        return passes

    def component_layers(self):
        """`--dry_run`'s breakdown: the ViT encoder (patch projection, CLS, blocks) apart from the rest."""
        m = self.model
        groups = {"vit_encoder": [m.patch_embedding, m.cls_token, m.encoder],
                  "modality_embedding": [m.modality_embedding],
                  "text_embedding": [m.text_embedding],
                  "decoder": [m.decoder_projection, m.mask_token, m.decoder_modality_embedding, m.decoder],
                  "image_head": [m.image_head], "text_head": [m.text_head]}
        out = {name: _Group([layer for layer in layers if layer is not None]) for name, layers in groups.items()}
        if m.contrastive:
            out["contrastive_temperature"] = _Group([], [m.log_temperature])
        return out

    # -- data --------------------------------------------------------------------------

    @property
    def text_vocab_fingerprint(self) -> str | None:
        from mmt.tokenizers.loading import text_vocab_fingerprint

        return text_vocab_fingerprint(self.text_vocab_path)

    def data_expectations(self):
        """What the network needs from the data (checked against manifests before step 1)."""
        m, network = self.model, "M3AETask.network"
        if not m.use_text:
            return DataExpectations()
        return DataExpectations(text_vocab_size=m.text_vocab_size, text_length=m.text_length,
                                special_text_ids={"pad_id": m.pad_id},
                                text_vocab_fingerprint=self.text_vocab_fingerprint,
                                bindings={"text_vocab_size": f"{network}['text_vocab_size']",
                                          "text_length": f"{network}['text_length']",
                                          "text_vocab_fingerprint": "M3AETask.text_vocab"})

    def text_tokenizer(self):
        if self._text_tokenizer is None:
            if not self.text_vocab_path:
                raise ValueError("M3AETask.text_vocab must be set to fill captions")
            from mmt.tokenizers.loading import load_text_vocab

            self._text_tokenizer = load_text_vocab(self.text_vocab_path)
        return self._text_tokenizer

    # -- inference hooks (eager; evaluation, generation, summaries) -----------------------

    def reconstruct(self, images, seed: int = 0, text_ids=None):
        """uint8 [N, H, W, 3] -> (masked input, reconstruction) uint8 [N, H, W, 3] each.

        `image_mask_ratio` of the patches is masked (grey in the input); the
        reconstruction shows the predicted pixels there and the original ones elsewhere
        (M3AE §4.4, Fig. 9). With `norm_pix_loss` the predictions are per-patch
        normalised and take each original patch's mean and std (as MAE's visualisation).
        `text_ids` (int [N, L]), when given, enter whole, unmasked.
        """
        m = self.model
        images = np.asarray(images, np.uint8)
        patches = m.patchify(self.normalise(images))
        text_ids = None if text_ids is None or not m.use_text else ops.convert_to_tensor(np.asarray(text_ids, np.int32))
        image_keep, _ = m.random_keeps(None, len(images), _fixed_seed(seed))
        z, _ = m.encode(patches, text_ids, image_keep, None)
        pixels, _ = m.decode(z, True, text_ids, image_keep, None)
        if self.norm_pix_loss:
            mean = ops.mean(patches, axis=-1, keepdims=True)
            std = ops.sqrt(ops.var(patches, axis=-1, keepdims=True) + 1e-6)
            pixels = pixels * std + mean
        masked = ops.cast(image_keep.masked, "bool")[..., None]
        grey = ops.zeros_like(patches)  # the ImageNet mean colour
        masked_input = self.denormalise(m.unpatchify(ops.where(masked, grey, patches)))
        reconstruction = self.denormalise(m.unpatchify(ops.where(masked, pixels, patches)))
        return np.asarray(ops.convert_to_numpy(masked_input)), np.asarray(ops.convert_to_numpy(reconstruction))

    def fill_caption(self, images, captions, seed: int = 0):
        """Masks `text_mask_ratio` of each caption's tokens and predicts them from the image and the rest.

        Returns:
          (masked captions with "_" for each masked piece, filled captions): lists of str.
        """
        m = self.model
        if not m.use_text:
            raise ValueError("this network was built with use_text=False (MAE): it has no text to fill")
        tokenizer = self.text_tokenizer()
        ids = tokenizer.encode(list(captions), m.text_length)
        patches = m.patchify(self.normalise(np.asarray(images, np.uint8)))
        _, text_keep = m.random_keeps(ops.convert_to_tensor(ids), len(ids), _fixed_seed(seed), image=False)
        z, _ = m.encode(patches, ids, None, text_keep)
        _, logits = m.decode(z, True, ids, None, text_keep)
        masked = np.asarray(ops.convert_to_numpy(text_keep.masked))
        predicted = np.asarray(ops.convert_to_numpy(ops.argmax(logits, axis=-1)), np.int32)
        filled = np.where(masked, predicted, ids)
        pieces = [[tokenizer.decode([[int(i)]])[0] if not hide else "_" for i, hide in zip(row, mrow)
                   if i != m.pad_id] for row, mrow in zip(ids, masked)]
        return [" ".join(p) for p in pieces], tokenizer.decode(filled)

    def image_features(self, images, all_layers: bool = False, pooling: str = "cls",
                       batch_size: int = 64) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, D] frozen features: the encoder over every patch, no text.

        `pooling`: "cls" (MAE / M3AE App. A.3: the linear probe reads the CLS token) or
        "mean" (the patch tokens' mean). `all_layers` concatenates every block's.
        """
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        m, out = self.model, []
        for start in range(0, len(images), batch_size):
            patches = m.patchify(self.normalise(np.asarray(images[start:start + batch_size], np.uint8)))
            layers = m.layer_outputs(patches)
            layers = layers if all_layers else layers[-1:]
            pooled = [x[:, 0] if pooling == "cls" else ops.mean(x[:, 1:], axis=1) for x in layers]
            out.append(np.asarray(ops.convert_to_numpy(ops.concatenate(pooled, axis=-1)), np.float32))
        return np.concatenate(out, axis=0)

    def image_summaries(self, batch, step):
        """`reconstruction`: uint8 [N, H, 3W, 3], masked input | reconstruction | original."""
        data = batch.get("paired") or batch.get("image_only")
        if data is None or "image" not in data:
            return {}
        images = np.asarray(data["image"])[: self.summary_images]
        text = data.get("text_ids")
        text = None if text is None else np.asarray(text)[: self.summary_images]
        masked_input, reconstruction = self.reconstruct(images, seed=int(step), text_ids=text)
        return {"reconstruction": np.concatenate([masked_input, reconstruction, images], axis=2)}


class _Group:
    """Several layers (and loose variables) counted as one component of `--dry_run`'s breakdown."""

    def __init__(self, layers, variables=()):
        self.trainable_variables = [v for layer in layers for v in layer.trainable_variables] + [
            v for v in variables if v.trainable]
        self.non_trainable_variables = [v for layer in layers for v in layer.non_trainable_variables]


def _fixed_seed(seed: int):
    return backend.FixedSeed(np.array([int(seed), 0], np.int32))


__all__ = ["DEFAULT_LOSS_WEIGHTS", "IMAGENET_MEAN", "IMAGENET_STD", "M3AETask"]
