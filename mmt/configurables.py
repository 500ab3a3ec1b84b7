"""The one place where mmt's library classes and functions are registered with gin.

Library modules never import gin (STYLE.md, principle 3): they take plain typed
arguments, and this module makes them bindable. Entry points import it through
`mmt.config.parse`. Names are short and unique so gin files read naturally
(`ShapesConfig.resolution = 64`, `Trainer.train_steps = 1000`).

Classes that hold TensorFlow state (optimizers, the trainer's task) are bound in gin
without parentheses (`Trainer.optimizer = @Adafactor`): the trainer calls the factory
inside its strategy's scope, where their variables must be created.
"""

import gin
import keras

from mmt.data import pipeline, shapes
from mmt.optimizers import Adafactor, AdamW, Constant, Rsqrt, WarmupCosine
from mmt.tokenizers.dvae import DVAE
from mmt.tasks.dvae import DVAETask
from mmt.tokenizers.vqgan import VQGAN
from mmt.tasks.vqgan import VQGANTask
from mmt.training.trainer import Trainer as _Trainer

gin.external_configurable(shapes.ShapesConfig, "ShapesConfig")
gin.external_configurable(pipeline.StreamSpec, "StreamSpec")

# Optimizers and schedules.
gin.external_configurable(Adafactor, "Adafactor")
gin.external_configurable(AdamW, "AdamW")  # keras AdamW + MAE's exclude_one_dimensional
gin.external_configurable(keras.optimizers.Adam, "Adam")
gin.external_configurable(keras.optimizers.SGD, "SGD")
gin.external_configurable(WarmupCosine, "WarmupCosine")
gin.external_configurable(Constant, "Constant")
gin.external_configurable(Rsqrt, "Rsqrt")

# DALL-E's dVAE image tokenizer and its training task.
gin.external_configurable(DVAE, "DVAE")
gin.external_configurable(DVAETask, "DVAETask")

# The VQGAN image tokenizer (MaskGIT / ITIT) and its training task.
gin.external_configurable(VQGAN, "VQGAN")
gin.external_configurable(VQGANTask, "VQGANTask")

#: `Trainer` with its gin bindings applied (what `python -m mmt.train` constructs).
Trainer = gin.external_configurable(_Trainer, "Trainer")

# Models.
from mmt.tasks.itit import ITITTask  # noqa: E402

gin.external_configurable(ITITTask, "ITITTask")

# UPGen (issue 8).
from mmt.tasks.upgen import UPGenTask  # noqa: E402

gin.external_configurable(UPGenTask, "UPGenTask")

# M3AE and MAE (issue 19).
from mmt.tasks.m3ae import M3AETask  # noqa: E402

gin.external_configurable(M3AETask, "M3AETask")

# The CLIP-style reranker of DALL-E §2.6 (issue 20).
from mmt.tasks.clip import CLIPTask  # noqa: E402

gin.external_configurable(CLIPTask, "CLIPTask")

# DALL-E's stage-two transformer (issue 20).
from mmt.tasks.dalle import DALLETask  # noqa: E402

gin.external_configurable(DALLETask, "DALLETask")
