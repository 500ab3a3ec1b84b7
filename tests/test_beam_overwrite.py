"""`--overwrite` never deletes before the new run succeeds (issue 17 item 3).

A failed (bad input) or SIGKILLed `--overwrite` run leaves the previous completed output
byte-identical; a swap interrupted half way is finished by the next run, and readers
refuse the directory while it is half swapped. Text-only corpora keep the runs small.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import beam_helpers as h
from beam_pipelines import output, tokenize, verify
from mmt.data import manifests

TESTS = Path(__file__).parent


def _args(root: Path, out: Path, corpus: str, *extra: str) -> list[str]:
    return ["--source=text", f"--input={root / corpus}", f"--output_dir={out}", f"--text_vocab={root / 'spm.model'}",
            "--num_shards=3", "--dead_letter_shards=2", *extra, "--direct_running_mode=in_memory"]


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, by relative path: equal snapshots are byte-identical trees."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _staging(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".staging-*"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """root/old: a completed run of old.txt; root/new: a completed run of new.txt (other captions)."""
    root = tmp_path_factory.mktemp("overwrite")
    h.make_vocab(root / "spm.model")
    (root / "old.txt").write_text("\n".join(h.CAPTIONS[:10]) + "\n   \n")  # one empty caption: a dead letter
    (root / "new.txt").write_text("\n".join(h.CAPTIONS[10:30]) + "\n")
    tokenize.run(_args(root, root / "old", "old.txt"))
    tokenize.run(_args(root, root / "new", "new.txt"))
    return root


def test_overwrite_with_a_bad_input_keeps_the_previous_output(runs, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(runs / "old", out)
    before = _snapshot(out)
    bad = [_args(runs, out, "missing.txt", "--overwrite"),
           _args(runs, out, "new.txt", "--overwrite", f"--text_vocab={runs / 'new.txt'}")]  # not a model
    for argv in bad:
        assert tokenize.main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --")
        assert _snapshot(out) == before
        assert _staging(out) == []


def test_overwrite_failing_mid_pipeline_keeps_the_previous_output(runs, tmp_path, monkeypatch):
    from beam_pipelines import writers

    def lost(*args, **kwargs):
        raise RuntimeError("records were lost (injected)")

    out = tmp_path / "out"
    shutil.copytree(runs / "old", out)
    before = _snapshot(out)
    monkeypatch.setattr(writers, "accounting", lost)  # the last stage refuses to finish
    with pytest.raises(Exception, match="records were lost"):
        tokenize.run(_args(runs, out, "new.txt", "--overwrite"))
    assert _snapshot(out) == before
    assert _staging(out) == []  # the failed run's staging directory is gone too


def test_successful_overwrite_replaces_the_output(runs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(runs / "old", out)
    (out / "paired-00000-of-00007.tfrecord").write_bytes(b"a shard of another run's shard count")
    (out / "notes.txt").write_text("not a run's file: kept")
    stats = tokenize.run(_args(runs, out, "new.txt", "--overwrite"))
    assert stats["inputs"] == 20 and stats["dead_lettered"] == 0
    new = _snapshot(runs / "new")
    after = _snapshot(out)
    for name, data in new.items():
        if name != "manifest.json" and name != "COMPLETED":  # they hold the output path and a time
            assert after[name] == data, name
    assert set(after) == set(new) | {"notes.txt"}
    assert _staging(out) == []
    assert verify.verify(str(out)) == {"text_only": 20}


def test_sigkill_mid_overwrite_keeps_the_previous_output(runs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(runs / "old", out)
    before = _snapshot(out)
    env = dict(os.environ, **{output.PAUSE_ENV: "120"})
    process = subprocess.Popen([sys.executable, "-m", "beam_pipelines.tokenize",
                                *_args(runs, out, "new.txt", "--overwrite")],
                               env=env, stderr=subprocess.PIPE, text=True, cwd=TESTS.parent)
    guard = threading.Timer(300, process.kill)  # a bound, should the hook never be reached
    guard.start()
    try:
        # Server-side event, not a timer: the run says when its shards are written.
        paused = next((line for line in process.stderr if "pausing before finalize" in line), None)
        assert paused is not None, "the run ended without reaching the pause hook"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        guard.cancel()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    staged = _staging(out)
    assert len(staged) == 1 and str(staged[0]) in paused  # it was writing beside the output...
    assert list(staged[0].glob("text_only-*.tfrecord")) and not (staged[0] / "COMPLETED").exists()
    assert _snapshot(out) == before  # ...which is untouched
    assert verify.verify(str(out)) == {"text_only": 10}

    tokenize.run(_args(runs, out, "new.txt", "--overwrite"))  # the next run clears the leftover
    assert _staging(out) == [] and verify.verify(str(out)) == {"text_only": 20}


def test_interrupted_swap_is_hidden_from_readers_and_finished_by_the_next_run(runs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(runs / "old", out)
    staging = Path(output.new_staging_dir(str(out)))
    shutil.copytree(runs / "new", staging)
    moves = []
    rename = output.FileSystems.rename

    def dies_after_two_moves(sources, targets):  # the process "dies" in step 3 of the swap
        if len(moves) == 2:
            raise KeyboardInterrupt("killed")
        moves.append(sources)
        rename(sources, targets)

    monkeypatch.setattr(output.FileSystems, "rename", dies_after_two_moves)
    with pytest.raises(KeyboardInterrupt):
        output.swap_in(str(staging), str(out))
    monkeypatch.undo()
    # Half swapped: neither verify nor training's manifest reading takes it for complete.
    assert not (out / "COMPLETED").exists() and not (out / "manifest.json").exists()
    with pytest.raises(verify.VerifyError, match="no COMPLETED"):
        verify.verify(str(out))
    with pytest.raises(FileNotFoundError):
        manifests.read_manifest(out)

    assert output.finish_interrupted_swap(str(out)) == str(staging)
    assert _snapshot(out) == _snapshot(runs / "new")
    assert not staging.exists()
    assert verify.verify(str(out)) == {"text_only": 20}
