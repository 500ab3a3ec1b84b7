"""Tiny random keras-hub T5 presets on disk, of the structure the real ones have (tests only)."""

import keras


def t5_preset(directory, vocabulary_size=40, seed=0, hidden_dim=16):
    """A random T5 backbone (encoder and decoder, 2 layers each) saved to `directory`; returns it."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    t5 = keras_hub.models.T5Backbone(vocabulary_size=vocabulary_size, num_layers=2, num_heads=2,
                                     hidden_dim=hidden_dim, intermediate_dim=24, key_value_dim=8, dropout=0.0)
    t5.save_to_preset(str(directory))
    return t5
