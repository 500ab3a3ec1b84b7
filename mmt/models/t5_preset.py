"""A keras-hub T5 preset directory read for its encoder alone (ITIT §4.1: frozen T5-XXL).

A preset written by `keras_hub.models.T5Backbone.save_to_preset` holds `config.json`
(the backbone's arguments), `model.weights.h5` (Keras's weights file of the whole
encoder-decoder) and, for a released preset, its SentencePiece vocabulary under
`assets/tokenizer/`. `T5Backbone.from_preset` would load encoder **and** decoder: about
11B parameters for T5-XXL where ITIT needs the 4.7B of the encoder. Here only the
encoder's datasets are read from the h5 file, one at a time, straight into the
encoder's variables, and their bytes are hashed on the way (the fingerprint that a
checkpoint records instead of the frozen weights).

Keras writes a functional model's layers under `layers/<snake_case class name>[_<n>]`,
numbered in the order of `model.layers`; `T5Backbone` creates the token embedding, the
encoder's layers, the encoder's final norm, then the decoder's, so encoder layer `i` is
`t5_transformer_layer[_i]` and the final norm is `t5_layer_norm` (the first one). Inside
a layer, groups are named after the attributes that hold sub-layers, and each layer's
own variables are `vars/0, vars/1, ...` in creation order.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
_RELATIVE_BUCKETS = 32  # keras-hub's T5MultiHeadAttention: relative_attention_buckets


class PresetError(ValueError):
    """The preset directory is missing a file or does not describe a T5 backbone."""


def read_config(preset: str | os.PathLike) -> dict[str, Any]:
    """The `T5Backbone` arguments of a preset directory (`config.json`'s `config`)."""
    path = os.path.join(os.fspath(preset), CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except FileNotFoundError:
        raise PresetError(f"{path} not found: the T5 text encoder needs a keras-hub T5 preset directory "
                          "(written by T5Backbone.save_to_preset)") from None
    except ValueError as e:
        raise PresetError(f"{path} is not JSON: {e}") from None
    config = document.get("config", document)
    missing = [k for k in ("vocabulary_size", "num_layers", "num_heads", "hidden_dim", "intermediate_dim")
               if k not in config]
    if missing:
        raise PresetError(f"{path} is not a T5 backbone config: no {missing}")
    return config


def encoder_parameter_count(config: Mapping[str, Any]) -> int:
    """Parameters of the encoder half (embeddings, layers, final norm), from the config alone.

    Per layer: Q, K, V, O projections (no biases), the MLP (two input projections when
    gated), two RMS-norm scales; the first layer also holds the relative position bias.
    T5-XXL (v1.1: d 4096, ff 10240, 64 heads x 64, 24 layers, 32,128 pieces): 4.76B.
    """
    d, ff, layers = int(config["hidden_dim"]), int(config["intermediate_dim"]), int(config["num_layers"])
    heads = int(config["num_heads"])
    inner = heads * int(config.get("key_value_dim") or d // heads)
    mlp = (3 if config.get("use_gated_activation", True) else 2) * d * ff
    per_layer = 4 * d * inner + mlp + 2 * d
    return int(config["vocabulary_size"]) * d + layers * per_layer + _RELATIVE_BUCKETS * heads + d


def encoder_groups(num_layers: int) -> dict[str, str]:
    """Encoder part -> its group in `model.weights.h5` (see the module docstring)."""
    groups = {"token_embedding": "layers/reversible_embedding", "final_norm": "layers/t5_layer_norm"}
    for i in range(num_layers):
        groups[f"layer_{i}"] = "layers/t5_transformer_layer" + (f"_{i}" if i else "")
    return groups


def load_layer(layer, group, digest) -> int:
    """Assigns `group`'s datasets to `layer` and its sub-layers (by attribute name).

    Only `vars/0` of the token embedding is read (its optional untied output table
    belongs to the decoder). Returns the number of values read; every dataset's name,
    shape, dtype and bytes go into `digest`.
    """
    count = 0
    own = group.get("vars")
    if own is not None and len(own):
        variables = list(layer._trainable_variables) + list(layer._non_trainable_variables)  # own, not nested
        for index, variable in enumerate(variables):
            dataset = own[str(index)]
            if tuple(dataset.shape) != tuple(variable.shape):
                raise PresetError(f"{dataset.name}: shape {tuple(dataset.shape)} in the file, "
                                  f"{tuple(variable.shape)} in the encoder")
            value = dataset[()]
            digest.update(f"{dataset.name}:{value.shape}:{value.dtype}".encode())
            digest.update(value.tobytes())
            variable.assign(value)  # cast to the variable's dtype (bfloat16 when asked) by Keras
            count += value.size
    for name in group:
        if name == "vars":
            continue
        child = getattr(layer, name, None)
        if child is None:
            raise PresetError(f"{group[name].name}: the encoder has no part named {name!r}")
        count += load_layer(child, group[name], digest)
    return count


def open_weights(preset: str | os.PathLike):
    """The preset's `model.weights.h5`, opened read-only with h5py."""
    import h5py  # a Keras dependency; imported here so that reading configs needs nothing

    path = os.path.join(os.fspath(preset), WEIGHTS_FILE)
    if not os.path.exists(path):
        raise PresetError(f"{path} not found: the preset has no weights")
    return h5py.File(path, "r")


def new_digest(preset: str | os.PathLike):
    """A sha256 that starts with the preset's config bytes (the weights follow as they load)."""
    digest = hashlib.sha256()
    with open(os.path.join(os.fspath(preset), CONFIG_FILE), "rb") as f:
        digest.update(f.read())
    return digest


__all__ = ["PresetError", "encoder_groups", "encoder_parameter_count", "load_layer", "new_digest", "open_weights",
           "read_config"]
