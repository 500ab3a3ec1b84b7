"""`python -m mmt.train` as a user runs it: kill and resume, SIGTERM, damaged checkpoints,
gin errors before step 1, --dry_run, config changes on resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from mmt.training.checkpoint import PAUSE_ENV

REPO = Path(__file__).resolve().parents[1]
GIN = str(REPO / "tests" / "gin" / "tiny_train.gin")


def _command(data_dir, workdir, *params, steps=30):
    return [sys.executable, "-m", "mmt.train", f"--gin_file={GIN}", f"--gin_param=DATA_DIR='{data_dir}'",
            f"--gin_param=TRAIN_STEPS={steps}", *[f"--gin_param={p}" for p in params], f"--workdir={workdir}"]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"), TF_CPP_MIN_LOG_LEVEL="2")
    env.pop(PAUSE_ENV, None)
    env.update(extra)
    return env


def _train(data_dir, workdir, *params, steps=30, check=True, **env):
    result = subprocess.run(_command(data_dir, workdir, *params, steps=steps), env=_env(**env), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def _start(data_dir, workdir, *params, steps=30, **env):
    return subprocess.Popen(_command(data_dir, workdir, *params, steps=steps), env=_env(**env), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(process, text):
    """Reads the child's output until a line contains `text`; returns everything read."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"child exited ({process.wait()}) before printing {text!r}:\n{''.join(seen)}")


def _losses(workdir):
    """step -> losses; every step is logged once, even across resumes (README: metrics.jsonl)."""
    by_step = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["step"] not in by_step, f"step {row['step']} logged twice in {workdir}/metrics.jsonl"
        by_step[row["step"]] = {k: v for k, v in row.items() if k.startswith(("loss/", "grad_norm/"))}
    return by_step


def _tree(directory):
    """Every file under `directory` (relative path -> bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def _final_state(workdir):
    """Every value in the newest checkpoint: model, optimizer slots, step, input position."""
    newest = sorted((Path(workdir) / "checkpoints").glob("ckpt-*[0-9]"))[-1]
    reader = tf.train.load_checkpoint(str(newest / "ckpt"))
    # The iterator's state is a variant (serialized tf.data buffers): not comparable.
    keys = [k for k in reader.get_variable_to_shape_map() if not k.startswith("iterator")]
    return newest.name, {k: reader.get_tensor(k) for k in keys}


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """An uninterrupted 30-step run."""
    workdir = tmp_path_factory.mktemp("reference")
    _train(tiny_data["data_dir"], workdir)
    return workdir


def _assert_same_run(workdir, reference, from_step):
    got, want = _losses(workdir), _losses(reference)
    for step in range(from_step, 31):
        assert got[step] == want[step], f"step {step}: {got[step]} != {want[step]}"
    name, state = _final_state(workdir)
    ref_name, ref_state = _final_state(reference)
    assert name == ref_name and state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tiny_data, reference, tmp_path):
    child = _start(tiny_data["data_dir"], tmp_path)
    _wait_for(child, "step 12/30")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    resumed = _train(tiny_data["data_dir"], tmp_path)
    assert "resumed from checkpoint at step" in resumed.stdout
    _assert_same_run(tmp_path, reference, from_step=13)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_never_uses_the_half_written_one(tiny_data, reference, tmp_path):
    child = _start(tiny_data["data_dir"], tmp_path, **{PAUSE_ENV: "60@8"})
    _wait_for(child, "checkpoint files written for step 8; pausing before commit")
    child.send_signal(signal.SIGKILL)
    child.wait()
    leftovers = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert leftovers[0] == "ckpt-000000004" and leftovers[1].startswith("ckpt-000000008.tmp-")
    resumed = _train(tiny_data["data_dir"], tmp_path)
    assert "resumed from checkpoint at step 4" in resumed.stdout
    _assert_same_run(tmp_path, reference, from_step=5)


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tiny_data, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    newest = workdir / "checkpoints" / "ckpt-000000030"
    data_file = next(newest.glob("ckpt.data-*"))
    data_file.write_bytes(data_file.read_bytes()[:-16])
    resumed = _train(tiny_data["data_dir"], workdir)
    assert "resumed from checkpoint at step 28" in resumed.stdout
    assert "ckpt-000000030" in resumed.stderr  # the warning names the damaged checkpoint
    # Steps 29 and 30 ran twice (before the damage and after the resume): logged once.
    assert sorted(_losses(workdir)) == list(range(1, 31))
    _assert_same_run(workdir, reference, from_step=29)


def test_sigterm_saves_at_the_step_boundary_and_exits_zero(tiny_data, tmp_path):
    child = _start(tiny_data["data_dir"], tmp_path, "Trainer.checkpoint_every = 100000", steps=100000)
    _wait_for(child, "step 3/")
    child.send_signal(signal.SIGTERM)
    output = child.communicate(timeout=120)[0]
    assert child.returncode == 0, output
    assert "SIGTERM received" in output and "preempted at step" in output
    name, state = _final_state(tmp_path)
    assert int(name.split("-")[1]) == int(state["step/.ATTRIBUTES/VARIABLE_VALUE"]) >= 3


def test_gin_typo_fails_before_step_one(tiny_data, tmp_path):
    result = _train(tiny_data["data_dir"], tmp_path, "Trainer.clip_grad_nrom = 1.0", check=False)
    assert result.returncode == 2
    assert "clip_grad_nrom" in result.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_missing_required_binding_fails_before_step_one(tmp_path):
    command = [sys.executable, "-m", "mmt.train", f"--gin_file={GIN}", f"--workdir={tmp_path}"]
    result = subprocess.run(command, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "DATA_DIR" in result.stderr and "REQUIRED" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_dry_run_prints_parameters_and_config_without_reading_data(tmp_path):
    result = subprocess.run(
        _command("/nonexistent/data", tmp_path / "dry") + ["--dry_run"], env=_env(), cwd=REPO,
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "embed" in result.stdout and "total" in result.stdout
    assert "TRAIN_STEPS = 30" in result.stdout and "Trainer.train_steps = %TRAIN_STEPS" in result.stdout
    assert not (tmp_path / "dry" / "checkpoints").exists()


def test_resuming_with_a_changed_config_is_refused_unless_allowed(tiny_data, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    before = _tree(workdir)
    changed = _train(tiny_data["data_dir"], workdir, "Trainer.clip_grad_norm = 1.0", check=False)
    assert changed.returncode == 2
    assert "different operative config" in changed.stderr and "clip_grad_norm" in changed.stderr
    # Refused before anything was written: config.gin, operative_config.gin, run_info.json,
    # metrics and checkpoints are byte for byte what they were.
    assert _tree(workdir) == before
    command = _command(tiny_data["data_dir"], workdir, "Trainer.clip_grad_norm = 1.0", steps=31)
    allowed = subprocess.run(command + ["--allow_config_change"], env=_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 0, allowed.stderr
    assert "completed at step 31" in allowed.stdout
