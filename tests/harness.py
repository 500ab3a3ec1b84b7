"""The checks every mmt layer and model repeats, each one call.

* `check_layer(make, *args, xla_rtol=..., mixed_dtype=..., **kwargs)`: on one built
  instance, the config round trip (exact outputs), eager == XLA-compiled, and a fresh
  instance under the `mixed_bfloat16` policy. Models are layers: the same call.
* `assert_xla_matches_eager(fn, *args, rtol=...)`: one function, eager vs
  `tf.function(jit_compile=True)`; integer outputs exactly, floats to `rtol`.
* `assert_no_tensorflow(files, modules)`: static: the files import neither TensorFlow nor
  gin anywhere, and importing the modules runs no TensorFlow import.
* `jax_check(...)`: a test run in ONE subprocess under `KERAS_BACKEND=jax` shared by
  every such test of the session (JAX + Keras start-up costs seconds): the modules import
  without TensorFlow, and an object built here gives the same outputs there.

Tolerances come from tests/tolerances.py; callers say which sums XLA may reorder.
This module imports neither Keras nor TensorFlow at import time: the JAX worker is
`python tests/harness.py` and must import the modules under test first.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

from tolerances import assert_close_to_scale

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = frozenset({"tensorflow", "tf_keras", "gin"})


def _numpy(x):
    from keras import ops

    return np.asarray(ops.convert_to_numpy(x))


def _flat(outputs) -> list[np.ndarray]:
    import keras

    return [_numpy(y) for y in keras.tree.flatten(outputs)]


def assert_same_outputs(got, want, rtol: float, what: str = "") -> None:
    """Same structure; integer / bool outputs equal, floating ones within `rtol` of scale."""
    got, want = _flat(got), _flat(want)
    assert len(got) == len(want), f"{what}: {len(got)} outputs vs {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, f"{what}[{i}]: shape {a.shape} vs {b.shape}"
        if np.issubdtype(b.dtype, np.floating):
            assert_close_to_scale([a], [b], rtol, f"{what}[{i}]")
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"{what}[{i}]")


# ------------------------------------------------------------------ in-process checks


@contextlib.contextmanager
def mixed_bfloat16():
    """The `mixed_bfloat16` global policy inside the block, float32 after it."""
    import keras

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def assert_config_round_trip(layer, args, kwargs, want, *, lazy_variables: bool = False) -> None:
    """serialize -> deserialize (which replays the build config) -> same weights -> same
    outputs, exactly (same weights, same ops). `lazy_variables`: the deserialized object
    creates its variables on its first call (ITIT, UPGen: `build_all`), not when rebuilt."""
    import keras

    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is type(layer)
    assert clone.get_config() == layer.get_config()
    assert clone.built, f"{type(layer).__name__}: deserializing did not rebuild it"
    if lazy_variables:
        clone(*args, **kwargs)
    assert len(clone.weights) == len(layer.weights), f"{type(layer).__name__}: rebuilt without all its variables"
    clone.set_weights(layer.get_weights())
    assert_same_outputs(clone(*args, **kwargs), want, rtol=0.0, what=f"{type(layer).__name__} round trip")


def assert_xla_matches_eager(fn, *args, rtol: float, want=None, what: str = "xla") -> None:
    """`fn(*args)` eager vs `tf.function(fn, jit_compile=True)`; `want` if already run."""
    import tensorflow as tf

    want = fn(*args) if want is None else want
    got = tf.function(fn, jit_compile=True, autograph=False)(*args)
    assert_same_outputs(got, want, rtol, what)


def assert_mixed_precision(make, args, kwargs, dtype: str) -> None:
    """A fresh `make()` under `mixed_bfloat16`: float32 variables, finite floating outputs,
    the first of them in `dtype` (what the layer promises: bfloat16 activations, float32
    logits)."""
    import keras

    with mixed_bfloat16():
        layer = make()
        outputs = [y for y in keras.tree.flatten(layer(*args, **kwargs))
                   if keras.backend.is_float_dtype(keras.backend.standardize_dtype(y.dtype))]
    name = type(layer).__name__
    assert outputs, f"{name}: no floating output"
    assert keras.backend.standardize_dtype(outputs[0].dtype) == dtype, f"{name}: {outputs[0].dtype} != {dtype}"
    assert all(np.isfinite(_numpy(y).astype(np.float32)).all() for y in outputs), f"{name}: not finite"
    assert layer.weights and all(v.dtype == "float32" for v in layer.weights), f"{name}: variables not float32"


def check_layer(make, *args, xla_rtol: float | None, mixed_dtype: str | None = "bfloat16",
                lazy_variables: bool = False, **kwargs):
    """The standard checks of a layer or model; returns the built instance and its outputs.

    Args:
      make: () -> a new, unbuilt layer (called twice: float32, then mixed_bfloat16).
      *args, **kwargs: its call arguments (closed over, not traced, under XLA).
      xla_rtol: tolerance of eager vs XLA (tests/tolerances.py); None: not compiled
        (e.g. a call with a Python-side cache index).
      mixed_dtype: the dtype of its first floating output under `mixed_bfloat16`; None:
        no mixed-precision run.
      lazy_variables: see `assert_config_round_trip`.
    """
    layer = make()
    want = layer(*args, **kwargs)
    assert_config_round_trip(layer, args, kwargs, want, lazy_variables=lazy_variables)
    if xla_rtol is not None:
        import tensorflow as tf

        tensors = [tf.constant(a) if isinstance(a, np.ndarray) else a for a in args]
        assert_xla_matches_eager(lambda *a: layer(*a, **kwargs), *tensors, rtol=xla_rtol, want=want,
                                 what=f"{type(layer).__name__} xla")
    if mixed_dtype is not None:
        assert_mixed_precision(make, args, kwargs, mixed_dtype)
    return layer, want


# ------------------------------------------------------------------ static import check


def _module_level(tree: ast.Module):
    """Nodes outside function bodies: what runs when the module is imported."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _imports(nodes):
    """Absolute module names imported by `nodes` (`__import__("x")` included)."""
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module or ""
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__" and node.args
              and isinstance(node.args[0], ast.Constant)):
            yield str(node.args[0].value)


def _module_file(name: str) -> Path:
    path = REPO / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def assert_no_tensorflow(files=(), modules=(), forbidden=FORBIDDEN) -> set[str]:
    """Static, so it runs where JAX is not installed: `files` (repo-relative) import nothing
    `forbidden` anywhere, not even inside functions; importing `modules` runs no forbidden
    import (module-level code of every mmt module reached, the packages on the way
    included). Returns the mmt modules reached."""
    for file in files:
        for name in _imports(ast.walk(ast.parse((REPO / file).read_text()))):
            assert name.split(".")[0] not in forbidden, f"{file} imports {name}"
    seen, todo = set(), list(modules)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            module = ".".join(parts[:i])
            if module in seen or not _module_file(module).is_file():
                continue
            seen.add(module)
            for name in _imports(_module_level(ast.parse(_module_file(module).read_text()))):
                assert name.split(".")[0] not in forbidden, f"{module} imports {name} at import time"
                if name.split(".")[0] in ("mmt", "beam_pipelines"):
                    todo.append(name)
    assert seen >= set(modules), f"not found: {set(modules) - seen}"
    return seen


# ------------------------------------------------------------------ the shared JAX worker

_JAX_CHECKS: dict[str, dict] = {}


def jax_check(*, modules=(), forbid=("tensorflow",), rtol: float = 0.0, call: str = "obj(*args, **kwargs)",
              code: str | None = None):
    """Decorates a test into a case of the session's one JAX subprocess.

    The worker imports `modules` (cases forbidding "keras" first, before anything imports
    it) and asserts none of `forbid` is loaded, then and after the case ran. The decorated
    function (no fixtures) returns None for an import-only check, or `(obj, args, kwargs)`:
    a built Keras layer / model that the worker rebuilds from its config and weights;
    `call` (an expression of obj, args, kwargs and the imported modules, by last name)
    must then give the same outputs under JAX as here, to `rtol` (tests/tolerances.py).
    `code`, if given, is a script the worker runs (modules in scope) after the imports;
    it must not raise.
    """
    def decorate(build):
        name = f"{build.__module__}.{build.__name__}"
        _JAX_CHECKS[name] = dict(modules=tuple(modules), forbid=tuple(forbid), call=call, code=code, build=build)

        @functools.wraps(build)
        def test():
            import importlib.util

            import pytest

            if "keras" not in forbid and importlib.util.find_spec("jax") is None:
                pytest.skip("jax is not installed")
            want, got = _jax_results()[name]
            assert not isinstance(got, str), f"under KERAS_BACKEND=jax:\n{got}"
            if want is not None:
                assert_same_outputs(got, want, rtol, f"{name}: jax vs tensorflow")

        return test

    return decorate


def _namespace(modules):
    import importlib

    return {m.rsplit(".", 1)[-1]: importlib.import_module(m) for m in modules}


@functools.cache
def _jax_results() -> dict:
    """name -> (want, got) of every registered case, computed once per test session.

    Under pytest-xdist every worker collects every case; the first worker to get here
    builds and runs them all, the others wait on a lock and read its results (its
    `want`s too: weights are built once), so the JAX worker starts once per session.
    """
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        return _compute_jax_results()
    import fcntl

    shared = Path(tempfile.gettempdir()) / f"mmt-jax-checks-{run}.pkl"
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shared.is_file():
            return pickle.loads(shared.read_bytes())  # written by this session's other worker
        results = _compute_jax_results()
        shared.write_bytes(pickle.dumps(results))
        return results


def _compute_jax_results() -> dict:
    """Builds every registered case here, runs them all in one worker: name -> (want, got)."""
    import keras

    cases, wants = [], {}
    for name, case in _JAX_CHECKS.items():
        payload = dict(name=name, modules=case["modules"], forbid=case["forbid"], call=case["call"],
                       code=case["code"])
        try:
            built = case["build"]()
            if built is not None:
                obj, args, kwargs = built
                args, kwargs = keras.tree.map_structure(_as_numpy, (tuple(args), dict(kwargs)))
                wants[name] = _flat(eval(case["call"], _namespace(case["modules"]),
                                         dict(obj=obj, args=args, kwargs=kwargs)))
                payload.update(config=keras.saving.serialize_keras_object(obj), weights=obj.get_weights(),
                               args=args, kwargs=kwargs)
        except Exception:  # noqa: BLE001 - reported by that case's test
            wants[name] = traceback.format_exc()
        cases.append(payload)
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = Path(tmp) / "cases.pkl", Path(tmp) / "results.pkl"
        inputs.write_bytes(pickle.dumps(cases))
        env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run([sys.executable, __file__, str(inputs), str(outputs)], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        got = pickle.loads(outputs.read_bytes()) if outputs.is_file() else {}
    failed = f"the JAX worker exited with {done.returncode}:\n{done.stderr[-3000:]}"
    results = {}
    for case in cases:
        want = wants.get(case["name"])
        if isinstance(want, str):
            results[case["name"]] = (None, f"building it under TensorFlow failed:\n{want}")
        else:
            results[case["name"]] = (want, got.get(case["name"], failed))
    return results


def _as_numpy(x):
    return _numpy(x) if hasattr(x, "shape") and hasattr(x, "dtype") else x


def _run_case(case) -> list | None:
    """In the worker: the case's imports (checked), then its forward under JAX."""
    namespace = _namespace(case["modules"])
    loaded = set(case["forbid"]) & set(sys.modules)
    assert not loaded, f"importing {case['modules']} imported {sorted(loaded)}"
    if case["code"]:
        exec(case["code"], dict(namespace))
    if "config" not in case:
        return _none_loaded(case)
    import keras

    config = case["config"]
    try:
        obj = keras.saving.deserialize_keras_object(config)
    except TypeError:  # not registered as serializable (DVAE): its class, from its module
        obj = getattr(_namespace([config["module"]])[config["module"].rsplit(".", 1)[-1]],
                      config["class_name"]).from_config(config["config"])
    local = dict(obj=obj, args=case["args"], kwargs=case["kwargs"])
    if not obj.built:
        eval(case["call"], namespace, local)  # creates the variables
    obj.set_weights(case["weights"])
    outputs = _flat(eval(case["call"], namespace, local))
    _none_loaded(case)
    return outputs


def _none_loaded(case) -> None:
    loaded = set(case["forbid"]) & set(sys.modules)
    assert not loaded, f"running {case['name']} imported {sorted(loaded)}"


def _worker(inputs: str, outputs: str) -> None:
    cases = pickle.loads(Path(inputs).read_bytes())
    cases.sort(key=lambda case: "keras" not in case["forbid"])  # keras-free imports first
    results = {}
    for case in cases:
        try:
            results[case["name"]] = _run_case(case)
        except Exception:  # noqa: BLE001 - reported by that case's test
            results[case["name"]] = traceback.format_exc()
    Path(outputs).write_bytes(pickle.dumps(results))


if __name__ == "__main__":
    _worker(*sys.argv[1:])


def distribute_shards(strategy, batch, stream: str = "paired"):
    """`{stream: batch}` split into equal consecutive slices, slice r on replica r of `strategy`.

    Args:
      batch: name -> array, every array with a leading batch axis divisible by the
        strategy's replica count.

    Returns:
      The distributed `{stream: {name: tensor}}` a trainer's `train_step` takes.
    """
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    shards = [{k: np.split(np.asarray(v), replicas)[r] for k, v in batch.items()} for r in range(replicas)]
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: {stream: tf.nest.map_structure(tf.constant, shards[ctx.replica_id_in_sync_group])})
