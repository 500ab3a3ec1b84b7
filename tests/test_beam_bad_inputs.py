"""Bad input to the Beam entry points: one `error:` line naming the culprit, exit 2, no traceback.

Issue 17 items 7 and 11. Each row runs `python -m beam_pipelines.tokenize` or
`python -m beam_pipelines.verify` in a subprocess, as a user would, and checks the
exit status, that stderr's last non-empty line starts with `error:` and names the
offending flag or path, that no traceback is printed without `--verbose`, and that
TensorFlow's C++ start-up lines (oneDNN, CUDA probing, CPU features) stay quiet.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import beam_helpers as h
from harness import jax_check

TESTS = Path(__file__).parent
# TensorFlow's C++ start-up lines, printed at import unless TF_CPP_MIN_LOG_LEVEL hides them.
NATIVE_NOISE = ("cpu_feature_guard", "oneDNN", "cuda", "cuInit", "absl::InitializeLog")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "corpus.txt").write_text("a red circle\na blue square\n")
    (root / "corpus.tsv").write_text("caption\turl\na red circle\tx.png\n")
    h.make_vocab(root / "spm.model")
    (root / "not_a_model.txt").write_text("this is not a SentencePiece model\n")
    (root / "empty_tokenizer").mkdir()
    (root / "done").mkdir()
    (root / "done" / "COMPLETED").write_text("{}\n")
    (root / "unfinished").mkdir()
    (root / "a_file").write_text("a file, not a directory\n")
    return root


def _text(root: Path, *extra: str) -> list[str]:
    """A text-only run (no image tokenizer to load) with `extra` flags."""
    return ["--source=text", f"--input={root / 'corpus.txt'}", f"--text_vocab={root / 'spm.model'}", *extra]


def _paired(root: Path, tokenizer: str, *extra: str) -> list[str]:
    return ["--source=tsv", f"--input={root / 'corpus.tsv'}", f"--text_vocab={root / 'spm.model'}",
            f"--image_tokenizer={tokenizer}", f"--output_dir={root / 'out_paired'}", *extra]


# (id, module, argv from the fixture's root, what the error line must name)
CASES = [
    ("bad_choice", "tokenize", lambda r: ["--source=bogus", f"--output_dir={r / 'o'}"], "--source"),
    ("unknown_flag", "tokenize", lambda r: _text(r, f"--output_dir={r / 'o'}", "--num_shardz=3"), "--num_shardz"),
    ("stray_argument", "tokenize", lambda r: _text(r, f"--output_dir={r / 'o'}", "stray_word"), "stray_word"),
    ("bad_number", "tokenize", lambda r: _text(r, f"--output_dir={r / 'o'}", "--num_shards=0"), "--num_shards"),
    ("no_output_dir", "tokenize", lambda r: _text(r), "--output_dir"),
    ("no_input", "tokenize", lambda r: ["--source=tsv", f"--output_dir={r / 'o'}", "--image_tokenizer=t",
                                        "--text_vocab=v"], "--input"),
    ("input_matches_nothing", "tokenize",
     lambda r: ["--source=text", f"--input={r / 'nowhere'}/*.txt", f"--text_vocab={r / 'spm.model'}",
                f"--output_dir={r / 'o'}"], "nowhere/*.txt"),
    ("vocab_missing", "tokenize",
     lambda r: ["--source=text", f"--input={r / 'corpus.txt'}", f"--text_vocab={r / 'no.model'}",
                f"--output_dir={r / 'o'}"], "no.model"),
    ("vocab_not_a_model", "tokenize",
     lambda r: ["--source=text", f"--input={r / 'corpus.txt'}", f"--text_vocab={r / 'not_a_model.txt'}",
                f"--output_dir={r / 'o'}"], "not_a_model.txt"),
    ("tokenizer_missing", "tokenize", lambda r: _paired(r, str(r / "no_tokenizer")), "no_tokenizer"),
    ("neither_tokens_nor_pixels", "tokenize", lambda r: _paired(r, ""), "--store_image"),
    ("pixels_without_size", "tokenize", lambda r: _paired(r, "", "--store_image=png"), "--image_size"),
    ("tokenizer_empty_dir", "tokenize", lambda r: _paired(r, str(r / "empty_tokenizer")), "empty_tokenizer"),
    ("output_completed", "tokenize", lambda r: _text(r, f"--output_dir={r / 'done'}"), "--overwrite"),
    ("output_not_writable", "tokenize", lambda r: _text(r, f"--output_dir={r / 'a_file' / 'out'}"), "a_file/out"),
    ("verify_missing_dir", "verify", lambda r: [str(r / "nothing_here")], "nothing_here"),
    ("verify_unfinished", "verify", lambda r: [str(r / "unfinished")], "COMPLETED"),
    ("verify_bad_flag", "verify", lambda r: [str(r / "done"), "--bogus"], "--bogus"),
]


def _run(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # what a user's shell has: the entry point must quiet TF itself
    return subprocess.run([sys.executable, "-m", f"beam_pipelines.{module}", *argv], env=env, capture_output=True,
                          text=True, timeout=300, cwd=TESTS.parent)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("case, module, make_argv, names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(files, case, module, make_argv, names):
    result = _run(module, make_argv(files))
    last = _last_line(result.stderr)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert last.startswith("error: ") and names in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    noise = [line for line in result.stderr.splitlines() if any(n in line for n in NATIVE_NOISE)]
    assert not noise, noise
    assert not (files / "o").exists()  # nothing created before the flags were found wanting


def test_verbose_adds_the_traceback(files):
    result = _run("tokenize", ["--source=text", f"--input={files / 'nowhere'}/*.txt",
                               f"--text_vocab={files / 'spm.model'}", f"--output_dir={files / 'o'}", "--verbose"])
    assert result.returncode == 2
    assert "Traceback" in result.stderr and _last_line(result.stderr).startswith("error: --input")


def test_a_bug_is_not_a_user_error(files):
    """Anything but a `UserError` keeps its traceback (and Python's exit status 1): it is ours to fix."""
    code = ("import sys; from beam_pipelines import tokenize, resources\n"
            "def broken(config): raise ZeroDivisionError('a bug')\n"
            "resources.tokenizer_info = broken\n"
            "sys.exit(tokenize.main(sys.argv[1:]))\n")
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-c", code, *_text(files, f"--output_dir={files / 'o'}")],
                            env=env, capture_output=True, text=True, timeout=300, cwd=TESTS.parent)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


@jax_check(modules=["beam_pipelines.tokenize", "beam_pipelines.verify"], forbid=("tensorflow", "keras"))
def test_entry_points_import_no_tensorflow():
    """TF_CPP_MIN_LOG_LEVEL only works if set before TensorFlow loads (item 11); neither
    imports Keras either, so no backend can load TensorFlow for them."""
