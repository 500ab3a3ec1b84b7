"""COCO evaluation files: Karpathy's split as COCO-format captions.

    python -m mmt.evaluation.coco dataset_coco.json --split=test --output=karpathy_test.json

Captioning results are reported on the Karpathy split of COCO (Karpathy & Fei-Fei,
2015: 5,000 val2014 images for test, 5,000 for val, the rest for training), distributed
as `dataset_coco.json`: `{"images": [{"cocoid", "filepath", "filename", "split",
"sentences": [{"raw"}, ...]}]}`. This writes one split in the COCO captions format
that `mmt.evaluate captions --references` and `beam_pipelines.tokenize --source=coco`
read: `{"images": [{"id", "file_name"}], "annotations": [{"id", "image_id", "caption"}]}`
with `file_name` relative to the COCO root (`val2014/COCO_val2014_....jpg`).
`--split=train` includes Karpathy's `restval` images, as is customary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmt.errors import UserError
from mmt.evaluation.captions import read_json

SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def karpathy_to_coco(dataset: dict, split: str) -> dict:
    """Karpathy's `dataset_coco.json` contents -> a COCO captions dict of one split."""
    if split not in SPLITS:
        raise UserError(f"unknown Karpathy split {split!r} (one of {sorted(SPLITS)})")
    images, annotations = [], []
    try:
        for image in dataset["images"]:
            if image["split"] not in SPLITS[split]:
                continue
            image_id = int(image["cocoid"])
            images.append({"id": image_id, "file_name": f"{image['filepath']}/{image['filename']}"})
            for sentence in image["sentences"]:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": sentence["raw"]})
    except (KeyError, TypeError) as e:
        raise UserError(f"not Karpathy's dataset_coco.json (missing {e})") from e
    return {"images": images, "annotations": annotations}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmt.evaluation.coco", description=__doc__.split("\n")[0])
    parser.add_argument("dataset", help="Karpathy's dataset_coco.json")
    parser.add_argument("--split", default="test", choices=sorted(SPLITS))
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    dataset = read_json(args.dataset, "Karpathy's dataset file")
    coco = karpathy_to_coco(dataset, args.split)
    Path(args.output).write_text(json.dumps(coco))
    print(f"wrote {len(coco['images'])} images, {len(coco['annotations'])} captions of Karpathy's {args.split} "
          f"split to {args.output}")
    return 0


if __name__ == "__main__":
    from mmt.errors import run_main

    sys.exit(run_main(main))
