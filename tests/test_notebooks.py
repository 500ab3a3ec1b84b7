"""The Colab notebooks (`colab/*.ipynb`): executed headless at tiny settings, and kept clean.

Each notebook has a code cell tagged `parameters` (papermill's convention) holding its sizes;
the execution test injects `TINY[notebook]` right after it, so every notebook runs
unchanged at a few training steps. Add a notebook's tiny settings here when adding one.
"""

from __future__ import annotations

import ast
import datetime
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell, at tiny settings on 2 busy cores
MAX_CELL_LINES = 25
ALLOWED_IMPORTS = {"mmt", "beam_pipelines", "numpy", "IPython"}
EAGER = "Trainer.mode = 'eager'"  # a few steps: tracing a graph costs more than it saves
TINY_STEPS = ["Trainer.checkpoint_every = 2", "Trainer.log_every = 1", "Trainer.image_every = 0", EAGER]

#: notebook stem -> (source of the injected cell, keys the last JSON line printed must hold).
TINY = {
    "quickstart": ("DATA_ONLY = True", {"records", "samples_png", "vocabulary", "data_dir"}),
    "itit": (f"""
EXAMPLES = {{"paired": 32, "image_only": 32, "text_only": 32, "eval": 8}}
VQGAN_STEPS, ITIT_STEPS, CYCLE_START, EVAL_EXAMPLES = 2, 2, 2, 2
TRAINER_PARAMS = {TINY_STEPS!r}
PROMPTS = PROMPTS[:2]
""", {"step", "prompts", "captions"}),
    "upgen": (f"""
EXAMPLES = {{"paired": 32, "image_only": 32, "text_only": 32}}
VQGAN_STEPS, UPGEN_STEPS = 2, 2
TRAINER_PARAMS = {TINY_STEPS!r}
UPGEN_PARAMS = ["UPGenTask.compile_inference = False", "SIZE_OVERRIDES = {{'width': 32, 'depth': 1, 'heads': 2}}"]
PROMPTS = PROMPTS[:2]
""", {"step", "prompts", "captions", "unconditional"}),
    "tokenizers": (f"""
IMAGES, VQGAN_STEPS, DVAE_STEPS = 32, 2, 2
TRAINER_PARAMS = {TINY_STEPS!r}
""", {"vqgan", "dvae"}),
    "m3ae": (f"""
EXAMPLES = {{"paired": 32, "image_only": 32, "text_only": 32, "eval": 8}}
M3AE_STEPS, EVAL_IMAGES, PROBE_TRAIN, PROBE_TEST = 2, 2, 48, 24
TRAINER_PARAMS = {TINY_STEPS!r}
M3AE_PARAMS = ["PAIRED_BATCH = 8", "IMAGE_ONLY_BATCH = 4", "TEXT_ONLY_BATCH = 4"]
""", {"step", "filled", "probe"}),
    "dalle": (f"""
EXAMPLES = {{"paired": 32, "image_only": 32, "text_only": 32}}
DVAE_STEPS, DALLE_STEPS, CLIP_STEPS = 2, 2, 2
TRAINER_PARAMS = {TINY_STEPS!r}
DVAE_PARAMS = ["DVAE.width = 8", "DVAE.decoder_input_width = 8", "BATCH_SIZE = 4"]
DALLE_PARAMS = ["SIZE_OVERRIDES = {{'width': 32, 'depth': 2, 'heads': 2}}", "BATCH_SIZE = 4"]
CLIP_PARAMS = ["SIZE_OVERRIDES = {{'width': 32, 'depth': 1, 'heads': 2, 'text_width': 32, 'text_depth': 1, "
               "'text_heads': 2, 'embed_dim': 16}}", "PAIRED_BATCH = 4"]
PROMPTS, NUM_SAMPLES, KEEP, EVAL_CAPTIONS = PROMPTS[:2], 2, 1, 2
""", {"step", "prompts", "reranked", "accuracy"}),
    "beam": ("""
NUM_IMAGES = 24
BEAM_FLAGS = ["--direct_running_mode=in_memory"]
""", {"stats", "manifest_keys"}),
}


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _code(cell: dict) -> str:
    return "".join(cell["source"])


def _imports(source: str) -> set[str]:
    # IPython magics (`!pip ...`, `%cd ...`) are not Python; the committed ones are comments anyway.
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("!", "%"))]
    names = set()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


def test_every_notebook_has_tiny_settings():
    assert NOTEBOOKS, "no notebooks in colab/"
    missing = {p.stem for p in NOTEBOOKS} - set(TINY)
    assert not missing, f"add the tiny settings of {sorted(missing)} to TINY"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_and_only_imports_mmt(path):
    notebook = _read(path)
    code_cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    for i, cell in enumerate(code_cells):
        assert cell.get("outputs") == [], f"{path.name} code cell {i}: outputs not stripped"
        assert cell.get("execution_count") is None, f"{path.name} code cell {i}: execution count not null"
        lines = _code(cell).splitlines()
        assert len(lines) <= MAX_CELL_LINES, (f"{path.name} code cell {i}: {len(lines)} lines (at most "
                                              f"{MAX_CELL_LINES}: logic belongs in the library)")
        foreign = {m for m in _imports(_code(cell)) if m not in ALLOWED_IMPORTS | set(sys.stdlib_module_names)}
        assert not foreign, f"{path.name} code cell {i} imports {sorted(foreign)}: notebooks only import mmt"
    first = _code(code_cells[0])
    assert "# !git clone" in first and "pip install" in first and "import mmt" in first, (
        f"{path.name}: the first code cell holds the commented Colab install lines, then `import mmt`")
    tagged = [c for c in code_cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one code cell tagged `parameters`"
    assert "TINY_STEPS" not in _code(tagged[0])


def _time(stamp: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _last_json_line(outputs) -> dict | None:
    """The last line printed to stdout that is a JSON object (each notebook prints a summary)."""
    lines = [line for o in outputs if o.output_type == "stream" and o.name == "stdout" for line in o.text.splitlines()]
    for line in reversed(lines):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _execute(path: Path, workdir: Path):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")

    notebook = nbformat.read(path, as_version=4)
    index = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
    source, _ = TINY[path.stem]
    injected = nbformat.v4.new_code_cell("# Injected by tests/test_notebooks.py\n" + source.strip())
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(index + 1, injected)
    # The kernel (this interpreter) sees this checkout whether or not mmt is installed from it.
    # One BLAS thread: numpy's tiny products (the linear probe's L-BFGS in m3ae.ipynb) ran 15-20x
    # slower with a thread per core on busy cores. TensorFlow has its own thread pools.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OPENBLAS_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute(env=env)
    finally:  # the executed notebook, outputs and all, for a look after a failure
        nbformat.write(notebook, workdir / f"executed_{path.name}")
    return notebook


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless_at_tiny_settings(path, tmp_path):
    notebook = _execute(path, tmp_path)  # a cell that raises fails here (CellExecutionError)
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    for i, cell in enumerate(code_cells):  # where the time goes (pytest -s shows it)
        timing = cell.metadata.get("execution", {})
        if "iopub.status.busy" in timing and "iopub.status.idle" in timing:
            seconds = (_time(timing["iopub.status.idle"]) - _time(timing["iopub.status.busy"])).total_seconds()
            print(f"{path.name} code cell {i}: {seconds:.1f}s")
    outputs = [o for c in code_cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data"), (
        f"{path.name}: no image displayed")
    result = _last_json_line(outputs)
    assert result is not None, f"{path.name}: no JSON summary printed"
    _, keys = TINY[path.stem]
    assert keys <= set(result), f"{path.name}: the summary lacks {sorted(keys - set(result))}"
    if path.stem == "beam":  # the bad rows were filtered or dead-lettered, none lost
        stats = result["stats"]
        assert stats["inputs"] == stats["written"] + stats["filtered"] + stats["dead_lettered"]
        assert stats["dead_lettered"] > 0 and stats["filtered"] > 0 and stats["written"] > 0
    if path.stem == "m3ae":  # two eval captions filled; both poolings probed on every attribute
        assert result["step"] == 2 and len(result["filled"]) == 2 and all(result["filled"])
        assert set(result["probe"]) == {"cls", "mean"}
        for accuracies in result["probe"].values():
            assert set(accuracies) == {"shape", "color", "cell", "count", "mean"}
            assert all(0.0 <= a <= 1.0 for a in accuracies.values())
    if path.stem == "dalle":  # each prompt's best one of 2 kept; eval accuracy without and with reranking
        assert result["step"] == 2 and [len(scores) for scores in result["reranked"]] == [1, 1]
        assert set(result["accuracy"]) == {"no_rerank", "best_of_2"}
        assert all(0.0 <= r["attribute"] <= 1.0 for r in result["accuracy"].values())
    if path.stem == "tokenizers":
        assert result["vqgan"]["grid"] == [16, 16] and result["dvae"]["grid"] == [16, 16]
