"""Bad inputs end with one line (issue 17): `mmt.train`, `mmt.generate`, `mmt.evaluate`.

Each row runs the entry point's `main` under `mmt.errors.run_main`, exactly as the
command line does, and checks the convention of `mmt.errors`: exit status 2, the last
line of stderr starts with `error: ` and names the culprit (file, binding, record), no
traceback. Rows run in this process (a subprocess per row cost ~15 s of TensorFlow
start-up each); the rows marked `subprocess` run the real command, as a user would, and
also check that none of TensorFlow's native start-up lines reach the terminal. Model /
data mismatches must be caught before step 1, so no row trains.
"""

import contextlib
import importlib
import io
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from mmt.data import manifests, schema
from mmt.errors import run_main
from mmt.training.checkpoint import PAUSE_ENV

REPO = Path(__file__).resolve().parents[1]
TINY_GIN = str(REPO / "tests" / "gin" / "tiny_train.gin")
NATIVE_LINES = ("cudart_stub", "absl::InitializeLog", "cpu_feature_guard", "cuInit")


def _subprocess(module, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the entry point must quiet TensorFlow itself
    env.pop(PAUSE_ENV, None)
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _run(module, *args):
    """`python -m module *args` in this process: (returncode, stdout, stderr) as a subprocess gives."""
    main = importlib.import_module(module).main
    stdout, stderr = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    pause = os.environ.pop(PAUSE_ENV, None)
    try:
        os.chdir(REPO)  # gin files are named relative to the checkout, as in the README
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            returncode = run_main(main, list(args))
    finally:
        os.chdir(cwd)
        if pause is not None:
            os.environ[PAUSE_ENV] = pause
    return types.SimpleNamespace(returncode=returncode, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def _assert_one_line_error(result, *culprits):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for culprit in culprits:
        assert culprit in lines[-1], f"{culprit!r} not in: {lines[-1]}"
    return lines[-1]


def _tiny(data_dir, workdir, *params, extra=(), run=None):
    return (run or _run)("mmt.train", f"--gin_file={TINY_GIN}", f"--gin_param=DATA_DIR='{data_dir}'", "--gin_param=TRAIN_STEPS=2",
                *[f"--gin_param={p}" for p in params], f"--workdir={workdir}", *extra)


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    """ITIT-shaped data: 8x8 grids of 256 codes, text vocabulary of 74, made-up fingerprints."""
    path = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    splits = {}
    for split, image, text in (("paired", True, True), ("text_only", False, True), ("image_only", True, False)):
        records = [(f"{split}-{i}", schema.encode_example(
            f"{split}-{i}", image_tokens=rng.integers(0, 256, (8, 8)) if image else None,
            text_ids=rng.integers(4, 74, 5) if text else None)) for i in range(8)]
        splits[split] = schema.write_split(path, split, records, num_shards=1)
    manifests.write_manifest(path, splits=splits, image_tokenizer=manifests.ImageTokenizerInfo("sha256:tok", (8, 8), 256),
                            text_vocab=manifests.TextVocabInfo("sha256:data-vocab", 74))
    return path


def _itit(token_data, workdir, *params):
    return _run("mmt.train", "--gin_file=gin/itit_tiny.gin", f"--gin_param=DATA_DIR='{token_data}'",
                "--gin_param=TRAIN_STEPS=400", *[f"--gin_param={p}" for p in params], f"--workdir={workdir}")


# -- model vs data (item 2): before step 1, naming the manifest, the binding, both values --


def test_image_vocab_smaller_than_the_data_fails_before_step_one(token_data, tmp_path):
    result = _itit(token_data, tmp_path / "run", "GRID = (8, 8)", "IMAGE_VOCAB_SIZE = 128")
    _assert_one_line_error(result, str(token_data / "manifest.json"), "IMAGE_VOCAB_SIZE", "256", "128")
    assert not (tmp_path / "run").exists()  # nothing written


def test_grid_of_the_model_and_the_data_differ(token_data, tmp_path):
    result = _itit(token_data, tmp_path / "run")  # itit_tiny.gin: GRID = (16, 16)
    _assert_one_line_error(result, str(token_data / "manifest.json"), "GRID", "(8, 8)", "(16, 16)")
    assert "Dimensions must be equal" not in result.stderr


def test_text_vocabulary_fingerprint_mismatch(token_data, tiny_data, tmp_path):
    result = _itit(token_data, tmp_path / "run", "GRID = (8, 8)", f"TEXT_VOCAB = '{tiny_data['vocabulary']}'")
    # All three named: the data (its manifest), the vocabulary (binding and fingerprint) and
    # the model, whose special ids come from that vocabulary.
    _assert_one_line_error(result, str(token_data / "manifest.json"), "TEXT_VOCAB", "sha256:data-vocab",
                           tiny_data["vocabulary_fingerprint"], "the model takes its special ids from it (eos 1")


def test_tokenizer_or_vocabulary_that_does_not_exist(token_data, tmp_path):
    image = _itit(token_data, tmp_path / "a", "GRID = (8, 8)", f"IMAGE_TOKENIZER = '{tmp_path / 'vq'}'")
    _assert_one_line_error(image, "ITITTask.image_tokenizer", str(tmp_path / "vq"))
    text = _itit(token_data, tmp_path / "b", "GRID = (8, 8)", f"TEXT_VOCAB = '{tmp_path / 'v.model'}'")
    _assert_one_line_error(text, str(tmp_path / "v.model"))


def test_warmup_longer_than_training_names_both_settings(token_data, tmp_path):
    # decay_steps is derived: TRAIN_STEPS - WARMUP_STEPS = 40 - 100.
    result = _itit(token_data, tmp_path / "run", "GRID = (8, 8)", "TRAIN_STEPS = 40", "WARMUP_STEPS = 100")
    _assert_one_line_error(result, "-60", "TRAIN_STEPS", "WARMUP_STEPS")


def test_text_vocab_and_length_mismatch_name_the_task_bindings(tiny_data, tmp_path):
    vocab = _tiny(tiny_data["data_dir"], tmp_path / "a", "TinyTask.vocab_size = 64")
    _assert_one_line_error(vocab, "manifest.json", "TinyTask.vocab_size", "74", "64")
    length = _tiny(tiny_data["data_dir"], tmp_path / "b", "text/StreamSpec.text_length = 12")
    _assert_one_line_error(length, "text/StreamSpec.text_length", "TinyTask.text_length", "12", "16")


# -- data, checkpoints ---------------------------------------------------------------------


def test_missing_data_dir(tmp_path):
    _assert_one_line_error(_tiny(tmp_path / "nowhere", tmp_path / "run"), str(tmp_path / "nowhere"), "DATA_DIR")


def test_the_command_line_prints_one_line_and_no_native_start_up_lines(tmp_path):
    # The real command, as a user types it: TensorFlow's native start-up lines are
    # filtered only when the entry point owns the process's stderr.
    result = _tiny(tmp_path / "nowhere", tmp_path / "run", run=_subprocess)
    _assert_one_line_error(result, str(tmp_path / "nowhere"), "DATA_DIR")
    assert not [n for n in NATIVE_LINES if n in result.stderr], result.stderr


def test_corrupt_shard_names_the_shard(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data["data_dir"], data)
    shard = sorted(data.glob("text_only-*.tfrecord"))[0]
    damaged = bytearray(shard.read_bytes())
    damaged[40] ^= 0xFF  # same size, bad checksum: found only while reading
    shard.write_bytes(bytes(damaged))
    _assert_one_line_error(_tiny(data, tmp_path / "run"), str(shard))


def test_all_checkpoints_damaged_changes_nothing(tiny_data, tmp_path):
    workdir = tmp_path / "run"
    first = _tiny(tiny_data["data_dir"], workdir)
    assert first.returncode == 0, first.stderr
    for data_file in (workdir / "checkpoints").glob("ckpt-*/ckpt.data-*"):
        data_file.write_bytes(data_file.read_bytes()[:100])
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    _assert_one_line_error(_tiny(tiny_data["data_dir"], workdir), str(workdir / "checkpoints"))
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


# -- gin and flags (items 6, 7) ----------------------------------------------------------------


def test_unreferenced_macro_and_unused_binding_fail_naming_their_source(tiny_data, tmp_path):
    macro = _tiny(tiny_data["data_dir"], tmp_path / "a", "TRAIN_STEPZ = 5")
    _assert_one_line_error(macro, "TRAIN_STEPZ", "--gin_param")
    # An Adam run leaves the file's Adafactor bindings unused.
    adam = _tiny(tiny_data["data_dir"], tmp_path / "b", "Trainer.optimizer = @Adam")
    _assert_one_line_error(adam, "Adafactor.learning_rate", "tiny_train.gin:21")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_allow_unused_bindings_warns_instead(tiny_data, tmp_path):
    # A subprocess: pytest records warnings raised in its own process instead of printing them.
    result = _tiny(tiny_data["data_dir"], tmp_path / "run", "TRAIN_STEPZ = 5",
                   extra=("--allow_unused_bindings", "--dry_run"), run=_subprocess)
    assert result.returncode == 0, result.stderr
    assert "TRAIN_STEPZ" in result.stderr and "UserWarning" in result.stderr  # a real warning still shows


def test_unbalanced_bracket_and_bad_flag(tiny_data, tmp_path):
    _assert_one_line_error(_tiny(tiny_data["data_dir"], tmp_path / "a", "Trainer.seed = (5"), "Trainer.seed = (5")
    _assert_one_line_error(_tiny(tiny_data["data_dir"], tmp_path / "b", extra=("--bogus",)), "--bogus")


def test_verbose_shows_the_traceback(tmp_path):
    result = _tiny(tmp_path / "nowhere", tmp_path / "run", extra=("--verbose",), run=_subprocess)
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


# -- generate, evaluate ------------------------------------------------------------------------


def test_generate_and_evaluate_on_a_directory_that_is_not_a_workdir(tmp_path):
    generate = _run("mmt.generate", f"--workdir={tmp_path}", "--prompt=a red circle")
    _assert_one_line_error(generate, str(tmp_path / "operative_config.gin"))
    missing_image = _run("mmt.generate", f"--workdir={tmp_path}", "--image=/nonexistent.png")
    _assert_one_line_error(missing_image, "/nonexistent.png")
    evaluate = _run("mmt.evaluate", "linear_probe", f"--workdir={tmp_path}")
    _assert_one_line_error(evaluate, "operative_config.gin")
