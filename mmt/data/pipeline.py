"""tf.data input pipelines: streams of mmt records, mixed into one nested batch per step.

ITIT trains on three streams at once -- paired image-text, image-only and text-only --
each with its own batch size (ITIT §4: 1024 / 512 / 512 of 2048). A `StreamSpec`
describes one stream; `mixture_dataset` zips the streams so that every element is
`{stream_name: batch}`; `distribute` splits that across replicas; `InputIterator`
iterates it (alone or across replicas), names the shard when a file turns out to be
corrupt, and exposes the iterator's position for `tf.train.Checkpoint`.

Every batch has a fully static shape (`drop_remainder=True`, fixed text length, grid
from the manifest), which TPUs and `jit_compile` need (DESIGN.md §5).

Per stream, the pipeline reads the manifest (and checks tokenizer fingerprints), shards
the files across input pipelines (or the records, when there are too few files),
shuffles the file order, reads files interleaved, shuffles records, batches, and only
then parses: `tf.io.parse_example` over a whole batch is over ten times faster than
parsing record by record (measured: 594k vs 42k paired records/s on 2 cores).

A stream may augment its images as MAE does (`StreamSpec.random_resized_crop`,
`StreamSpec.horizontal_flip`; `mmt.data.augment`), each image with its own stateless
seed derived from `seed`, the stream's name and the image's position in the stream, so
a resumed iterator redraws the same crops and flips.

A training stream may re-tokenize its captions with BPE dropout
(`StreamSpec.bpe_dropout`, DALL-E §2.2: 10%; `mmt.data.bpe_dropout`): its `text_ids`
then come from the records' `text/caption`, segmented afresh every time a record is
read, with stateless draws keyed by `seed`, the stream's name and the batch's position
in the stream, so a resumed iterator draws the same segmentations. With dropout 0 (and
in evaluation) the ids are the records' `text/ids`.

Typical use in a trainer::

    specs = {"paired": StreamSpec(data_dir, "paired", batch_size=1024, ...), ...}
    inputs = InputIterator.from_specs(specs, seed=0, eos_id=1, pad_id=0, strategy=strategy)
    checkpoint = tf.train.Checkpoint(model=..., optimizer=..., iterator=inputs.checkpointable)
    checkpoint.restore(latest)          # before the first next(): resumes the data position
    for step in ...:
        batch = next(inputs)            # {"paired": {...}, "image_only": {...}, ...}
        strategy.run(train_step, args=(batch,))

Shuffling is seeded by `seed` and the stream's name; like all of tf.data it also
depends on TensorFlow's global seed when one is set (`tf.random.set_seed`), so a
resumed run must set the same global seed as the original.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Mapping, Sequence

import tensorflow as tf

from mmt.data import augment, integrity, manifests, schema
from mmt.data.text_ids import terminate_and_pad
from mmt.errors import UserError

# The fields a stream can produce, and what each holds.
FIELDS = (
    "key",  # string [B]
    "image_tokens",  # int32 [B, h, w]
    "text_ids",  # int32 [B, text_length]: ids, EOS, padding
    "caption",  # string [B]
    "image",  # uint8 [B, R, R, 3]
)

_AUTOTUNE = tf.data.AUTOTUNE
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """One input stream: which split of which data directory, how batched, what fields.

    Attributes:
      data_dir: a data directory written in `mmt.data.schema` (has manifest.json).
      split: the split to read, e.g. `paired`.
      batch_size: the GLOBAL batch size; each replica gets `batch_size / replicas`.
      fields: which of `FIELDS` the batches carry.
      text_length: static length of `text_ids` (pieces, EOS, padding).
      image_resolution: side R of `image`; None takes the manifest's
        `options["image_size"]`. Images of another size are resized (area-averaged).
      random_resized_crop: None, or the (min, max) area of MAE's random resized crop
        as a fraction of the stored image (MAE: (0.2, 1.0), `augment.MAE_CROP_SCALE`);
        aspect ratio in (3/4, 4/3), resized bicubically to R x R (`mmt.data.augment`).
        Off by default: a crop can cut away what a caption names (shapes captions
        name objects, counts and grid cells).
      horizontal_flip: mirror each image left-right with probability 1/2 (MAE).
        Off by default: a flip swaps the "left" and "right" of a caption.
      bpe_dropout: probability of dropping each available BPE merge (Provilkov et al.
        2019; DALL-E §2.2: 0.1). Above 0, a training stream's `text_ids` are the records'
        captions re-tokenized with BPE dropout (same EOS / padding convention as stored
        `text/ids`); evaluation (`stream_dataset(training=False)`) never drops. Needs a
        BPE vocabulary.
      text_vocab: the SentencePiece model that re-tokenizes captions when bpe_dropout
        > 0 (file or directory); None takes the manifest's `options["text_vocab"]`
        (written by `beam_pipelines.tokenize` and the shapes records). Its fingerprint
        must be the manifest's.
      shuffle_buffer: records in the shuffle buffer (per input pipeline).
      cycle_length: files read concurrently (at most the number of files).
      name: the stream's name; `mixture_dataset` fills it from its mapping key.
    """

    data_dir: str
    split: str
    batch_size: int
    fields: tuple[str, ...] = ("image_tokens", "text_ids")
    text_length: int = 64
    image_resolution: int | None = None
    random_resized_crop: tuple[float, float] | None = None
    horizontal_flip: bool = False
    bpe_dropout: float = 0.0
    text_vocab: str | None = None
    shuffle_buffer: int = 10_000
    cycle_length: int = 16
    name: str = ""

    def __post_init__(self):
        unknown = set(self.fields) - set(FIELDS)
        where = f"stream {self.name or self.split!r}"
        if unknown or not self.fields:
            raise ValueError(f"{where}: fields must be a non-empty subset of {FIELDS}, got {self.fields}")
        if self.batch_size < 1:
            raise ValueError(f"{where}: batch_size must be positive, got {self.batch_size}")
        if self.text_length < 1:
            raise ValueError(f"{where}: text_length must be positive, got {self.text_length}")
        if self.shuffle_buffer < 1 or self.cycle_length < 1:
            raise ValueError(f"{where}: shuffle_buffer and cycle_length must be positive")
        if self.random_resized_crop is not None:
            scale = self.random_resized_crop
            try:
                low, high = (float(v) for v in scale)
            except (TypeError, ValueError):
                low = high = float("nan")
            if not 0 < low <= high <= 1:
                raise ValueError(
                    f"{where}: StreamSpec.random_resized_crop must be None or (min, max) area fractions with "
                    f"0 < min <= max <= 1 (MAE: (0.2, 1.0)), got {scale!r}"
                )
            # gin may hand over a list; a tuple keeps the spec hashable.
            object.__setattr__(self, "random_resized_crop", (low, high))
        if not isinstance(self.horizontal_flip, bool):
            raise ValueError(
                f"{where}: StreamSpec.horizontal_flip must be True or False (MAE flips with probability 1/2), "
                f"got {self.horizontal_flip!r}"
            )
        try:
            rate = float(self.bpe_dropout)
        except (TypeError, ValueError):
            rate = float("nan")
        if not 0 <= rate <= 1 or isinstance(self.bpe_dropout, bool):
            raise BPEDropoutConfigError(
                f"{where}: StreamSpec.bpe_dropout must be a probability in [0, 1] (DALL-E: 0.1), "
                f"got {self.bpe_dropout!r}"
            )
        object.__setattr__(self, "bpe_dropout", rate)
        if rate > 0 and "text_ids" not in self.fields:
            raise BPEDropoutConfigError(
                f"{where}: StreamSpec.bpe_dropout re-tokenizes the `text_ids` field, which this stream does not "
                f"read (fields {self.fields}); set bpe_dropout to 0 or add text_ids"
            )
        if self.augments and "image" not in self.fields:
            raise ValueError(
                f"{where}: random_resized_crop / horizontal_flip augment the `image` field, which this "
                f"stream does not read (fields {self.fields})"
            )

    @property
    def augments(self) -> bool:
        """Whether the stream's images are cropped or flipped (`mmt.data.augment`)."""
        return self.random_resized_crop is not None or bool(self.horizontal_flip)


class BPEDropoutConfigError(UserError, ValueError):
    """A stream's BPE-dropout settings cannot work (rate, fields, vocabulary)."""


def derive_seed(seed: int, *parts: str) -> int:
    """A stable 31-bit seed from `seed` and names (same on every machine and run)."""
    text = "/".join([str(int(seed)), *parts]).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "big") & 0x7FFFFFFF


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # The parse step checks its inputs with tf.debugging.Assert, which tf.data counts as
    # external state; the assertion holds no state, so checkpointing the iterator is safe.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return options


# -- parsing ---------------------------------------------------------------------------


def _require(ok: tf.Tensor, keys: tf.Tensor, message: str) -> tf.Operation:
    """Fails the step, naming the offending records, unless `ok` (bool [B]) is all true."""
    bad_keys = tf.boolean_mask(keys, tf.logical_not(ok))
    return tf.debugging.Assert(tf.reduce_all(ok), [message, "records:", bad_keys], summarize=16)


def _decode_images(
    encoded: tf.Tensor,
    resolution: int,
    *,
    crop_scale: tuple[float, float] | None = None,
    flip: bool = False,
    crop_seeds: tf.Tensor | None = None,
    flip_seeds: tf.Tensor | None = None,
) -> tf.Tensor:
    """string [B] PNG/JPEG -> uint8 [B, R, R, 3]; other sizes are resized to R x R.

    With `crop_scale`, MAE's random resized crop takes its box from the image as
    stored (as torchvision's crops the original, not a resized copy) and resizes it
    to R x R; `flip` then mirrors half the images. `crop_seeds` / `flip_seeds`: int64
    [B, 2], one stateless seed per image (`augment.element_seeds`).
    """
    batch = tf.shape(encoded)[0]
    no_seeds = tf.zeros([batch, 2], tf.int64)
    crop_seeds = no_seeds if crop_seeds is None else crop_seeds
    flip_seeds = no_seeds if flip_seeds is None else flip_seeds

    @tf.autograph.experimental.do_not_convert
    def decode(args):
        data, crop_seed, flip_seed = args
        image = tf.io.decode_image(data, channels=3, expand_animations=False)  # uint8 [H, W, 3]
        if crop_scale is None:
            same = tf.reduce_all(tf.shape(image)[:2] == resolution)

            def resize():
                resized = tf.image.resize(image, [resolution, resolution], method="area")
                return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

            image = tf.reshape(tf.cond(same, lambda: image, resize), [resolution, resolution, 3])
        if crop_scale is None and not flip:
            return image
        return augment.augment_image(
            image, resolution, crop_scale=crop_scale, flip=flip, crop_seed=crop_seed, flip_seed=flip_seed
        )

    return tf.map_fn(
        decode,
        (encoded, crop_seeds, flip_seeds),
        fn_output_signature=tf.TensorSpec([resolution, resolution, 3], tf.uint8),
    )


def _make_parser(
    spec: StreamSpec,
    manifest: manifests.Manifest,
    batch_size: int,
    eos_id: int,
    pad_id: int,
    *,
    seed: int = 0,
    num_pipelines: int = 1,
    pipeline_id: int = 0,
    dropout=None,
):
    """Returns a function: string [B] serialized records -> dict of static-shape tensors.

    For a stream that augments its images (`spec.augments`) or re-tokenizes captions
    with BPE dropout (`dropout`, a `bpe_dropout.BPEDropout`) the function takes (batch
    index, string [B]) instead: the batch's index in this input pipeline, from
    `Dataset.enumerate`, gives every element its position in the stream, and so its seeds.
    """
    where = f"stream {spec.name!r} ({spec.data_dir}, split {spec.split!r})"
    wanted = set(spec.fields)
    parse_spec = {schema.KEY: tf.io.FixedLenFeature([], tf.string)}
    grid = resolution = None
    if "image_tokens" in wanted:
        if manifest.image_tokenizer is None:
            raise ValueError(f"{where} asks for image_tokens, but the manifest records no image tokenizer")
        grid = tuple(int(d) for d in manifest.image_tokenizer.grid)
        image_vocab = manifest.image_tokenizer.vocab_size
        parse_spec[schema.IMAGE_TOKENS] = tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int64)
    if "text_ids" in wanted:
        text_vocab = None if manifest.text_vocab is None else manifest.text_vocab.vocab_size
        if text_vocab is not None and not (0 <= eos_id < text_vocab and 0 <= pad_id < text_vocab):
            raise ValueError(f"{where}: eos_id {eos_id} / pad_id {pad_id} outside the vocabulary of {text_vocab}")
        # int64 row splits, like every other ragged tensor terminate_and_pad sees.
        parse_spec[schema.TEXT_IDS] = tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int64)
    if "caption" in wanted:
        parse_spec[schema.TEXT_CAPTION] = tf.io.FixedLenFeature([], tf.string)
    elif dropout is not None:
        # A default, so a record without a caption is named below.
        parse_spec[schema.TEXT_CAPTION] = tf.io.FixedLenFeature([], tf.string, default_value="")
    if "image" in wanted:
        resolution = spec.image_resolution or manifest.options.get("image_size")
        if not resolution:
            raise ValueError(
                f"{where} asks for image, but neither the spec's image_resolution nor the "
                "manifest's options['image_size'] gives a resolution"
            )
        resolution = int(resolution)
        # A default, so a record without an image is named below (parse_example's own
        # error names no record).
        parse_spec[schema.IMAGE_ENCODED] = tf.io.FixedLenFeature([], tf.string, default_value="")
    length = spec.text_length
    # Keys of the two draws; the stream's name keeps streams apart, as for shuffling.
    crop_key = derive_seed(seed, spec.name, "random_resized_crop")
    flip_key = derive_seed(seed, spec.name, "horizontal_flip")
    dropout_key = derive_seed(seed, spec.name, "bpe_dropout")

    # Python control flow only (on static facts): nothing for autograph to convert.
    @tf.autograph.experimental.do_not_convert
    def parse_augmented(index: tf.Tensor, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        # Position of each element among all input pipelines' elements: batch `index`
        # of pipeline p holds positions (index * pipelines + p) * B + [0, B), so no two
        # images of a run (any replica, any step) share a seed.
        first = (index * num_pipelines + pipeline_id) * batch_size
        positions = first + tf.range(batch_size, dtype=tf.int64)  # int64 (B,)
        # The batch's seed for BPE dropout: its first element's position, unique per batch.
        dropout_seed = tf.stack([tf.constant(dropout_key, tf.int64), tf.cast(first, tf.int64)])
        return parse(serialized, augment.element_seeds(crop_key, positions),
                     augment.element_seeds(flip_key, positions), dropout_seed)

    @tf.autograph.experimental.do_not_convert
    def parse(serialized: tf.Tensor, crop_seeds=None, flip_seeds=None, dropout_seed=None) -> dict[str, tf.Tensor]:
        parsed = tf.io.parse_example(serialized, parse_spec)
        keys = parsed[schema.KEY]  # string [B]
        out = {}
        if "key" in wanted:
            out["key"] = keys
        if grid is not None:
            h, w = grid
            tokens = parsed[schema.IMAGE_TOKENS]  # int64 ragged [B, None]
            count_ok = _require(
                tokens.row_lengths() == h * w, keys,
                f"{where}: image/tokens must hold {h}x{w}={h * w} tokens (the manifest's grid)",
            )
            with tf.control_dependencies([count_ok]):
                dense = tf.reshape(tokens.flat_values, [batch_size, h * w])  # (B, h*w)
            range_ok = _require(
                (tf.reduce_min(dense, axis=1) >= 0) & (tf.reduce_max(dense, axis=1) < image_vocab), keys,
                f"{where}: image/tokens outside [0, {image_vocab}) (the manifest's vocab size)",
            )
            with tf.control_dependencies([range_ok]):
                out["image_tokens"] = tf.reshape(tf.cast(dense, tf.int32), [batch_size, h, w])  # (B, h, w)
        if "text_ids" in wanted:
            ids = parsed[schema.TEXT_IDS]  # int64 ragged [B, None]
            checks = [_require(
                ids.row_lengths() > 0, keys,
                f"{where}: records without text/ids (image-only records in a text stream?)",
            )]
            if text_vocab is not None:
                bad = ids.with_flat_values((ids.flat_values < 0) | (ids.flat_values >= text_vocab))
                checks.append(_require(
                    tf.logical_not(tf.reduce_any(bad, axis=1)), keys,
                    f"{where}: text/ids outside [0, {text_vocab}) (the manifest's vocab size)",
                ))
            if dropout is not None:
                captions = parsed[schema.TEXT_CAPTION]  # string (B,)
                checks.append(_require(
                    tf.strings.length(captions) > 0, keys,
                    f"{where}: records without text/caption, which BPE dropout re-tokenizes",
                ))
                # DALL-E §2.2 footnote 5: a fresh segmentation of the caption at every read.
                ids = dropout.tokenize(captions, spec.bpe_dropout, dropout_seed)
            with tf.control_dependencies(checks):
                padded = terminate_and_pad(ids, length, eos_id, pad_id)  # int32 (B, L)
            out["text_ids"] = tf.ensure_shape(padded, [batch_size, length])
        if "caption" in wanted:
            out["caption"] = parsed[schema.TEXT_CAPTION]
        if resolution is not None:
            encoded = parsed[schema.IMAGE_ENCODED]  # string (B,)
            present = _require(
                tf.strings.length(encoded) > 0, keys,
                f"{where}: records without image/encoded (text-only records in an image stream, or data "
                "written without beam_pipelines.tokenize --store_image=png|jpeg?)",
            )
            with tf.control_dependencies([present]):
                out["image"] = _decode_images(
                    encoded, resolution, crop_scale=spec.random_resized_crop, flip=bool(spec.horizontal_flip),
                    crop_seeds=crop_seeds, flip_seeds=flip_seeds,
                )
        return out

    return parse_augmented if spec.augments or dropout is not None else parse


def _bpe_dropout(spec: StreamSpec, manifest: manifests.Manifest):
    """The `BPEDropout` that re-tokenizes `spec`'s captions, with its vocabulary checked."""
    from mmt.data.bpe_dropout import BPEDropout
    from mmt.data.vocab_files import VocabularyNotFoundError, resolve_model_file, vocab_fingerprint

    where = f"stream {spec.name!r} ({spec.data_dir}, split {spec.split!r})"
    path = spec.text_vocab or manifest.options.get("text_vocab")
    if not path:
        raise BPEDropoutConfigError(
            f"{where}: StreamSpec.bpe_dropout re-tokenizes captions, but neither StreamSpec.text_vocab nor the "
            "manifest's options['text_vocab'] names the vocabulary; set StreamSpec.text_vocab to the "
            "SentencePiece model the data was tokenized with"
        )
    try:
        model_file = resolve_model_file(path)
    except VocabularyNotFoundError as e:
        source = "StreamSpec.text_vocab" if spec.text_vocab else "the manifest's options['text_vocab']"
        raise VocabularyNotFoundError(f"{where}: BPE dropout's vocabulary (from {source}): {e}; set "
                                      "StreamSpec.text_vocab to the vocabulary the data was tokenized with") from e
    model_proto = model_file.read_bytes()
    recorded = None if manifest.text_vocab is None else manifest.text_vocab.fingerprint
    if recorded != vocab_fingerprint(model_proto):
        raise manifests.FingerprintMismatchError(
            f"{where}: BPE dropout would re-tokenize captions with {model_file} "
            f"({vocab_fingerprint(model_proto)}), but the data's text/ids were made with {recorded!r}; set "
            "StreamSpec.text_vocab to the vocabulary the data was tokenized with"
        )
    return BPEDropout(model_proto, source=str(model_file), where=f"{where}, StreamSpec.bpe_dropout={spec.bpe_dropout}")


# -- one stream ------------------------------------------------------------------------


def stream_files(spec: StreamSpec) -> list[str]:
    """The shard paths a stream reads (all input pipelines together)."""
    return manifests.read_manifest(spec.data_dir).shard_paths(spec.split)


def stream_dataset(
    spec: StreamSpec,
    *,
    seed: int,
    eos_id: int,
    pad_id: int,
    input_context: tf.distribute.InputContext | None = None,
    repeat: bool = True,
    shuffle: bool = True,
    expected_image_tokenizer: str | None = None,
    expected_text_vocab: str | None = None,
    check_shard_sizes: bool = True,
    training: bool | None = None,
) -> tf.data.Dataset:
    """Batches of one stream, parsed, with fully static shapes.

    Args:
      spec: the stream.
      seed: shuffling and augmentation seed (combined with the stream's name, see
        `derive_seed`).
      eos_id, pad_id: appended after / padded with in `text_ids`.
      input_context: from `distribute_datasets_from_function`; selects this input
        pipeline's files (or records) and the per-replica batch size.
      repeat: cycle through the data forever (training).
      shuffle: shuffle file order and records.
      expected_image_tokenizer, expected_text_vocab: fingerprints the data must have
        been made with; checked when the stream reads image tokens / text ids.
      check_shard_sizes: compare shard sizes with the manifest before reading (one
        stat per file), which catches truncated shards that TensorFlow would read as
        merely shorter.
      training: whether `spec.bpe_dropout` applies; None means `repeat` (evaluation
        reads its data once).

    Returns:
      A dataset of dicts with the requested fields, B = per-replica batch size:
      `key` string [B], `image_tokens` int32 [B, h, w], `text_ids` int32
      [B, text_length], `caption` string [B], `image` uint8 [B, R, R, 3].

    Raises:
      FingerprintMismatchError, CorruptShardError, FileNotFoundError, ValueError: at
        construction. While iterating, a record with a wrong token count (or ids
        outside the vocabulary) fails with InvalidArgumentError naming its key.
    """
    name = spec.name or spec.split
    manifest = manifests.read_manifest(spec.data_dir)
    # Only the ids a stream reads must come from the run's tokenizers: a text-only
    # stream does not care which image tokenizer made the directory's other splits.
    manifests.check_fingerprints(
        manifest,
        image_tokenizer=expected_image_tokenizer if "image_tokens" in spec.fields else None,
        text_vocab=expected_text_vocab if "text_ids" in spec.fields else None,
    )
    info = manifest.split(spec.split)
    paths = manifest.shard_paths(spec.split)
    if check_shard_sizes and info.shard_bytes:
        problems = integrity.find_corrupt_shards_by_size(paths, info.shard_bytes)
        if problems:
            raise integrity.CorruptShardError(problems, context=f"stream {name!r}")

    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    batch_size = input_context.get_per_replica_batch_size(spec.batch_size) if input_context else spec.batch_size
    if info.num_records < num_pipelines:
        raise ValueError(
            f"stream {name!r}: split {spec.split!r} has {info.num_records} records, fewer than its "
            f"{num_pipelines} input pipeline(s)"
        )

    # Shard files when every input pipeline gets a non-empty share of them; else every
    # pipeline reads all files and keeps every n-th record (the same record order on
    # all pipelines, since they share the seeds).
    # (Manifests written by other tools may lack per-shard counts.)
    counts = info.shard_records
    shard_files = num_pipelines == 1 or (
        len(paths) >= num_pipelines
        and (not counts or all(sum(counts[i::num_pipelines]) > 0 for i in range(num_pipelines)))
    )
    if shard_files:
        paths = paths[pipeline_id::num_pipelines]
        records_here = sum(counts[pipeline_id::num_pipelines]) if counts else info.num_records // num_pipelines
    else:
        records_here = info.num_records // num_pipelines
    if not repeat and records_here < batch_size:
        _log.warning("stream %r: %d records give no full batch of %d", name, records_here, batch_size)

    files = tf.data.Dataset.from_tensor_slices(paths)
    if shuffle:
        files = files.shuffle(len(paths), seed=derive_seed(seed, name, "files"), reshuffle_each_iteration=True)
    if repeat:
        files = files.repeat()
    records = files.interleave(
        lambda path: tf.data.TFRecordDataset(path, buffer_size=1 << 20),
        cycle_length=min(len(paths), spec.cycle_length),
        block_length=1,
        num_parallel_calls=_AUTOTUNE,
        deterministic=True,
    )
    if not shard_files:
        records = records.shard(num_pipelines, pipeline_id)
    if shuffle:
        records = records.shuffle(
            spec.shuffle_buffer, seed=derive_seed(seed, name, "records"), reshuffle_each_iteration=True
        )
    # Batch the serialized records, then parse whole batches (vectorised parsing).
    batches = records.batch(batch_size, drop_remainder=True)
    spec = dataclasses.replace(spec, name=name)
    training = repeat if training is None else training
    dropout = _bpe_dropout(spec, manifest) if training and spec.bpe_dropout > 0 else None
    parse = _make_parser(spec, manifest, batch_size, eos_id, pad_id, seed=seed,
                         num_pipelines=num_pipelines, pipeline_id=pipeline_id, dropout=dropout)
    if spec.augments or dropout is not None:
        # The batch counter gives each element its position, hence its seeds; it is
        # part of the iterator's checkpointed state. Only streams that draw count, so
        # the iterator checkpoints of the others keep their layout.
        batches = batches.enumerate()
    batches = batches.map(parse, num_parallel_calls=_AUTOTUNE, deterministic=True)
    return batches.prefetch(_AUTOTUNE).with_options(_options())


# -- mixtures --------------------------------------------------------------------------


def _named(specs: Mapping[str, StreamSpec]) -> dict[str, StreamSpec]:
    if not specs:
        raise ValueError("a mixture needs at least one stream")
    named = {}
    for key, spec in specs.items():
        if spec.name and spec.name != key:
            raise ValueError(f"stream {key!r} has a StreamSpec named {spec.name!r}; leave name empty or use the key")
        named[key] = dataclasses.replace(spec, name=key)
    return named


def mixture_dataset(
    specs: Mapping[str, StreamSpec],
    *,
    seed: int,
    eos_id: int,
    pad_id: int,
    input_context: tf.distribute.InputContext | None = None,
    repeat: bool = True,
    shuffle: bool = True,
    expected_image_tokenizer: str | None = None,
    expected_text_vocab: str | None = None,
    check_shard_sizes: bool = True,
    training: bool | None = None,
) -> tf.data.Dataset:
    """Zips named streams: each element is `{stream_name: batch_dict}`, one per step.

    Each stream keeps its own batch size and fields (see `stream_dataset` for the
    arguments and the batch layout); stream seeds are derived from `seed` and the
    stream's name, so adding a stream leaves the others' order unchanged. Without
    `repeat`, the mixture ends with its shortest stream.
    """
    streams = {
        name: stream_dataset(
            spec,
            seed=seed,
            eos_id=eos_id,
            pad_id=pad_id,
            input_context=input_context,
            repeat=repeat,
            shuffle=shuffle,
            expected_image_tokenizer=expected_image_tokenizer,
            expected_text_vocab=expected_text_vocab,
            check_shard_sizes=check_shard_sizes,
            training=training,
        )
        for name, spec in _named(specs).items()
    }
    mixture = tf.data.Dataset.zip(streams)
    return mixture.prefetch(_AUTOTUNE).with_options(_options())


def distribute(
    strategy: tf.distribute.Strategy,
    specs: Mapping[str, StreamSpec],
    *,
    input_options: tf.distribute.InputOptions | None = None,
    **kwargs,
) -> tf.distribute.DistributedDataset:
    """The mixture split across `strategy`'s replicas (per-replica batch = global / N).

    Uses `strategy.distribute_datasets_from_function`: each input pipeline builds its
    own `mixture_dataset` from its `InputContext`, so hosts read disjoint files, and
    consecutive per-replica batches go to consecutive local replicas. `kwargs` go to
    `mixture_dataset` (seed, eos_id, ...). Batches holding strings (`key`, `caption`)
    stay on the host unless `input_options` says otherwise: accelerators have no
    string tensors.

    The iterator of a distributed dataset cannot be checkpointed (TensorFlow 2.21:
    tensorflow/tensorflow#56372), so training that must resume exactly iterates with
    `InputIterator.from_specs(specs, strategy=...)` instead, which feeds the replicas
    the same batches from a checkpointable host iterator.
    """
    if input_options is None:
        input_options = tf.distribute.InputOptions(experimental_fetch_to_device=not _has_strings(specs))
    return strategy.distribute_datasets_from_function(
        lambda context: mixture_dataset(specs, input_context=context, **kwargs), options=input_options
    )


def _has_strings(specs: Mapping[str, StreamSpec]) -> bool:
    return any(field in ("key", "caption") for spec in specs.values() for field in spec.fields)


# -- iteration -------------------------------------------------------------------------


def _local_replicas(strategy: tf.distribute.Strategy) -> list[int]:
    """Ids (in sync group) of the replicas this process feeds, in local order."""
    ids = []

    def record(context):
        ids.append(context.replica_id_in_sync_group)
        return tf.constant(0)

    strategy.experimental_distribute_values_from_function(record)
    return ids


class InputIterator:
    """Iterates a mixture, alone or across a strategy's replicas; checkpointable.

    `next(it)` returns the next `{stream: batch}` -- per-replica values under a
    strategy with several replicas. A corrupt shard raises `CorruptShardError` naming
    the file (TensorFlow's own error does not).

    Checkpointing: put `it.checkpointable` into the trainer's checkpoint, e.g.
    `tf.train.Checkpoint(model=..., optimizer=..., iterator=it.checkpointable)`.
    Saving records the position, shuffle buffers and shuffle seeds included.
    Restoring into a freshly built iterator over the same data (same specs, seed and
    global seed, same number of replicas), before its first `next()`, continues with
    exactly the batch the original run would have produced next.

    Build it with `from_specs`. Under a strategy, a distributed dataset's iterator
    cannot be checkpointed (tensorflow/tensorflow#56372), so `from_specs` reads this
    host's share of the data with a plain tf.data iterator -- one element stacks the
    per-replica batches of the local replicas, as `distribute` would hand them out --
    and gives slice i to local replica i with
    `strategy.experimental_distribute_values_from_function`.
    """

    def __init__(
        self,
        dataset: tf.data.Dataset | tf.distribute.DistributedDataset,
        files: Sequence[str] = (),
        *,
        strategy: tf.distribute.Strategy | None = None,
    ):
        """Wraps `iter(dataset)`.

        Args:
          dataset: the data; with `strategy`, a dataset whose elements stack the
            batches of this process's local replicas on a new leading axis.
          files: the shards `dataset` reads, searched when reading fails.
          strategy: hands slice i of each element to local replica i.
        """
        self._iterator = iter(dataset)
        self._files = tuple(files)
        self._strategy = strategy
        if strategy is not None:
            self._replica_index = {r: i for i, r in enumerate(_local_replicas(strategy))}

    @classmethod
    def from_specs(
        cls,
        specs: Mapping[str, StreamSpec],
        *,
        strategy: tf.distribute.Strategy | None = None,
        **kwargs,
    ) -> "InputIterator":
        """Builds the mixture of `specs` for this process and iterates it.

        Args:
          specs: stream name -> `StreamSpec` (global batch sizes).
          strategy: split batches across its replicas; None (or one replica) yields
            plain batches.
          **kwargs: for `mixture_dataset` (seed, eos_id, pad_id, ...), except
            `input_context`, which comes from the strategy.
        """
        files = [path for spec in specs.values() for path in stream_files(spec)]
        if strategy is None or strategy.num_replicas_in_sync == 1:
            return cls(mixture_dataset(specs, **kwargs), files)
        local = _local_replicas(strategy)
        num_replicas = strategy.num_replicas_in_sync
        # Hosts feed equal, contiguous blocks of replicas (MultiWorkerMirroredStrategy:
        # replica = host * local + i); one input pipeline per host, as with
        # distribute_datasets_from_function.
        context = tf.distribute.InputContext(
            num_input_pipelines=num_replicas // len(local),
            input_pipeline_id=min(local) // len(local),
            num_replicas_in_sync=num_replicas,
        )
        dataset = mixture_dataset(specs, input_context=context, **kwargs)
        # Consecutive per-replica batches, stacked: (local replicas, per-replica batch, ...).
        dataset = dataset.batch(len(local), drop_remainder=True).prefetch(_AUTOTUNE)
        return cls(dataset, files, strategy=strategy)

    @property
    def checkpointable(self):
        """The trackable tf.data iterator, for `tf.train.Checkpoint(iterator=...)`."""
        if not isinstance(self._iterator, tf.data.Iterator):
            raise TypeError(
                "the iterator of a distributed dataset cannot be checkpointed "
                "(tensorflow/tensorflow#56372); build the iterator with "
                "InputIterator.from_specs(specs, strategy=...) instead"
            )
        return self._iterator

    @property
    def files(self) -> tuple[str, ...]:
        return self._files

    def __iter__(self) -> "InputIterator":
        return self

    def __next__(self):
        try:
            batch = next(self._iterator)
        except tf.errors.DataLossError as e:
            raise integrity.corrupt_shard_error(self._files, e) from e
        if self._strategy is None:
            return batch
        return self._strategy.experimental_distribute_values_from_function(
            lambda context: tf.nest.map_structure(
                lambda stacked: stacked[self._replica_index[context.replica_id_in_sync_group]], batch
            )
        )
