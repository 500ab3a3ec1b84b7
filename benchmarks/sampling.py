"""Speed of the compiled samplers around a small transformer, on this host's Keras backend.

    python benchmarks/sampling.py                                # TensorFlow, XLA
    KERAS_BACKEND=jax python benchmarks/sampling.py --batch=64   # JAX (e.g. on a GPU)

Times, after one compiling call, (1) `mmt.sampling.decode`: MaskGIT decoding of
`--image_tokens` tokens in `--steps` steps with classifier-free guidance (two model
calls per step, as ITIT T2I), and (2) `mmt.sampling.beam_search`: `--beam` beams over
`--text_length` tokens with a KV-cached causal decoder (ITIT I2T). The model is a tiny
random `TransformerStack` (width 128, depth 2): the numbers measure the samplers'
overhead at small scale, not a paper-sized model.

Measured (2 CPU cores, AVX-512, TensorFlow 2.21 XLA, defaults, 2026-11-26):

    decode       batch 8, 256 tokens, 24 steps, V 1024, guided: 0.63 s/batch
    beam_search  batch 8, beam 4, 32 tokens, V 1024, cached: 0.04 s/batch

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
    common.report("sampling", figures, argv)


if __name__ == "__main__":
    main()
