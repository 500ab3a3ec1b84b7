"""UPGen on shapes: text -> image and image -> text attribute accuracy, linear probes, samples.

Make tokenized data for a saved image tokenizer, train, then score the workdir:

    python benchmarks/upgen_shapes.py --make_data=/tmp/upgen_data --image_tokenizer=/tmp/vqgan_tiny/export
    python -m mmt.train --gin_file=gin/upgen_tiny.gin --workdir=/tmp/upgen_tiny \\
        --gin_param="DATA_DIR='/tmp/upgen_data/data'" --gin_param="IMAGE_TOKENIZER='/tmp/vqgan_tiny/export'" \\
        --gin_param="TEXT_VOCAB='/tmp/upgen_data/vocab/shapes.model'"
    python benchmarks/upgen_shapes.py --workdir=/tmp/upgen_tiny [--set guidance_scale=1.0 ...]

`--make_data` renders the four shapes splits at the tokenizer's resolution (paired
2,000 / image-only 4,000 / text-only 4,000 / eval 500, as the quickstart), trains a
256-piece BPE vocabulary on the captions (at most 31 pieces each, so TEXT_LENGTH 32
never truncates) and writes TFRecords with image tokens and text ids.

Scoring a workdir prints, headed by the command that produced it:

* T2I: images generated for `--examples` eval captions, read back by the shapes
  detector, against the caption's parsed objects (`mmt.evaluation.shapes_accuracy`);
* I2T: captions generated for as many eval images, parsed, against the true objects;
  `attribute` is the mean of the shape / colour / size / cell scores;
* caption reliance: the image-token cross-entropy with the image fully masked (the
  first text-to-image step) given the right caption, no caption (all masked) and
  another example's caption -- how much the model reads the text at all;
* linear probes of the frozen mean-pooled image features (`mmt.evaluate linear_probe`)
  for the trained network and for its untrained initialisation;

and writes `upgen_shapes.json` and `samples.png` (T2I samples under their prompts,
eval images under their generated captions, unconditional samples) into
`--output_dir` (default `{workdir}/benchmark`). Target at the tiny scale: T2I and
I2T attribute accuracy >= 50%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from mmt.data import shapes

import common

COUNTS = {"paired": 2000, "image_only": 4000, "text_only": 4000, "eval": 500}


def make_data(output: str, image_tokenizer: str, vocab_size: int = 256, seed: int = 0) -> dict:
    """Shapes at the tokenizer's resolution -> `{output}/data` (tokens + ids) and `{output}/vocab`."""
    from mmt.data.shapes.records import write_shapes_records
    from mmt.tokenizers import text as text_lib
    from mmt.tokenizers.loading import load_image_tokenizer

    tokenizer = load_image_tokenizer(image_tokenizer)
    config = shapes.ShapesConfig(resolution=tokenizer.image_size, seed=seed)
    examples = {split: list(shapes.generate(config, split, n)) for split, n in COUNTS.items()}
    captions = [e.caption for split in ("paired", "text_only") for e in examples[split]]
    vocab = text_lib.train_sentencepiece(captions, Path(output) / "vocab" / "shapes.model", vocab_size=vocab_size,
                                         model_type="bpe", seed=seed)
    longest = max(len(ids) for ids in vocab.tokenize(captions))
    manifest = write_shapes_records(Path(output) / "data", config, examples, text_tokenizer=vocab,
                                    image_tokenizer=tokenizer)
    return {"data_dir": str(Path(output) / "data"), "vocab": str(Path(output) / "vocab" / "shapes.model"),
            "vocab_size": vocab.vocab_size, "longest_caption_pieces": longest, "grid": list(tokenizer.grid_size),
            "image_vocab_size": tokenizer.vocab_size,
            "records": {s: manifest.splits[s].num_records for s in COUNTS}}


def score(workdir: str, examples: int, probe_train: int, probe_test: int, seed: int,
          generation: dict | None = None) -> tuple[dict, dict]:
    from mmt.evaluation import linear_probe as probe_lib
    from mmt.evaluation import shapes_accuracy
    from mmt.restore import load_task

    task, step = load_task(workdir)
    unknown = set(generation or {}) - set(task.generation)
    if unknown:
        raise SystemExit(f"--set: unknown generation settings {sorted(unknown)}; known: {sorted(task.generation)}")
    task.generation.update(generation or {})
    resolution = task.tokenizers()[0].image_size
    eval_examples = list(shapes.generate(shapes.ShapesConfig(resolution=resolution), "eval", examples))
    captions = [e.caption for e in eval_examples]
    images = np.stack([e.image for e in eval_examples])
    results = {"workdir": workdir, "step": step, "examples": examples, "generation": dict(task.generation)}
    generated = []

    def text_to_image(batch):
        out, _ = task.text_to_image(batch, seed=seed + len(generated))
        generated.append(out)
        return out

    start = time.perf_counter()
    results["t2i"] = shapes_accuracy.t2i_accuracy(text_to_image, captions)
    results["t2i_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    results["i2t"], written = shapes_accuracy.i2t_accuracy(lambda x: task.image_to_text(x, seed=seed), images,
                                                         [e.objects for e in eval_examples])
    results["i2t_seconds"] = time.perf_counter() - start
    results["caption_reliance"] = caption_reliance(task, images, captions)
    unconditional, _ = task.unconditional_images(4, seed=seed)
    results["probe"] = probe_lib.linear_probe(task.image_features, resolution, train_examples=probe_train,
                                              test_examples=probe_test)
    untrained, _ = load_task(workdir, restore=False)
    untrained._tokenizers = task.tokenizers()
    results["probe_untrained"] = probe_lib.linear_probe(untrained.image_features, resolution,
                                                        train_examples=probe_train, test_examples=probe_test)
    samples = {"t2i": list(zip(captions[:8], np.concatenate(generated)[:8])),
               "i2t": list(zip(written[:8], images[:8])), "unconditional": list(unconditional)}
    results["i2t_samples"] = [{"true": c, "generated": w} for c, w in zip(captions[:8], written[:8])]
    return results, samples


def caption_reliance(task, images, captions, batch_size: int = 64) -> dict:
    """Mean image-token CE (nats) with the image fully masked, per caption condition.

    "right": the image's caption; "none": every text position masked; "other": the
    caption of the next example (a different scene). right << none means the model
    reads the caption; right ~ none ~ other means it generates images blind.
    """
    from keras import ops

    image_tokenizer, text_tokenizer = task.tokenizers()
    model = task.model
    tokens = image_tokenizer.encode(np.asarray(images, np.uint8)).reshape(len(images), -1)
    text = np.asarray(text_tokenizer.encode(list(captions), model.text_length), np.int32)
    k = model.num_image_tokens
    out = {}
    for name, ids, mask_text in (("right", text, False), ("other", np.roll(text, 1, axis=0), False),
                                 ("none", text, True)):
        total = count = 0.0
        for start in range(0, len(tokens), batch_size):
            seq, modalities = model.sequence(ops.convert_to_tensor(tokens[start:start + batch_size]),
                                             ops.convert_to_tensor(ids[start:start + batch_size]))
            mask = np.zeros(seq.shape, bool)
            mask[:, :k] = True  # the image fully masked; "none" masks the caption too
            mask[:, k:] = mask_text
            (ce_sum, ce_count), _ = task.masked_losses(seq, ops.convert_to_tensor(mask), modalities,
                                                       training=False)["image"]
            total, count = total + float(ce_sum), count + float(ce_count)
        out[name] = total / count
    return out


def _line(name: str, scores: dict) -> str:
    parts = "  ".join(f"{k} {scores[k]:.3f}" for k in ("shape", "color", "size", "cell", "exact", "count"))
    return f"{name:<4} attribute {scores['attribute']:.3f}   ({parts})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="a trained UPGen workdir to score")
    parser.add_argument("--make_data", help="write tokenized shapes data into this directory")
    parser.add_argument("--image_tokenizer", help="saved image tokenizer (with --make_data)")
    parser.add_argument("--examples", type=int, default=200, help="eval captions / images for T2I and I2T")
    parser.add_argument("--probe_train", type=int, default=1000)
    parser.add_argument("--probe_test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a generation setting of the task, e.g. --set guidance_scale=1.0")
    parser.add_argument("--output_dir", default=None)
    args = parser.parse_args(argv)
    command = common.print_command(argv)
    if args.make_data:
        if not args.image_tokenizer:
            parser.error("--make_data needs --image_tokenizer")
        summary = make_data(args.make_data, args.image_tokenizer, seed=args.seed)
        print(json.dumps(summary, indent=2))
        return 0
    if not args.workdir:
        parser.error("give --workdir (score) or --make_data (write data)")
    import ast

    generation = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            generation[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            generation[key] = value  # a bare string, e.g. text_order=left_to_right
    results, samples = score(args.workdir, args.examples, args.probe_train, args.probe_test, args.seed, generation)
    print(f"UPGen at step {results['step']}: {args.examples} eval examples")
    print(_line("T2I", results["t2i"]) + f"   {results['t2i_seconds']:.0f}s")
    print(_line("I2T", results["i2t"]) + f"   {results['i2t_seconds']:.0f}s")
    ce = results["caption_reliance"]
    print(f"image CE, image fully masked: right caption {ce['right']:.3f}  no caption {ce['none']:.3f}  "
          f"other caption {ce['other']:.3f}")
    for name, key in (("probe (trained)", "probe"), ("probe (untrained)", "probe_untrained")):
        probe = results[key]
        parts = "  ".join(f"{a} {probe[a]['accuracy']:.3f}" for a in ("shape", "color", "cell", "count"))
        print(f"{name:<18} mean {probe['mean']['accuracy']:.3f}   ({parts})   chance {probe['mean']['chance']:.3f}")
    for sample in results["i2t_samples"][:4]:
        print(f"  true: {sample['true']!r}\n   I2T: {sample['generated']!r}")
    output = Path(args.output_dir or Path(args.workdir) / "benchmark")
    output.mkdir(parents=True, exist_ok=True)
    tiles = ([(image, f"T2I: {c}") for c, image in samples["t2i"]]
             + [(image, f"I2T: {c}") for c, image in samples["i2t"]]
             + [(image, "unconditional") for image in samples["unconditional"]])
    shapes.save_grid([t[0] for t in tiles], [t[1] for t in tiles], output / "samples.png")
    written = {**results, "command": command}
    (output / "upgen_shapes.json").write_text(json.dumps(written, indent=2, default=str) + "\n")
    print(f"wrote {output / 'samples.png'} and {output / 'upgen_shapes.json'}")
    common.report("upgen_shapes", results, argv)  # upgen_shapes.json's figures
    return 0


if __name__ == "__main__":
    sys.exit(main())
