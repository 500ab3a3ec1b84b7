"""M3AE vs MAE on 64x64 shapes: linear probes after the same training steps, and untrained.

    python benchmarks/m3ae_shapes.py --workdir=/tmp/m3ae_shapes                  # ~20 min on 2 idle cores
    python benchmarks/m3ae_shapes.py --workdir=/tmp/m3ae_shapes --steps=300 --seeds 0
    python benchmarks/m3ae_shapes.py --workdir=/tmp/m3ae_shapes --data=/tmp/qs64  # quickstart data of your own

The M3AE paper's claim (M3AE §4.3, Fig. 3-4): with the same pre-training, the linear
probe on M3AE's frozen CLS feature beats MAE's (53.3-58.8% vs 45.2% on ImageNet after
CC12M). Here, in miniature:

1. data: `python -m mmt.quickstart --data_only --workdir={data}
   --gin_param=SHAPES_RESOLUTION=64` (paired 2,000 / image-only 4,000 / text-only
   4,000 / eval 500, a 256-piece BPE vocabulary), unless `{data}/summary.json` exists;
2. for each seed, `python -m mmt.train` of `gin/m3ae_tiny.gin` (paired captions,
   image-only and text-only streams) and of `gin/mae_tiny.gin` (the same network with
   text off, on the same images), both `--steps` steps with a 5% warmup
   (`TRAIN_STEPS`, `WARMUP_STEPS`, `Trainer.seed`), `--parallel` runs at a time; a run
   whose final checkpoint exists is reused (`{workdir}/{model}_steps{N}_seed{S}`);
3. linear probes (`mmt.evaluate linear_probe`'s library: shape, colour and cell of the
   main object, object count; 1,000 image-only training images, 500 eval images) of
   each trained network's frozen image features -- CLS token and mean-pooled patches --
   and of the same run's untrained initialisation (`--untrained`'s baseline).

Prints a table per pooling (mean and spread over seeds), writes
`{workdir}/m3ae_shapes.json` and ends with the JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]
MODELS = {"m3ae": "gin/m3ae_tiny.gin", "mae": "gin/mae_tiny.gin"}
POOLINGS = ("cls", "mean")
ATTRIBUTES = ("shape", "color", "cell", "count", "mean")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def make_data(data: Path) -> dict:
    """The quickstart's 64x64 shapes records and vocabulary in `data` (reused when present)."""
    summary = data / "summary.json"
    if not summary.exists():
        command = [sys.executable, "-m", "mmt.quickstart", "--data_only", f"--workdir={data}", "--no_progress",
                   "--gin_param=SHAPES_RESOLUTION=64"]
        print("data: " + " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=REPO, env=_env(), check=True, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def run_dir(workdir: Path, model: str, steps: int, seed: int) -> Path:
    return workdir / f"{model}_steps{steps}_seed{seed}"


def finished(run: Path, steps: int) -> bool:
    return (run / "checkpoints" / f"ckpt-{steps:09d}" / "COMMITTED.json").exists()


def train_command(model: str, run: Path, data: dict, steps: int, seed: int, gin_params=()) -> list[str]:
    params = [f"DATA_DIR='{data['data_dir']}'", f"TRAIN_STEPS={steps}", f"WARMUP_STEPS={max(1, round(0.05 * steps))}",
              f"Trainer.seed={seed}", "Trainer.progress_bar=False", *gin_params]
    if model == "m3ae":
        params.insert(1, f"TEXT_VOCAB='{data['vocabulary']}'")
    return ["-m", "mmt.train", f"--gin_file={MODELS[model]}", f"--workdir={run}",
            *[f"--gin_param={p}" for p in params]]


def train_all(jobs, parallel: int) -> dict:
    """Runs `(name, run_dir, args)` jobs, `parallel` at a time: name -> wall seconds."""
    pending, running, seconds = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            name, run, args = pending.pop(0)
            run.mkdir(parents=True, exist_ok=True)
            print(f"train {name}: python " + " ".join(args), flush=True)
            log = open(run / "train.log", "w")
            running.append((name, run, subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), stdout=log,
                                                        stderr=subprocess.STDOUT), log, time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            name, run, process, log, start = item
            if process.poll() is None:
                continue
            log.close()
            running.remove(item)
            if process.returncode:
                for other in running:  # no orphaned runs
                    other[2].terminate()
                    other[2].wait()
                tail = (run / "train.log").read_text().splitlines()[-20:]
                raise RuntimeError(f"training {name} failed ({process.returncode}):\n" + "\n".join(tail))
            seconds[name] = time.perf_counter() - start
            print(f"  {name} done in {seconds[name]:.0f}s", flush=True)
    return seconds


def last_metrics(run: Path) -> dict:
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {k: v for k, v in lines[-1].items() if k.startswith("loss/") or k == "step"} if lines else {}


def probe_run(run: Path, probe_train: int, probe_test: int) -> dict:
    """{"trained": {pooling: results}, "untrained": {pooling: results}, "step": N} of one workdir."""
    from mmt.evaluation import linear_probe as probe_lib
    from mmt.restore import load_task, load_trained

    out = {}
    for kind in ("trained", "untrained"):
        task, step = load_trained(run) if kind == "trained" else load_task(os.fspath(run), restore=False)
        if kind == "trained":
            out["step"] = step
        out[kind] = {pooling: probe_lib.linear_probe(
            lambda images, pooling=pooling: task.image_features(images, pooling=pooling), task.image_resolution,
            train_examples=probe_train, test_examples=probe_test) for pooling in POOLINGS}
    return out


def summarise(per_seed: list[dict]) -> dict:
    """[{attribute: {accuracy, ...}}] over seeds -> {attribute: mean accuracy, attribute_sd: spread}."""
    out = {}
    for a in ATTRIBUTES:
        values = [r[a]["accuracy"] for r in per_seed]
        out[a] = round(statistics.fmean(values), 4)
        if len(values) > 1:
            out[f"{a}_sd"] = round(statistics.stdev(values), 4)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/m3ae_shapes", help="runs, data and results; finished runs reused")
    parser.add_argument("--data", default=None, help="quickstart --data_only workdir (default {workdir}/data)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every run (gin: 2,000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Trainer.seed of each pair of runs")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--parallel", type=int, default=2, help="training runs at a time")
    parser.add_argument("--probe_train", type=int, default=1000)
    parser.add_argument("--probe_test", type=int, default=500)
    parser.add_argument("--gin_param", action="append", default=[],
                        help="an extra binding for every training run (smoke tests shrink the model)")
    args = parser.parse_args(argv)
    command = common.print_command(argv)
    start = time.perf_counter()
    workdir = Path(args.workdir)
    data = make_data(Path(args.data) if args.data else workdir / "data")
    runs = {(m, s): run_dir(workdir, m, args.steps, s) for s in args.seeds for m in args.models}
    jobs = [(f"{m} seed {s}", run, train_command(m, run, data, args.steps, s, args.gin_param))
            for (m, s), run in runs.items() if not finished(run, args.steps)]
    for (m, s), run in runs.items():
        if finished(run, args.steps):
            print(f"reusing {run} (step {args.steps} checkpoint)")
    train_s = train_all(jobs, args.parallel)
    probes, losses = {}, {}
    for (m, s), run in runs.items():
        probe_start = time.perf_counter()
        probes[(m, s)] = probe_run(run, args.probe_train, args.probe_test)
        losses[f"{m}_seed{s}"] = last_metrics(run)
        print(f"probed {run} (step {probes[(m, s)]['step']}) in {time.perf_counter() - probe_start:.0f}s", flush=True)

    figures = {"steps": args.steps, "seeds": args.seeds, "probe_train": args.probe_train,
               "probe_test": args.probe_test, "train_s": {k: round(v) for k, v in train_s.items()},
               "final_losses": losses}
    for pooling in POOLINGS:
        rows = {}
        for m in args.models:
            rows[m] = summarise([probes[(m, s)]["trained"][pooling] for s in args.seeds])
            rows[f"{m}_untrained"] = summarise([probes[(m, s)]["untrained"][pooling] for s in args.seeds])
        any_probe = probes[(args.models[0], args.seeds[0])]["trained"][pooling]
        rows["chance"] = {a: round(any_probe[a]["chance"], 4) for a in ATTRIBUTES}
        if set(MODELS) <= set(args.models):
            rows["m3ae_minus_mae"] = {a: round(rows["m3ae"][a] - rows["mae"][a], 4) for a in ATTRIBUTES}
            rows["m3ae_minus_mae_per_seed"] = {
                a: [round(probes[("m3ae", s)]["trained"][pooling][a]["accuracy"]
                          - probes[("mae", s)]["trained"][pooling][a]["accuracy"], 4) for s in args.seeds]
                for a in ATTRIBUTES}
        figures[pooling] = rows
        print(f"\nlinear probe, {pooling} pooling: accuracy, mean over {len(args.seeds)} seed(s) "
              f"({args.steps} steps each; +- sd over seeds)")
        print(f"{'':<16}" + "".join(f"{a:>15}" for a in ATTRIBUTES))
        for name, row in rows.items():
            if name.endswith("per_seed"):
                continue
            cells = [f"{row[a]:.3f}" + (f" +-{row[a + '_sd']:.3f}" if a + "_sd" in row else "") for a in ATTRIBUTES]
            print(f"{name:<16}" + "".join(f"{c:>15}" for c in cells))
    figures["wall_s"] = round(time.perf_counter() - start)
    record = {"command": command, "figures": figures,
              "per_seed": {f"{m}_seed{s}": p for (m, s), p in probes.items()}}
    (workdir / "m3ae_shapes.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {workdir / 'm3ae_shapes.json'} ({figures['wall_s']}s in all)")
    common.report("m3ae_shapes", figures, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
