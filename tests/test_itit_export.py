"""ITIT at paper-scale plumbing, at toy size: a frozen T5 preset stays out of checkpoints and
exports, resumes refuse another preset, the text conventions come from the vocabulary, and
an export trained under TensorFlow generates under `KERAS_BACKEND=jax`."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mmt.tasks import exports
from mmt.data import manifests, pipeline, schema
from mmt.tasks.itit import ITITTask, text_conventions
from mmt.optimizers import Adafactor, Constant
from mmt.tokenizers.text import TextTokenizer, train_sentencepiece
from mmt.tokenizers.vqgan import VQGAN
from mmt.training.trainer import Trainer, TrainingError
from t5_presets import t5_preset

REPO = Path(__file__).resolve().parents[1]
GRID, CODES, LENGTH = (4, 4), 32, 8
NETWORK = dict(size="tiny", image_vocab_size=CODES, grid=GRID, text_length=LENGTH,
               size_overrides={"encoder_depth": 1, "encoder_width": 32, "decoder_width": 32,
                               "text_encoder_width": 32, "encoder_heads": 2, "decoder_heads": 2,
                               "text_decoder_depth": 1, "image_decoder_depth": 1})
CAPTIONS = ["a red circle", "a blue square", "a large green triangle", "a small red square in the top left",
            "two blue circles", "a green circle at the bottom"]


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """Text vocabulary, an (untrained) image tokenizer, token data made with both, a T5 preset."""
    root = tmp_path_factory.mktemp("itit_export")
    vocab = train_sentencepiece(CAPTIONS * 20, root / "vocab.model", vocab_size=40, model_type="bpe")
    keras.utils.set_random_seed(0)
    tokenizer = VQGAN(image_size=16, filters=8, channel_multipliers=(1, 1, 1), num_res_blocks=1,
                      embedding_dim=8, codebook_size=CODES, code_dim=4, num_groups=4)
    tokenizer.build_for_images()
    tokenizer.save(root / "tokenizer")
    images = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    codes = tokenizer.encode(images)
    ids = vocab.encode([CAPTIONS[i % len(CAPTIONS)] for i in range(24)], LENGTH)
    records = ((f"r{i:02d}", schema.encode_example(f"r{i:02d}", image_tokens=codes[i], text_ids=ids[i]))
               for i in range(24))
    data = root / "data"
    manifests.write_manifest(
        data, splits={"paired": schema.write_split(data, "paired", records, 2)},
        image_tokenizer=manifests.ImageTokenizerInfo(tokenizer.fingerprint(), GRID, CODES),
        text_vocab=manifests.TextVocabInfo(vocab.fingerprint(), vocab.vocab_size))
    preset = root / "t5"
    t5_preset(preset, vocabulary_size=vocab.vocab_size)
    return {"root": root, "vocab": str(root / "vocab.model"), "tokenizer": str(root / "tokenizer"),
            "data": str(data), "preset": str(preset), "image": images[0]}


def _trainer(files, steps, preset=None, **task):
    network = {**NETWORK, "text_encoder": preset or "trainable", "text_vocab_size": 40, "dropout": 0.1,
               "drop_path": 0.1}
    stream = pipeline.StreamSpec(files["data"], "paired", 4, fields=("image_tokens", "text_ids"), text_length=LENGTH)
    return Trainer(task=functools.partial(ITITTask, network=network, image_tokenizer=files["tokenizer"],
                                          text_vocab=files["vocab"], generation={"num_steps": 2, "beam_size": 1},
                                          **task),
                   streams={"paired": stream}, train_steps=steps, mode="graph", checkpoint_every=2, log_every=1,
                   optimizer=functools.partial(Adafactor, learning_rate=Constant(1e-2), beta_1=0.9),
                   progress_bar=False)


def _losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in rows}


def _newest(workdir):
    return sorted((Path(workdir) / "checkpoints").glob("ckpt-*[0-9]"))[-1]


@pytest.mark.slow
def test_frozen_t5_stays_out_of_checkpoints_and_resume_is_exact(run_files, tmp_path):
    trainer = _trainer(run_files, 4, preset=run_files["preset"])
    trainer.run(str(tmp_path / "a"))
    task = trainer.task
    frozen = exports.frozen_variables(task)
    assert frozen and all(not v.trainable for v in frozen)

    # The checkpoint holds the trainable weights, the optimizer's slots and the trainer's
    # state, nothing of T5: count and bytes.
    reader = tf.train.load_checkpoint(str(_newest(tmp_path / "a") / "ckpt"))
    shapes = reader.get_variable_to_shape_map()
    tensors = {k: reader.get_tensor(k) for k in shapes if k != "_CHECKPOINTABLE_OBJECT_GRAPH"
               and not k.startswith("iterator")}
    model = {k: v for k, v in tensors.items() if k.startswith("model/")}
    slots = {k: v for k, v in tensors.items() if k.startswith("optimizer_model/")}
    state = {k: v for k, v in tensors.items() if k not in model and k not in slots}
    expected = exports.weight_names(task.model, exclude=frozen)
    assert len(model) == len(expected) == len(task.model.weights) - len(frozen)
    assert not [k for k in model if "text_encoder" in k]
    assert sum(v.nbytes for v in model.values()) == sum(int(np.prod(v.shape)) * 4 for v in expected.values())
    optimizer = trainer.optimizers["model"]
    assert len(slots) == len(optimizer.variables)
    assert sum(v.nbytes for v in slots.values()) == sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in optimizer.variables)
    assert sorted(k.split("/")[0] for k in state) == ["skipped_in_row", "skipped_total", "step"]
    marker = json.loads((_newest(tmp_path / "a") / "COMMITTED.json").read_text())
    assert marker["metadata"]["frozen"]["text_encoder"] == {"source": run_files["preset"],
                                                           "fingerprint": task.model.text_encoder.fingerprint}

    # Resumed (4 -> 6) == uninterrupted (0 -> 6), dropout and drop-path on.
    _trainer(run_files, 6, preset=run_files["preset"]).run(str(tmp_path / "a"))
    _trainer(run_files, 6, preset=run_files["preset"]).run(str(tmp_path / "b"))
    resumed, uninterrupted = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    for step in (5, 6):
        assert resumed[step] == uninterrupted[step], step

    # Another preset behind the same path: the resume is refused, naming the part.
    other = tmp_path / "other_t5"
    t5_preset(other, vocabulary_size=40, seed=1)
    with pytest.raises(TrainingError, match="frozen part 'text_encoder'"):
        _trainer(run_files, 8, preset=str(other)).run(str(tmp_path / "a"))


def test_text_conventions_come_from_the_vocabulary(run_files, tmp_path):
    vocab = TextTokenizer.from_file(run_files["vocab"])
    network = text_conventions({"text_encoder": "trainable"}, run_files["vocab"])
    assert (network["pad_id"], network["eos_id"], network["bos_id"]) == (vocab.pad_id, vocab.eos_id, vocab.bos_id)
    with pytest.raises(ValueError, match=r"network\['bos_id'\] = 7.*vocab.model"):
        text_conventions({"bos_id": 7}, run_files["vocab"])
    # A T5 preset without its SentencePiece model: T5's own conventions (decoder starts at pad).
    t5 = text_conventions({"text_encoder": run_files["preset"]}, None)
    assert (t5["pad_id"], t5["eos_id"], t5["bos_id"]) == (0, 1, 0)


@pytest.mark.slow
def test_export_trained_under_tensorflow_generates_under_jax(run_files, tmp_path):
    pytest.importorskip("jax")
    workdir = tmp_path / "run"
    trainer = _trainer(run_files, 3)
    trainer.run(str(workdir))
    export = workdir / "export"
    document = exports.read_document(export)
    assert document["task"] == "mmt.tasks.itit.ITITTask" and document["step"] == 3
    assert (export / "assets" / "text_vocab" / "vocab.model").is_file()
    # The same logits from the export under TensorFlow ...
    task, _ = exports.load_task(export)
    inputs = {"image_tokens": np.arange(16, dtype=np.int32).reshape(1, 16) % CODES,
              "text_ids": np.asarray(TextTokenizer.from_file(run_files["vocab"]).encode(["a red circle"], LENGTH),
                                     np.int32)}
    reference = [np.asarray(x) for x in trainer.task.model(inputs)]
    np.testing.assert_array_equal(np.asarray(task.model(inputs)[0]), reference[0])
    np.save(tmp_path / "inputs.npy", inputs, allow_pickle=True)

    # ... and under JAX, in a process without the trainer; then mmt.generate both ways.
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    script = (
        "import sys, numpy as np\n"
        "from mmt.tasks import exports\n"
        f"task, _ = exports.load_task({str(export)!r})\n"
        f"inputs = np.load({str(tmp_path / 'inputs.npy')!r}, allow_pickle=True).item()\n"
        "image, text = task.model(inputs)\n"
        f"np.savez({str(tmp_path / 'jax.npz')!r}, image=np.asarray(image), text=np.asarray(text))\n"
        "assert 'tensorflow' not in sys.modules, 'the export loaded TensorFlow'\n")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = np.load(tmp_path / "jax.npz")
    # Two backends' float32 kernels: sums over <= 64 terms of O(1) values per layer,
    # through four small layers -- a few hundred float32 ulps at most.
    np.testing.assert_allclose(got["image"], reference[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["text"], reference[1], rtol=1e-4, atol=1e-4)

    Image.fromarray(run_files["image"]).save(tmp_path / "input.png")
    result = subprocess.run(
        [sys.executable, "-m", "mmt.generate", f"--workdir={workdir}", "--prompt=a red circle",
         f"--image={tmp_path / 'input.png'}", f"--output={tmp_path / 'out'}"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (png,) = (tmp_path / "out").glob("000_*.png")
    assert Image.open(png).size == (16, 16)
    captions = json.loads((tmp_path / "out" / "captions.json").read_text())
    assert list(captions) == [str(tmp_path / "input.png")]
