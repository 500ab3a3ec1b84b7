"""A tiny masked-caption model that exercises the trainer in tests (not a library model).

Registered with gin as `TinyTask`; `tests/gin/tiny_train.gin` trains it on the
text-only split of a small shapes data directory.
"""

from __future__ import annotations

import gin
import keras
from keras import ops

from mmt import backend
from mmt.layers import Dropout
from mmt.tasks.base import OptimizerGroup, Ratio, Task, task_arguments

MASK_ID = 2  # UNK doubles as the mask token in this toy
# No attention biases: the key bias has an exactly-zero gradient (softmax is shift
# invariant), and Adafactor turns its rounding noise into full-size updates.


class TinyTask(Task):
    def __init__(self, vocab_size: int = 128, text_length: int = 16, width: int = 32, mask_rate: float = 0.3,
                 nan_at_steps: tuple[int, ...] = (), two_groups: bool = False, dropout: float = 0.0,
                 drop_path: float = 0.0, random_mask: bool = True):
        self.arguments = task_arguments(locals())  # what a completed run's export records
        self.vocab_size, self.text_length, self.mask_rate = vocab_size, text_length, mask_rate
        self.nan_at_steps = tuple(nan_at_steps)
        self.two_groups = two_groups
        self.random_mask = random_mask
        tokens = keras.Input((text_length,), dtype="int32")
        x = keras.layers.Embedding(vocab_size, width, name="embed")(tokens)
        x = Dropout(dropout)(x)
        attended = keras.layers.MultiHeadAttention(2, width // 2, use_bias=False, name="attention")(x, x)
        if drop_path:  # a residual branch dropped per example (stochastic depth)
            attended = x + Dropout(drop_path, noise_shape=(None, 1, 1))(attended)
        x = attended
        x = keras.layers.Dense(2 * width, activation="gelu", name="mlp")(x)
        logits = keras.layers.Dense(vocab_size, name="logits", dtype="float32")(x)
        self.model = keras.Model(tokens, logits, name="tiny")
        self.loss_weights = {"masked_ce": 1.0, "l2": 1e-4}

    def build(self):
        self.model(ops.zeros((1, self.text_length), "int32"))

    def data_expectations(self):
        from mmt.tasks.base import DataExpectations

        return DataExpectations(text_vocab_size=self.vocab_size, text_length=self.text_length,
                                special_text_ids={"mask_id": MASK_ID},
                                bindings={"text_vocab_size": "TinyTask.vocab_size",
                                          "text_length": "TinyTask.text_length"})

    def optimizer_groups(self):
        if not self.two_groups:
            return super().optimizer_groups()
        return (OptimizerGroup("head", losses=("masked_ce",), variable_prefixes=("logits", "mlp")),
                OptimizerGroup("body", losses=("masked_ce", "l2")))

    def compute_losses(self, batch, step, seed):
        ids = batch["text"]["text_ids"]
        real = ops.cast(ops.not_equal(ids, 0), "float32")
        if self.random_mask:
            draw = backend.uniform(ops.shape(ids), seed)
        else:  # every third position: the same whatever the replica count
            draw = ops.cast(ops.arange(self.text_length) % 3 == 0, "float32")[None] * 0 + ops.cast(
                ops.arange(self.text_length) % 3 != 0, "float32")[None] + ops.zeros(ops.shape(ids))
        mask = ops.cast(draw < self.mask_rate, "float32") * real
        inputs = ops.where(mask > 0, MASK_ID, ids)
        logits = self.model(inputs, training=True)
        ce = keras.losses.sparse_categorical_crossentropy(ids, logits, from_logits=True)
        numerator = ops.sum(ce * mask)
        for bad in self.nan_at_steps:
            numerator = ops.where(ops.equal(step, bad), float("nan"), numerator)
        l2 = ops.mean(ops.square(self.model.get_layer("embed").embeddings))
        return {"masked_ce": Ratio(numerator, ops.sum(mask)), "l2": l2}


gin.external_configurable(TinyTask, "TinyTask")
