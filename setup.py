"""Thin shim so that Dataflow workers can install mmt with `--setup_file=./setup.py`.

All metadata lives in pyproject.toml.
"""
import setuptools

setuptools.setup()
