"""Every benchmark prints its command first and ends with one JSON line (benchmarks/common.py)."""

import ast
import importlib.util
import json
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _common():
    # By path: tests import no `benchmarks` module (tests/test_layout.py).
    spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_prints_its_command_and_reports():
    scripts = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "common.py")
    assert scripts
    missing = []
    for path in scripts:
        called = {node.func.attr for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and isinstance(node.func.value, ast.Name) and node.func.value.id == "common"}
        missing += [f"{path.name} never calls common.{name}" for name in ("print_command", "report")
                    if name not in called]
    assert not missing, missing


def test_report_prints_one_json_line_with_the_four_keys(capsys):
    _common().report("example", {"images_per_s": 12.5, "ratio": 0.9}, ["--count=3"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert set(line) == {"benchmark", "command", "machine", "figures"}
    assert line["benchmark"] == "example" and line["command"].endswith(" --count=3")
    assert line["figures"] == {"images_per_s": 12.5, "ratio": 0.9}
    assert line["machine"]["matmul_fp32_gflops"] > 0
