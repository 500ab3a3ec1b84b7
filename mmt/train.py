"""Trains any mmt model from gin files.

    python -m mmt.train --gin_file=gin/itit_h.gin --workdir=gs://bucket/itit_h [--tpu=NAME]
    python -m mmt.train --gin_file=gin/itit_tiny.gin --workdir=/tmp/itit --dry_run

Flags: `--gin_file` / `--gin_param` (repeatable), `--workdir`, `--tpu` (a TPU name, or
`local` on a TPU VM), `--dry_run` (build the model, print its parameters by component
and the operative config, read no data), `--allow_config_change` (resume a workdir whose
recorded operative config differs). Re-running the same command resumes from the newest
valid checkpoint in the workdir. Exit status: 0 when the run completed or was stopped by
SIGTERM/SIGINT after saving; 1 when training failed (the message says why); 2 for a bad
flag or gin binding, before anything runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mmt import config as mmt_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmt.train", description=__doc__.split("\n")[0])
    mmt_config.add_flags(parser)
    parser.add_argument("--tpu", default=None, help="TPU name, or 'local' on a TPU VM")
    parser.add_argument("--dry_run", action="store_true", help="build, print parameters and config, exit")
    parser.add_argument("--allow_config_change", action="store_true",
                        help="resume a workdir even if its recorded operative config differs")
    parser.add_argument("--cpu_replicas", type=int, default=0,
                        help="without accelerators, mirror over this many logical CPU devices (testing)")
    args = parser.parse_args(argv)
    if not args.gin_file:
        parser.error("at least one --gin_file is required (e.g. --gin_file=gin/itit_tiny.gin)")

    try:
        mmt_config.parse(args.gin_file, args.gin_param)
    except mmt_config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from mmt import configurables, distribute
    from mmt.training.trainer import TrainingError

    if args.cpu_replicas > 1:
        distribute.split_cpu(args.cpu_replicas)
    strategy = distribute.make_strategy(args.tpu, cpu_replicas=args.cpu_replicas or None)
    try:
        trainer = configurables.Trainer()
    except (TypeError, ValueError) as e:
        # Gin reports a missing %gin.REQUIRED or a bad value when the trainer is built.
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.dry_run:
        mmt_config.write_config(args.workdir)
    try:
        result = trainer.run(args.workdir, strategy=strategy, dry_run=args.dry_run,
                             allow_config_change=args.allow_config_change)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.status != "dry_run":
        print(f"{result.status} at step {result.step} ({result.skipped_steps} skipped); workdir {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
