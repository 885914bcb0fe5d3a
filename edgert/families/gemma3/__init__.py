"""Gemma 3 (Google): decoder-only LMs with sliding-window and global attention layers."""
