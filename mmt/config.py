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
import contextlib
import difflib
import inspect
import io
import os
import tokenize
from pathlib import Path
from typing import Sequence

import gin

from mmt.errors import UserError, describe_binding  # noqa: F401  (part of this module's API)


def _gin_dir() -> Path:
    """mmt's gin files: shipped inside the package (`mmt/gin`, from a wheel; setup.py maps the
    repo's gin/ there), else the checkout's gin/ folder (a source tree or an editable install).
    Never `site-packages/gin`: that is the gin-config package itself."""
    here = Path(__file__).resolve().parent
    shipped = here / "gin"
    return shipped if shipped.is_dir() else here.parent / "gin"


GIN_DIR = _gin_dir()

OPERATIVE_CONFIG = "operative_config.gin"
FULL_CONFIG = "config.gin"


class ConfigError(UserError, ValueError):
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
    add_common_flags(parser)
    parser.add_argument(
        "--allow_unused_bindings",
        action="store_true",
        help="warn, instead of failing, about gin bindings and macros the run never uses "
        "(for overlay files shared by several models)",
    )
    parser.add_argument(
        "--workdir",
        default=default_workdir,
        required=default_workdir is None,
        help="Directory for everything the run writes."
        + (f" Default: {default_workdir}" if default_workdir else ""),
    )


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors follow `mmt.errors`: one `error: ...` line, exit 2, no usage dump."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Adds --verbose (tracebacks and TensorFlow's start-up lines; see `mmt.errors`)."""
    parser.add_argument("--verbose", action="store_true",
                        help="print tracebacks of errors and TensorFlow's native start-up lines")


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
    _LOCATIONS.clear()
    _REQUIRED.clear()
    try:
        with _recording_locations():
            gin.parse_config_files_and_bindings(files, list(gin_params), finalize_config=True)
    except ConfigError:
        raise
    except SyntaxError as e:
        # gin's SyntaxError carries the file (None for --gin_param) and the line.
        source = f"{e.filename}:{e.lineno}" if e.filename else f"--gin_param '{(e.text or '').strip()}'"
        raise ConfigError(f"gin syntax error in {source}: {e.msg}; fix the binding "
                          "(brackets, quotes and commas must balance)") from e
    except tokenize.TokenError as e:  # an unbalanced bracket or quote runs off the end
        culprit = next((p for p in gin_params if _unbalanced(p)), None)
        source = f"--gin_param '{culprit}'" if culprit is not None else f"one of {', '.join(files)}"
        raise ConfigError(f"gin syntax error in {source}: {e.args[0]} (an unbalanced bracket or quote); "
                          "fix the binding") from e
    except (ValueError, KeyError, TypeError, IOError) as e:
        where = f" (files: {', '.join(files) or 'none'}; params: {list(gin_params) or 'none'})"
        raise ConfigError(f"{e}{where}") from e


def _unbalanced(binding: str) -> bool:
    try:
        list(tokenize.generate_tokens(io.StringIO(binding + "\n").readline))
    except tokenize.TokenError:
        return True
    return False


# (scope, selector, parameter) of every parsed binding -> where it was written.
_LOCATIONS: dict[tuple[str, str, str], str] = {}
# Bindings that some file declared `%gin.REQUIRED`.
_REQUIRED: set[tuple[str, str, str]] = set()


@contextlib.contextmanager
def _recording_locations():
    """Records the file and line of each binding gin parses (gin keeps none of them).

    gin's parser calls `bind_parameter` inside `utils.try_with_location(location)`;
    both are looked up as module attributes at call time, so wrapping them here sees
    every binding with its location. A binding of --gin_param has no file name.
    """
    current = [None]
    original_try, original_bind = gin.utils.try_with_location, gin.config.bind_parameter

    @contextlib.contextmanager
    def try_with_location(location):
        current[0] = location
        with original_try(location):
            yield

    def bind_parameter(binding_key, value):
        original_bind(binding_key, value)
        try:
            pbk = gin.config.ParsedBindingKey.parse(binding_key)
            key = (pbk.config_key[0], pbk.config_key[1], pbk.arg_name)
        except (ValueError, KeyError):
            return
        if str(value) == "%gin.REQUIRED":
            _REQUIRED.add(key)
        location = current[0]
        filename = getattr(location, "filename", None)
        if filename:
            _LOCATIONS[key] = f"{filename}:{location.line_num}"  # 1-based already
        else:
            line = (getattr(location, "line_content", "") or "").strip()
            _LOCATIONS[key] = f"--gin_param '{line}'" if line else "--gin_param"

    gin.utils.try_with_location, gin.config.bind_parameter = try_with_location, bind_parameter
    try:
        yield
    finally:
        gin.utils.try_with_location, gin.config.bind_parameter = original_try, original_bind


def unused_bindings() -> list[str]:
    """Bindings and macros that nothing has used so far, each with where it was written.

    Compares everything parsed with gin's operative config (the bindings of configurables
    that were called, and the macros whose references were evaluated); call it once the
    run has built everything it will build.

    One exemption: a macro that an included file declares `%gin.REQUIRED` and a later
    file sets to `None` is unused on purpose (gin insists that every required macro be
    overridden, even one the including file no longer references: `itit_quickstart.gin`
    reads three directories instead of `DATA_DIR`).
    """
    config = gin.config._CONFIG  # pylint: disable=protected-access
    operative = gin.config._OPERATIVE_CONFIG  # pylint: disable=protected-access
    unused = []
    for (scope, selector), params in config.items():
        used = operative.get((scope, selector), {})
        for param, value in params.items():
            if param in used:
                continue
            if selector == "gin.macro" and value is None and (scope, selector, param) in _REQUIRED:
                continue
            if selector == "gin.macro":
                name = f"macro {scope}"
            else:
                short = selector.rsplit(".", 1)[-1]
                name = f"{scope + '/' if scope else ''}{short}.{param}"
            where = _LOCATIONS.get((scope, selector, param), "unknown file")
            unused.append(f"{name} ({where})")
    return unused


def check_unused_bindings(allow: bool = False, what: str = "this run") -> None:
    """Fails (or, with `allow`, warns) about bindings `unused_bindings` reports.

    A misspelled macro (`TRAIN_STEPZ = 5`) or a binding of a configurable that the run
    never calls (`Adafactor.learning_rate` under an Adam config) would otherwise be
    ignored silently.
    """
    unused = unused_bindings()
    if not unused:
        return
    listed = "; ".join(unused)
    if allow:
        import warnings

        warnings.warn(f"gin bindings unused by {what}: {listed}", stacklevel=2)
        return
    raise ConfigError(
        f"gin bindings unused by {what}: {listed}. Fix or remove them (a misspelled macro or "
        "a configurable this model does not build), or pass --allow_unused_bindings for "
        "overlay files shared by several models"
    )


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
