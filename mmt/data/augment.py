"""MAE's image augmentation in tf.data: random resized crop and horizontal flip, stateless.

MAE pre-trains with only these two (He et al. 2021, "Masked Autoencoders Are Scalable
Vision Learners", §A.1 and Table 8; its `main_pretrain.py`: torchvision's
`RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=3)`, 3 = bicubic, then
`RandomHorizontalFlip()`); the M3AE issue (19) takes MAE's recipe, although the M3AE
paper itself says it trains "without relying on data augmentations" (its Fig. 2). A `StreamSpec` turns them on per
stream (`random_resized_crop`, `horizontal_flip`); `mmt.data.pipeline` calls
`augment_image` on every decoded image of such a stream.

**Every draw is a function of (seed, stream, position).** Resuming from a checkpoint
must redraw exactly what the uninterrupted run drew (mmt/backend.py's rule), so the
draws are TensorFlow's *stateless* image ops, seeded per element with
`[stream key, position]`: the key derives from the run's seed and the stream's name
(`pipeline.derive_seed`), the position counts the stream's elements (a counter that
the checkpointed tf.data iterator saves and restores). The same record drawn again in a
later epoch sits at another position, so it gets another crop, as in MAE.

**The crop sampler is TensorFlow's, not torchvision's.** `stateless_sample_distorted_
bounding_box` (the Inception-style crop that TF and big_vision's `inception_crop` use)
keeps the crop's area within `scale` of the image's and its aspect ratio within
(3/4, 4/3), like torchvision, and falls back to the whole image after 10 failed
attempts (torchvision: a centre crop, the whole image for the square images mmt
stores). It draws the aspect ratio uniformly (torchvision: log-uniformly) and the crop
height uniformly (torchvision: the area), so small crops come a little more often:
mean area 0.49 of a 64x64 image at scale (0.2, 1.0), against 0.54 for torchvision's
sampler (measured, 2,000 and 20,000 draws).

**Bicubic, antialiased**, as MAE: torchvision resizes PIL images with PIL's bicubic
filter, which widens its kernel when shrinking; `tf.image.resize(..., "bicubic",
antialias=True)` is the same Keys (a = -0.5) kernel widened the same way. The result
is rounded and clipped back to uint8 (bicubic overshoots at edges).
"""

from __future__ import annotations

import tensorflow as tf

#: MAE's crop scale range (MAE `main_pretrain.py`: `RandomResizedCrop(scale=(0.2, 1.0))`).
MAE_CROP_SCALE = (0.2, 1.0)
#: torchvision's default aspect-ratio range of `RandomResizedCrop`, which MAE keeps.
CROP_ASPECT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# torchvision tries 10 boxes before falling back; TF's op takes the same bound.
_CROP_ATTEMPTS = 10


def element_seeds(key: int, positions: tf.Tensor) -> tf.Tensor:
    """int64 [B, 2] stateless seeds `[key, position]`, one row per element.

    Args:
      key: a 31-bit stream key (from `pipeline.derive_seed(seed, stream, "crop")`).
      positions: int64 [B], distinct per element of the stream.
    """
    positions = tf.cast(positions, tf.int64)
    return tf.stack([tf.fill(tf.shape(positions), tf.constant(key, tf.int64)), positions], axis=1)


def crop_box(image_shape: tf.Tensor, seed: tf.Tensor, scale: tuple[float, float]) -> tuple[tf.Tensor, tf.Tensor]:
    """The box of a random resized crop: (begin int32 [3], size int32 [3]) for `tf.slice`.

    Args:
      image_shape: int32 [3], the image's (H, W, C).
      seed: int64 [2], the element's stateless seed.
      scale: (min, max) area of the box as a fraction of the image's.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.zeros([1, 0, 4], tf.float32),  # none: the whole image is the object
        seed=seed,
        min_object_covered=0.0,  # any box qualifies; only area and aspect ratio constrain it
        aspect_ratio_range=CROP_ASPECT_RATIO,
        area_range=tuple(float(s) for s in scale),
        max_attempts=_CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def random_resized_crop(
    image: tf.Tensor, seed: tf.Tensor, resolution: int, scale: tuple[float, float] = MAE_CROP_SCALE
) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8 [R, R, 3]: a random box (see `crop_box`), resized bicubically."""
    begin, size = crop_box(tf.shape(image), seed, scale)
    crop = tf.slice(image, begin, size)  # uint8 (h, w, 3)
    resized = tf.image.resize(crop, [resolution, resolution], method="bicubic", antialias=True)
    return tf.reshape(_to_uint8(resized), [resolution, resolution, 3])


def horizontal_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 3] mirrored left-right with probability 1/2 (MAE: `RandomHorizontalFlip()`)."""
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def augment_image(
    image: tf.Tensor,
    resolution: int,
    *,
    crop_scale: tuple[float, float] | None,
    flip: bool,
    crop_seed: tf.Tensor,
    flip_seed: tf.Tensor,
) -> tf.Tensor:
    """One decoded image -> uint8 [R, R, 3], cropped (when `crop_scale`) then flipped (when `flip`).

    Without a crop the image must already be R x R (the pipeline resizes it first).
    Crop first, as torchvision's Compose in MAE: the flip then mirrors the crop.
    """
    if crop_scale is not None:
        image = random_resized_crop(image, crop_seed, resolution, crop_scale)
    if flip:
        image = horizontal_flip(image, flip_seed)
    return tf.ensure_shape(image, [resolution, resolution, 3])
