"""Marian translation: `model`, `build`, `translator` (runtime, on the shared seq2seq decoding)."""
