"""tensorflow-datasets builders that turn user videos + annotations into ArrayRecord shards (no TensorFlow)."""
