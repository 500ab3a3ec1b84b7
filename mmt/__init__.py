"""mmt: multimodal masked vision-language transformers.

Implements ITIT, UPGen, M3AE and DALL-E in TensorFlow / Keras 3. Importing `mmt` is
cheap: it imports neither TensorFlow nor Keras; submodules import what they need.
"""

__version__ = "0.1.0"
