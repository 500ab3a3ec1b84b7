"""Pre-tokenize an image-caption corpus into mmt TFRecords, with Apache Beam.

    python -m beam_pipelines.tokenize --source=tsv --input='/data/cc3m/*.tsv' \\
        --columns=caption,url --output_dir=/data/cc3m_tok \\
        --image_tokenizer=/models/vqgan --text_vocab=/models/spiece.model

Runs on the DirectRunner by default and on Dataflow with Beam's usual options (see
README, "Preprocessing with Apache Beam"). The graph:

    Read corpus -> Filter captions -> Load images -> Decode images -> Filter images
      -> Resize and crop -> Tokenize images -> Deduplicate images -> Tokenize text
      -> Encode records -> Write shards
    (without --image_tokenizer, `--store_image` alone: Compress images instead of
    Tokenize images; the records carry `image/encoded` and no VQ tokens)
    every stage's drops -> Write dead letters; counts -> Finalize (stats, manifest, COMPLETED)

The output directory holds one split: `{split}-NNNNN-of-NNNNN.tfrecord` in the schema
of `mmt.data.schema`, `manifest.json`, `stats.json`, `dead_letter/*.jsonl` and, once
everything else is written and the counts add up, `COMPLETED`. Check it with
`python -m beam_pipelines.verify DIR`.

Before anything is written, the launcher checks the flags, that every `--input` glob
matches a file, that the output directory is writable and not complete (unless
`--overwrite`), and loads the vocabulary and the image tokenizer. `--overwrite` of a
completed directory writes the new run into a staging sibling and swaps it in only
once it is complete (`beam_pipelines.output`), so a failed or killed run leaves the
previous output as it was. An error the user can fix ends the run with one line,
`error: ...`, and exit status 2 (`mmt.errors`); `--verbose` adds the traceback and
TensorFlow's start-up logging. Importing this module does not import TensorFlow (the
stages that need it are imported when the graph is built), so the C++ log level is set
before TensorFlow loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Sequence

from beam_pipelines import output, resources, sources
from beam_pipelines.config import TokenizeConfig, parse_args
from beam_pipelines.resources import TokenizerInfo
from mmt.errors import run_main

_log = logging.getLogger(__name__)


def build_pipeline(pipeline, config: TokenizeConfig, info: TokenizerInfo, write_dir: str | None = None) -> None:
    """Adds the whole tokenize graph to `pipeline` (nothing runs until it does).

    `write_dir`: where the files go (default `config.output_dir`; a staging directory
    for `--overwrite`).
    """
    import apache_beam as beam

    # Here, not at the top: these import TensorFlow (see the module docstring).
    from beam_pipelines import transforms, writers
    from beam_pipelines.transforms import Stage

    c = config
    write_dir = write_dir or c.output_dir
    read = pipeline | "Read corpus" >> sources.ReadCorpus(c)
    drops = [read["dropped"]]
    stream = read["items"]
    read_count = stream | "Count inputs" >> beam.combiners.Count.Globally()

    def stage(label: str, transform):
        nonlocal stream
        out = stream | label >> transform
        drops.append(out["dropped"])
        stream = out["items"]

    if "text" in c.modalities:
        stage("Filter captions", Stage(transforms.FilterCaptionsFn(c.max_caption_chars)))
    if "image" in c.modalities:
        stage("Load images", Stage(transforms.LoadImagesFn(c)))
        stage("Decode images", Stage(transforms.DecodeImagesFn(c, info.image_size)))
        stage("Filter images", Stage(transforms.FilterImagesFn(c)))
        stream = stream | "Resize and crop" >> beam.Map(transforms.resize_item, image_size=info.image_size)
        if c.pixels_only:
            # No tokenizer (M3AE reads pixels): compress now, so the shuffle that finds
            # duplicates moves the PNG / JPEG that will be written, not raw pixels.
            stream = stream | "Compress images" >> beam.Map(transforms.compress_item, store_image=c.store_image)
        else:
            stream = stream | "Tokenize images" >> transforms.TokenizeImages(c, info)
        if c.dedupe:
            # After the tokenizer (or the compression), so the shuffle that finds
            # duplicates moves a few hundred token ids per image instead of its pixels.
            stage("Deduplicate images", transforms.DedupeImages())
    if "text" in c.modalities:
        stage("Tokenize text", transforms.TokenizeText(c.text_vocab))
    stage("Encode records", Stage(transforms.EncodeRecordsFn(c.store_image)))
    written = stream | "Write shards" >> writers.WriteShards(write_dir, c.split_name, c.num_shards)
    drops.append(written["dropped"])

    all_drops = drops | "All drops" >> beam.Flatten()
    dead_files = all_drops | "Write dead letters" >> writers.WriteDeadLetters(write_dir, c.dead_letter_shards)
    drop_counts = all_drops | "Count drops" >> writers.CountDrops()
    pipeline | "Finalize" >> writers.Finalize(c, info, read_count, written["shards"], dead_files, drop_counts,
                                              write_dir=write_dir)


def _absolute(path: str) -> str:
    return path if not path or "://" in path else os.path.abspath(path)


def normalise_paths(config: TokenizeConfig) -> TokenizeConfig:
    """Local paths made absolute, so that workers in other directories find them."""
    globs = ",".join(_absolute(g.strip()) for g in config.input.split(",") if g.strip())
    return dataclasses.replace(
        config, input=globs, output_dir=_absolute(config.output_dir).rstrip("/"),
        image_tokenizer=_absolute(config.image_tokenizer), text_vocab=_absolute(config.text_vocab),
        image_dir=_absolute(config.image_dir))


def validate(config: TokenizeConfig) -> TokenizerInfo:
    """Every check that needs no writing, cheapest first; raises `UserError`. Returns the tokenizers' info."""
    output.refuse_completed(config.output_dir, config.overwrite)
    sources.check_inputs(config)
    resources.import_modules(config.import_modules)
    info = resources.tokenizer_info(config)
    # Last, as it creates the directory (empty) when missing: nothing after it can fail.
    output.check_writable(config.output_dir)
    return info


def prepare_write_dir(config: TokenizeConfig) -> str:
    """Where this run writes: `--output_dir`, or a fresh staging sibling for `--overwrite` of a completed one."""
    out = config.output_dir
    output.finish_interrupted_swap(out)
    output.refuse_completed(out, config.overwrite)  # a finished swap may have completed it
    if output.is_complete(out):
        staging = output.new_staging_dir(out)
        output.check_writable(staging)
        return staging
    removed = output.remove_previous_run(out)
    if removed:
        _log.warning("removed %d files of an unfinished run from %s", len(removed), out)
    return out


def run(argv: Sequence[str] | None = None) -> dict:
    """Runs the pipeline; returns the stats. Raises on failure (nothing marked COMPLETED)."""
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    config, beam_args = parse_args(argv)
    config = normalise_paths(config)
    info = validate(config)
    write_dir = prepare_write_dir(config)
    options = PipelineOptions(beam_args)
    try:
        with beam.Pipeline(options=options) as pipeline:
            build_pipeline(pipeline, config, info, write_dir)
    except BaseException:
        if write_dir != config.output_dir:
            output.discard_staging(write_dir)  # the previous output stays as it was
        raise
    if write_dir != config.output_dir:
        output.swap_in(write_dir, config.output_dir)
        _log.info("replaced the previous run in %s", config.output_dir)
    with FileSystems.open(FileSystems.join(config.output_dir, resources.STATS)) as handle:
        return json.loads(handle.read())


def _main(argv: Sequence[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stats = run(argv)
    print(json.dumps({k: stats[k] for k in ("split", "inputs", "written", "filtered", "dead_lettered")}))
    for outcome in ("filtered_by_reason", "dead_lettered_by_reason"):
        for reason, n in stats[outcome].items():
            print(f"  {outcome.split('_by_')[0]:>13} {n:8d}  {reason}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point: `error: ...` and exit 2 for what the user can fix (`mmt.errors`)."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
