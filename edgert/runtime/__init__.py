"""The device runtime: loads an artifact and runs it.

Imports only numpy, the TVM runtime (works with ``TVM_USE_RUNTIME_LIB=1``), `tokenizers` and
`jinja2` for text; never `edgert.compiler`, `edgert.frontend` or `tvm.relax`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgert.errors import ArtifactError
from edgert.runtime.artifact import Artifact, open_artifact
from edgert.runtime.codec import Codec
from edgert.runtime.generator import ChatSession, GenerationStats, Generator, Token
from edgert.runtime.graph import GraphModel
from edgert.runtime.sampling import SamplingParams

__all__ = [
    "Artifact",
    "ChatSession",
    "Codec",
    "GenerationStats",
    "Generator",
    "GraphModel",
    "SamplingParams",
    "Token",
    "load",
    "open_artifact",
]


def load(path: str | Path, threads: int | None = None, context_length: int | None = None) -> Any:
    """Open and verify an artifact and load it for running, by its model family.

    ``llama``: a `Generator` (``.generate(prompt)``); ``whisper``: a `Transcriber`; ``marian``: a
    `Translator`; ``graph``: a `GraphModel`, called with numpy arrays by input name
    (``model(input=x)``) and returning the outputs by name; ``codec``: a `Codec`
    (``.encode(audio)``, ``.decode(codes)``, ``.encoder()`` / ``.decoder()`` streams).
    """
    artifact = open_artifact(path)
    if artifact.family == "llama":
        return Generator(artifact, threads=threads, context_length=context_length)
    if artifact.family == "graph":
        return GraphModel(artifact, threads=threads)
    if artifact.family == "whisper":
        from edgert.runtime.transcriber import Transcriber

        return Transcriber(artifact, threads=threads)
    if artifact.family == "marian":
        from edgert.runtime.translator import Translator

        return Translator(artifact, threads=threads)
    if artifact.family == "codec":
        return Codec(artifact, threads=threads)
    raise ArtifactError(f"{path}: model family '{artifact.family}' has no runtime in this edgert")
