"""Packaging beside pyproject.toml (which holds the metadata); also lets Dataflow workers
install mmt with `--setup_file=./setup.py`.

The repository's gin/ folder ships inside the package as `mmt/gin`, so that
`--gin_file=itit_h.gin` resolves the same from a wheel as from a checkout
(`mmt.config.GIN_DIR`).
"""
import pathlib

import setuptools

ROOT = pathlib.Path(__file__).resolve().parent
GIN_SUBFOLDERS = sorted(p.name for p in (ROOT / "gin").iterdir() if p.is_dir())

setuptools.setup(
    packages=setuptools.find_packages(include=["mmt", "mmt.*", "beam_pipelines", "beam_pipelines.*"]) + ["mmt.gin"],
    package_dir={"mmt.gin": "gin"},
    package_data={"mmt": ["py.typed"], "mmt.gin": ["*.gin", *(f"{d}/*.gin" for d in GIN_SUBFOLDERS)]},
)
