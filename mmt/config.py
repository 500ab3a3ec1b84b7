"""Gin plumbing shared by every entry point: flags, strict parsing, config files.

Every entry point (`mmt.quickstart`, `mmt.train`, ...) takes the same flags::

    --gin_file=FILE    repeatable; a path, or a path relative to the repo's gin/ folder
    --gin_param=B      repeatable; one binding, e.g. 'TRAIN_STEPS = 1000'
    --workdir=DIR      where everything the run writes goes

Parsing is strict so that a typo fails before any work starts:

* gin itself rejects unknown configurables, unknown parameters of functions without
  `**kwargs`, undefined macros and `%gin.REQUIRED` bindings nobody overrode;
* gin silently accepts *any* parameter of a callable that takes `**kwargs` (every Keras
  layer does). `_strict_parameters_hook` closes that hole: a bound parameter must be
  named in the signature of the callable or, for a class, of an `__init__` somewhere
  in its MRO.

Configurables are registered in `mmt.configurables` (never in library modules); entry
points register their own run function with `gin.external_configurable`.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
from pathlib import Path
from typing import Sequence

import gin

# The repo's gin/ folder (present in a source checkout and an editable install).
GIN_DIR = Path(__file__).resolve().parent.parent / "gin"

OPERATIVE_CONFIG = "operative_config.gin"
FULL_CONFIG = "config.gin"


class ConfigError(ValueError):
    """A gin file or binding is wrong; the message names the file or binding."""


def add_flags(parser: argparse.ArgumentParser, *, default_workdir: str | None = None) -> None:
    """Adds --gin_file, --gin_param and --workdir to `parser`."""
    parser.add_argument(
        "--gin_file",
        action="append",
        default=[],
        help="Gin file (repeatable). Relative paths are tried in the working directory, "
        f"then in {GIN_DIR}.",
    )
    parser.add_argument(
        "--gin_param",
        action="append",
        default=[],
        help="Gin binding (repeatable), e.g. --gin_param='TRAIN_STEPS = 1000'.",
    )
    parser.add_argument(
        "--workdir",
        default=default_workdir,
        required=default_workdir is None,
        help="Directory for everything the run writes."
        + (f" Default: {default_workdir}" if default_workdir else ""),
    )


def resolve_gin_file(name: str | os.PathLike) -> Path:
    """Finds a gin file: as given, then relative to the repo's gin/ folder."""
    path = Path(name)
    candidates = [path]
    if not path.is_absolute():
        candidates.append(GIN_DIR / path)
        if path.parts and path.parts[0] == "gin":  # 'gin/x.gin' from outside the repo
            candidates.append(GIN_DIR / Path(*path.parts[1:]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()  # absolute: gin then reads it without searching
    raise ConfigError(
        f"gin file not found: {name} (looked in: {', '.join(str(c) for c in candidates)})"
    )


def parse(gin_files: Sequence[str | os.PathLike] = (), gin_params: Sequence[str] = ()) -> None:
    """Registers mmt's configurables, parses files then bindings, and locks the config.

    Any earlier config is cleared first, so an entry point can run twice in one process
    (a notebook).

    Raises:
      ConfigError: naming the file or binding at fault, before anything runs.
    """
    import mmt.configurables  # noqa: F401  (registers the configurables)

    reset()
    prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
    if str(GIN_DIR) not in prefixes:
        # First, not appended: gin tries each prefix in order and logs an alarming
        # "Path not found" for every miss before it reaches mmt's own files.
        prefixes.insert(0, str(GIN_DIR))
    files = [str(resolve_gin_file(f)) for f in gin_files]
    try:
        gin.parse_config_files_and_bindings(files, list(gin_params), finalize_config=True)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError, SyntaxError, IOError) as e:
        where = f" (files: {', '.join(files) or 'none'}; params: {list(gin_params) or 'none'})"
        raise ConfigError(f"{e}{where}") from e


def configurable_entry(fn, name: str):
    """Registers an entry point's run function with gin (once) and returns the wrapper.

    Entry points are gin's outermost callables; registering them here, rather than in
    `mmt.configurables`, keeps `python -m mmt.X` from importing module X twice.
    """
    registry = gin.config._REGISTRY  # pylint: disable=protected-access
    if name in registry:
        return registry[name].wrapper
    return gin.external_configurable(fn, name)


def reset() -> None:
    """Clears all bindings and unlocks the config (tests, notebooks)."""
    gin.clear_config(clear_constants=False)


def write_config(workdir: str | os.PathLike, *, operative: bool = False) -> Path:
    """Writes the parsed config (or, after the run, the operative one) into `workdir`.

    The full config is written before work starts; the operative config -- only the
    bindings that were actually used, with defaults filled in -- after it, so that a
    run can be reproduced from its workdir alone.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / (OPERATIVE_CONFIG if operative else FULL_CONFIG)
    text = gin.operative_config_str() if operative else gin.config_str()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _named_parameters(fn_or_cls) -> tuple[set[str], bool]:
    """Parameter names accepted by a configurable, and whether **kwargs leaks out.

    For a class, `**kwargs` is followed up the MRO: a Keras layer's `**kwargs` go to
    `Layer.__init__`, whose named parameters (name, dtype, trainable, ...) count.
    """
    if inspect.isclass(fn_or_cls):
        names: set[str] = set()
        for klass in inspect.getmro(fn_or_cls):
            init = klass.__dict__.get("__init__")
            if init is None or init is object.__init__:
                continue
            try:
                spec = inspect.getfullargspec(inspect.unwrap(init))
            except TypeError:
                continue
            names.update(spec.args[1:])
            names.update(spec.kwonlyargs)
            if not spec.varkw:
                return names, False
        return names, True
    fn = inspect.unwrap(fn_or_cls)
    try:
        spec = inspect.getfullargspec(fn)
    except TypeError:
        spec = inspect.getfullargspec(fn.__call__)
    return set(spec.args) | set(spec.kwonlyargs), bool(spec.varkw)


@gin.config.register_finalize_hook
def _strict_parameters_hook(config):
    """Rejects bindings of parameters that only a `**kwargs` would swallow."""
    registry = gin.config._REGISTRY  # pylint: disable=protected-access
    for (scope, selector), params in config.items():
        if selector not in registry:
            continue  # gin reports unknown configurables itself
        configurable = registry[selector]
        if configurable.wrapped is gin.config.macro or configurable.module == "gin":
            continue
        names, _ = _named_parameters(configurable.wrapped)
        for param in params:
            if param in names:
                continue
            key = f"{scope + '/' if scope else ''}{configurable.name}.{param}"
            close = difflib.get_close_matches(param, sorted(names), n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown gin parameter '{key}': {configurable.name} takes no parameter "
                f"named '{param}'{hint}"
            )
    return None
