"""The `fid`, `captions` and `clip_score` subcommands of `python -m mmt.evaluate` (parsers and bodies).

    python -m mmt.evaluate fid --images=DIR --reference=DIR [--reference_stats=ref.npz] --inception_weights=W
    python -m mmt.evaluate fid --reference=DIR --reference_stats=ref.npz --inception_weights=W   # statistics only
    python -m mmt.evaluate fid --workdir=W --captions=captions.txt --reference_stats=coco_val.npz --inception_weights=W
    python -m mmt.evaluate captions --predictions=pred.json --references=captions_val2014.json
    python -m mmt.evaluate captions --workdir=W --image_dir=val2014/ --references=karpathy_test.json
    python -m mmt.evaluate clip_score --clip=C --workdir=W --captions=captions.txt
    python -m mmt.evaluate clip_score --clip=C --images=DIR --captions=captions.txt|pairs.json|coco.json
    python -m mmt.evaluate fid --workdir=W --captions=captions.txt --clip=C ...   # FID and CLIP score, one pass

See `mmt.evaluation.fid` / `fid_inception` (network, resize protocol, weights file),
`mmt.evaluation.captions` (metrics, tokenizer rules) and `mmt.evaluation.clip_score`
(the score's definition; `read_pairs` below pairs a folder with its captions).

A `--workdir` / `--clip` is a training workdir or an export directory: its export when
it has one (what `mmt.generate` loads), else its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import time
from pathlib import Path

import numpy as np

from mmt.errors import UserError


def add_parsers(commands) -> None:
    """Adds `fid`, `captions` and `clip_score` to the subparsers `commands` of `mmt.evaluate`."""
    fid = commands.add_parser("fid", help="Fréchet Inception Distance (generated or folder images vs reference)")
    source = fid.add_argument_group("images to score (one of)")
    source.add_argument("--images", help="a folder of images")
    source.add_argument("--workdir", help="a T2I workdir: generates one image per caption of --captions")
    fid.add_argument("--captions", help="captions: .txt (one per line) or COCO captions .json (first per image)")
    fid.add_argument("--reference", help="a folder of reference images")
    fid.add_argument("--reference_stats", help=".npz of reference statistics: written from --reference when given, "
                                               "else read")
    fid.add_argument("--inception_weights", default=os.environ.get("MMT_FID_INCEPTION_WEIGHTS"),
                     help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth or an .npz of it "
                          "(default: $MMT_FID_INCEPTION_WEIGHTS)")
    fid.add_argument("--num_images", type=int, default=None, help="at most this many images / captions")
    fid.add_argument("--batch_size", type=int, default=64)
    fid.add_argument("--resolution", type=int, default=299, help="network input side (299: the protocol)")
    fid.add_argument("--image_size", type=int, default=None,
                     help="centre-crop and resize folder images to this square first")
    _add_generation_flags(fid)
    fid.add_argument("--clip", default=None, help="with --workdir, a CLIP workdir: also the CLIP score of the same "
                                                  "generated images (see clip_score)")
    fid.add_argument("--output", default=None, help="JSON results (default: {workdir}/eval/fid.json or stdout only)")

    cap = commands.add_parser("captions", help="CIDEr-D, BLEU-4, ROUGE-L (METEOR) on COCO-format references")
    cap.add_argument("--references", required=True, help="COCO captions .json (images + annotations)")
    cap.add_argument("--predictions", help="captions to score: COCO results .json or {image_id: caption}")
    cap.add_argument("--workdir", help="an I2T workdir: captions every referenced image in --image_dir")
    cap.add_argument("--image_dir", help="the images of --references (by file_name)")
    cap.add_argument("--num_images", type=int, default=None)
    cap.add_argument("--batch_size", type=int, default=32)
    cap.add_argument("--beam_size", type=int)
    cap.add_argument("--no_meteor", action="store_true", help="skip METEOR (slow Java start)")
    cap.add_argument("--output", default=None, help="JSON results (default: {workdir}/eval/captions.json)")

    from mmt.evaluation.clip_score import DEFINITION

    clip = commands.add_parser(
        "clip_score", help="CLIP score: " + DEFINITION.replace("%", "%%"),
        description="CLIP score = 100 x cos(caption embedding, image embedding) of a trained CLIP (unit "
                    "embeddings), not clipped at 0; reported as the mean over the captions (one image each) with "
                    "a 95% Student-t interval, the count and the CLIP's step. It is the reranker's score "
                    "(mmt.generate --rerank_with: logit_scale x cos) rescaled to a fixed 100, so it does not move "
                    "with the learned temperature; the record keeps logit_scale. See mmt.evaluation.clip_score.")
    clip.add_argument("--clip", required=True, help="a CLIP workdir (gin/clip_tiny.gin, clip_tiny_pixels.gin) or "
                                                    "its export")
    source = clip.add_argument_group("images to score (one of)")
    source.add_argument("--workdir", help="a text-to-image workdir (ITIT, UPGen, DALL-E): generates one image per "
                                          "caption of --captions, in batches, seed + batch index, as fid does")
    source.add_argument("--images", help="a folder of images, paired with --captions: a .txt (line i <-> the i-th "
                                         "image by name, as fid --save_images writes them), a JSON {file: caption} "
                                         "(or mmt.generate's prompts.json), or COCO captions .json (images by "
                                         "file_name, first caption each)")
    clip.add_argument("--captions", help="captions: .txt (one per line), COCO captions .json, or (with --images) "
                                         "a JSON {file: caption}")
    clip.add_argument("--num_images", type=int, default=None, help="at most this many captions (a seeded subset, "
                                                                   "as fid)")
    clip.add_argument("--batch_size", type=int, default=64)
    _add_generation_flags(clip)
    clip.add_argument("--output", default=None,
                      help="JSON results (default: {workdir}/eval/clip_score.json or stdout only)")


def _add_generation_flags(parser) -> None:
    """Seed, sampling options and --save_images of a command that generates from a --workdir."""
    parser.add_argument("--seed", type=int, default=0, help="generation seed (batch b uses seed + b) and the seed "
                                                            "of the --num_images subset")
    parser.add_argument("--num_steps", type=int, help="parallel decoding steps (ITIT, UPGen)")
    parser.add_argument("--guidance_scale", type=float, help="classifier-free guidance (ITIT, UPGen)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (DALL-E)")
    parser.add_argument("--top_k", type=int, help="top-k filter (DALL-E)")
    parser.add_argument("--top_p", type=float, help="top-p filter (DALL-E)")
    parser.add_argument("--save_images", default=None, help="also write the generated images to this folder "
                                                            "(NNNNNN.png in caption order)")


def _load_task(workdir: str, hook: str):
    from mmt.restore import load_trained
    from mmt.tasks.exports import is_export

    exported = is_export(workdir) or is_export(Path(workdir, "export"))
    if not exported and not Path(workdir, "operative_config.gin").is_file() and "://" not in workdir:
        raise UserError(f"{workdir} is not a training workdir (no operative_config.gin) nor an export")
    try:
        task, step = load_trained(workdir)
    except FileNotFoundError as e:
        raise UserError(f"{workdir}: {e}") from e
    if not hasattr(task, hook):
        raise UserError(f"{workdir} holds a {type(task).__name__}, which cannot {hook.replace('_', ' ')}: "
                        f"this evaluation needs a workdir of a model that can")
    return task, step


def read_captions(path: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """Captions of a .txt (one per line) or a COCO captions .json (the first caption of each
    image, by image id). With `limit`, a seeded random subset of that size (FID-30K)."""
    path_ = Path(path)
    if not path_.is_file():
        raise UserError(f"captions file {path} not found")
    if path_.suffix == ".json":
        from mmt.evaluation.captions import read_coco_references

        references, _ = read_coco_references(path_)
        captions = [references[i][0].strip() for i in sorted(references)]
    else:
        captions = [line.strip() for line in path_.read_text().splitlines() if line.strip()]
    if not captions:
        raise UserError(f"no captions in {path}")
    return seeded_subset(captions, limit, seed)


def seeded_subset(items: list, limit: int | None, seed: int) -> list:
    """`limit` items drawn at random (seeded), in their original order; all of them without `limit`."""
    if limit is None or limit >= len(items):
        return list(items)
    order = np.random.default_rng(seed).permutation(len(items))[:limit]
    return [items[i] for i in sorted(order)]


def read_pairs(folder: str, path: str, limit: int | None = None, seed: int = 0) -> tuple[list[Path], list[str]]:
    """(image files, captions) of `clip_score --images=folder --captions=path`, pair i = (files[i], captions[i]).

    The pairing depends on the captions file:
      * COCO captions .json (`images` with `id`, `file_name`; `annotations`): each image
        `folder/file_name` with its first caption, by image id (COCO val2014 with its
        captions file: the real images' score, the ceiling for generated ones);
      * any other .json, an object {file name: caption} (or {file: {"prompt": caption}},
        the `prompts.json` of `mmt.generate`): `folder/file` with its caption, by file name;
      * a .txt (one caption per line): line i with the i-th image of the folder in name
        order, the files `fid --save_images` / `clip_score --save_images` write
        (000000.png, ...) for the same captions file, --num_images and --seed.
    With `limit`, the same seeded subset as `read_captions` takes. Every file must exist
    and a .txt must have as many captions as the folder has images (`UserError` naming them).
    """
    from mmt.evaluation.captions import read_coco_references, read_json
    from mmt.evaluation.fid import list_images

    root, path_ = Path(folder), Path(path)
    if not root.is_dir():
        raise UserError(f"image folder {folder} not found")
    if not path_.is_file():
        raise UserError(f"captions file {path} not found")
    if path_.suffix != ".json":
        captions, files = read_captions(path, limit, seed), list_images(root)
        if len(files) != len(captions):
            raise UserError(f"{folder} holds {len(files)} images but {path} gives {len(captions)} captions"
                            f"{f' (--num_images {limit})' if limit else ''}: a .txt pairs line i with the i-th image "
                            "by name, so they must match; or pair by name with a JSON {file: caption}")
        return files, captions
    data = read_json(path, "captions file")
    if isinstance(data, dict) and "annotations" in data:  # COCO
        references, names = read_coco_references(path)
        ids = seeded_subset(sorted(references), limit, seed)
        missing = [i for i in ids if not names.get(i)]
        if missing:
            raise UserError(f"{path}: image {missing[0]} has no 'file_name' in 'images' (needed to find it in "
                            f"{folder})")
        pairs = [(names[i], references[i][0].strip()) for i in ids]
    elif isinstance(data, dict) and data:
        pairs = []
        for name in seeded_subset(sorted(data), limit, seed):
            value = data[name]
            caption = value.get("prompt", value.get("caption")) if isinstance(value, dict) else value
            if not isinstance(caption, str):
                raise UserError(f"{path}: {name!r} has no caption (a string, or an object with 'prompt')")
            pairs.append((name, caption.strip()))
    else:
        raise UserError(f"{path}: expected COCO captions ({{'images', 'annotations'}}) or an object "
                        "{file name: caption}")
    for name, _ in pairs:
        if not name or not (root / name).is_file():
            raise UserError(f"image {name!r} of {path} not found in {folder}")
    return [root / name for name, _ in pairs], [caption for _, caption in pairs]


def _write(record: dict, output: str | None) -> None:
    print(json.dumps({k: v for k, v in record.items() if k != "command"}))
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")


def fid(args) -> int:
    from mmt.evaluation import fid as fid_lib
    from mmt.evaluation.fid_inception import FIDInception

    if args.images and args.workdir:
        raise UserError("fid takes one of --images (a folder) or --workdir (with --captions), not both")
    stats_only = not args.images and not args.workdir
    if stats_only and not (args.reference and args.reference_stats):
        raise UserError("fid needs --images or --workdir (the images to score), or --reference with "
                        "--reference_stats to only write the reference statistics")
    if args.workdir and not args.captions:
        raise UserError("fid --workdir needs --captions (the prompts to generate from)")
    if args.clip and not args.workdir:
        raise UserError("fid --clip scores the images fid generates: give --workdir and --captions (for a folder "
                        "of images, run `clip_score --images`)")
    if not args.reference and not args.reference_stats:
        raise UserError("fid needs --reference (a folder) or --reference_stats (a saved .npz)")
    if args.reference_stats and not args.reference and not Path(args.reference_stats).is_file():
        raise UserError(f"reference statistics {args.reference_stats} not found (pass --reference to write them)")
    if not args.inception_weights:
        raise UserError("fid needs --inception_weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                        "(github.com/mseitzer/pytorch-fid/releases) or an .npz converted from it")
    if not Path(args.inception_weights).is_file():
        raise UserError(f"FID Inception weights {args.inception_weights} not found")
    # Check every input before the slow parts (model loading, generation).
    files = fid_lib.list_images(args.images)[: args.num_images] if args.images else None
    captions = read_captions(args.captions, args.num_images, args.seed) if args.workdir else None
    reference_files = fid_lib.list_images(args.reference) if args.reference else None
    scorer = _clip_scorer(args.clip) if args.clip else None
    task, step = _load_task(args.workdir, "text_to_image") if args.workdir else (None, None)
    try:
        model = FIDInception.from_file(args.inception_weights)
    except (ValueError, OSError, pickle.UnpicklingError) as e:  # incl. a refused (unsafe) pickle
        raise UserError(f"cannot use {args.inception_weights} as FID Inception weights: {e}") from e
    extractor = fid_lib.FIDExtractor(model, resolution=args.resolution, batch_size=args.batch_size)
    start = time.perf_counter()

    if reference_files is not None:
        ref = extractor.statistics(fid_lib.image_batches(reference_files, args.batch_size, args.image_size))
        mu_ref, sigma_ref, ref_count = ref.mean(), ref.covariance(), ref.count
        if args.reference_stats:
            Path(args.reference_stats).parent.mkdir(parents=True, exist_ok=True)
            ref.save(args.reference_stats)
            print(f"wrote reference statistics of {ref.count} images to {args.reference_stats}")
    else:
        mu_ref, sigma_ref, ref_count = fid_lib.load_statistics(args.reference_stats)
    if stats_only:
        return 0

    if files is not None:
        stats = extractor.statistics(fid_lib.image_batches(files, args.batch_size, args.image_size))
    else:
        def generated():
            for chunk, images, codes in generate_batches(task, captions, args):
                if scorer:  # the CLIP scores the batch FID reads next
                    scorer.add_generated(task, images, codes, chunk)
                yield images

        stats = extractor.statistics(generated())
    value = fid_lib.frechet_distance(stats.mean(), stats.covariance(), mu_ref, sigma_ref)
    record = {"command": "python -m mmt.evaluate " + " ".join(shlex.quote(a) for a in args.argv), "fid": value,
              "num_images": stats.count, "reference_images": ref_count, "resolution": args.resolution,
              "protocol": "pytorch-fid: bilinear resize (align_corners=False) to the network input, [-1, 1]",
              "seconds": round(time.perf_counter() - start, 1)}
    if step is not None:
        record["step"] = step
    if scorer:
        record.update(scorer.record())
        print(scorer.line())
    output = args.output or (str(Path(args.workdir) / "eval" / "fid.json") if args.workdir else None)
    _write(record, output)
    return 0


def generate_batches(task, captions: list[str], args):
    """Yields (captions, uint8 images [B, H, W, 3], codes or None) of `task.text_to_image`, `args.batch_size`
    captions per call, call b seeded `args.seed + b`, with the sampling options given as flags; writes
    the images to `args.save_images` (NNNNNN.png, caption order) when set."""
    options = {k: getattr(args, k) for k in ("num_steps", "guidance_scale", "temperature", "top_k", "top_p")
               if getattr(args, k) is not None}
    save = Path(args.save_images) if args.save_images else None
    if save:
        save.mkdir(parents=True, exist_ok=True)
    for b, first in enumerate(range(0, len(captions), args.batch_size)):
        chunk = captions[first:first + args.batch_size]
        images, codes = task.text_to_image(chunk, seed=args.seed + b, **options)
        images = np.asarray(images, np.uint8)
        if save:
            from PIL import Image

            for i, image in enumerate(images):
                Image.fromarray(image).save(save / f"{first + i:06d}.png")
        print(f"generated {first + len(images)} / {len(captions)}", flush=True)
        yield chunk, images, codes


def _clip_scorer(workdir: str):
    from mmt.evaluation.clip_score import CLIPScorer, load_clip

    clip, step = load_clip(workdir)
    return CLIPScorer(clip, workdir, step)


def clip_score(args) -> int:
    """`clip_score`: the CLIP score (`mmt.evaluation.clip_score`) of generated or folder images."""
    from mmt.evaluation import clip_score as clip_lib
    from mmt.evaluation.fid import image_batches

    if bool(args.images) == bool(args.workdir):
        raise UserError("clip_score needs exactly one of --workdir (a text-to-image workdir: generates from "
                        "--captions) or --images (a folder, paired with --captions)")
    if not args.captions:
        raise UserError("clip_score needs --captions (the prompts to generate from, or the folder's captions)")
    if args.images and args.save_images:
        raise UserError("--save_images is for generated images (--workdir), not --images")
    # Every input is checked before the slow parts (model loading, generation).
    if args.images:
        files, captions = read_pairs(args.images, args.captions, args.num_images, args.seed)
    else:
        captions = read_captions(args.captions, args.num_images, args.seed)
    scorer = _clip_scorer(args.clip)
    start = time.perf_counter()
    record = {"command": "python -m mmt.evaluate " + " ".join(shlex.quote(a) for a in args.argv)}
    if args.workdir:
        task, step = _load_task(args.workdir, "text_to_image")
        for chunk, images, codes in generate_batches(task, captions, args):
            scorer.add_generated(task, images, codes, chunk)
        record.update(workdir=args.workdir, step=step, seed=args.seed)
    else:
        size = clip_lib.input_size(scorer.clip)
        for first, images in zip(range(0, len(files), args.batch_size),
                                 image_batches(files, args.batch_size, size)):
            scorer.add_images(images, captions[first:first + len(images)])
        record.update(images=args.images, captions=args.captions, image_size=size)
    record.update(scorer.record(), seconds=round(time.perf_counter() - start, 1))
    print(scorer.line())
    output = args.output or (str(Path(args.workdir) / "eval" / "clip_score.json") if args.workdir else None)
    _write(record, output)
    return 0


def captions(args) -> int:
    from mmt.evaluation import captions as cap_lib

    if bool(args.predictions) == bool(args.workdir):
        raise UserError("captions needs exactly one of --predictions (a JSON) or --workdir (with --image_dir)")
    references, file_names = cap_lib.read_coco_references(args.references)
    step = None
    if args.predictions:
        predictions = cap_lib.read_predictions(args.predictions)
    else:
        if not args.image_dir or not Path(args.image_dir).is_dir():
            raise UserError(f"captions --workdir needs --image_dir, a folder of the referenced images "
                            f"(got {args.image_dir})")
        ids = sorted(references)[: args.num_images]
        paths = {}
        for i in ids:
            name = file_names.get(i)
            if not name or not (Path(args.image_dir) / name).is_file():
                raise UserError(f"image {i} ({name}) of {args.references} not found in {args.image_dir}")
            paths[i] = Path(args.image_dir) / name
        task, step = _load_task(args.workdir, "image_to_text")
        predictions = _caption_images(task, paths, args.batch_size, args.beam_size)
    if args.num_images:
        predictions = dict(list(predictions.items())[: args.num_images])
    scores = cap_lib.caption_metrics(references, predictions, meteor=False if args.no_meteor else None)
    cap_lib.print_table(scores)
    record = {"command": "python -m mmt.evaluate " + " ".join(shlex.quote(a) for a in args.argv), **scores}
    if step is not None:
        record["step"] = step
    output = args.output or (str(Path(args.workdir) / "eval" / "captions.json") if args.workdir else None)
    _write(record, output)
    return 0


def _caption_images(task, paths: dict, batch_size: int, beam_size: int | None) -> dict:
    from PIL import Image

    size = task.tokenizers()[0].image_size
    ids = list(paths)
    out = {}
    for first in range(0, len(ids), batch_size):
        chunk = ids[first:first + batch_size]
        pixels = []
        for i in chunk:
            with Image.open(paths[i]) as im:  # centre crop to a square, then the model's size
                im = im.convert("RGB")
                side = min(im.size)
                left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
                im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
                pixels.append(np.asarray(im, np.uint8))
        texts = task.image_to_text(np.stack(pixels), beam_size=beam_size)
        out.update(zip(chunk, (str(t) for t in texts)))
        print(f"captioned {first + len(chunk)} / {len(ids)}", flush=True)
    return out


__all__ = ["add_parsers", "captions", "clip_score", "fid", "generate_batches", "read_captions", "read_pairs",
           "seeded_subset"]
