"""The package layout's arrows: which part of mmt may import which (README, "Layout").

Arrows run one way, `layers -> models -> tasks -> training`; `data` and `tokenizers`
never import training. Every import counts, including the lazy ones inside functions.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MMT = ROOT / "mmt"

_BASE = {"backend", "errors"}
_MODEL_PARTS = _BASE | {"layers", "losses", "sampling", "tokenizers", "data"}
#: part of mmt -> the parts it may import (besides itself). Entry points may import anything.
ALLOWED = {
    "errors": set(),
    "backend": set(),
    "layers": _BASE,
    "sampling": _BASE,
    "optimizers": _BASE,
    "data": _BASE,
    "losses": _BASE | {"layers"},
    "tokenizers": _BASE | {"layers", "losses", "data"},
    "models": _MODEL_PARTS - {"data"},
    "tasks": _MODEL_PARTS | {"models", "optimizers"},
    "training": _MODEL_PARTS | {"models", "optimizers", "tasks"},
    "evaluation": _MODEL_PARTS | {"models", "tasks", "restore"},
    "restore": _BASE | {"config", "configurables", "tasks", "training"},
    "config": _BASE | {"configurables"},
    "configurables": _MODEL_PARTS | {"models", "optimizers", "tasks", "training"},
}
ENTRY_POINTS = {"train", "generate", "evaluate", "quickstart"}
#: What the Beam pipelines may use of mmt: records, tokenizers, errors.
BEAM_ALLOWED = {"data", "tokenizers", "errors"}


def _part(name: str) -> str | None:
    """`mmt.x.y` -> "x" when x is a package or module of mmt, else None."""
    parts = name.split(".")
    if parts[0] != "mmt" or len(parts) < 2:
        return None
    return parts[1] if (MMT / parts[1]).is_dir() or (MMT / f"{parts[1]}.py").is_file() else None


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, part of mmt) for every import of mmt in `path`, function bodies included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found += [(node.lineno, part) for part in {_part(n) for n in names} - {None}]
    return found


def _crossings(files, owner, allowed) -> list[str]:
    bad = []
    for path in files:
        mine = owner(path)
        for line, part in _imports(path):
            if part != mine and part not in allowed(mine):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({mine} -> {part})")
    return bad


def _owner(path: pathlib.Path) -> str:
    return path.relative_to(MMT).with_suffix("").parts[0]


def test_every_part_of_mmt_has_a_rule():
    parts = {_owner(p) for p in MMT.rglob("*.py")} - {"__init__", "__main__"}
    assert parts <= set(ALLOWED) | ENTRY_POINTS, sorted(parts - set(ALLOWED) - ENTRY_POINTS)


def test_imports_follow_the_arrows():
    files = [p for p in sorted(MMT.rglob("*.py")) if _owner(p) not in ENTRY_POINTS | {"__init__", "__main__"}]
    bad = _crossings(files, _owner, lambda mine: ALLOWED[mine])
    assert not bad, "imports against the layout's arrows (README, Layout):\n" + "\n".join(bad)


def test_beam_pipelines_use_records_and_tokenizers_only():
    bad = _crossings(sorted((ROOT / "beam_pipelines").rglob("*.py")), lambda p: "beam_pipelines",
                     lambda mine: BEAM_ALLOWED)
    assert not bad, bad


def test_benchmarks_and_tests_use_public_names_and_no_benchmark_script():
    bad = []
    for folder in ("benchmarks", "tests", "colab"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmt"):
                    bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}"
                            for a in node.names if a.name.startswith("_")]
                if isinstance(node, (ast.Import, ast.ImportFrom)) and folder != "benchmarks":
                    modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {m}" for m in modules
                            if m.split(".")[0] == "benchmarks"]
                if (folder == "benchmarks" and isinstance(node, ast.Attribute) and node.attr.startswith("_")
                        and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                        and node.value.id in {"quickstart", "mmt_config", "trainer"}):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, bad


def test_the_arrow_check_catches_a_forbidden_import(tmp_path):
    sample = tmp_path / "mmt" / "data" / "bad.py"
    sample.parent.mkdir(parents=True)
    sample.write_text("def f():\n    from mmt.training.trainer import Trainer\n")
    imports = _imports(sample)
    assert imports == [(2, "training")]
    assert "training" not in ALLOWED["data"] and "training" not in ALLOWED["tokenizers"]
