"""mmt.backend: every random draw is a function of (seed, step, replica), and the backend seams
(private Keras APIs, JAX / torch autodiff and compilation) live in that one module."""

import ast
import pathlib

import numpy as np
import pytest
from keras import ops

from mmt import backend as rng
from mmt.layers import Dropout, TransformerBlock

MMT = pathlib.Path(__file__).resolve().parents[1] / "mmt"
# The only modules allowed to call a random-number API directly.
RANDOMNESS_MODULES = {"backend.py"}
# Random APIs are recognised by a `random` component in a dotted name (`keras.random.x`,
# `tf.random.x`, `np.random.x`, `krandom.x`) or by Keras's seed-generator names.
RANDOM_NAMES = {"random", "krandom", "seed_generator", "SeedGenerator", "set_random_seed"}
# Data generation (the shapes data set) builds `np.random.Generator`s seeded per
# (config seed, split, index): deterministic, outside any training step.
SEEDED_GENERATORS = {"np.random.Generator", "np.random.Philox", "np.random.SeedSequence", "np.random.default_rng",
                     "rng.random"}  # a seeded Generator's method (mmt.backend has no `random`)


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _random_uses(path: pathlib.Path) -> list[str]:
    """Lines of `path` that import or use a random API other than `mmt.backend`."""
    tree = ast.parse(path.read_text())
    found, inner = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = {a.name for a in node.names}
            if set((node.module or "").split(".")) & RANDOM_NAMES or names & RANDOM_NAMES:
                found.append(f"{node.lineno}: from {node.module} import {sorted(names)}")
        elif isinstance(node, ast.Import):
            if any(set(a.name.split(".")) & RANDOM_NAMES for a in node.names):
                found.append(f"{node.lineno}: import {[a.name for a in node.names]}")
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            child = node.value
            while isinstance(child, ast.Attribute):  # report each chain once, outermost
                inner.add(id(child))
                child = child.value
            dotted = _dotted(node)
            if set(dotted.split(".")) & RANDOM_NAMES and dotted not in SEEDED_GENERATORS:
                found.append(f"{node.lineno}: {dotted}")
        elif isinstance(node, ast.Name) and node.id in RANDOM_NAMES:
            found.append(f"{node.lineno}: {node.id}")
    return found


def test_no_module_outside_mmt_backend_draws_random_numbers():
    offenders = {}
    for path in sorted(MMT.rglob("*.py")):
        relative = path.relative_to(MMT).as_posix()
        if relative not in RANDOMNESS_MODULES:
            uses = _random_uses(path)
            if uses:
                offenders[relative] = uses
    assert not offenders, f"random draws outside mmt.backend: {offenders}"


def _seam_uses(path: pathlib.Path) -> list[str]:
    """Lines of `path` that touch a private Keras API or another backend's autodiff / compiler."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for module in modules:
            if module.startswith("keras.src") or module.split(".")[0] in ("jax", "torch"):
                found.append(f"{node.lineno}: import {module}")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and isinstance(node.ctx, ast.Store) and not (isinstance(node.value, ast.Name)
                                                            and node.value.id in ("self", "cls")):
            found.append(f"{node.lineno}: sets {_dotted(node)}")  # monkeypatching another object
    return found


def test_backend_seams_and_private_keras_apis_only_in_mmt_backend():
    offenders = {}
    for path in sorted(MMT.rglob("*.py")):
        relative = path.relative_to(MMT).as_posix()
        if relative != "backend.py" and (uses := _seam_uses(path)):
            offenders[relative] = uses
    assert not offenders, f"backend seams outside mmt.backend: {offenders}"


def test_the_seam_scan_finds_what_it_forbids(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("from keras.src.backend import x\nimport jax\nopt._all_reduce = None\nself._ok = 1\n")
    assert len(_seam_uses(sample)) == 3, _seam_uses(sample)


def test_the_scan_finds_what_it_forbids(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import keras\nfrom keras import random as krandom\nx = keras.random.uniform((2,))\n"
                      "y = self.seed_generator\nimport tensorflow as tf\nz = tf.random.uniform((1,))\n")
    uses = _random_uses(sample)
    assert len(uses) == 4, uses  # the keras.random import, keras.random.uniform, seed_generator, tf.random.uniform


def test_layers_draw_only_inside_a_scope():
    layer = Dropout(0.5)
    x = ops.ones((4, 8))
    with pytest.raises(RuntimeError, match="outside mmt.backend.scope"):
        layer(x, training=True)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(x))  # inference needs no seed


def test_same_scope_seed_same_masks_other_seed_other_masks():
    block = TransformerBlock(num_heads=2, mlp_dim=16, dropout=0.3, drop_path=0.3)
    x = ops.convert_to_tensor(np.random.default_rng(0).normal(size=(4, 5, 8)).astype("float32"))

    def run(seed):
        with rng.scope(rng.StepSeed(np.array(seed))):
            return np.asarray(block(x, training=True))

    first = run([7, 11])
    np.testing.assert_array_equal(run([7, 11]), first)
    assert not np.array_equal(run([7, 12]), first)


def test_step_seeds_differ_by_step_and_replica():
    def draw(step, replica):
        return np.asarray(rng.uniform((16,), rng.for_step(3, step, replica)))

    reference = draw(5, 0)
    np.testing.assert_array_equal(draw(5, 0), reference)
    assert not np.array_equal(draw(6, 0), reference)
    assert not np.array_equal(draw(5, 1), reference)
    seed = rng.for_step(3, 5, 1)
    assert np.asarray(seed._seed).tolist() == [3, 5 * 4096 + 1]  # the trainer's layout since checkpoints began
