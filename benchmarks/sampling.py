"""Speed of the compiled samplers around a small transformer, on this host's Keras backend.

    python benchmarks/sampling.py                                # TensorFlow, XLA
    KERAS_BACKEND=jax python benchmarks/sampling.py --batch=64   # JAX (e.g. on a GPU)

Times, after one compiling call, (1) `mmt.sampling.decode`: MaskGIT decoding of
`--image_tokens` tokens in `--steps` steps with classifier-free guidance (two model
calls per step, as ITIT T2I), and (2) `mmt.sampling.beam_search`: `--beam` beams over
`--text_length` tokens with a KV-cached causal decoder (ITIT I2T). The model is a tiny
random `TransformerStack` (width 128, depth 2): the numbers measure the samplers'
overhead at small scale, not a paper-sized model.

Then (3) autoregressive against parallel image decoding at one size (`--ar_size`, a
name both `DALLE_SIZES` and `UPGEN_SIZES` have) and one image-token count
(`--ar_grid` squared; 16 -> 256 tokens), after a `--ar_text_length` caption, random
weights, one timed run each (`--ar_repeats`): DALL-E's `sample_image_tokens` with the
KV cache (one position per step) and without it (the whole `[L + N]` buffer recomputed
at every one of the N steps), and MaskGIT decoding (`upgen_inference.text_to_image`,
no guidance: one call per step) with UPGen's bidirectional network of the same width,
depth and heads over the same `[N + L]` positions, in `--parallel_steps` steps. Image
tokens per second each; the JSON line adds `cache_speedup` (cached over uncached) and
`parallel_vs_ar` (MaskGIT at 24 steps over cached AR). Only ratios within one run
compare: the figures move with the machine's load.

Measured (2 CPU cores, AVX-512, TensorFlow 2.21 XLA, defaults, 2026-11-26):

    decode       batch 8, 256 tokens, 24 steps, V 1024, guided: 0.63 s/batch
    beam_search  batch 8, beam 4, 32 tokens, V 1024, cached: 0.04 s/batch

AR vs parallel, two runs of `python benchmarks/sampling.py --ar_batch=4` (other
defaults: tiny = width 128, depth 4, 32 text + 256 image tokens, V_i 1024) on 2 CPU
cores shared with other jobs (load average 11.6 / 10.1, fp32 matmul ceiling 17.5 / 19.4
GFLOP/s in the same runs), TensorFlow 2.21 XLA, 2026-12-03:

                             run 1                  run 2
    DALL-E AR, KV cache      3.42 s/batch  300/s    5.30 s/batch  193/s   image tokens/s
    DALL-E AR, no cache     31.6  s/batch   32/s   33.3  s/batch   31/s
    MaskGIT (UPGen), 12      1.42 s/batch  722/s    2.31 s/batch  444/s
    MaskGIT (UPGen), 24      3.95 s/batch  259/s    5.11 s/batch  200/s
    cache_speedup            9.3x                   6.3x
    parallel_vs_ar           0.87x                  1.04x

On a compute-bound CPU, cached AR (288 position-forwards in all, one per step) is about
as fast as 24 MaskGIT steps (24 x 288 position-forwards in wide batches). The spread
between the runs (cached AR 3.4 vs 5.3 s; 12 -> 24 steps 2.8x vs 2.2x where 2x is
expected) is the shared machine's: only ratios within one run compare, and even those
move by a third. Not measured on an accelerator, where per-step latency, not FLOPs,
bounds AR decoding.

`decode` took 1.53 s/batch on the same machine at the previous revision (658d70e), which drew
candidates by Gumbel-max: `[8, 256, 1024]` random variates and two logs per step,
XLA's CPU random-bit generation being most of the loop. `rng.categorical` now
inverts the cumulative distribution (one uniform per token). Accelerators generate
random bits at memory speed, so the gain there is smaller.
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np
from keras import ops

from mmt import layers, sampling
from mmt.backend import FixedSeed
from mmt.models import upgen_inference
from mmt.models.dalle import DALLE, sample_image_tokens
from mmt.models.upgen import UPGen

import common


def compile_fn(fn):
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    import tensorflow as tf

    return tf.function(fn, jit_compile=True, autograph=False)


def build(vocab: int, length: int, dim: int = 128, causal: bool = False):
    embed = layers.TokenEmbedding(vocab, dim)
    pos = layers.LearnedPositionEmbedding(length, dim)
    stack = layers.TransformerStack(2, num_heads=4, mlp_dim=4 * dim)
    stack(pos(embed(ops.zeros((1, length), "int32"))))
    mask = layers.causal_mask(length) if causal else None

    def logits(tokens, offset=None, **kwargs):
        """-> (logits [B, T, V], new cache or None)."""
        out = stack(pos(embed(tokens), offset=offset), mask=kwargs.pop("mask", mask), **kwargs)
        h, cache = out if isinstance(out, tuple) else (out, None)
        return embed.attend(h), cache

    return logits, stack


def timed(fn, *args, repeats: int):
    ops.convert_to_numpy(keras.tree.flatten(fn(*args))[0])  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        ops.convert_to_numpy(keras.tree.flatten(fn(*args))[0])
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--text_length", type=int, default=32)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ar_size", default="tiny", help="DALL-E and UPGen size name (tiny, B)")
    parser.add_argument("--ar_grid", type=int, default=16, help="image grid side: 16 -> 256 image tokens")
    parser.add_argument("--ar_text_length", type=int, default=32)
    parser.add_argument("--ar_text_vocab", type=int, default=512)
    parser.add_argument("--ar_batch", type=int, default=None, help="default: --batch")
    parser.add_argument("--parallel_steps", default="12,24", help="MaskGIT step counts (24 gives parallel_vs_ar)")
    parser.add_argument("--ar_repeats", type=int, default=1, help="timed runs of each AR / parallel sampler")
    parser.add_argument("--skip_ar", action="store_true", help="only the two sampler-overhead figures")
    args = parser.parse_args(argv)
    common.print_command(argv)
    print(f"backend {keras.backend.backend()}")
    keras.utils.set_random_seed(0)

    mask_id = args.vocab - 1
    image_logits, _ = build(args.vocab, args.image_tokens)

    def guided(tokens):  # ITIT App. B: t = 32, lambda = 2
        return sampling.decode(
            lambda x: image_logits(x)[0], tokens, mask_id, args.steps, seed=0,
            choice_temperature=32.0, guidance_scale=2.0,
            uncond_logits_fn=lambda x: image_logits(x)[0] * 0.5,
        )

    tokens = np.full((args.batch, args.image_tokens), mask_id, "int32")
    seconds = timed(compile_fn(guided), tokens, repeats=args.repeats)
    figures = {"backend": keras.backend.backend(), "decode_s_per_batch": round(seconds, 4)}
    print(f"decode       batch {args.batch}, {args.image_tokens} tokens, {args.steps} steps, "
          f"V {args.vocab}, guided: {seconds:.2f} s/batch")

    text_logits, stack = build(args.vocab, args.text_length, causal=True)
    cache = stack.init_cache(args.batch, args.text_length)

    def step(token, index, cache):
        logits, cache = text_logits(token, offset=index, mask=None, cache=cache, cache_index=index)
        return logits[:, 0], cache

    def beam(start, cache):
        return sampling.beam_search(
            step, start, args.text_length, 1, 0, beam_size=args.beam, cache=cache,
            cache_batch_axis=1,  # the stacked cache is [depth, B, 2, T, H, Dh]
        )

    start = np.full((args.batch, 1), 2, "int32")
    seconds = timed(compile_fn(beam), start, cache, repeats=args.repeats)
    print(f"beam_search  batch {args.batch}, beam {args.beam}, {args.text_length} tokens, "
          f"V {args.vocab}, cached: {seconds:.2f} s/batch")
    figures["beam_search_s_per_batch"] = round(seconds, 4)
    if not args.skip_ar:
        figures.update(ar_against_parallel(args))
    common.report("sampling", figures, argv)


def ar_against_parallel(args) -> dict:
    """DALL-E AR decoding (cached, uncached) and MaskGIT decoding with UPGen: image tokens per second."""
    batch = args.ar_batch or args.batch
    grid = (args.ar_grid, args.ar_grid)
    n = grid[0] * grid[1]
    common_args = dict(image_vocab_size=args.vocab, grid=grid, text_vocab_size=args.ar_text_vocab,
                       text_length=args.ar_text_length)
    dalle = DALLE(args.ar_size, **common_args)
    dalle.build_all()
    upgen = UPGen(args.ar_size, **common_args)
    upgen.build_all()
    print(f"AR vs parallel: size {args.ar_size} (width {dalle.cfg.width}, depth {dalle.cfg.depth}, "
          f"heads {dalle.cfg.heads}), batch {batch}, text {args.ar_text_length} + image {n} tokens, "
          f"V_i {args.vocab}, random weights, {args.ar_repeats} timed run(s) each")
    rng = np.random.default_rng(0)
    text_ids = rng.integers(4, args.ar_text_vocab, (batch, args.ar_text_length)).astype("int32")
    seed = np.array([0, 0], "int32")
    out, rates = {"ar_size": args.ar_size, "ar_image_tokens": n, "ar_batch": batch}, {}

    for name, use_cache in (("dalle_cached", True), ("dalle_uncached", False)):
        fn = compile_fn(lambda ids, s, use_cache=use_cache: sample_image_tokens(dalle, ids, FixedSeed(s),
                                                                               use_cache=use_cache))
        seconds = timed(fn, text_ids, seed, repeats=args.ar_repeats)
        rates[name] = batch * n / seconds
        print(f"{name:<16} {seconds:8.2f} s/batch  {rates[name]:10.1f} image tokens/s")
    steps_list = [int(v) for v in args.parallel_steps.split(",") if v.strip()]
    for steps in steps_list:
        fn = compile_fn(lambda ids, s, steps=steps: upgen_inference.text_to_image(
            upgen, ids, FixedSeed(s), num_steps=steps))
        seconds = timed(fn, text_ids, seed, repeats=args.ar_repeats)
        rates[f"maskgit_{steps}"] = batch * n / seconds
        print(f"{f'maskgit {steps} steps':<16} {seconds:8.2f} s/batch  {rates[f'maskgit_{steps}']:10.1f} image tokens/s")
    out.update({f"{k}_tokens_per_s": round(v, 2) for k, v in rates.items()})
    out["cache_speedup"] = round(rates["dalle_cached"] / rates["dalle_uncached"], 3)
    if 24 in steps_list:
        out["parallel_vs_ar"] = round(rates["maskgit_24"] / rates["dalle_cached"], 3)
    print(f"cache speedup (cached / uncached AR, {n} image tokens): {out['cache_speedup']:.2f}x"
          + (f"; MaskGIT 24 steps / cached AR: {out['parallel_vs_ar']:.2f}x" if "parallel_vs_ar" in out else ""))
    return out


if __name__ == "__main__":
    main()
