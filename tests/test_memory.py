"""`--dry_run`'s per-replica memory: the activation formula, and ITIT-H with a T5-XXL-shaped
preset reported without materialising the encoder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmt.training.memory import StackPass, activation_bytes

REPO = Path(__file__).resolve().parents[1]
# T5-XXL (v1.1) as keras-hub's preset config.json describes it; no weights file.
T5_XXL = {"vocabulary_size": 32128, "hidden_dim": 4096, "intermediate_dim": 10240, "num_layers": 24,
          "num_heads": 64, "activation": "gelu", "key_value_dim": 64, "dropout": 0.1,
          "use_gated_activation": True, "layer_norm_epsilon": 1e-06, "tie_embedding_weights": False}


def test_activation_bytes_by_hand():
    # Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes per layer in 16 bits.
    p = StackPass("x", batch=2, tokens=10, width=8, depth=3, heads=4)
    per_layer_16bit = 10 * 2 * 8 * (34 + 5 * 4 * 10 / 8)
    assert activation_bytes(p, 2) == 3 * per_layer_16bit
    assert activation_bytes(p, 4) == 2 * 3 * per_layer_16bit


@pytest.mark.slow
def test_itit_h_dry_run_with_a_t5_xxl_shaped_preset(tmp_path):
    preset = tmp_path / "t5_xxl"
    preset.mkdir()
    (preset / "config.json").write_text(json.dumps({"class_name": "T5Backbone", "config": T5_XXL}))
    network = ("{'size': %ITIT_SIZE, 'image_vocab_size': %IMAGE_VOCAB_SIZE, 'grid': %GRID, "
               "'text_vocab_size': %TEXT_VOCAB_SIZE, 'text_length': %TEXT_LENGTH, 'text_encoder': %TEXT_ENCODER, "
               "'dropout': %DROPOUT, 'drop_ratio': %DROP_RATIO, 'text_encoder_dtype': 'bfloat16'}")
    result = subprocess.run(
        [sys.executable, "-m", "mmt.train", "--gin_file=gin/itit_h.gin", f"--workdir={tmp_path / 'w'}", "--dry_run",
         "--replicas=256", f"--gin_param=DATA_DIR='{tmp_path / 'no_data'}'",
         f"--gin_param=TEXT_ENCODER='{preset}'", f"--gin_param=ITITTask.network = {network}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # The T5-XXL encoder: 4.76B parameters counted from the config, held in bf16.
    assert "frozen text_encoder: 4,762,310,656 parameters [bfloat16]" in out
    assert "one TPU v4 core (32 GiB HBM):" in out and "one TPU v5e core (16 GiB HBM): does NOT fit" in out
    assert "activations I2T2I soft text T5 encoder (b 2, s 64, 24 x 4096)" in out
    assert not (tmp_path / "w").exists()  # a dry run writes nothing
