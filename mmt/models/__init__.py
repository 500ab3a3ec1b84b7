"""mmt's models: ITIT, UPGen, M3AE, DALL-E (keras.ops only; no TensorFlow, no gin)."""
