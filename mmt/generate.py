"""Generates from a trained workdir: images from prompts, captions from images.

    python -m mmt.generate --workdir=/tmp/itit_tiny --prompt="a large red circle in the top left"
    python -m mmt.generate --workdir=/tmp/itit_tiny --image=photo.png --image=other.png
    python -m mmt.generate --workdir=/tmp/upgen_tiny --unconditional=8
    python -m mmt.generate --workdir=/tmp/dalle_tiny --prompt="a small blue square" --top_k=64
    python -m mmt.generate --workdir=/tmp/dalle_tiny --prompt="a small blue square" --rerank_with=/tmp/clip_tiny
    python -m mmt.generate --workdir=/tmp/m3ae_tiny --image=photo.png [--caption="a red circle"]

Images go to `--output` (default `{workdir}/generated/`) as PNGs named after their
prompt, with `prompts.json`; captions are printed and written to `captions.json`;
unconditional samples (tasks with an `unconditional_images` hook, e.g. UPGen) are
`unconditional_NNN.png`. For a masked autoencoder (M3AE / MAE: a task with a
`reconstruct` hook) `--image` writes `reconstruction_NNN_<name>.png`, masked input |
reconstruction | original side by side, and `--caption` (one per image, or one for all)
has the masked words of the caption filled in from the image (`captions.json`). Sampling options (`--num_steps`, `--guidance_scale`,
`--choice_temperature`, `--beam_size`; for an autoregressive model such as DALL-E
`--temperature`, `--top_k`, `--top_p`) default to the task's gin-bound `generation`
settings; they apply to images (the task's own text settings caption).

`--rerank_with=<CLIP workdir>` (DALL-E §2.6; any text-to-image model): each `--prompt`
draws `--num_samples` images (default the task's `rerank_samples`, else 16), a trained
CLIP (`gin/clip_tiny.gin`) scores them, and the best `--keep` are written, with their
scores in `prompts.json`. A CLIP over the generator's own tokens scores the sampled codes;
a pixel CLIP, or one of another tokenizer, scores the decoded images.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from mmt import config as mmt_config
from mmt.errors import UserError, run_main


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "prompt"


def main(argv: Sequence[str] | None = None) -> int:
    parser = mmt_config.ArgumentParser(prog="python -m mmt.generate", description=__doc__.split("\n")[0])
    mmt_config.add_common_flags(parser)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--prompt", action="append", default=[], help="text -> image (repeatable)")
    parser.add_argument("--image", action="append", default=[], help="image file -> caption (repeatable)")
    parser.add_argument("--caption", action="append", default=[],
                        help="with --image, for a masked autoencoder (M3AE): fill masked words of this caption "
                        "(repeatable: one per image, or one for all)")
    parser.add_argument("--unconditional", type=int, default=0, help="this many images from nothing")
    parser.add_argument("--output", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_steps", type=int)
    parser.add_argument("--guidance_scale", type=float)
    parser.add_argument("--choice_temperature", type=float)
    parser.add_argument("--beam_size", type=int)
    parser.add_argument("--rerank_with", default=None,
                        help="a trained CLIP workdir: draw --num_samples images per --prompt and keep the "
                        "--keep it scores highest (DALL-E §2.6)")
    parser.add_argument("--num_samples", type=int, default=None,
                        help="with --rerank_with: candidates per prompt (default: the task's rerank_samples, "
                        "e.g. DALLETask.rerank_samples from gin, else 16; the paper: 512)")
    parser.add_argument("--keep", type=int, default=1, help="with --rerank_with: images kept per prompt")
    parser.add_argument("--temperature", type=float, help="autoregressive image sampling (DALL-E)")
    parser.add_argument("--top_k", type=int, help="autoregressive image sampling (DALL-E)")
    parser.add_argument("--top_p", type=float, help="autoregressive image sampling (DALL-E)")
    args = parser.parse_args(argv)
    if not (args.prompt or args.image or args.unconditional):
        parser.error("give at least one --prompt, --image or --unconditional")

    if (args.num_samples is not None or args.keep != 1) and not args.rerank_with:
        parser.error("--num_samples and --keep need --rerank_with")
    if args.rerank_with and not args.prompt:
        parser.error("--rerank_with needs --prompt")
    if args.caption and (not args.image or len(args.caption) not in (1, len(args.image))):
        parser.error("--caption needs --image, and one caption per --image (or one for all)")
    for path in args.image:
        if not Path(path).is_file():
            raise UserError(f"--image {path}: no such file")

    from PIL import Image, UnidentifiedImageError

    from mmt.training.data_check import check_tokenizers
    from mmt.restore import load_trained

    task, step = load_trained(args.workdir)
    reconstructs = hasattr(task, "reconstruct")
    hooks = ((["text_to_image"] if args.prompt else [])
             + (["image_to_text"] if args.image and not reconstructs else [])
             + (["fill_caption"] if args.caption else [])
             + (["unconditional_images"] if args.unconditional else []))
    for hook in hooks:
        if not hasattr(task, hook):
            raise UserError(f"{args.workdir} holds a {type(task).__name__}, which cannot {hook.replace('_', ' ')}; "
                            "drop that flag or use a workdir of a model that can")
    # Tokens are decoded by (and images encoded with) the configured tokenizer: it must
    # be the one the model was trained on.
    check_tokenizers(task)
    output = Path(args.output or Path(args.workdir) / "generated")
    output.mkdir(parents=True, exist_ok=True)
    print(f"{type(task).__name__} at step {step}; writing to {output}")
    options = {k: getattr(args, k) for k in ("num_steps", "guidance_scale", "choice_temperature", "temperature",
                                             "top_k", "top_p")
               if getattr(args, k) is not None}
    if args.prompt and args.rerank_with:
        _rerank_prompts(task, args, options, output)
    elif args.prompt:
        images, _ = task.text_to_image(args.prompt, seed=args.seed, **options)
        names = {}
        for i, (prompt, image) in enumerate(zip(args.prompt, images)):
            name = f"{i:03d}_{_slug(prompt)}.png"
            Image.fromarray(image).save(output / name)
            names[name] = prompt
            print(f"{name}: {prompt}")
        (output / "prompts.json").write_text(json.dumps(names, indent=2) + "\n")
    if args.image:
        size = getattr(task, "image_resolution", None) or task.tokenizers()[0].image_size
        pixels = []
        for path in args.image:
            try:
                with Image.open(path) as im:
                    pixels.append(np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), np.uint8))
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"--image {path}: not a readable image ({e})") from e
        pixels = np.stack(pixels)
        if reconstructs:
            masked, reconstruction = task.reconstruct(pixels, seed=args.seed)
            for i, path in enumerate(args.image):
                name = f"reconstruction_{i:03d}_{_slug(Path(path).stem)}.png"
                Image.fromarray(np.concatenate([masked[i], reconstruction[i], pixels[i]], axis=1)).save(output / name)
                print(f"{path}: {name} (masked input | reconstruction | original)")
            if args.caption:
                captions = args.caption * len(args.image) if len(args.caption) == 1 else args.caption
                shown, filled = task.fill_caption(pixels, captions, seed=args.seed)
                record = {}
                for path, caption, hidden, text in zip(args.image, captions, shown, filled):
                    print(f"{path}: {hidden!r} -> {text!r}")
                    record[path] = {"caption": caption, "masked": hidden, "filled": text}
                (output / "captions.json").write_text(json.dumps(record, indent=2) + "\n")
        else:
            extra = {"seed": args.seed} if "seed" in inspect.signature(task.image_to_text).parameters else {}
            captions = task.image_to_text(pixels, beam_size=args.beam_size, **extra)
            for path, caption in zip(args.image, captions):
                print(f"{path}: {caption}")
            (output / "captions.json").write_text(json.dumps(dict(zip(args.image, captions)), indent=2) + "\n")
    if args.unconditional:
        options.pop("guidance_scale", None)  # nothing to guide by
        images, _ = task.unconditional_images(args.unconditional, seed=args.seed, **options)
        for i, image in enumerate(images):
            Image.fromarray(image).save(output / f"unconditional_{i:03d}.png")
        print(f"{len(images)} unconditional images: unconditional_000.png ...")
    return 0


def _rerank_prompts(task, args, options, output: Path) -> None:
    """--prompt with --rerank_with: N samples per prompt, the CLIP's best --keep written."""
    from PIL import Image

    from mmt.evaluation.clip_score import load_clip
    from mmt.sampling.rerank import select
    from mmt.tasks.reranking import sample_and_score

    clip, clip_step = load_clip(args.rerank_with, flag="--rerank_with")
    n = args.num_samples or int(getattr(task, "rerank_samples", 16))
    if not 1 <= args.keep <= n:
        raise UserError(f"--keep {args.keep} must be between 1 and the number of samples ({n})")
    images, scores = sample_and_score(task, clip, args.prompt, n, seed=args.seed, clip_workdir=args.rerank_with,
                                      **options)
    best = select(images, scores, args.keep)
    record = {}
    for i, prompt in enumerate(args.prompt):
        for rank in range(args.keep):
            name = f"{i:03d}_{_slug(prompt)}" + (f"_{rank}" if args.keep > 1 else "") + ".png"
            Image.fromarray(best.samples[i, rank]).save(output / name)
            record[name] = {"prompt": prompt, "clip_score": float(best.scores[i, rank]),
                            "sample": int(best.indices[i, rank]), "of": n}
            print(f"{name}: {prompt} (CLIP score {best.scores[i, rank]:.2f}, best {rank + 1} of {n})")
    (output / "prompts.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"reranked by the CLIP at {args.rerank_with} (step {clip_step})")


if __name__ == "__main__":
    sys.exit(run_main(main))
