"""What the server serves: each artifact as a chat/completion model, a transcriber or an embedder."""

from __future__ import annotations

import asyncio
import base64
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgert.artifact import open_artifact
from edgert.errors import ArtifactError, EdgertError, UnsupportedModelError
from edgert.serve.engine import LLMEngine

KINDS = {"llama": "completion", "gemma3": "completion", "whisper": "transcription", "graph": "embedding"}


class OneThread:
    """A model that is not batched runs on one thread of its own, one call at a time (TVM's thread
    pool belongs to the thread that calls it, so it is made once, there)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1)

    async def call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Transcription(OneThread):
    """A Whisper artifact behind /v1/audio/transcriptions."""

    def __init__(self, path: Path, threads: int | None):
        super().__init__()
        from edgert.families.whisper.transcriber import Transcriber

        self.model = self.pool.submit(Transcriber, path, threads).result()

    def transcribe(self, data: bytes) -> dict[str, Any]:
        """Text and segments of an uploaded WAV file (the bytes of the multipart part)."""
        with tempfile.NamedTemporaryFile(suffix=".wav") as fh:
            fh.write(data)
            fh.flush()
            try:
                result = self.model.transcribe(fh.name, beam_size=self.model.default_beam_size)
            except EdgertError as exc:  # name the upload, not the temporary file
                raise type(exc)(str(exc).replace(fh.name, "the uploaded file")) from None
        return {
            "text": result.text,
            "duration": round(float(getattr(result.stats, "audio_seconds", 0.0) or 0.0), 3),
            "segments": [s.to_dict() for s in result.segments],
        }


class Embedding(OneThread):
    """An encoder graph (MiniLM-like: input_ids, attention_mask[, token_type_ids]) behind /v1/embeddings.

    Its tokenizer is ``<artifact stem>.tokenizer.json`` or ``tokenizer.json`` beside the artifact
    (graph artifacts carry none). The vector is the graph's ``sentence_embedding`` output when it
    has one, else the mask-weighted mean of its first output, L2-normalized.
    """

    def __init__(self, path: Path, threads: int | None):
        super().__init__()
        from tokenizers import Tokenizer

        candidates = [path.with_name(f"{path.stem}.tokenizer.json"), path.with_name("tokenizer.json")]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise EdgertError(f"{path}: an embedding model needs its tokenizer at {candidates[0]} or {candidates[1]}")
        self.tokenizer = Tokenizer.from_file(str(found))
        self.tokenizer.enable_padding()
        self.model = self.pool.submit(_load_graph, path, threads).result()
        names = [i["name"] for i in self.model.inputs]
        if "input_ids" not in names:
            raise UnsupportedModelError(f"{path}: a graph without an 'input_ids' input cannot embed text")
        self.input_names = names

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """L2-normalized vectors [len(texts), d] and the number of tokens read."""
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], np.int64)
        mask = np.array([e.attention_mask for e in enc], np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        out = self.model({k: v for k, v in feeds.items() if k in self.input_names})
        if "sentence_embedding" in out:
            vec = out["sentence_embedding"]
        else:
            hidden = next(iter(out.values()))
            vec = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
        vec = vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
        return vec.astype(np.float32), int(mask.sum())


def _load_graph(path: Path, threads: int | None) -> Any:
    from edgert.families.registry import load

    return load(path, threads=threads)


def encode_vector(vec: np.ndarray, encoding_format: str) -> list[float] | str:
    """An embedding as OpenAI sends it: a list of floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode()
    return [float(x) for x in vec]


@dataclass
class Served:
    """One served artifact: its name (the file's stem), kind and runtime."""

    name: str
    kind: str
    runtime: Any
    path: Path


def load_models(paths: list[Path], threads: int | None = None, **engine_options: Any) -> dict[str, Served]:
    """Each artifact by name, loaded for its kind; a duplicate name or an unservable family is refused."""
    served: dict[str, Served] = {}
    for path in paths:
        name = path.name.removesuffix(".edgert")
        if name in served:
            raise EdgertError(f"two artifacts are named '{name}' ({served[name].path} and {path}); rename one")
        art = open_artifact(path)
        kind = KINDS.get(art.family)
        if kind is None:
            raise ArtifactError(
                f"{path}: edgert serve serves llama, whisper and graph (embedding) artifacts, not '{art.family}'"
            )
        if kind == "completion":
            runtime: Any = LLMEngine(art, threads=threads, **engine_options)
        elif kind == "transcription":
            runtime = Transcription(path, threads)
        else:
            runtime = Embedding(path, threads)
        served[name] = Served(name, kind, runtime, path)
    return served
