"""Trains any mmt model from gin files.

    python -m mmt.train --gin_file=gin/itit_h.gin --workdir=gs://bucket/itit_h [--tpu=NAME]
    python -m mmt.train --gin_file=gin/itit_tiny.gin --workdir=/tmp/itit --dry_run

Flags: `--gin_file` / `--gin_param` (repeatable), `--workdir`, `--tpu` (a TPU name, or
`local` on a TPU VM), `--dry_run` (build the model, print its parameters by component
and the operative config, read no data), `--allow_config_change` (resume a workdir whose
recorded operative config differs), `--allow_unused_bindings` (warn instead of failing
about bindings and macros the run never uses, for overlay files shared by several
models), `--verbose` (tracebacks, TensorFlow's start-up lines). Re-running the same
command resumes from the newest valid checkpoint in the workdir.

Before step 1 the run checks its gin config (unused bindings), every stream's manifest
against the model (vocabularies, grid, text length, tokenizer fingerprints) and, when
resuming, the recorded config; only then does it write into the workdir.

Exit status: 0 when the run completed or was stopped by SIGTERM/SIGINT after saving;
2 for anything the user can fix -- a bad flag, gin binding, data directory, checkpoint,
or a run stopped by non-finite losses -- with one line `error: ...` naming the file or
binding at fault (`mmt.errors`); 1 with a traceback for a bug in mmt itself.
"""

from __future__ import annotations

import functools
import sys
from typing import Sequence

from mmt import config as mmt_config
from mmt import errors
from mmt.errors import run_main


def main(argv: Sequence[str] | None = None) -> int:
    parser = mmt_config.ArgumentParser(prog="python -m mmt.train", description=__doc__.split("\n")[0])
    mmt_config.add_flags(parser)
    parser.add_argument("--tpu", default=None, help="TPU name, or 'local' on a TPU VM")
    parser.add_argument("--dry_run", action="store_true", help="build, print parameters and config, exit")
    parser.add_argument("--allow_config_change", action="store_true",
                        help="resume a workdir even if its recorded operative config differs")
    parser.add_argument("--replicas", type=int, default=None,
                        help="with --dry_run: split the global batch over this many replicas in the memory "
                        "report (e.g. the TPU cores of a slice)")
    parser.add_argument("--cpu_replicas", type=int, default=0,
                        help="without accelerators, mirror over this many logical CPU devices (testing)")
    args = parser.parse_args(argv)
    if not args.gin_file:
        parser.error("at least one --gin_file is required (e.g. --gin_file=gin/itit_tiny.gin)")

    mmt_config.parse(args.gin_file, args.gin_param)

    from mmt import configurables
    from mmt.training import distribute

    if args.cpu_replicas > 1:
        distribute.split_cpu(args.cpu_replicas)
    strategy = distribute.make_strategy(args.tpu, cpu_replicas=args.cpu_replicas or None)
    errors.stop_filtering_native_stderr()  # TensorFlow's start-up is over
    try:
        trainer = configurables.Trainer()
    except (TypeError, ValueError) as e:
        # Gin reports a missing %gin.REQUIRED or a bad value when the trainer is built.
        raise mmt_config.ConfigError(str(e)) from e
    check = functools.partial(mmt_config.check_unused_bindings, args.allow_unused_bindings, "mmt.train")
    result = trainer.run(args.workdir, strategy=strategy, dry_run=args.dry_run,
                         allow_config_change=args.allow_config_change, check_config=check,
                         dry_run_replicas=args.replicas)
    if result.status != "dry_run":
        print(f"{result.status} at step {result.step} ({result.skipped_steps} skipped); workdir {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
