"""DALL-E on shapes: T2I attribute accuracy without and with CLIP reranking (N = 1, 4, 16), CLIP retrieval.

The paper's Figure 9c / Figure 6 shape at the tiny scale: more samples per caption,
reranked by a contrastive model, give better images. Train everything (the tiny dVAE,
DALL-E and CLIP on 64x64 shapes), then score:

    python benchmarks/dalle_shapes.py --root=/tmp/dalle_bench

or score runs trained by hand (gin/dalle_tiny.gin's and gin/clip_tiny.gin's headers give
their commands; the CLIP must read the DALL-E's tokens, or pixels):

    python benchmarks/dalle_shapes.py --dalle=/tmp/dalle_tiny --clip=/tmp/clip_tiny
    python benchmarks/dalle_shapes.py --clip=/tmp/clip_tiny        # the CLIP's retrieval only

Training (`--root`): shapes at 64x64 (paired 2,000 / image-only 4,000 / text-only 4,000 /
eval 500, as the quickstart; `--data_scale` shrinks them), a 256-piece BPE vocabulary,
`gin/dvae_tiny.gin` on the image-only split, every split tokenized with the trained dVAE,
then `gin/dalle_tiny.gin` and `gin/clip_tiny.gin` on the paired split -- each stage a
`python -m mmt.train` subprocess whose command is printed; a stage whose workdir holds a
completed export is reused. `--steps` sets every stage's TRAIN_STEPS (a smoke run);
`--smoke` also shrinks the networks and batches.

Scoring: for `--examples` eval captions, the generator draws 16 samples each (DALL-E:
temperature 1, no truncation, §2.6); the CLIP scores every (caption, sample) pair -- a
token CLIP on the sampled codes (it must read the generator's tokenizer: the dVAE's), a
pixel CLIP on the decoded images. Reranking at N keeps the best of the first N samples
(nested draws: one set of 16 serves N = 1, 4, 16), read back by the shapes detector
(`mmt.evaluation.shapes_accuracy`). "no_rerank" scores all 16 samples of each caption
(the expected accuracy of one unranked sample, with 16x the examples of N = 1). The
CLIP's caption -> image recall@1/@5 is measured over the same eval examples' true images
(a gallery of `--examples`). `--generator` (alias of `--dalle`) takes any text-to-image
workdir -- UPGen, ITIT -- with a pixel CLIP: the same reranker for every model.

Targets (issue 20): DALL-E tiny >= 50% attribute accuracy without reranking, and N = 16
better than N = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common

REPO = Path(__file__).resolve().parents[1]
COUNTS = {"paired": 2000, "image_only": 4000, "text_only": 4000, "eval": 500}
RERANK_N = (1, 4, 16)
#: `--smoke`: networks and batches small enough for a test (with `--steps 2`).
SMOKE = {
    "dvae": ["DVAE.width = 8", "DVAE.decoder_input_width = 8", "BATCH_SIZE = 4"],
    "dalle": ["SIZE_OVERRIDES = {'width': 32, 'depth': 4, 'heads': 2}", "BATCH_SIZE = 4"],
    "clip": ["SIZE_OVERRIDES = {'width': 32, 'depth': 1, 'heads': 2, 'text_width': 32, 'text_depth': 1, "
             "'text_heads': 2, 'embed_dim': 16}", "PAIRED_BATCH = 4"],
}


# -- training -------------------------------------------------------------------------------


def _completed(workdir: Path) -> bool:
    return (workdir / "export" / "task.json").is_file()


#: The binding of each stage's warm-up (shortened with `--steps`: a tenth of the run).
WARMUP = {"dvae": "WarmupCosine.warmup_steps", "dalle": "WARMUP_STEPS", "clip": "WARMUP_STEPS"}


def train(stage: str, gin_file: str, workdir: Path, params: list[str], steps: int | None) -> None:
    """`python -m mmt.train` in a subprocess (skipped when `workdir` already holds an export)."""
    if _completed(workdir):
        print(f"[{stage}] reusing {workdir}", flush=True)
        return
    if steps:
        params = [*params, f"TRAIN_STEPS = {steps}", f"{WARMUP[stage]} = {max(1, steps // 10)}"]
    command = [sys.executable, "-m", "mmt.train", f"--gin_file={gin_file}", f"--workdir={workdir}",
               *(f"--gin_param={p}" for p in params), "--gin_param=Trainer.progress_bar = False"]
    print(f"[{stage}] " + " ".join(command), flush=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"[{stage}] failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"[{stage}] done in {time.perf_counter() - start:.0f}s", flush=True)


def make_images(root: Path, counts: dict, seed: int) -> dict:
    """64x64 shapes splits, a 256-piece BPE vocabulary and PNG records (for the dVAE)."""
    from mmt.data import shapes
    from mmt.data.shapes.records import write_shapes_records
    from mmt.tokenizers import text as text_lib

    config = shapes.ShapesConfig(resolution=64, seed=seed)
    examples = {split: list(shapes.generate(config, split, n)) for split, n in counts.items()}
    vocab_path = root / "vocab" / "shapes.model"
    captions = [e.caption for split in ("paired", "text_only") for e in examples[split]]
    if vocab_path.is_file():  # a rerun reuses the vocabulary its stages were trained with
        vocab = text_lib.TextTokenizer.from_file(vocab_path)
    else:
        vocab = text_lib.train_sentencepiece(captions, vocab_path, vocab_size=256, model_type="bpe", seed=seed)
    if not (root / "images" / "manifest.json").is_file():
        write_shapes_records(root / "images", config, {"image_only": examples["image_only"]}, text_tokenizer=None)
    return {"config": config, "examples": examples, "vocab": vocab, "vocab_path": vocab_path}


def make_tokens(root: Path, data: dict, dvae_export: Path) -> Path:
    """Every split tokenized with the trained dVAE (`image/tokens`) and the vocabulary (`text/ids`)."""
    from mmt.data.shapes.records import write_shapes_records
    from mmt.tokenizers.loading import load_image_tokenizer

    output = root / "data"
    if not (output / "manifest.json").is_file():
        write_shapes_records(output, data["config"], data["examples"], text_tokenizer=data["vocab"],
                             image_tokenizer=load_image_tokenizer(str(dvae_export)))
    return output


def train_all(args) -> tuple[str, str]:
    """The whole chain under `--root`; returns the DALL-E and CLIP workdirs."""
    root = Path(args.root)
    counts = {s: max(8, int(round(n * args.data_scale))) for s, n in COUNTS.items()}
    data = make_images(root, counts, args.seed)
    smoke = SMOKE if args.smoke else {"dvae": [], "dalle": [], "clip": []}
    train("dvae", "gin/dvae_tiny.gin", root / "dvae", [f"DATA_DIR = '{root / 'images'}'", *smoke["dvae"]],
          args.steps)
    data_dir = make_tokens(root, data, root / "dvae" / "export")
    shared = [f"DATA_DIR = '{data_dir}'", f"IMAGE_TOKENIZER = '{root / 'dvae' / 'export'}'",
              f"TEXT_VOCAB = '{data['vocab_path']}'", f"TEXT_VOCAB_SIZE = {data['vocab'].vocab_size}"]
    train("dalle", "gin/dalle_tiny.gin", root / "dalle", [*shared, *smoke["dalle"]], args.steps)
    train("clip", "gin/clip_tiny.gin", root / "clip", [*shared, *smoke["clip"]], args.steps)
    return str(root / "dalle"), str(root / "clip")


# -- scoring --------------------------------------------------------------------------------------


def _accuracy(images, captions) -> dict:
    from mmt.evaluation import shapes_accuracy

    return shapes_accuracy.image_scores(list(images), list(captions))


def clip_retrieval(clip, examples: int) -> dict:
    """Caption -> image recall@1/@5 of a CLIP task over `examples` eval pairs (the gallery)."""
    from mmt.data import shapes

    pixel_clip = clip.model.image_input == "pixels"
    if pixel_clip:
        image_tokenizer, vocab, resolution = None, _vocab(clip.text_vocab_path), clip.model.image_size
    else:
        image_tokenizer, vocab = clip.tokenizers()
        resolution = image_tokenizer.image_size
    eval_examples = list(shapes.generate(shapes.ShapesConfig(resolution=resolution), "eval", examples))
    images = np.stack([e.image for e in eval_examples])
    ids = np.asarray(vocab.encode([e.caption for e in eval_examples], clip.model.text_length), np.int32)
    gallery = images if pixel_clip else image_tokenizer.encode(images)
    return {**clip.retrieval(gallery, ids), "gallery": examples}


def score(generator_workdir: str, clip_workdir: str, examples: int, seed: int, prompts_per_call: int = 8) -> dict:
    """Samples 16 images per eval caption from any text-to-image workdir, reranks them with the CLIP.

    The generator is any task with `text_to_image(captions, seed=) -> (uint8 images, codes)`
    (DALL-E, UPGen, ITIT). A token CLIP scores the codes (it must read the generator's image
    tokenizer); a pixel CLIP scores the images (resized to its resolution).
    """
    from mmt.data import shapes
    from mmt.restore import load_trained
    from mmt.sampling import rerank
    from mmt.tasks.reranking import sample_and_score

    generator, generator_step = load_trained(generator_workdir)
    clip, clip_step = load_trained(clip_workdir)
    token_clip = clip.model.image_input == "tokens"
    if token_clip and clip.image_tokenizer_fingerprint != generator.image_tokenizer_fingerprint:
        raise SystemExit(f"the CLIP {clip_workdir} reads the codes of {clip.image_tokenizer_path}, the generator "
                         f"samples those of {generator.image_tokenizer_path}: train the CLIP on the generator's "
                         "tokens, or a pixel CLIP (gin/clip_tiny_pixels.gin)")
    resolution = generator.tokenizers()[0].image_size
    eval_examples = list(shapes.generate(shapes.ShapesConfig(resolution=resolution), "eval", examples))
    captions = [e.caption for e in eval_examples]
    n_max = max(RERANK_N)
    start = time.perf_counter()
    # [P, 16, H, W, 3], [P, 16]: caption-major draws, the CLIP's score of each.
    images, scores = sample_and_score(generator, clip, captions, n_max, seed=seed, prompts_per_call=prompts_per_call,
                                      clip_workdir=clip_workdir)
    results = {"generator_workdir": generator_workdir, "generator": type(generator).__name__,
               "generator_step": generator_step, "clip_workdir": clip_workdir, "clip_step": clip_step,
               "clip_input": clip.model.image_input, "examples": examples, "samples_per_caption": n_max,
               "sampling_and_scoring_seconds": round(time.perf_counter() - start, 1)}
    results["no_rerank"] = _accuracy(images.reshape(-1, *images.shape[2:]), np.repeat(captions, n_max))
    results["rerank"], chosen_images = {}, {}
    for n in RERANK_N:
        chosen = rerank.select(images[:, :n], scores[:, :n], 1)
        chosen_images[n] = chosen.samples[:, 0]
        results["rerank"][str(n)] = _accuracy(chosen_images[n], captions)
        results["rerank"][str(n)]["clip_score"] = float(np.mean(chosen.scores[:, 0]))
    results["clip_retrieval"] = clip_retrieval(clip, examples)
    results["samples"] = {"captions": captions[:8], "n1": chosen_images[1][:8], "n16": chosen_images[n_max][:8]}
    return results


def _vocab(path):
    from mmt.tokenizers.loading import load_text_vocab

    return load_text_vocab(path)


def _line(name: str, s: dict) -> str:
    parts = "  ".join(f"{k} {s[k]:.3f}" for k in ("shape", "color", "size", "cell", "exact"))
    return f"{name:<12} attribute {s['attribute']:.3f} ± {s['attribute_ci95']:.3f}   ({parts})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", help="train the dVAE, DALL-E and CLIP under this directory, then score")
    parser.add_argument("--dalle", "--generator", dest="dalle",
                        help="a trained DALL-E workdir (or export) to score; any text-to-image workdir (UPGen, "
                             "ITIT) works with a pixel CLIP")
    parser.add_argument("--clip", help="a trained CLIP workdir (or export) over the DALL-E's tokens, or pixels; "
                        "alone: its retrieval only")
    parser.add_argument("--examples", type=int, default=200, help="eval captions")
    parser.add_argument("--steps", type=int, default=None, help="every training stage's TRAIN_STEPS (smoke runs)")
    parser.add_argument("--smoke", action="store_true", help="tiny networks and batches (with --steps)")
    parser.add_argument("--data_scale", type=float, default=1.0, help="scale the shapes split sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="default: {root or dalle workdir}/benchmark")
    args = parser.parse_args(argv)
    command = common.print_command(argv)
    if args.root:
        dalle_workdir, clip_workdir = train_all(args)
    elif args.dalle and args.clip:
        dalle_workdir, clip_workdir = args.dalle, args.clip
    elif args.clip:
        from mmt.restore import load_trained

        clip, step = load_trained(args.clip)
        figures = {"clip_workdir": args.clip, "clip_step": step, "clip_input": clip.model.image_input,
                   "clip_retrieval": clip_retrieval(clip, args.examples)}
        r = figures["clip_retrieval"]
        print(f"CLIP ({clip.model.image_input}) at step {step}, caption -> image: recall@1 {r['recall@1']:.3f}  "
              f"recall@5 {r['recall@5']:.3f}  (gallery {r['gallery']})")
        common.report("dalle_shapes", figures, argv)
        return 0
    else:
        parser.error("give --root (train everything, then score), both --dalle and --clip, or --clip alone")
    results = score(dalle_workdir, clip_workdir, args.examples, args.seed)
    samples = results.pop("samples")
    print(f"{results['generator']} at step {results['generator_step']}, CLIP ({results['clip_input']}) at step "
          f"{results['clip_step']}: "
          f"{args.examples} eval captions, {results['samples_per_caption']} samples each "
          f"({results['sampling_and_scoring_seconds']:.0f}s)")
    print(_line("no rerank", results["no_rerank"]))
    for n, s in results["rerank"].items():
        print(_line(f"rerank N={n}", s) + f"   mean CLIP score {s['clip_score']:.2f}")
    r = results["clip_retrieval"]
    print(f"CLIP caption -> image: recall@1 {r['recall@1']:.3f}  recall@5 {r['recall@5']:.3f}  "
          f"(gallery {r['gallery']})")
    results["targets"] = {"no_rerank_at_least_0.5": results["no_rerank"]["attribute"] >= 0.5,
                          "n16_beats_n1": results["rerank"]["16"]["attribute"] > results["rerank"]["1"]["attribute"]}
    output = Path(args.output_dir or Path(args.root or dalle_workdir) / "benchmark")
    output.mkdir(parents=True, exist_ok=True)
    from mmt.data import shapes

    shapes.save_grid(list(samples["n1"]) + list(samples["n16"]),
                     [f"N=1: {c}" for c in samples["captions"]] + [f"N=16: {c}" for c in samples["captions"]],
                     output / "samples.png")
    (output / "dalle_shapes.json").write_text(json.dumps({**results, "command": command}, indent=2,
                                                         default=str) + "\n")
    print(f"wrote {output / 'samples.png'} and {output / 'dalle_shapes.json'}")
    common.report("dalle_shapes", results, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
