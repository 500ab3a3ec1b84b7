"""Untrained tiny DALL-E and CLIP exports over one untrained dVAE (32x32 -> 8x8 codes of 16).

Shared by the reranking tests and the `benchmarks/dalle_shapes.py` smoke test: the
scoring and generation paths need real exports, not their training.
"""

from pathlib import Path


def make_exports(vocab: str, root: Path, pixel_clip: bool = False) -> dict[str, Path]:
    """Writes `root/{dvae, dalle/export, clip/export}`; returns the workdirs by name."""
    from mmt.tasks import exports
    from mmt.tasks.clip import CLIPTask
    from mmt.tasks.dalle import DALLETask
    from mmt.tokenizers.dvae import DVAE
    from mmt.tokenizers.text import TextTokenizer

    dvae = DVAE(image_size=32, vocab_size=16, width=8, width_multipliers=(1, 1, 1), blocks_per_group=1,
                decoder_input_width=8)
    dvae.build_for_images()
    dvae.save(root / "dvae")
    size = TextTokenizer.from_file(vocab).vocab_size
    common = dict(text_vocab_size=size, text_length=16, image_vocab_size=16, grid=tuple(dvae.grid_size))
    dalle = DALLETask(network={**common, "conv_kernel": 3, "size_overrides": {"width": 16, "depth": 4, "heads": 2}},
                      image_tokenizer=str(root / "dvae"), text_vocab=vocab, compile_inference=False,
                      rerank_samples=4)
    clip_network = {**common, "size_overrides": {"width": 16, "depth": 1, "heads": 2, "text_width": 16,
                                                 "text_depth": 1, "text_heads": 2, "embed_dim": 8}}
    if pixel_clip:
        clip_network.update(image_input="pixels", image_size=32, patch_size=8)
    clip = CLIPTask(network=clip_network, image_tokenizer=None if pixel_clip else str(root / "dvae"),
                    text_vocab=vocab, compile_inference=False)
    for task, name in ((dalle, "dalle"), (clip, "clip")):
        task.build()
        exports.save_task(task, root / name / "export", step=0)
    return {"dvae": root / "dvae", "dalle": root / "dalle", "clip": root / "clip"}
