"""Importers of public image-tokenizer weights into ordinary mmt `ImageTokenizer` directories.

    python -m mmt.tokenizers.converters maskgit_vqgan --checkpoint=tokenizer_imagenet256_checkpoint --output=DIR
    python -m mmt.tokenizers.converters dalle_dvae --encoder=encoder.pkl --decoder=decoder.pkl --output=DIR

The output directory (`config.json` + `model.weights.h5`) is what `--image_tokenizer`,
Beam's tokenize pipeline and generation take, exactly like a tokenizer mmt trained.
Readers: `flax_msgpack` (Flax checkpoints, no flax needed) and `torch_pickle` (torch
files, no torch needed, no pickle code run). Nothing here downloads anything.
"""
