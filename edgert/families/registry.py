"""The one table of model families: names, GGUF architectures and source formats -> a family's
build (compile side) and its runtime task (device side).

Adding an architecture adds a folder under `edgert/families/` and one `Family` line here.
Builds and tasks are named as ``"module:attribute"`` and imported on use, so a device that loads
an artifact imports only that family's task, never the compiler (the runtime-only test checks it).
Choosing a family for a model file and compiling it is `edgert.families.compile`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgert.errors import ArtifactError, UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """A model family: what it reads, the options its build takes, and where its code is."""

    name: str
    description: str
    build: str  # "module:function" taking a `BuildRequest`
    task: str  # "module:callable" (a class or factory) called as f(artifact, threads=..., [context_length=...])
    formats: tuple[str, ...]  # source formats it reads (see `source_format`)
    options: frozenset[str]  # compile options its build takes
    gguf_architectures: tuple[str, ...] = ()
    takes_context: bool = False  # the task takes ``context_length``
    device_ops: dict[str, str] = field(default_factory=dict)  # agent op name -> "module:function"
    calibrate: str | None = None  # "module:function" fitting early exits (`edgert calibrate`), if any

    def build_function(self) -> Any:
        """The build function (imports the compiler)."""
        return _resolve(self.build)

    def task_class(self) -> Any:
        """The runtime class that serves this family's artifacts (imports the runtime only)."""
        return _resolve(self.task)

    def calibrate_function(self) -> Any:
        """The early-exit calibration (host side), or None when the family has none."""
        return _resolve(self.calibrate) if self.calibrate else None


_LLM_OPTIONS = {"quant", "weight_dtype", "context_length", "prefill_chunk_size", "threads"}

FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        "decoder-only language models of the Llama architecture (SmolLM2, Llama, TinyLlama)",
        build="edgert.families.llama.build:build",
        task="edgert.runtime.generator:Generator",
        formats=("gguf",),
        options=frozenset(_LLM_OPTIONS | {"library_cache", "activations", "evictable_kv", "kv_dtype"}),
        gguf_architectures=("llama",),
        takes_context=True,
        device_ops={"run": "edgert.families.llama.device:run"},
        calibrate="edgert.families.llama.calibrate:calibrate",
    ),
    Family(
        "gemma3",
        "Gemma 3 decoder-only language models (sliding-window and global attention layers)",
        build="edgert.families.gemma3.build:build",
        task="edgert.runtime.generator:Generator",
        formats=("gguf",),
        options=frozenset(_LLM_OPTIONS | {"library_cache", "activations"}),
        gguf_architectures=("gemma3",),
        takes_context=True,
        device_ops={"run": "edgert.families.llama.device:run"},
    ),
    Family(
        "whisper",
        "Whisper speech recognition (CTranslate2 model.bin)",
        build="edgert.families.whisper.build:build",
        task="edgert.families.whisper.transcriber:Transcriber",
        formats=("ctranslate2",),
        options=frozenset({"weight_dtype", "threads", "audio_ctx", "calibrate"}),
        device_ops={"transcribe": "edgert.families.whisper.device:transcribe"},
        calibrate="edgert.families.whisper.calibrate:calibrate",
    ),
    Family(
        "marian",
        "Marian encoder-decoder translation (transformers config.json + safetensors)",
        build="edgert.families.marian.build:build",
        task="edgert.families.marian.translator:Translator",
        formats=("marian",),
        options=frozenset({"weight_dtype", "threads"}),
    ),
    Family(
        "codec",
        "neural audio codecs: edgert's own, EnCodec and Mimi (config.json + model.safetensors)",
        build="edgert.families.codec.build:build",
        task="edgert.families.codec.stream:Codec",
        formats=("codec",),
        options=frozenset({"weight_dtype", "threads", "chunk_ms"}),
        device_ops={"codec_roundtrip": "edgert.families.codec.device:roundtrip"},
    ),
    Family(
        "graph",
        "plain ONNX and TFLite graphs",
        build="edgert.families.graph.build:build",
        task="edgert.runtime.graph:open_graph",
        formats=("onnx", "tflite"),
        options=frozenset({"quant", "threads", "input_shapes", "tuning", "calibrate"}),
    ),
)


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def get(name: str) -> Family:
    """The family called ``name``; a clear error names the known ones."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnsupportedModelError(f"model family '{name}' is not known to this edgert ({', '.join(names())})")


def names() -> list[str]:
    """Every family's name, in table order."""
    return [f.name for f in FAMILIES]


def for_gguf_architecture(arch: str, where: Path | str) -> Family:
    """The family that compiles GGUF architecture ``arch``."""
    for family in FAMILIES:
        if arch in family.gguf_architectures:
            return family
    known = ", ".join(a for f in FAMILIES for a in f.gguf_architectures)
    raise UnsupportedModelError(f"{where}: architecture '{arch}' is not supported (edgert compiles: {known})")


def load(
    path: str | Path, threads: int | None = None, context_length: int | None = None, device_kind: str | None = None
) -> Any:
    """Open and verify an artifact and load it with its family's runtime task.

    ``llama``: a `Generator` (``.generate(prompt)``); ``whisper``: a `Transcriber`; ``marian``: a
    `Translator`; ``graph``: a `GraphModel` (for NPU artifacts a `PartitionedGraph`), called with
    numpy arrays by input name; ``codec``: a `Codec` (``.encode``, ``.decode``, ``.encoder()`` /
    ``.decoder()`` streams).

    A GPU artifact runs on the first OpenCL device, a CPU one on the CPU; ``device_kind`` (cpu, gpu)
    refuses an artifact built for the other kind, saying how to build one.
    """
    from edgert.artifact import open_artifact
    from edgert.artifact.signing import require_trusted
    from edgert.runtime.session import check_device_kind

    artifact = open_artifact(path)
    require_trusted(artifact.signature(), path)  # before anything of it is loaded (the library loads check again)
    check_device_kind(artifact, device_kind)
    try:
        family = get(artifact.family)
    except UnsupportedModelError:
        raise ArtifactError(f"{path}: model family '{artifact.family}' has no runtime in this edgert") from None
    kwargs: dict[str, Any] = {"threads": threads}
    if family.takes_context:
        kwargs["context_length"] = context_length
    return family.task_class()(artifact, **kwargs)


def device_op(op: str, family_name: str | None = None) -> tuple[Family, Any] | None:
    """(family, function) serving the device agent's ``op`` (for ``family_name``'s models when given:
    several families serve ``run``), or None when no such family serves it."""
    for family in FAMILIES:
        if op in family.device_ops and family_name in (None, family.name):
            return family, _resolve(family.device_ops[op])
    return None


def families_serving(op: str) -> list[str]:
    """Names of the families whose models serve the device agent's ``op``."""
    return [f.name for f in FAMILIES if op in f.device_ops]
