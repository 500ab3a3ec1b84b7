"""Captioning metrics of the COCO caption evaluation server, via pycocoevalcap.

    scores = caption_metrics({image_id: [reference, ...]}, {image_id: candidate})
    -> {"BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr-D", "METEOR"?}

Both sides go through pycocoevalcap's `PTBTokenizer` (Stanford CoreNLP's PTB
tokenizer, lower-cased, punctuation removed: the server's rules), which needs Java.
`Cider` in pycocoevalcap is CIDEr-D (Vedantam et al., 2015: Gaussian length penalty
σ = 6, clipped n-gram counts, ×10, IDF from the reference set being scored). BLEU is
corpus-level with the closest reference length. METEOR runs when Java is present;
SPICE is skipped (it downloads a Stanford model on first use, impossible offline),
with a message in `skipped`.

The COCO reference format is the `captions_*.json` of the COCO release (or a
Karpathy split written in it): `{"images": [{"id", "file_name"}, ...],
"annotations": [{"image_id", "caption"}, ...]}`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from mmt.errors import UserError


def java_available() -> bool:
    return shutil.which("java") is not None


def read_coco_references(path: str | os.PathLike) -> tuple[dict, dict]:
    """(image_id -> [captions], image_id -> file_name) of a COCO captions file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"reference captions file {path} not found")
    try:
        data = json.loads(path.read_text())
        references: dict = defaultdict(list)
        for annotation in data["annotations"]:
            references[annotation["image_id"]].append(str(annotation["caption"]))
        files = {image["id"]: image.get("file_name") for image in data.get("images", [])}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a COCO captions file ({{'annotations': [{{'image_id', 'caption'}}]}}): "
                        f"{e!r}") from e
    if not references:
        raise UserError(f"{path} has no caption annotations")
    return dict(references), files


def read_json(path: str | os.PathLike, what: str):
    """The JSON document at `path`; a missing or malformed file is a `UserError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e


def read_predictions(path: str | os.PathLike) -> dict:
    """image_id -> caption from a COCO results file (`[{"image_id", "caption"}]`) or a
    `{image_id: caption}` JSON object (keys that look like integers become integers)."""
    data = read_json(path, "predicted captions file")
    if isinstance(data, list):
        try:
            return {item["image_id"]: str(item["caption"]) for item in data}
        except (KeyError, TypeError) as e:
            raise UserError(f"{path}: a list must hold {{'image_id', 'caption'}} records: {e!r}") from e
    if isinstance(data, dict):
        return {(int(k) if str(k).lstrip("-").isdigit() else k): str(v) for k, v in data.items()}
    raise UserError(f"{path}: expected a list of results or an object of captions")


def caption_metrics(references: Mapping, candidates: Mapping, meteor: bool | None = None) -> dict:
    """COCO caption metrics of `candidates` (image_id -> caption) against `references`.

    Args:
      references: image_id -> list of reference captions (every candidate's id must be here).
      candidates: image_id -> one generated caption.
      meteor: run METEOR (Java); None: when Java is present.

    Returns:
      {"BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr-D", ["METEOR"], "num_images", "skipped": {metric: why}}.
    """
    if not java_available():
        raise UserError("caption metrics need Java (pycocoevalcap's PTB tokenizer runs Stanford CoreNLP): "
                        "install a JRE, e.g. `apt-get install default-jre-headless`")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as e:
        raise UserError(f"caption metrics need pycocoevalcap: pip install 'mmt[eval]' ({e})") from e
    missing = [k for k in candidates if k not in references]
    if missing:
        raise UserError(f"{len(missing)} predicted image ids have no reference captions, e.g. {missing[:3]}")
    if not candidates:
        raise UserError("no predicted captions to score")
    ids = list(candidates)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": candidates[i]}] for i in ids})
    scores: dict = {"num_images": len(ids), "skipped": {}}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, 1):
        scores[f"BLEU-{n}"] = float(value)
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    if meteor is None or meteor:
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            scorer = Meteor()
            try:
                scores["METEOR"] = float(scorer.compute_score(gts, res)[0])
            finally:
                close = getattr(scorer, "close", None)
                if close:
                    close()
        except Exception as e:  # METEOR's Java subprocess is fragile; the other metrics stand
            scores["skipped"]["METEOR"] = f"METEOR failed: {e!r}"
    scores["skipped"]["SPICE"] = "SPICE skipped: it downloads a Stanford CoreNLP model on first use (no network)"
    return scores


def print_table(scores: Mapping, names: Sequence[str] = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")) -> None:
    for name in names:
        if name in scores:
            print(f"{name:<8} {100 * scores[name]:7.2f}")
    for name, why in scores.get("skipped", {}).items():
        print(f"{name:<8} {why}")


__all__ = ["caption_metrics", "java_available", "print_table", "read_coco_references", "read_predictions"]
