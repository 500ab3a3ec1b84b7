"""The quickstart: mmt's main job on the embedded `shapes` data, end to end.

    python -m mmt.quickstart [--workdir=quickstart_workdir] [--gin_file=...] [--gin_param=...]
    python -m mmt.quickstart --data_only     # stages 1-4 only (seconds)

Stages (each prints a progress line; the whole chain takes about 15 minutes on 2 CPU
cores, the data stages alone seconds):

1. generate the shapes splits (paired / image_only / text_only / eval);
2. train a SentencePiece vocabulary on the captions of the text-bearing splits;
3. write the splits as TFRecords in mmt's schema (PNG images + text ids), manifest.json;
4. draw a PNG grid of paired samples with their captions;
5. train the image tokenizer (`python -m mmt.train --gin_file=vqgan_quickstart.gin`) on
   the image-only split;
6. tokenize the paired, image-only and text-only splits with it through the Beam
   pipeline (`beam_pipelines.tokenize --source=shapes`), as a real corpus would be;
7. train ITIT with both cycles (`python -m mmt.train --gin_file=itit_quickstart.gin`);
8. generate images for eval captions and captions for eval images, score both with the
   shapes detector / parser (attribute accuracy) and draw them in `generated.png`;
9. print where everything went and the scores (also in `summary.json`).

Training stages run the real entry points in subprocesses (each with its own gin config
and workdir under `{workdir}/`), so every stage can be rerun by hand with the command it
prints. `gin/quickstart.gin` binds the defaults; `gin/run/quickstart_smoke.gin` is the overlay the
tests use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from mmt import config as mmt_config
from mmt.data import shapes
from mmt.errors import UserError, run_main
from mmt.tokenizers import text as text_lib

DEFAULT_GIN_FILE = "quickstart.gin"
DATA_STAGES, CHAIN_STAGES = 5, 9
#: The splits the Beam stage tokenizes (eval is scored from the generator's images).
TOKENIZED_SPLITS = ("paired", "image_only", "text_only")


class _Stages:
    """Numbered progress lines: `[3/9] message` then `done in 1.2s`."""

    def __init__(self, total: int):
        self.total, self.number, self.start = total, 0, 0.0

    def begin(self, message: str) -> None:
        self.number += 1
        print(f"[{self.number}/{self.total}] {message}", flush=True)
        self.start = time.perf_counter()

    def done(self, detail: str = "") -> None:
        print(f"      done in {time.perf_counter() - self.start:.1f}s{'  ' + detail if detail else ''}", flush=True)


def make_data(
    workdir: Path,
    stages: _Stages,
    shapes_config: shapes.ShapesConfig,
    examples_per_split: Mapping[str, int],
    vocab_size: int,
    vocab_model_type: str,
    num_shards: int,
    grid_samples: int,
    show_progress: bool,
) -> tuple[dict, dict]:
    """Stages 1-4. Returns (summary, {split: [shapes.Example]})."""
    from tqdm import tqdm

    workdir.mkdir(parents=True, exist_ok=True)
    counts = dict(examples_per_split)
    unknown = set(counts) - set(shapes.SPLITS)
    if unknown:
        raise ValueError(f"quickstart.examples_per_split: unknown splits {sorted(unknown)}; "
                         f"expected some of {list(shapes.SPLITS)}")

    stages.begin(f"generating shapes at {shapes_config.resolution}x{shapes_config.resolution}: "
                 + ", ".join(f"{s} {n}" for s, n in counts.items()))
    examples = {}
    for split, n in counts.items():
        examples[split] = list(tqdm(shapes.generate(shapes_config, split, n), total=n, desc=split,
                                    disable=not show_progress, leave=False, file=sys.stderr))
    stages.done()

    text_splits = [s for s in ("paired", "text_only") if s in examples]
    captions = [e.caption for s in text_splits for e in examples[s]]
    stages.begin(f"training a SentencePiece {vocab_model_type} vocabulary (<= {vocab_size} pieces) "
                 f"on {len(captions)} captions from {', '.join(text_splits)}")
    vocab_path = workdir / "vocab" / "shapes.model"
    tokenizer = text_lib.train_sentencepiece(captions, vocab_path, vocab_size=vocab_size,
                                             model_type=vocab_model_type, seed=shapes_config.seed)
    stages.done(f"{tokenizer.vocab_size} pieces, {tokenizer.fingerprint()[:19]}...")

    data_dir = workdir / "data"
    stages.begin(f"writing TFRecords ({num_shards} shards per split) to {data_dir}")
    bars = {s: tqdm(total=n, desc=s, disable=not show_progress, leave=False, file=sys.stderr)
            for s, n in counts.items()}
    from mmt.data.shapes.records import write_shapes_records  # TensorFlow: after run_main's set-up

    manifest = write_shapes_records(
        data_dir, shapes_config, examples, text_tokenizer=tokenizer, num_shards=num_shards,
        progress=lambda split, n: bars[split].update(n - bars[split].n),
    )
    for bar in bars.values():
        bar.close()
    stages.done(", ".join(f"{s}: {manifest.splits[s].num_records}" for s in counts))

    stages.begin(f"drawing {grid_samples} paired samples")
    sample_source = examples.get("paired") or next(iter(examples.values()))
    samples = sample_source[:grid_samples]
    grid_path = workdir / "samples.png"
    shapes.save_grid([e.image for e in samples], [e.caption for e in samples], grid_path)
    stages.done()

    summary = {
        "workdir": str(workdir.resolve()),
        "vocabulary": str(vocab_path.resolve()),
        "vocabulary_fingerprint": tokenizer.fingerprint(),
        "text_vocab_size": tokenizer.vocab_size,
        "data_dir": str(data_dir.resolve()),
        "manifest": str((data_dir / "manifest.json").resolve()),
        "records": {s: manifest.splits[s].num_records for s in counts},
        "samples_png": str(grid_path.resolve()),
        "config": str((workdir / mmt_config.FULL_CONFIG).resolve()),
    }
    return summary, examples


def _write_summary(workdir: Path, summary: dict) -> None:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"      {key:<{width}}  {value}", flush=True)


def run(
    workdir: str,
    shapes_config: shapes.ShapesConfig = shapes.ShapesConfig(),
    examples_per_split: Mapping[str, int] = (
        ("paired", 2000), ("image_only", 4000), ("text_only", 4000), ("eval", 500)
    ),
    vocab_size: int = 256,
    vocab_model_type: str = "unigram",
    num_shards: int = 4,
    grid_samples: int = 16,
    show_progress: bool = True,
) -> dict:
    """The data stages (1-4) into `workdir`; returns a summary of the outputs.

    Args:
      workdir: output directory (created).
      shapes_config: which shapes to draw (resolution, objects, held-out pairs, seed).
      examples_per_split: split name -> number of examples (a mapping or pairs).
      vocab_size: upper bound on the SentencePiece vocabulary size.
      vocab_model_type: SentencePiece "unigram" or "bpe" (BPE learns whole words and
        common phrases of the shapes grammar, so captions come out short).
      num_shards: TFRecord shards per split.
      grid_samples: paired samples drawn in samples.png.
      show_progress: print a progress bar per stage (tqdm, on stderr).
    """
    stages = _Stages(DATA_STAGES)
    summary, _ = make_data(Path(workdir), stages, shapes_config, dict(examples_per_split), vocab_size,
                           vocab_model_type, num_shards, grid_samples, show_progress)
    stages.begin("summary")
    _write_summary(Path(workdir), summary)
    return summary


def _run_logged(command: Sequence[str], log_path: Path, echo: Callable[[str], bool]) -> None:
    """Runs `command`, teeing its output to `log_path` and echoing lines `echo` accepts."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    print("      $ " + " ".join(command), flush=True)
    with open(log_path, "w") as log, subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
    ) as process:
        for line in process.stdout:
            log.write(line)
            if echo(line):
                print("      " + line.rstrip(), flush=True)
    if process.returncode:
        last = next((line for line in reversed(log_path.read_text().splitlines()) if line.startswith("error: ")), "")
        message = f"`{' '.join(command)}` failed with exit code {process.returncode}; its output is in {log_path}"
        if process.returncode == 2 and last:  # the stage's own one-line error (mmt.errors)
            raise UserError(f"{last[len('error: '):]} (from {message})")
        raise RuntimeError(message)


def train_stage(workdir: Path, gin_file: str, gin_params: Sequence[str], log_name: str) -> None:
    """Runs `python -m mmt.train` on `gin_file` + `gin_params` into `workdir`, logging to
    `{workdir.parent}/{log_name}` (step lines echoed); a failing run raises its own error."""
    command = [sys.executable, "-m", "mmt.train", f"--gin_file={gin_file}", f"--workdir={workdir}"]
    command += [f"--gin_param={p}" for p in gin_params]
    _run_logged(command, workdir.parent / log_name, lambda line: line.startswith(("step ", "error", "Trainer")))


def tokenize_splits(workdir: Path, summary: dict, shapes_config: shapes.ShapesConfig, counts: Mapping[str, int],
                    tokenizer_dir: Path, num_shards: int, batch_size: int) -> dict[str, Path]:
    """Tokenizes the shapes splits `TOKENIZED_SPLITS` (`counts` examples each) with the Beam
    pipeline into `{workdir}/tokens/{split}`; returns split -> output directory."""
    from beam_pipelines import tokenize

    outputs = {}
    for split in TOKENIZED_SPLITS:
        output = workdir / "tokens" / split
        stats = tokenize.run([
            "--source=shapes", f"--split={split}", f"--num_examples={counts[split]}",
            f"--shapes_resolution={shapes_config.resolution}", f"--shapes_seed={shapes_config.seed}",
            f"--output_dir={output}", f"--image_tokenizer={tokenizer_dir}",
            f"--text_vocab={summary['vocabulary']}", f"--num_shards={num_shards}",
            # The generator repeats simple scenes (432 one-object scenes at most) with
            # paraphrased captions: all are training data, so no de-duplication.
            f"--batch_size={batch_size}", "--min_image_side=8", "--no_dedupe", "--overwrite",
        ])
        lost = stats["inputs"] - stats["written"]
        print(f"      {split}: {stats['written']} of {stats['inputs']} records written"
              + (f" ({lost} filtered or dead-lettered: see {output}/dead_letter)" if lost else ""), flush=True)
        outputs[split] = output
    return outputs


def run_chain(
    workdir: str,
    shapes_config: shapes.ShapesConfig = shapes.ShapesConfig(),
    examples_per_split: Mapping[str, int] = (
        ("paired", 2000), ("image_only", 4000), ("text_only", 4000), ("eval", 500)
    ),
    vocab_size: int = 256,
    vocab_model_type: str = "bpe",
    num_shards: int = 4,
    grid_samples: int = 16,
    show_progress: bool = True,
    vqgan_gin_file: str = "vqgan_quickstart.gin",
    vqgan_gin_params: Sequence[str] = (),
    itit_gin_file: str = "itit_quickstart.gin",
    itit_gin_params: Sequence[str] = (),
    tokenize_batch_size: int = 64,
    eval_examples: int = 400,
    eval_seed: int = 0,
    data_only: bool = False,
    on_configured: Callable[[], None] | None = None,
    trainer_params: Sequence[str] = (),
) -> dict:
    """The whole chain (stages 1-9); returns the summary, scores included.

    Args (besides `run`'s):
      vqgan_gin_file, vqgan_gin_params: the image tokenizer's training config (stage 5);
        the chain adds DATA_DIR and IMAGE_SIZE.
      itit_gin_file, itit_gin_params: ITIT's training config (stage 7); the chain adds
        the three token directories, the vocabulary sizes and the tokenizer paths.
      tokenize_batch_size: images per tokenizer call in the Beam stage.
      eval_examples: eval-split examples scored in each direction (stage 8).
      eval_seed: the T2I sampler's seed.
      data_only: stop after the data stages (1-4), as `run` does.
      trainer_params: `Trainer.*` bindings for every training stage (VQGAN and ITIT):
        `--gin_param='Trainer.seed = 1'` on the quickstart's command line lands here.
      on_configured: called once every gin binding of this function has been read,
        before later stages re-parse gin (the entry point writes its operative config).
    """
    if on_configured is not None:
        on_configured()
    if data_only:
        return run(workdir, shapes_config, examples_per_split, vocab_size, vocab_model_type, num_shards,
                   grid_samples, show_progress)
    if shapes_config.held_out_combinations:
        # Stage 6 draws the splits again inside the Beam pipeline, whose shapes source
        # knows resolution and seed only.
        raise ValueError("quickstart: held-out (shape, colour) combinations need --data_only; the chain's "
                         "Beam stage (--source=shapes) cannot hold them out")
    root = Path(workdir)
    counts = dict(examples_per_split)
    missing = set(TOKENIZED_SPLITS + ("eval",)) - set(counts)
    if missing:
        raise ValueError(f"quickstart.examples_per_split: the chain needs the splits {sorted(missing)} too")
    stages = _Stages(CHAIN_STAGES)
    summary, examples = make_data(root, stages, shapes_config, counts, vocab_size, vocab_model_type,
                                  num_shards, grid_samples, show_progress)

    vqgan_dir = root / "vqgan"
    stages.begin(f"training the image tokenizer ({vqgan_gin_file}) on the image_only split")
    train_stage(vqgan_dir, vqgan_gin_file, [f"DATA_DIR='{summary['data_dir']}'",
                                       f"IMAGE_SIZE={shapes_config.resolution}", *vqgan_gin_params, *trainer_params],
           "vqgan.log")
    tokenizer_dir = vqgan_dir / "export"
    stages.done(f"exported to {tokenizer_dir}")

    stages.begin(f"tokenizing {', '.join(TOKENIZED_SPLITS)} with the Beam pipeline (DirectRunner)")
    token_dirs = tokenize_splits(root, summary, shapes_config, counts, tokenizer_dir, num_shards,
                                  tokenize_batch_size)
    stages.done()

    from mmt.tokenizers.image import ImageTokenizer

    image_tokenizer = ImageTokenizer.load(str(tokenizer_dir))
    itit_dir = root / "itit"
    stages.begin(f"training ITIT ({itit_gin_file}) on paired + image-only + text-only tokens")
    train_stage(itit_dir, itit_gin_file, [
        f"PAIRED_DIR='{token_dirs['paired']}'", f"IMAGE_ONLY_DIR='{token_dirs['image_only']}'",
        f"TEXT_ONLY_DIR='{token_dirs['text_only']}'", f"IMAGE_VOCAB_SIZE={image_tokenizer.vocab_size}",
        f"GRID={tuple(image_tokenizer.grid_size)}", f"TEXT_VOCAB_SIZE={summary['text_vocab_size']}",
        f"IMAGE_TOKENIZER='{tokenizer_dir}'", f"TEXT_VOCAB='{summary['vocabulary']}'", *itit_gin_params,
        *trainer_params,
    ], "itit.log")
    stages.done()
    del image_tokenizer

    from mmt.evaluation.shapes_accuracy import evaluate_generation
    from mmt.restore import load_task

    evaluated = examples["eval"][:eval_examples]
    stages.begin(f"generating and scoring {len(evaluated)} images and {len(evaluated)} captions (eval split)")
    task, step = load_task(str(itit_dir))
    scores = evaluate_generation(task, evaluated, seed=eval_seed, grid_path=root / "generated.png",
                                 grid_samples=grid_samples)
    (root / "metrics.json").write_text(json.dumps({"step": step, **scores}, indent=2) + "\n")
    # 400 examples: each figure's 95% interval is about +-4 to 5 points (shapes_accuracy).
    stages.done(f"T2I attribute accuracy {scores['t2i']['attribute']:.1%} ± {scores['t2i']['attribute_ci95']:.1%}, "
                f"I2T attribute accuracy {scores['i2t']['attribute']:.1%} ± {scores['i2t']['attribute_ci95']:.1%} "
                "(95% intervals)")

    stages.begin("summary")
    summary.update({
        "image_tokenizer": str(tokenizer_dir.resolve()),
        "tokens": {s: str(d.resolve()) for s, d in token_dirs.items()},
        "itit_workdir": str(itit_dir.resolve()),
        "generated_png": str((root / "generated.png").resolve()),
        "metrics": str((root / "metrics.json").resolve()),
        "t2i_attribute_accuracy": round(scores["t2i"]["attribute"], 4),
        "i2t_attribute_accuracy": round(scores["i2t"]["attribute"], 4),
        "t2i_attribute_ci95": round(scores["t2i"]["attribute_ci95"], 4),
        "i2t_attribute_ci95": round(scores["i2t"]["attribute_ci95"], 4),
    })
    _write_summary(root, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = mmt_config.ArgumentParser(prog="python -m mmt.quickstart", description=__doc__.split("\n")[0])
    mmt_config.add_flags(parser, default_workdir="quickstart_workdir")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--data_only", action="store_true", help="stop after the data stages (1-4)")
    args = parser.parse_args(argv)

    configured_run = mmt_config.configurable_entry(run_chain, "quickstart")
    # `Trainer.*` bindings (a training seed, say) belong to the training stages' own runs.
    trainer_params = [p for p in args.gin_param if p.strip().startswith("Trainer.")]
    mmt_config.parse(args.gin_file or [DEFAULT_GIN_FILE], [p for p in args.gin_param if p not in trainer_params])
    mmt_config.write_config(args.workdir)
    start = time.perf_counter()

    def write_operative():
        mmt_config.check_unused_bindings(args.allow_unused_bindings, "mmt.quickstart")
        mmt_config.write_config(args.workdir, operative=True)

    configured_run(args.workdir, show_progress=not args.no_progress, data_only=args.data_only,
                   on_configured=write_operative, trainer_params=trainer_params)
    print(f"quickstart finished in {time.perf_counter() - start:.0f}s; outputs in {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
