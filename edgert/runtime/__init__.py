"""The device runtime's shared parts: sessions on the TVM runtime, sampling, tokenizer, and the
tasks several families use (causal-LM generation, seq2seq decoding, plain graphs).

Imports only numpy, `tvm_ffi` with ``libtvm_runtime.so``, `tokenizers` and `jinja2`; never
`edgert.compiler`, `edgert.frontend` or `tvm.relax`. Load an artifact with `edgert.load`.
"""

from __future__ import annotations

from edgert.artifact import Artifact, open_artifact
from edgert.runtime.generator import ChatSession, GenerationStats, Generator, Token
from edgert.runtime.graph import GraphModel
from edgert.runtime.sampling import SamplingParams

__all__ = [
    "Artifact",
    "ChatSession",
    "GenerationStats",
    "Generator",
    "GraphModel",
    "SamplingParams",
    "Token",
    "open_artifact",
]
