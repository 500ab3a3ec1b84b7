"""Data: the embedded `shapes` data set, the TFRecord schema and tf.data pipelines."""
