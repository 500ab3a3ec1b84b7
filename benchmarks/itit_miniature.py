"""ITIT Table 2 in miniature: rows 3, 7, 10 and 14 on shapes, a little paired data.

    python -m mmt.quickstart --workdir=qs                       # tokenizer + vocabulary
    python benchmarks/itit_miniature.py --quickstart_workdir=qs [--rows 3,14] [--steps 1500]

The data: `--examples` shapes scenes, of which `--paired_fraction` (default 5%) are
paired and the rest split evenly into image-only and text-only streams (the paper's
setting: a little paired data, much unpaired data), all tokenized with the
quickstart's VQGAN and vocabulary through the Beam pipeline. Each row trains
`gin/itit_quickstart.gin` with the row's losses for `--steps` steps (cycles from half
way on), then both directions are scored on `--eval` eval-split examples with the
shapes detector / parser (attribute accuracy, as the quickstart reports).

Rows (ITIT Table 2): 3 paired only; 7 T2T + I2I baselines on the unpaired data; 10 half
cycles; 14 full cycles. The figures are printed whatever they are: at this scale they
say more about the tokenizer and the step budget than about the paper's claim.

Measured (defaults, quickstart workdir of 2026-11-26; T2I / I2T attribute accuracy):
row 3 39.5% / 47.8%, row 7 41.3% / 48.6%, row 10 48.6% / 54.5%, row 14 49.2% / 54.0%.
With `--gin_param="Trainer.seed = 1"` (another training seed, same data): row 3 37.3% /
49.2%, row 7 38.2% / 45.6%, row 10 41.9% / 51.5%, row 14 42.8% / 52.3%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mmt import quickstart
from mmt.data import shapes

import common

ROWS = {  # Table 2 row -> (t2i2t, i2t2i)
    3: ("off", "off"),
    7: ("baseline", "baseline"),
    10: ("half", "half"),
    14: ("full", "full"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quickstart_workdir", required=True, help="a finished `python -m mmt.quickstart` workdir")
    parser.add_argument("--output", default=None, help="default: {quickstart_workdir}/miniature")
    parser.add_argument("--rows", default="3,7,10,14")
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--paired_fraction", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--gin_param", action="append", default=[], help="extra ITIT bindings (every row)")
    args = parser.parse_args(argv)
    common.print_command(argv)

    qs = Path(args.quickstart_workdir)
    summary = json.loads((qs / "summary.json").read_text())
    tokenizer_dir = Path(summary["image_tokenizer"])
    out = Path(args.output or qs / "miniature")
    paired = max(1, round(args.examples * args.paired_fraction))
    unpaired = (args.examples - paired) // 2
    counts = {"paired": paired, "image_only": unpaired, "text_only": unpaired}
    shapes_config = shapes.ShapesConfig(resolution=json.loads((tokenizer_dir / "config.json").read_text())
                                        ["config"]["image_size"])
    print(f"data: {counts} ({args.paired_fraction:.0%} paired), {args.steps} steps per row, "
          f"{args.eval} eval examples per direction")
    token_dirs = quickstart.tokenize_splits(out, summary, shapes_config, counts, tokenizer_dir, 2, 64)

    from mmt.evaluation.shapes_accuracy import evaluate_generation
    from mmt.tokenizers.image import ImageTokenizer
    from mmt.restore import load_task

    image_tokenizer = ImageTokenizer.load(str(tokenizer_dir))
    evaluated = list(shapes.generate(shapes_config, "eval", args.eval))
    results = {}
    for row in (int(r) for r in args.rows.split(",")):
        t2i2t, i2t2i = ROWS[row]
        workdir = out / f"row{row}"
        start = time.perf_counter()
        quickstart.train_stage(workdir, "itit_quickstart.gin", [
            f"PAIRED_DIR='{token_dirs['paired']}'", f"IMAGE_ONLY_DIR='{token_dirs['image_only']}'",
            f"TEXT_ONLY_DIR='{token_dirs['text_only']}'", f"IMAGE_VOCAB_SIZE={image_tokenizer.vocab_size}",
            f"GRID={tuple(image_tokenizer.grid_size)}", f"TEXT_VOCAB_SIZE={summary['text_vocab_size']}",
            f"IMAGE_TOKENIZER='{tokenizer_dir}'", f"TEXT_VOCAB='{summary['vocabulary']}'",
            f"TRAIN_STEPS={args.steps}", f"ITITTask.cycle_start_step={args.steps // 2}",
            f"ITITTask.t2i2t='{t2i2t}'", f"ITITTask.i2t2i='{i2t2i}'", *args.gin_param,
        ], f"row{row}.log")
        train_s = time.perf_counter() - start
        task, _ = load_task(str(workdir))
        scores = evaluate_generation(task, evaluated, grid_path=workdir / "generated.png")
        results[row] = {"t2i": scores["t2i"]["attribute"], "i2t": scores["i2t"]["attribute"], "train_s": train_s}
        print(f"row {row:2d} (T2I2T {t2i2t}, I2T2I {i2t2i}): T2I attribute {results[row]['t2i']:.1%}, "
              f"I2T attribute {results[row]['i2t']:.1%}  ({train_s:.0f} s training)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'row':>3}  {'T2I2T':>8}  {'I2T2I':>8}  {'T2I attr':>8}  {'I2T attr':>8}")
    for row, r in results.items():
        print(f"{row:>3}  {ROWS[row][0]:>8}  {ROWS[row][1]:>8}  {r['t2i']:>8.1%}  {r['i2t']:>8.1%}")
    common.report("itit_miniature", results, argv)  # results.json's figures
    return 0


if __name__ == "__main__":
    sys.exit(main())
