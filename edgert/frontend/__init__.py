"""Readers of model files (GGUF today); they produce a config and named numpy tensors."""

from edgert.frontend.gguf_reader import GGUFModel, read_gguf

__all__ = ["GGUFModel", "read_gguf"]
