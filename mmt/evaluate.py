"""Evaluates a trained workdir.

    python -m mmt.evaluate linear_probe --workdir=/tmp/upgen_tiny [--train_examples=1000] [--test_examples=500]
    python -m mmt.evaluate linear_probe --workdir=/tmp/upgen_tiny --all_layers --untrained
    python -m mmt.evaluate linear_probe --workdir=/tmp/m3ae_tiny --pooling=mean

`linear_probe`: frozen image features of the task (`task.image_features`, e.g. UPGen's
mean-pooled image-token outputs without text) -> one linear classifier per shapes
attribute of the main object (shape, colour, cell) and the object count
(`mmt.evaluation.linear_probe`). `--all_layers` concatenates every block's pooled
output (UPGen §4.2); `--untrained` probes the freshly initialised network of the same
config, the baseline the trained features should beat. `--pooling` picks M3AE / MAE's
feature: the CLS token (default, M3AE App. A.3) or the patch tokens' mean. Prints a table and writes the
results as JSON to `--output` (default `{workdir}/eval/linear_probe[_mean][_all_layers][_untrained].json`).

    python -m mmt.evaluate fid --workdir=/tmp/itit --captions=captions.txt --reference_stats=ref.npz --inception_weights=W
    python -m mmt.evaluate captions --workdir=/tmp/itit --image_dir=val2014 --references=captions_test.json
    python -m mmt.evaluate clip_score --clip=/tmp/clip_tiny --workdir=/tmp/dalle_tiny --captions=captions.txt

`fid`, `captions` and `clip_score`: see `mmt.evaluation.commands` (FID-30K, COCO captioning,
and the CLIP score of `mmt.evaluation.clip_score`; README).
"""

from __future__ import annotations

import inspect
import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

from mmt import config as mmt_config
from mmt.errors import VERBOSE_FLAG, run_main


def linear_probe(args) -> int:
    from mmt.evaluation import linear_probe as probe_lib
    from mmt.errors import UserError
    from mmt.training.data_check import check_tokenizers
    from mmt.restore import load_task, load_trained

    task, step = load_task(args.workdir, restore=False) if args.untrained else load_trained(args.workdir)
    if not hasattr(task, "image_features"):
        raise UserError(f"{args.workdir} holds a {type(task).__name__}, which has no image_features (frozen "
                        "features for a probe); probe a workdir of a model that has (e.g. UPGen)")
    check_tokenizers(task)
    resolution = getattr(task, "image_resolution", None) or task.tokenizers()[0].image_size
    options = {"all_layers": args.all_layers}
    if args.pooling is not None:
        if "pooling" not in inspect.signature(task.image_features).parameters:
            raise UserError(f"{type(task).__name__}.image_features has one pooling; drop --pooling")
        options["pooling"] = args.pooling
    print(f"{type(task).__name__} at step {step}{' (untrained)' if args.untrained else ''}: probing "
          f"{args.train_examples} / {args.test_examples} shapes images at {resolution}x{resolution}", flush=True)
    results = probe_lib.linear_probe(lambda images: task.image_features(images, **options),
                                     resolution, train_examples=args.train_examples,
                                     test_examples=args.test_examples, seed=args.seed)
    print(f"{'attribute':<10} {'accuracy':>9} {'chance':>7}")
    for name in (*probe_lib.ATTRIBUTES, "mean"):
        print(f"{name:<10} {results[name]['accuracy']:>9.3f} {results[name]['chance']:>7.3f}")
    suffix = (f"_{args.pooling}" if args.pooling not in (None, "cls") else "") + (
        "_all_layers" if args.all_layers else "") + ("_untrained" if args.untrained else "")
    output = Path(args.output or Path(args.workdir) / "eval" / f"linear_probe{suffix}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "python -m mmt.evaluate " + " ".join(shlex.quote(a) for a in args.argv), "step": step,
              "untrained": args.untrained, "all_layers": args.all_layers, "pooling": args.pooling, "results": results}
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --verbose (tracebacks, TensorFlow's start-up lines) is read by run_main, in any position.
    argv = [a for a in argv if a != VERBOSE_FLAG]
    parser = mmt_config.ArgumentParser(prog="python -m mmt.evaluate", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    probe = commands.add_parser("linear_probe", help="linear probes on frozen image features (shapes attributes)")
    probe.add_argument("--workdir", required=True)
    probe.add_argument("--train_examples", type=int, default=1000)
    probe.add_argument("--test_examples", type=int, default=500)
    probe.add_argument("--all_layers", action="store_true", help="concatenate every block's pooled output")
    probe.add_argument("--pooling", choices=("cls", "mean"), default=None,
                       help="image features' pooling, for tasks that offer a choice (M3AE / MAE: CLS token, "
                       "the default, or the patch tokens' mean)")
    probe.add_argument("--untrained", action="store_true", help="the initial weights instead of the checkpoint")
    probe.add_argument("--seed", type=int, default=0, help="seed of the shapes images")
    probe.add_argument("--output", default=None)
    from mmt.evaluation import commands as metric_commands  # fid, captions, clip_score

    metric_commands.add_parsers(commands)
    args = parser.parse_args(argv)
    args.argv = argv
    return {"linear_probe": linear_probe, "fid": metric_commands.fid, "captions": metric_commands.captions,
            "clip_score": metric_commands.clip_score}[args.command](args)


if __name__ == "__main__":
    sys.exit(run_main(main))
