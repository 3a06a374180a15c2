"""Video decoding, Molmo2 preprocessing and prompt layout."""
