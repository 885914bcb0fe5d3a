"""Llama-architecture language models: `model` (config + nn.Module), `loader` (GGUF weights), `build`, `device`."""
