"""The quickstart: mmt's main job on the embedded `shapes` data, end to end.

    python -m mmt.quickstart [--workdir=quickstart_workdir] [--gin_file=...] [--gin_param=...]

Stages (each prints a progress line; the whole run takes well under 5 minutes on 2 CPU
cores):

1. generate the shapes splits (paired / image_only / text_only / eval);
2. train a SentencePiece vocabulary on the captions of the text-bearing splits;
3. write the splits as TFRecords in mmt's schema, with manifest.json;
4. draw a PNG grid of paired samples with their captions;
5. print where everything went.

The gin file `gin/quickstart.gin` binds the defaults; `gin/size/tiny.gin` is the
overlay the tests use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from mmt import config as mmt_config
from mmt.data import shapes
from mmt.data.shapes_records import write_shapes_records
from mmt.tokenizers import text as text_lib

DEFAULT_GIN_FILE = "quickstart.gin"


def _stage(number: int, total: int, message: str) -> float:
    print(f"[{number}/{total}] {message}", flush=True)
    return time.perf_counter()


def _done(start: float, detail: str = "") -> None:
    print(f"      done in {time.perf_counter() - start:.1f}s{'  ' + detail if detail else ''}", flush=True)


def run(
    workdir: str,
    shapes_config: shapes.ShapesConfig = shapes.ShapesConfig(),
    examples_per_split: Mapping[str, int] = (
        ("paired", 2000), ("image_only", 4000), ("text_only", 4000), ("eval", 500)
    ),
    vocab_size: int = 256,
    num_shards: int = 4,
    grid_samples: int = 16,
    show_progress: bool = True,
) -> dict:
    """Runs the quickstart stages into `workdir` and returns a summary of the outputs.

    Args:
      workdir: output directory (created).
      shapes_config: which shapes to draw (resolution, objects, held-out pairs, seed).
      examples_per_split: split name -> number of examples (a mapping or pairs).
      vocab_size: upper bound on the SentencePiece vocabulary size.
      num_shards: TFRecord shards per split.
      grid_samples: paired samples drawn in samples.png.
      show_progress: print a progress bar per stage (tqdm, on stderr).
    """
    from tqdm import tqdm

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    counts = dict(examples_per_split)
    unknown = set(counts) - set(shapes.SPLITS)
    if unknown:
        raise ValueError(f"quickstart.examples_per_split: unknown splits {sorted(unknown)}; "
                         f"expected some of {list(shapes.SPLITS)}")
    total_stages = 5

    start = _stage(1, total_stages, f"generating shapes at {shapes_config.resolution}x"
                   f"{shapes_config.resolution}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    examples = {}
    for split, n in counts.items():
        examples[split] = list(tqdm(shapes.generate(shapes_config, split, n), total=n, desc=split,
                                    disable=not show_progress, leave=False, file=sys.stderr))
    _done(start)

    text_splits = [s for s in ("paired", "text_only") if s in examples]
    captions = [e.caption for s in text_splits for e in examples[s]]
    start = _stage(2, total_stages, f"training a SentencePiece vocabulary (<= {vocab_size} pieces) "
                   f"on {len(captions)} captions from {', '.join(text_splits)}")
    vocab_path = workdir / "vocab" / "shapes.model"
    tokenizer = text_lib.train_sentencepiece(captions, vocab_path, vocab_size=vocab_size,
                                             seed=shapes_config.seed)
    _done(start, f"{tokenizer.vocab_size} pieces, {tokenizer.fingerprint()[:19]}...")

    data_dir = workdir / "data"
    start = _stage(3, total_stages, f"writing TFRecords ({num_shards} shards per split) to {data_dir}")
    bars = {s: tqdm(total=n, desc=s, disable=not show_progress, leave=False, file=sys.stderr)
            for s, n in counts.items()}
    manifest = write_shapes_records(
        data_dir, shapes_config, examples, text_tokenizer=tokenizer, num_shards=num_shards,
        progress=lambda split, n: bars[split].update(n - bars[split].n),
    )
    for bar in bars.values():
        bar.close()
    _done(start, ", ".join(f"{s}: {manifest.splits[s].num_records}" for s in counts))

    start = _stage(4, total_stages, f"drawing {grid_samples} paired samples")
    sample_source = examples.get("paired") or next(iter(examples.values()))
    samples = sample_source[:grid_samples]
    grid_path = workdir / "samples.png"
    shapes.save_grid([e.image for e in samples], [e.caption for e in samples], grid_path)
    _done(start)

    _stage(5, total_stages, "summary")
    summary = {
        "workdir": str(workdir.resolve()),
        "vocabulary": str(vocab_path.resolve()),
        "vocabulary_fingerprint": tokenizer.fingerprint(),
        "data_dir": str(data_dir.resolve()),
        "manifest": str((data_dir / "manifest.json").resolve()),
        "records": {s: manifest.splits[s].num_records for s in counts},
        "samples_png": str(grid_path.resolve()),
        "config": str((workdir / mmt_config.FULL_CONFIG).resolve()),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"      {key:<{width}}  {value}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmt.quickstart", description=__doc__.split("\n")[0])
    mmt_config.add_flags(parser, default_workdir="quickstart_workdir")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    configured_run = mmt_config.configurable_entry(run, "quickstart")
    mmt_config.parse(args.gin_file or [DEFAULT_GIN_FILE], args.gin_param)
    mmt_config.write_config(args.workdir)
    start = time.perf_counter()
    configured_run(args.workdir, show_progress=not args.no_progress)
    mmt_config.write_config(args.workdir, operative=True)
    print(f"quickstart finished in {time.perf_counter() - start:.0f}s; outputs in {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
