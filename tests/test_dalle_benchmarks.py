"""benchmarks/dalle_shapes.py at toy size: the scoring path (DALL-E samples, CLIP reranking at
N = 1 / 4 / 16, retrieval) on untrained exports, ending with its JSON line.

The training chain (`--root`: dVAE, token records, DALL-E, CLIP through `mmt.train`) is the
same code with three subprocesses in front; its toy run (`--root=... --steps=2 --smoke
--data_scale=0.02 --examples=8`, about 4 minutes on 2 loaded cores) is too slow for the suite.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    sys.path.insert(0, str(REPO / "benchmarks"))  # for its `import common`
    spec = importlib.util.spec_from_file_location("dalle_shapes", REPO / "benchmarks" / "dalle_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dalle_shapes_scores_untrained_exports_and_prints_its_json_line(tiny_data, tmp_path, capsys):
    from dalle_exports import make_exports

    make_exports(tiny_data["vocabulary"], tmp_path)
    module = _benchmark()
    assert module.main(["--dalle", str(tmp_path / "dalle"), "--clip", str(tmp_path / "clip"), "--examples", "5",
                        "--output_dir", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("command: python ")
    report = json.loads(lines[-1])
    figures = report["figures"]
    assert report["benchmark"] == "dalle_shapes" and figures["examples"] == 5
    assert set(figures["rerank"]) == {"1", "4", "16"}
    assert figures["no_rerank"]["num_examples"] == 5 * 16 and figures["rerank"]["16"]["num_examples"] == 5
    for n in ("1", "4", "16"):
        assert 0.0 <= figures["rerank"][n]["attribute"] <= 1.0
    # Nested draws: the best of 16 scores at least the best of 4, which scores at least the first.
    clip_scores = [figures["rerank"][n]["clip_score"] for n in ("1", "4", "16")]
    assert clip_scores == sorted(clip_scores)
    assert set(figures["clip_retrieval"]) == {"recall@1", "recall@5", "gallery"}
    assert 0.0 <= figures["clip_retrieval"]["recall@1"] <= figures["clip_retrieval"]["recall@5"] <= 1.0
    assert (tmp_path / "out" / "samples.png").is_file()
    assert np.isfinite(json.loads((tmp_path / "out" / "dalle_shapes.json").read_text())["rerank"]["16"]["clip_score"])
