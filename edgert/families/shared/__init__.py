"""Blocks several families share: the encoder-decoder stack and its paged cross/self attention."""
