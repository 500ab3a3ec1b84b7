"""The wheel ships mmt's gin files: `--gin_file=itit_h.gin` resolves after a wheel install
as it does in a checkout (issue 21, item 4)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "mmt", "beam_pipelines", "gin")


def _build_wheel(source: Path, dist: Path) -> Path:
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)]
    # Without build isolation (offline, seconds) when this environment has setuptools and
    # wheel; else pip fetches the build requirements from the package index.
    for command in (base[:5] + ["--no-build-isolation"] + base[5:], base):
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode == 0:
            return next(dist.glob("mmt-*.whl"))
    raise AssertionError(f"building the wheel failed:\n{result.stderr[-3000:]}")


@pytest.mark.slow
def test_a_wheel_install_resolves_and_parses_gin_files_outside_the_checkout(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(
            REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                           if (REPO / name).is_dir() else {}))
    wheel = _build_wheel(source, tmp_path / "dist")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    shutil.rmtree(source)  # nothing of the checkout is left to fall back on

    script = (
        "import mmt.config as c\n"
        "assert c.GIN_DIR == c.Path(c.__file__).resolve().parent / 'gin', c.GIN_DIR\n"
        "print(c.resolve_gin_file('itit_h.gin'))\n"
        "print(c.resolve_gin_file('gin/model/itit_paper.gin'))\n"
        # Includes resolve too: itit_h.gin -> model/itit_paper.gin -> model/itit.gin -> run/, optimizer/.
        "c.parse(['itit_h.gin'], [\"DATA_DIR = 'x'\", \"TEXT_ENCODER = 'trainable'\"])\n"
        "import gin\n"
        "print(gin.query_parameter('%TRAIN_STEPS'))\n")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split()
    assert lines[0] == str(site / "mmt" / "gin" / "itit_h.gin")
    assert lines[1] == str(site / "mmt" / "gin" / "model" / "itit_paper.gin")
    assert lines[2] == "1500000"


def test_a_checkout_resolves_gin_files_from_its_gin_folder():
    from mmt import config

    assert config.GIN_DIR == REPO / "gin"
    assert config.resolve_gin_file("itit_h.gin") == REPO / "gin" / "itit_h.gin"
