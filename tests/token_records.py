"""Tiny shapes token records over an untrained 4x4 VQGAN, for command-line chain tests."""

from pathlib import Path


def make_token_records(root: Path, vocabulary: str, counts: dict[str, int]) -> dict:
    """Writes `root/vq` (an untrained 32x32 -> 4x4 VQGAN of 16 codes) and `root/data` (records).

    Args:
      counts: split -> examples (e.g. {"paired": 16}).

    Returns:
      `examples` (split -> shapes examples) and `gin_params`: the `--gin_param=` flags
      every token model's tiny gin file needs for this data (data, tokenizer,
      vocabularies, grid, text length).
    """
    from mmt.data import shapes
    from mmt.data.shapes.records import write_shapes_records
    from mmt.tokenizers.text import TextTokenizer
    from mmt.tokenizers.vqgan import VQGAN

    tokenizer = VQGAN(image_size=32, filters=8, channel_multipliers=(1, 1, 1, 1), num_res_blocks=0,
                      embedding_dim=8, codebook_size=16, num_groups=4)
    tokenizer.build_for_images()
    tokenizer.save(root / "vq")
    config = shapes.ShapesConfig(resolution=32, seed=11)
    examples = {s: list(shapes.generate(config, s, n)) for s, n in counts.items()}
    vocab = TextTokenizer.from_file(vocabulary)
    write_shapes_records(root / "data", config, examples, text_tokenizer=vocab, image_tokenizer=tokenizer,
                         num_shards=1)
    gin_params = [f"--gin_param=DATA_DIR='{root / 'data'}'", f"--gin_param=IMAGE_TOKENIZER='{root / 'vq'}'",
                  f"--gin_param=TEXT_VOCAB='{vocabulary}'", "--gin_param=IMAGE_VOCAB_SIZE=16",
                  "--gin_param=GRID=(4, 4)", f"--gin_param=TEXT_VOCAB_SIZE={vocab.vocab_size}",
                  "--gin_param=TEXT_LENGTH=16", "--gin_param=Trainer.mode='graph'",
                  "--gin_param=Trainer.progress_bar=False", "--gin_param=TRAIN_STEPS=2", "--gin_param=WARMUP_STEPS=1"]
    return {"examples": examples, "gin_params": gin_params}
