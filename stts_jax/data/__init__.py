"""Video data: decoding (video), Molmo2 preprocessing and prompt layout (processor, tokenizer), per-example work
(examples), the Grain pipeline (pipeline), tfds preparation (tfds_builders) and the synthetic benchmark (synthetic).
"""
