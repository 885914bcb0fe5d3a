#!/usr/bin/env python3
"""Fuzz edgert's parsers: every input must be accepted or refused with one `EdgertError`.

    python tools/fuzz.py gguf --cases 10000 --seed 0 --json gguf.json
    python tools/fuzz.py all --cases 200

Targets: gguf, onnx, tflite, ct2, manifest (a whole artifact), wav, protocol (device frames),
template (chat templates). Seeds come from the project's own scripts (make_tiny_gguf.py,
make_tiny_onnx.py, make_tiny_tflite.py) or are written here in the formats' own layouts; each
case is one seed put through a few mutations, structure-aware (header fields, counts, lengths,
offsets, types, truncation, bit flips inside known fields) or plain random bytes. Case ``i`` of
seed ``S`` is the same on every run (`make_case`), so a failure is reproduced from its id.

Each case runs in a child forked from a worker that imported edgert (and TVM) once: the child
sets an address-space and CPU limit, parses, and reports through a pipe; the parent kills it
after ``--timeout`` seconds. Outcomes: ``error`` (a clean EdgertError), ``accepted``,
``traceback`` (any other exception), ``hang``, ``crash`` (killed by a signal) and ``memory``
(MemoryError under the limit, or a peak memory growth over the bound below).

Peak memory: a case's growth is the child's peak RSS (``ru_maxrss`` from `os.wait4`) minus its
RSS when it began (sent first on the pipe; not the worker's: a forked child does not map the
worker's resident file pages, the shared libraries, until it touches them, so it starts lower).
The goal bounds it by twice the input's honest size (its bytes) plus the parsed model; the
model's share is stated per target as twice the largest growth of its unmutated seeds plus
16 MiB of allocator slack (`allowance`). A case growing past
``2 x len(input) + allowance`` counts as ``memory`` even when it stayed under the RLIMIT_AS cap.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import resource
import select
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUTCOMES = ("error", "accepted", "traceback", "hang", "crash", "memory")
BAD = ("traceback", "hang", "crash", "memory")
INTERESTING_32 = (0, 1, 2, 7, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
INTERESTING_64 = (*INTERESTING_32, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


def _load_tool(name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# -- generic byte mutations --------------------------------------------------------------------------


@dataclass
class Field:
    """A known field of a seed: where it lies, how wide it is (bytes), and what it holds."""

    offset: int
    size: int
    kind: str = "int"  # int, length, count, offset, type, bytes


def _put_int(data: bytearray, f: Field, value: int) -> None:
    value &= (1 << (8 * f.size)) - 1
    data[f.offset : f.offset + f.size] = value.to_bytes(f.size, "little")


def mutate_field(rng: random.Random, data: bytearray, f: Field) -> None:
    """Change one known field: an interesting value, off-by-one, a large or negative one, flipped bits."""
    if f.offset + f.size > len(data):
        return
    if f.kind == "bytes" or f.size > 8:
        for _ in range(rng.randint(1, 3)):
            i = f.offset + rng.randrange(f.size)
            data[i] ^= 1 << rng.randrange(8)
        return
    old = int.from_bytes(data[f.offset : f.offset + f.size], "little")
    choice = rng.randrange(6)
    if choice == 0:
        value = rng.choice(INTERESTING_64 if f.size == 8 else INTERESTING_32)
    elif choice == 1:
        value = old + rng.choice((-2, -1, 1, 2))
    elif choice == 2:
        value = old * rng.choice((2, 16, 1 << 10, 1 << 20))
    elif choice == 3:
        value = -rng.randint(1, 1 << 16)
    elif choice == 4:
        value = old ^ (1 << rng.randrange(8 * f.size))
    else:
        value = rng.getrandbits(8 * f.size)
    _put_int(data, f, value)


def mutate_bytes(rng: random.Random, data: bytearray) -> None:
    """One format-blind mutation: bit flip, interesting integer, truncation, insertion, deletion, copy."""
    if not data:
        data.extend(rng.randbytes(rng.randint(1, 64)))
        return
    choice = rng.randrange(8)
    i = rng.randrange(len(data))
    if choice == 0:
        data[i] ^= 1 << rng.randrange(8)
    elif choice == 1:
        data[i] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
    elif choice == 2 and len(data) >= 4:
        j = rng.randrange(len(data) - 3)
        data[j : j + 4] = rng.choice(INTERESTING_32).to_bytes(4, "little")
    elif choice == 3:
        del data[rng.randrange(len(data)) :]
    elif choice == 4:
        data[i:i] = rng.randbytes(rng.randint(1, 32))
    elif choice == 5:
        del data[i : i + rng.randint(1, 64)]
    elif choice == 6:
        j = rng.randrange(len(data))
        data[i:i] = data[j : j + rng.randint(1, 64)]
    else:
        for _ in range(rng.randint(2, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)


# -- targets -------------------------------------------------------------------------------------------


@dataclass
class Seed:
    """A seed input and its known fields."""

    data: bytes
    fields: list[Field] = field(default_factory=list)
    name: str = "seed"


class Target:
    """An input kind: seeds, mutations, and the parse a case runs."""

    name = ""
    suffix = ".bin"

    def seeds(self, work: Path) -> list[Seed]:
        raise NotImplementedError

    def mutate(self, rng: random.Random, seed: Seed) -> bytes:
        """A few structure-aware mutations of known fields, byte mutations, or random bytes."""
        data = bytearray(seed.data)
        roll = rng.random()
        if roll < 0.03:
            return rng.randbytes(rng.randint(0, 256))
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            if seed.fields and rng.random() < 0.6:
                mutate_field(rng, data, rng.choice(seed.fields))
            else:
                mutate_bytes(rng, data)
        return bytes(data)

    def prepare(self) -> None:
        """Imports done once in the worker, before any fork."""

    def parse(self, path: Path) -> Any:
        raise NotImplementedError


# GGUF ------------------------------------------------------------------------------------------------


CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def small_tokenizer_fields() -> dict[str, Any]:
    """GGUF tokenizer fields of a small byte-level BPE vocabulary with ChatML specials (fast to
    parse, unlike a real 49k vocabulary), as (value, GGUF types) pairs for `write_tiny_llama`."""
    import gguf

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    byte_chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_chars]
    tokens += [m.replace(" ", "") for m in merges]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    arr, u32, s, b = (
        (gguf.GGUFValueType.ARRAY,),
        (gguf.GGUFValueType.UINT32,),
        (gguf.GGUFValueType.STRING,),
        (gguf.GGUFValueType.BOOL,),
    )
    return {
        "tokenizer.ggml.model": ("gpt2", s),
        "tokenizer.ggml.pre": ("smollm", s),
        "tokenizer.ggml.tokens": (tokens, arr),
        "tokenizer.ggml.token_type": (types, arr),
        "tokenizer.ggml.merges": (merges, arr),
        "tokenizer.ggml.bos_token_id": (1, u32),
        "tokenizer.ggml.eos_token_id": (2, u32),
        "tokenizer.ggml.add_bos_token": (False, b),
        "tokenizer.chat_template": (CHATML, s),
    }


def gguf_fields(path: Path) -> list[Field]:
    """Every part of every metadata field and tensor record of a GGUF file, by offset."""
    from edgert.frontend.gguf_reader import open_gguf_reader

    reader = open_gguf_reader(path)
    base = reader.data.ctypes.data
    found = [Field(4, 4, "int"), Field(8, 8, "count"), Field(16, 8, "count")]
    records = list(reader.fields.values()) + [t.field for t in reader.tensors]
    for rec in records:
        for i, part in enumerate(rec.parts):
            if part.nbytes == 0:
                continue
            off = part.ctypes.data - base
            if part.nbytes <= 8:
                kind = "length" if i % 2 == 0 and part.dtype == np.uint64 else "int"
                found.append(Field(off, part.nbytes, kind))
            elif part.dtype == np.uint8:
                found.append(Field(off, min(part.nbytes, 64), "bytes"))
            else:  # an array of numbers (token types, ...): a few of its items
                item = part.dtype.itemsize
                for _ in range(3):
                    found.append(Field(off + item * random.Random(off).randrange(part.size), item, "int"))
    return found


class GGUFTarget(Target):
    """A GGUF file, read as `edgert compile` reads it: metadata, config, tokenizer, template, weights."""

    name, suffix = "gguf", ".gguf"

    def seeds(self, work: Path) -> list[Seed]:
        tool = _load_tool("make_tiny_gguf")
        fields = small_tokenizer_fields()
        out = []
        for qtype, untied in (("Q4_0", False), ("F16", True), ("Q8_0", False)):
            p = tool.write_tiny_llama(
                work / f"seed-{qtype}.gguf",
                qtype,
                n_layers=1,
                hidden=32,
                heads=2,
                kv_heads=1,
                ffn=64,
                tie_embeddings=not untied,
                tokenizer_fields=fields,
            )
            out.append(Seed(p.read_bytes(), gguf_fields(p), p.name))
        return out

    def prepare(self) -> None:
        import tokenizers  # noqa: F401

        from edgert.families.llama import config, loader  # noqa: F401

    def parse(self, path: Path) -> Any:
        from edgert.families.llama import loader
        from edgert.families.llama.config import read_source

        model, cfg, _, _ = read_source(path)
        return [w for _, w in loader.gguf_weights(model, cfg, keep_blocks=True)]


# ONNX ------------------------------------------------------------------------------------------------


class ONNXTarget(Target):
    """An ONNX graph, imported as `edgert compile` imports it (checks, folding, TVM's importer)."""

    name, suffix = "onnx", ".onnx"

    def seeds(self, work: Path) -> list[Seed]:
        tool = _load_tool("make_tiny_onnx")
        paths = tool.write(work / "onnx", ["dense", "layernorm", "conv1d"])
        return [Seed(p.read_bytes(), [], p.name) for p in paths.values()]

    def mutate(self, rng: random.Random, seed: Seed) -> bytes:
        if rng.random() < 0.5:
            return self._mutate_proto(rng, seed.data)
        return super().mutate(rng, seed)

    def _mutate_proto(self, rng: random.Random, data: bytes) -> bytes:
        """Change the parsed graph: dims, dtypes, op types, inputs, attributes, initializer data."""
        import onnx

        model = onnx.load_from_string(data)
        g = model.graph
        for _ in range(rng.randint(1, 3)):
            choice = rng.randrange(8)
            if choice == 0 and g.input:
                dims = rng.choice(list(g.input)).type.tensor_type.shape.dim
                if dims:
                    rng.choice(list(dims)).dim_value = rng.choice((0, 1, 2, 1 << 31, 1 << 40))
            elif choice == 1 and g.initializer:
                init = rng.choice(list(g.initializer))
                if init.dims:
                    init.dims[rng.randrange(len(init.dims))] = rng.choice((0, 1, 3, 1 << 20, -1))
            elif choice == 2 and g.initializer:
                init = rng.choice(list(g.initializer))
                init.data_type = rng.randrange(0, 25)
            elif choice == 3 and g.initializer:
                init = rng.choice(list(g.initializer))
                init.raw_data = init.raw_data[: rng.randrange(len(init.raw_data) + 1)]
            elif choice == 4 and g.node:
                node = rng.choice(list(g.node))
                node.op_type = rng.choice(("Gemm", "MatMul", "Relu", "Reshape", "Concat", "Bogus", "LSTM", "If"))
            elif choice == 5 and g.node:
                node = rng.choice(list(g.node))
                if node.input:
                    node.input[rng.randrange(len(node.input))] = rng.choice(("", "missing", node.output[0]))
            elif choice == 6 and g.node:
                node = rng.choice(list(g.node))
                if node.attribute:
                    a = rng.choice(list(node.attribute))
                    a.i = rng.choice((-1, 0, 2, 1 << 40))
                    a.f = rng.choice((float("nan"), float("inf"), 0.0))
            else:
                model.opset_import[0].version = rng.choice((1, 7, 13, 17, 99, 0))
        return model.SerializeToString()

    def prepare(self) -> None:
        import onnx  # noqa: F401

        from edgert.families.graph import lower  # noqa: F401

    def parse(self, path: Path) -> Any:
        from edgert.frontend.onnx_graph import import_onnx

        return import_onnx(path)


# TFLite ----------------------------------------------------------------------------------------------


class TFLiteTarget(Target):
    """A TFLite flatbuffer, imported as `edgert compile` imports it."""

    name, suffix = "tflite", ".tflite"

    def seeds(self, work: Path) -> list[Seed]:
        tool = _load_tool("make_tiny_tflite")
        data = tool.build(rows=2, k=5, hidden=4, n=3)
        # Flatbuffers are offsets and vtable entries: every aligned 32-bit word is a field of some kind.
        fields = [Field(i, 4, "offset") for i in range(0, len(data) - 3, 4)]
        fields += [Field(i, 2, "int") for i in range(0, len(data) - 1, 2)]
        return [Seed(data, fields, "tiny.tflite")]

    def prepare(self) -> None:
        import tflite  # noqa: F401
        from tvm.relax.frontend.tflite import from_tflite  # noqa: F401

    def parse(self, path: Path) -> Any:
        from edgert.frontend.tflite_graph import import_tflite

        return import_tflite(path)


# CTranslate2 ------------------------------------------------------------------------------------------


def ct2_bytes(variables: dict[str, np.ndarray], version: int = 6, spec: str = "WhisperSpec") -> Seed:
    """A CTranslate2 model.bin in the layout `edgert.families.whisper.ct2` documents, with its fields."""
    buf = bytearray()
    fields: list[Field] = []

    def u(fmt: str, value: int, kind: str) -> None:
        fields.append(Field(len(buf), struct.calcsize(fmt), kind))
        buf.extend(struct.pack(fmt, value))

    def string(s: str) -> None:
        raw = s.encode() + b"\0"
        u("<H", len(raw), "length")
        fields.append(Field(len(buf), len(raw), "bytes"))
        buf.extend(raw)

    u("<I", version, "int")
    string(spec)
    u("<I", 1, "int")
    u("<I", len(variables), "count")
    codes = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}
    for name, arr in variables.items():
        string(name)
        u("<B", arr.ndim, "count")
        for d in arr.shape:
            u("<I", d, "int")
        u("<B", codes[str(arr.dtype)], "type")
        u("<I", arr.nbytes, "length")
        buf.extend(arr.tobytes())
    u("<I", 1, "count")
    string("decoder/embeddings/weight_alias")
    string("decoder/embeddings/weight")
    return Seed(bytes(buf), fields, "model.bin")


class CT2Target(Target):
    """A CTranslate2 model.bin."""

    name, suffix = "ct2", ".bin"

    def seeds(self, work: Path) -> list[Seed]:
        rng = np.random.default_rng(0)
        variables = {
            "decoder/embeddings/weight": rng.standard_normal((8, 4)).astype(np.float32),
            "decoder/layer_0/ffn/linear_0/weight": rng.integers(-100, 100, (4, 4)).astype(np.int8),
            "decoder/layer_0/ffn/linear_0/weight_scale": np.full(4, 10.0, np.float32),
            "decoder/layer_0/ffn/linear_0/bias": rng.standard_normal(4).astype(np.float16),
            "encoder/num_heads": np.array(2, np.int32),
        }
        return [ct2_bytes(variables)]

    def parse(self, path: Path) -> Any:
        from edgert.families.whisper.ct2 import read_ct2

        model = read_ct2(path)
        return [model.tensor(name) for name in model.variables]


# The artifact -----------------------------------------------------------------------------------------


def artifact_members(fields: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The members of a small language-model artifact (a random library, tiny weights, a real tokenizer)."""
    from edgert.artifact.tensorfile import write_tensors
    from edgert.frontend.gguf_tokenizer import build_tokenizer_json, tokenizer_config

    meta = {k: v for k, (v, _) in (fields or small_tokenizer_fields()).items()}
    weights = io.BytesIO()
    rng = np.random.default_rng(0)
    write_tensors(
        weights, {"embed": rng.standard_normal((8, 4)).astype(np.float32), "ids": np.arange(5, dtype=np.int32)}
    )
    manifest = {
        "format": "edgert-artifact",
        "format_version": 1,
        "name": "tiny",
        "family": "llama",
        "created_by": "fuzz",
        "tvm_version": "0",
        "target": {"name": "host", "arch": "x86_64", "cpu": "generic", "cpu_flags": []},
        "model": {"vocab_size": len(meta["tokenizer.ggml.tokens"]), "num_layers": 1},
        "kv_cache": {"context_length": 64, "prefill_chunk_size": 16, "page_size": 16},
        "tokenizer": {"file": "tokenizer.json", **tokenizer_config(meta)},
        "entry_points": {"prefill": {}},
        "weights": {"file": "weights.safetensors", "order": ["embed", "ids"]},
        "library": "model.so",
        "defaults": {"prompt": "Hello"},
    }
    return {
        "manifest.json": json.dumps(manifest, indent=1).encode(),
        "model.so": b"\x7fELF" + bytes(60),
        "weights.safetensors": weights.getvalue(),
        "tokenizer.json": build_tokenizer_json(meta).encode(),
    }


def pack_artifact(members: dict[str, bytes], rehash: bool = True) -> bytes:
    """A stored zip of ``members``; with ``rehash`` the manifest's file table and hash made consistent."""
    members = dict(members)
    if rehash:
        try:
            manifest = json.loads(members["manifest.json"])
        except ValueError:
            manifest = None
        if isinstance(manifest, dict):
            manifest["files"] = {
                n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                for n, d in members.items()
                if n != "manifest.json"
            }
            members["manifest.json"] = json.dumps(manifest, indent=1).encode()
        members["manifest.sha256"] = hashlib.sha256(members["manifest.json"]).hexdigest().encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


_JSON_VALUES: tuple[Any, ...] = (
    None,
    True,
    0,
    -1,
    1 << 62,
    1.5,
    float("nan"),
    "",
    "x" * 300,
    "../../etc/passwd",
    [],
    {},
    [1, "a"],
    {"a": 1},
    "F64",
    "weights.safetensors",
    "manifest.json",
    ".hidden",
)


def mutate_json(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """A JSON document with one value replaced, deleted or retyped somewhere in its tree."""
    if depth == 0 and rng.random() < 0.03:
        return rng.choice(_JSON_VALUES)
    if isinstance(value, dict) and value and (depth == 0 or rng.random() < 0.7):
        key = rng.choice(list(value))
        out = dict(value)
        roll = rng.random()
        if roll < 0.15:
            del out[key]
        elif roll < 0.5:
            out[key] = rng.choice(_JSON_VALUES)
        else:
            out[key] = mutate_json(rng, value[key], depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.7:
        out = list(value)
        i = rng.randrange(len(out))
        out[i] = mutate_json(rng, out[i], depth + 1) if rng.random() < 0.6 else rng.choice(_JSON_VALUES)
        return out
    if isinstance(value, int) and not isinstance(value, bool):
        return rng.choice((0, -1, -value, value + 1, 1 << 40, 1 << 64, str(value), float(value)))
    if isinstance(value, str) and value:
        return rng.choice((value[:-1], value + "x", value.upper(), 7, None, value * 2))
    return rng.choice(_JSON_VALUES)


class ManifestTarget(Target):
    """A whole artifact (zip): manifest, member hashes, weights header, tokenizer document and template."""

    name, suffix = "manifest", ".edgert"

    def seeds(self, work: Path) -> list[Seed]:
        self._members = artifact_members()
        return [Seed(pack_artifact(self._members), [], "tiny.edgert")]

    def mutate(self, rng: random.Random, seed: Seed) -> bytes:
        members = dict(self._members)
        roll = rng.random()
        if roll < 0.45:
            members["manifest.json"] = json.dumps(mutate_json(rng, json.loads(members["manifest.json"]))).encode()
            return pack_artifact(members)
        if roll < 0.65:  # the safetensors header: JSON after a u64 length
            data = members["weights.safetensors"]
            (n,) = struct.unpack("<Q", data[:8])
            if rng.random() < 0.7:
                head = json.dumps(mutate_json(rng, json.loads(data[8 : 8 + n]))).encode()
                data = struct.pack("<Q", len(head)) + head + data[8 + n :]
            else:
                buf = bytearray(data)
                mutate_field(rng, buf, Field(0, 8, "length")) if rng.random() < 0.5 else mutate_bytes(rng, buf)
                data = bytes(buf)
            members["weights.safetensors"] = data
            return pack_artifact(members)
        if roll < 0.8:  # the tokenizer document
            doc = members["tokenizer.json"]
            if rng.random() < 0.5:
                buf = bytearray(doc)
                mutate_bytes(rng, buf)
                members["tokenizer.json"] = bytes(buf)
            else:
                members["tokenizer.json"] = json.dumps(mutate_json(rng, json.loads(doc))).encode()
            return pack_artifact(members)
        if roll < 0.9:  # a raw change of the member, its hash left as it was
            name = rng.choice(list(members))
            buf = bytearray(members[name])
            mutate_bytes(rng, buf)
            members[name] = bytes(buf)
            return pack_artifact(members, rehash=rng.random() < 0.5)
        return super().mutate(rng, seed)  # the zip's own bytes

    def prepare(self) -> None:
        import jinja2.sandbox  # noqa: F401
        import tokenizers  # noqa: F401

    def parse(self, path: Path) -> Any:
        from edgert.artifact.reader import open_artifact
        from edgert.runtime.tokenizer import TextTokenizer, tokenizer_from_artifact

        art = open_artifact(path, check_host=False, trust_stamp=False)
        weights = art.weights()
        tok: TextTokenizer = tokenizer_from_artifact(art)
        text = tok.apply_chat_template([{"role": "user", "content": "Hello"}]) if tok.has_chat_template else "Hello"
        return weights, tok.decode(tok.encode(text))


# WAV -------------------------------------------------------------------------------------------------


def wav_seed(rate: int, channels: int, width: int, frames: int, fmt_tag: int = 1) -> Seed:
    """A RIFF/WAVE file of a short tone, with the offsets of its header fields."""
    t = np.arange(frames) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    if fmt_tag == 3:
        body = np.repeat(tone[:, None], channels, 1).astype("<f4").tobytes()
        width = 4
    else:
        scale = {1: 127, 2: 32767, 4: 2**31 - 1}[width]
        kind = {1: "u1", 2: "<i2", 4: "<i4"}[width]
        pcm = tone * scale + (128 if width == 1 else 0)
        body = np.repeat(pcm[:, None], channels, 1).astype(kind).tobytes()
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * channels * width, channels * width, 8 * width)
    data = b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(body)) + b"WAVE"
    data += b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(body)) + body
    fields = [
        Field(4, 4, "length"),
        Field(16, 4, "length"),
        Field(20, 2, "type"),
        Field(22, 2, "count"),
        Field(24, 4, "int"),
        Field(28, 4, "int"),
        Field(32, 2, "int"),
        Field(34, 2, "int"),
        Field(40, 4, "length"),
        Field(0, 4, "bytes"),
        Field(8, 8, "bytes"),
        Field(36, 4, "bytes"),
    ]
    return Seed(data, fields, f"tone-{rate}-{channels}-{width}-{fmt_tag}.wav")


class WAVTarget(Target):
    """A WAV file, read and resampled to Whisper's 16 kHz as `edgert transcribe` does."""

    name, suffix = "wav", ".wav"

    def seeds(self, work: Path) -> list[Seed]:
        return [
            wav_seed(16000, 1, 2, 800),
            wav_seed(44100, 2, 2, 1000),
            wav_seed(8000, 1, 1, 400),
            wav_seed(22050, 1, 4, 500),
            wav_seed(48000, 2, 4, 600, fmt_tag=3),
        ]

    def prepare(self) -> None:
        import soxr  # noqa: F401

    def parse(self, path: Path) -> Any:
        from edgert.runtime.audio import read_wav

        return read_wav(path)


# Device protocol frames -------------------------------------------------------------------------------


class ProtocolTarget(Target):
    """One frame of the device protocol, as the agent's and the host's decoder read it."""

    name, suffix = "protocol", ".frame"

    def seeds(self, work: Path) -> list[Seed]:
        from edgert.deploy.protocol import encode_frame

        out = []
        for header, payload in (
            ({"op": "hello", "id": 1, "version": 2}, b""),
            ({"op": "put_chunk", "id": 7, "name": "a.edgert", "offset": 0}, bytes(range(256)) * 4),
            ({"ok": True, "id": 3, "result": {"files": ["x"]}}, b"payload"),
        ):
            frame = encode_frame(header, payload)
            hlen = len(json.dumps(header, separators=(",", ":")))
            fields = [Field(0, 4, "bytes"), Field(4, 4, "length"), Field(8, 4, "length"), Field(12, hlen, "bytes")]
            out.append(Seed(frame, fields, header.get("op", "reply")))
        return out

    def mutate(self, rng: random.Random, seed: Seed) -> bytes:
        data = super().mutate(rng, seed)
        if rng.random() < 0.6 and len(data) >= 16:
            # Mostly keep the CRC right, so the mutation reaches the header's decoding.
            return self._fix_crc(data)
        return data

    @staticmethod
    def _fix_crc(data: bytes) -> bytes:
        hlen, plen = struct.unpack(">II", data[4:12])
        end = 12 + hlen + plen
        if end > len(data) or hlen > 1 << 20:
            return data
        body = data[:end]
        return body + struct.pack(">I", zlib.crc32(body))

    def parse(self, path: Path) -> Any:
        from edgert.deploy.protocol import decode_frame

        return decode_frame(path.read_bytes())


# Chat templates ---------------------------------------------------------------------------------------

_TEMPLATE_PIECES = (
    "{{ 'x' * 10000000000 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 10 ** 100000000 }}",
    "{{ 'x'|center(10000000000) }}",
    "{{ 'ab'.center(999999999) }}",
    "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{{ raise_exception('no') }}",
    "{{ messages[99] }}",
    "{{ messages[0]['content'] }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ range(99999999999) }}",
    "{% if %}",
    "{{",
    "}}",
    "{%",
    "%}",
    "{# ",
    "{% endfor %}",
    "{{ bos_token }}",
    "{{ eos_token ~ 'x' }}",
    "{% for m in messages %}{{ m.role }}{% endfor %}",
    "{{ '%99999999999s' % 'x' }}",
    "{{ [1] * 100000000000 }}",
    "{{ ('x' * 1000) * 1000000 }}",
    "{{ '{:>99999999999}'.format(1) }}",
    "{{ 'x'|indent(9999999999) }}",
    "{{ 'x'|wordwrap(9999999999) }}",
    "{{ 'x'|truncate(9999999999) }}",
    "{{ 'x' + 'y' * 99999999 }}",
    "{{ ('x' ~ 'y')|replace('x', 'x' * 100000)|replace('x', 'x' * 100000) }}",
    "{{ 'a'.ljust(99999999999) }}",
    "{{ (range(100000)|list)|join('x' * 100000) }}",
    "{% for x in range(100000)|batch(3) %}{% endfor %}",
)


class TemplateTarget(Target):
    """A chat template, checked and rendered on a sample conversation as compile and run do."""

    name, suffix = "template", ".jinja"

    def seeds(self, work: Path) -> list[Seed]:
        smollm = CHATML
        plain = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        plain += "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        return [Seed(smollm.encode(), [], "smollm2"), Seed(plain.encode(), [], "plain")]

    def mutate(self, rng: random.Random, seed: Seed) -> bytes:
        text = seed.data.decode()
        for _ in range(rng.randint(1, 3)):
            roll = rng.random()
            i = rng.randrange(len(text) + 1)
            if roll < 0.5:
                text = text[:i] + rng.choice(_TEMPLATE_PIECES) + text[i:]
            elif roll < 0.7:
                text = text[:i] + text[i + rng.randint(1, 20) :]
            elif roll < 0.85:
                j = rng.randrange(len(text) + 1)
                text = text[:i] + text[j : j + rng.randint(1, 40)] + text[i:]
            else:
                data = bytearray(text.encode())
                mutate_bytes(rng, data)
                return bytes(data)
        return text.encode()

    def prepare(self) -> None:
        from edgert.runtime import chat_template  # noqa: F401

    def parse(self, path: Path) -> Any:
        from edgert.runtime.chat_template import check_template

        return check_template(path.read_bytes(), str(path))


# Those that need no TVM first: a worker that imported TVM forks ten times slower.
TARGETS: dict[str, type[Target]] = {
    t.name: t
    for t in (
        ProtocolTarget,
        WAVTarget,
        CT2Target,
        TemplateTarget,
        ManifestTarget,
        GGUFTarget,
        ONNXTarget,
        TFLiteTarget,
    )
}


# -- running cases -------------------------------------------------------------------------------------


def make_case(target: Target, seeds: list[Seed], seed: int, index: int) -> bytes:
    """Case ``index`` of campaign ``seed``: the same bytes on every run."""
    rng = random.Random(f"{target.name}:{seed}:{index}")
    return target.mutate(rng, rng.choice(seeds))


def _vm_size() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    """This process's resident set now, in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


SLACK = 16 << 20  # allocator arenas, a parse's scratch buffers: noise beside the model's own share


def memory_bound(size: int, allowance: int) -> int:
    """The most a case of ``size`` input bytes may grow: twice its honest size plus the model's share."""
    return 2 * size + allowance


def _child(target: Target, path: Path, memory: int, timeout: float, wfd: int) -> None:
    """Runs in the forked child: limits, parse, report, exit without cleanup."""
    code = 0
    try:
        os.write(wfd, struct.pack("<Q", _rss()))  # the baseline of the growth `run_case` reports
        limit = _vm_size() + memory
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        cpu = int(timeout) + 2
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        from edgert.errors import EdgertError

        try:
            target.parse(path)
            report = {"outcome": "accepted"}
        except EdgertError as exc:
            message = str(exc)
            report = {"outcome": "error", "message": message[:300], "one_line": "\n" not in message}
        except MemoryError:
            report = {"outcome": "memory", "message": "MemoryError"}
        except BaseException as exc:
            report = {
                "outcome": "traceback",
                "message": f"{type(exc).__name__}: {exc}"[:300],
                "traceback": traceback.format_exc()[-3000:],
            }
        os.write(wfd, json.dumps(report).encode())
    except BaseException:
        code = 3
    finally:
        os._exit(code)


def run_case(
    target: Target, data: bytes, work: Path, timeout: float, memory: int, allowance: int | None = None
) -> dict[str, Any]:
    """Fork, parse ``data`` in the child under limits, and classify what happened; ``growth`` is the
    child's peak RSS over the worker's at the fork. With ``allowance``, a growth past
    `memory_bound` is a ``memory`` outcome."""
    path = work / f"case{target.suffix}"
    path.write_bytes(data)
    rfd, wfd = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _child(target, path, memory, timeout, wfd)
    os.close(wfd)
    chunks: list[bytes] = []
    hung = False
    deadline = start + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            hung = True
            break
        ready, _, _ = select.select([rfd], [], [], left)
        if not ready:
            continue
        block = os.read(rfd, 1 << 16)
        if not block:
            break
        chunks.append(block)
    if hung:
        os.kill(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    os.close(rfd)
    seconds = time.monotonic() - start
    body = b"".join(chunks)
    base, body = (struct.unpack("<Q", body[:8])[0], body[8:]) if len(body) >= 8 else (usage.ru_maxrss * 1024, b"")
    growth = max(0, usage.ru_maxrss * 1024 - base)  # ru_maxrss: KiB on Linux
    if hung:
        return {"outcome": "hang", "seconds": seconds, "growth": growth}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        outcome = "hang" if sig == signal.SIGXCPU else "crash"
        return {"outcome": outcome, "signal": signal.Signals(sig).name, "seconds": seconds, "growth": growth}
    try:
        report = json.loads(body)
    except ValueError:
        report = {
            "outcome": "memory" if os.WEXITSTATUS(status) == 3 else "crash",
            "message": f"no report (exit {os.WEXITSTATUS(status)})",
        }
    report["seconds"], report["growth"] = seconds, growth
    if allowance is not None and report["outcome"] in ("error", "accepted"):
        bound = memory_bound(len(data), allowance)
        if growth > bound:
            report = {
                **report,
                "outcome": "memory",
                "message": f"peak RSS grew {growth >> 20} MiB, over the bound of {bound >> 20} MiB "
                f"(2 x {len(data)} input bytes + {allowance >> 20} MiB for the model); was {report['outcome']}",
            }
    return report


def allowance(target: Target, seeds: list[Seed], work: Path, timeout: float, memory: int) -> int:
    """The parsed model's share of a case's memory bound: twice the largest growth of an
    unmutated seed, plus `SLACK`."""
    grown = [run_case(target, s.data, work, timeout, memory)["growth"] for s in seeds]
    return 2 * max(grown, default=0) + SLACK


def warm_up(target: Target, seeds: list[Seed], work: Path) -> None:
    """Parse every seed once in the worker: lazy imports and caches (TVM's importers take seconds
    on first use) are then paid once, not in every forked child."""
    from edgert.errors import EdgertError

    for s in seeds:
        path = work / f"warm{target.suffix}"
        path.write_bytes(s.data)
        try:
            target.parse(path)
        except EdgertError:
            pass


@dataclass
class Campaign:
    """The outcome of one target's cases."""

    target: str
    cases: int
    seed: int
    counts: Counter = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    unnamed: int = 0  # clean errors spread over several lines
    seconds: float = 0.0
    slowest: float = 0.0
    allowance: int = 0  # the model's share of the memory bound (bytes)
    max_growth: int = 0  # the largest peak RSS growth of a case (bytes)
    max_growth_case: int = -1
    max_growth_size: int = 0  # that case's input bytes

    def bad(self) -> int:
        return sum(self.counts[o] for o in BAD)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "cases": self.cases,
            "seed": self.seed,
            "counts": {o: self.counts.get(o, 0) for o in OUTCOMES},
            "multi_line_errors": self.unnamed,
            "seconds": round(self.seconds, 2),
            "slowest_case_seconds": round(self.slowest, 3),
            "memory": {
                "bound": "2 x input bytes + allowance",
                "allowance_bytes": self.allowance,
                "max_growth_bytes": self.max_growth,
                "max_growth_case": self.max_growth_case,
                "max_growth_case_input_bytes": self.max_growth_size,
            },
            "failures": self.failures[:50],
        }


def run_campaign(
    name: str,
    cases: int,
    seed: int = 0,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    start: int = 0,
    on_case: Callable[[int, dict[str, Any]], None] | None = None,
) -> Campaign:
    """Run cases ``start`` .. ``start + cases - 1`` of target ``name``; return the counts and failures."""
    target = TARGETS[name]()
    # A Rust panic in `tokenizers` is refused as a clean error; with RUST_BACKTRACE=1 (set in some shells)
    # the panic hook also symbolizes a backtrace, ~50 MiB of debug tables whatever the input: not the input's.
    os.environ["RUST_BACKTRACE"] = "0"
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        work = Path(tmp)
        seeds = target.seeds(work)
        target.prepare()
        warm_up(target, seeds, work)
        result = Campaign(name, cases, seed)
        result.allowance = allowance(target, seeds, work, timeout, memory_mb << 20)
        for index in range(start, start + cases):
            data = make_case(target, seeds, seed, index)
            report = run_case(target, data, work, timeout, memory_mb << 20, result.allowance)
            result.counts[report["outcome"]] += 1
            result.slowest = max(result.slowest, report["seconds"])
            if report["growth"] > result.max_growth:
                result.max_growth, result.max_growth_case, result.max_growth_size = report["growth"], index, len(data)
            if report["outcome"] == "error" and not report.get("one_line", True):
                result.unnamed += 1
            if report["outcome"] in BAD:
                result.failures.append({"index": index, "size": len(data), **report})
            if on_case is not None:
                on_case(index, report)
    result.seconds = time.monotonic() - began
    return result


def table(results: list[Campaign]) -> str:
    """The summary: one row per target."""
    head = f"{'target':<10}{'cases':>7}" + "".join(f"{o:>11}" for o in OUTCOMES)
    head += f"{'max MiB':>9}{'allow MiB':>10}{'seconds':>9}"
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.target:<10}{r.cases:>7}"
            + "".join(f"{r.counts.get(o, 0):>11}" for o in OUTCOMES)
            + f"{r.max_growth / (1 << 20):>9.1f}{r.allowance / (1 << 20):>10.1f}{r.seconds:>9.1f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Command line: run the campaigns, print the table, write JSON; exit 1 if any case went bad."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=[*TARGETS, "all"])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first case index (to split a campaign)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address space a case may add, in MB")
    parser.add_argument("--json", type=Path, help="write the summary and the failing cases here")
    parser.add_argument("--show", type=int, metavar="INDEX", help="write case INDEX's bytes to stdout and stop")
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.target == "all" else [args.target]
    if args.show is not None:
        target = TARGETS[names[0]]()
        with tempfile.TemporaryDirectory() as tmp:
            sys.stdout.buffer.write(make_case(target, target.seeds(Path(tmp)), args.seed, args.show))
        return 0
    results = []

    def progress(index: int, report: dict[str, Any]) -> None:
        if report["seconds"] > 2:
            print(f"  case {index}: {report['outcome']} after {report['seconds']:.1f} s", file=sys.stderr)
        if (index + 1) % 500 == 0:
            print(f"  {index + 1} cases", file=sys.stderr, flush=True)

    for name in names:
        r = run_campaign(name, args.cases, args.seed, args.timeout, args.memory_mb, args.start, on_case=progress)
        results.append(r)
        for f in r.failures[:5]:
            print(f"{name} case {f['index']}: {f['outcome']} {f.get('message', f.get('signal', ''))}", file=sys.stderr)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"results": [r.to_dict() for r in results]}, indent=1))
    return 1 if any(r.bad() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
