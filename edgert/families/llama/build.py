"""Build a Llama-architecture GGUF model: weights in the target's layout, the Relax module with its
entry points (prefill, verify, decode, per-layer pieces, the paged KV cache), one artifact."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from edgert.artifact.tensorfile import write_tensors
from edgert.compiler.compile import (
    Build,
    BuildRequest,
    CompileResult,
    cached_library,
    create_kv_cache_entry,
    main_dtype,
    write_weights,
)
from edgert.compiler.gpu_layout import apply_gpu_layout
from edgert.compiler.layout import apply_cpu_layout
from edgert.compiler.passes.attention import use_fast_cache_attention, use_fast_decode_attention
from edgert.compiler.quantize import QUANT_MODES, choose_storage, storage_kind
from edgert.errors import EdgertError
from edgert.families.llama.model import VERIFY_ROW_ENTRIES
from edgert.runtime.exits import range_spans
from edgert.runtime.piece_bpe import compact_tables

TOKENIZER_TABLES = "tokenizer.tables.safetensors"


def build(req: BuildRequest) -> CompileResult:
    """Compile the GGUF file ``req.source`` for ``req.target``.

    Options: ``quant`` (source, q4, q8, f16, f32; see `edgert.compiler.quantize`; ``weight_dtype``
    f16/f32 is its older name), ``context_length``, ``prefill_chunk_size``, ``threads``,
    ``activations`` (``f32``: float activations times dequantized q4/q8 weights; ``int8``: int8
    activations and integer dot products, `edgert.compiler.kernels.int8`; ``auto``: int8 where
    the CPU has AVX-512 VNNI, f32 elsewhere), ``library_cache`` (a folder reusing the library of a
    structurally identical module for the same target), ``evictable_kv`` (True: RoPE before the
    cache and the ``prefill_at``/``batch_decode_at`` entry points that `edgert serve --kv-budget`
    evicts through; see `edgert.runtime.kv_budget`), ``kv_dtype`` (auto, f16, f32: the KV cache's
    keys and values; auto is f16 with int8 activations, else f32).
    """
    from edgert.families.llama import loader
    from edgert.families.llama.model import LlamaConfig, LlamaForCausalLM

    return build_decoder(req, "llama", LlamaConfig, LlamaForCausalLM, loader)


def build_decoder(req: BuildRequest, family: str, config_cls: Any, model_cls: Any, loader: Any) -> CompileResult:
    """The build of a decoder-only GGUF family: its config class (``from_gguf``), its nn model
    (the entry points of `LlamaForCausalLM`) and its loader (``gguf_weights``, ``tied_weights``)."""
    from edgert.families.llama.config import read_source
    from edgert.frontend.quantized import QuantizedRows

    progress, source = req.progress, req.source
    weight_dtype = req.options.get("weight_dtype")
    if weight_dtype is not None and weight_dtype not in ("f16", "f32"):
        raise EdgertError(f"weight dtype '{weight_dtype}' is not one of f16, f32")
    quant = req.options.get("quant") or weight_dtype or req.option("quant", "source")
    if quant not in QUANT_MODES:
        raise EdgertError(f"--quant '{quant}' is not one of {', '.join(QUANT_MODES)}")
    job = Build.start(req.name, family, req.target, req.options.get("threads"), req.output, req.as_dir, gpu=True)

    progress("reading model", None)
    with job.timed("read"):
        gguf_model, cfg, tokenizer_json, tokenizer_fields = read_source(source, req.parsed, config_cls, loader)
        context = min(req.option("context_length", 2048), cfg.context_length)
        chunk = min(req.option("prefill_chunk_size", 256), context)
        # int8 on AVX-512 VNNI by default (auto): a verify pass runs as decode rows, so its logits
        # are decode's bit for bit and speculative decoding stays lossless (tests/test_verify_rows.py).
        # A model with a second (sliding-window) cache verifies through the prefill kernels, whose
        # last-bit differences int8 rounding would amplify: f32 there.
        rows_verify = not hasattr(model_cls, "manifest_kv_cache")
        activations = req.option("activations", "auto" if rows_verify else "f32")
        if job.on_gpu and activations not in ("f32", "auto"):
            raise EdgertError(f"--activations {activations}: GPU builds take f32 activations only")
        int8_isa = None if job.on_gpu else _int8_isa(activations, job.record)
        activations = "int8" if int8_isa else "f32"

    progress("reading weights", None)
    with job.timed("weights"):
        weights: dict[str, Any] = {}
        keep_blocks = quant in ("source", "q4", "q8")
        for i, (pname, w) in enumerate(loader.gguf_weights(gguf_model, cfg, keep_blocks=keep_blocks)):
            matrix = isinstance(w, QuantizedRows) or w.ndim == 2
            weights[pname] = choose_storage(w, quant) if matrix else w
            progress("reading weights", (i + 1) / (6 * cfg.num_layers + 3))
        storage = {n: storage_kind(w) for n, w in weights.items() if isinstance(w, QuantizedRows) or w.ndim == 2}

    progress("building Relax module", None)
    with job.timed("export"):
        evictable = bool(req.option("evictable_kv", False))
        kv_dtype = _kv_dtype(req.option("kv_dtype", "auto"), family, job.on_gpu, activations)
        net = model_cls(cfg, evictable=evictable, kv_dtype=kv_dtype) if family == "llama" else model_cls(cfg)
        if job.on_gpu:  # rows of uint32 codes + f16 scales, dequantized inside dlight's GEMV/Matmul
            repack = apply_gpu_layout(net, storage, tied=loader.tied_weights(cfg), half=job.record["fp16"])
        else:
            repack = apply_cpu_layout(net, storage, tied=loader.tied_weights(cfg), int8_isa=int8_isa)
        with job.tvm_target:
            mod, named_params = net.export_tvm(spec=net.get_default_spec())
        if not job.on_gpu:  # a CPU kernel; the GPU keeps the paged cache's own decode kernels
            theta = cfg.rope_theta if family == "llama" else None  # Gemma applies RoPE outside the cache
            mod = use_fast_decode_attention(mod, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim, theta, kv_dtype)
            if hasattr(net, "cache_windows"):  # further caches (Gemma's local layers) and their windows
                mod = use_fast_cache_attention(mod, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim, net.cache_windows())

    library_cache = req.options.get("library_cache")
    cached = cached_library(library_cache, mod, job.tvm_target, job.spec.cc) if library_cache else None
    if cached is None or not cached.is_file():
        progress("compiling with TVM", None)
        # Scratch tiles on the stack where the kernels were checked for it (the int8/q4 matmuls,
        # the decode attention); not yet Gemma's windowed cache kernels.
        executable = job.compile(mod, stack_scratch=not hasattr(net, "cache_windows"))

    with job.staging() as stage_dir:
        stage = Path(stage_dir)
        with job.timed("link"):
            if cached is not None and cached.is_file():
                shutil.copyfile(cached, stage / "model.so")
            else:
                executable.export_library(str(stage / "model.so"), fcompile=job.fcompile)
                if cached is not None:  # copied beside it, then renamed: a reader never sees half a library
                    part = cached.with_name(f".{cached.name}.{os.getpid()}.part")
                    shutil.copyfile(stage / "model.so", part)
                    os.replace(part, cached)
        with job.timed("pack"):
            order, arrays = write_weights(named_params, weights.items(), repack, stage, source)
            (stage / "tokenizer.json").write_text(tokenizer_json)
            tables = compact_tables(tokenizer_json)  # SentencePiece-style vocabularies: mapped at load
            if tables is not None:
                with (stage / TOKENIZER_TABLES).open("wb") as fh:
                    write_tensors(fh, tables)

        progress("writing artifact", None)
        entries = net.manifest_entry_points() if hasattr(net, "manifest_entry_points") else entry_points(cfg, evictable)
        # The CPU kernels run a verify pass of up to a page of tokens as decode rows of one sequence
        # (`PagedKVCache.begin_rows`): each row's logits are a decode step's, bit for bit; and a token
        # tree of up to 16 nodes as a ``verify`` pass, each node as the decode step of its path
        # (`PagedKVCache.begin_tree`, `compiler.passes.attention.paged_tree_attention`).
        cpu_rows = not job.on_gpu and rows_verify and "batch_decode" in entries
        verify_rows = {"verify_rows": 16, "verify_tree": 16} if cpu_rows else {}
        if verify_rows:  # the row counts with a static entry (`Generator.verify_row_entries`)
            verify_rows["verify_row_entries"] = [n for n in VERIFY_ROW_ENTRIES if f"verify_rows_{n}" in entries]
        result = job.finish(
            {
                name: stage / name
                for name in ("model.so", "weights.safetensors", "tokenizer.json", TOKENIZER_TABLES)
                if name != TOKENIZER_TABLES or tables is not None
            },
            source={"file": source.name, "tensor_types": sorted(set(gguf_model.tensor_types.values()))},
            model=cfg.to_dict(),
            entry_points=entries,
            kv_cache={
                "kind": "paged",
                "page_size": 16,
                "context_length": context,
                "prefill_chunk_size": chunk,
                "dtype": kv_dtype,
                "num_layers": cfg.num_layers,
                "num_kv_heads": cfg.num_kv_heads,
                "head_dim": cfg.head_dim,
                "num_heads": cfg.num_heads,
                "rope": "before-cache" if evictable else "in-cache",
                "evictable": evictable,
                **verify_rows,
                **(net.manifest_kv_cache() if hasattr(net, "manifest_kv_cache") else {}),
            },
            weights={
                "file": "weights.safetensors",
                "dtype": main_dtype(arrays),
                "quant": quant,
                "activations": activations,
                "storage": {kind: list(storage.values()).count(kind) for kind in sorted(set(storage.values()))},
                "layout": "gpu-rows-uint32" if job.on_gpu else "cpu-packed-columns",
                "order": order,
            },
            library="model.so",
            tokenizer={
                "file": "tokenizer.json",
                **({"tables": TOKENIZER_TABLES} if tables is not None else {}),
                **tokenizer_fields,
            },
            defaults=dict(req.recipe.run) if req.recipe else {},
        )
    progress("done", 1.0)
    return result


def _kv_dtype(option: str, family: str, on_gpu: bool, activations: str) -> str:
    """The KV cache's dtype for ``--kv-dtype``: ``auto`` is float16 for Llama with int8 activations (the
    default on AVX-512 VNNI; llama.cpp's cache is float16 by default too): half the cache's memory, and a
    batch of 4 sequences of ~150 tokens read 28 MB of float32 keys and values a step, 1.1 ms of a 5.1 ms
    pass (docs/serving.md). Float activations keep float32, the exact mode the other builds compare with
    (a float16 key turns a 1e-7 difference between two kernels' schedules into one of 1e-3). GPU builds
    keep float32 (OpenCL devices without cl_khr_fp16); Gemma 3 keeps it for its window caches."""
    if option not in ("auto", "f16", "f32"):
        raise EdgertError(f"--kv-dtype '{option}' is not one of auto, f16, f32")
    if option == "f16" and (on_gpu or family != "llama"):
        raise EdgertError(f"--kv-dtype f16: {'GPU builds' if on_gpu else family} keep a float32 KV cache")
    if option == "auto":
        option = "f16" if family == "llama" and not on_gpu and activations == "int8" else "f32"
    return {"f16": "float16", "f32": "float32"}[option]


def _int8_isa(activations: str, record: dict[str, Any]) -> str | None:
    """The dot-product instruction set for ``activations`` int8 on the target (None for f32).

    ``auto`` (the default) takes int8 on AVX-512 VNNI only: there the multi-row kernel makes one
    token 1.7x and five tokens (a verify pass) 2.8x faster than the float kernels
    (`tools/bench_kernels.py`); elsewhere the q8 head is slower with int8 activations.
    """
    from edgert.compiler.kernels.int8 import dot_isa, vnni_layout

    if activations not in ("f32", "int8", "auto"):
        raise EdgertError(f"--activations '{activations}' is not one of f32, int8, auto")
    if activations == "f32":
        return None
    isa = dot_isa(record["cpu_flags"])
    if activations == "auto":
        return isa if vnni_layout(isa) else None
    if isa is None:
        raise EdgertError(
            f"--activations int8 needs integer dot products (x86 AVX2, aarch64 dotprod or i8mm); target "
            f"'{record['name']}' ({record['cpu']}) has {', '.join(record['cpu_flags']) or 'neither'}"
        )
    return isa


def entry_points(cfg: Any, evictable: bool = False) -> dict[str, Any]:
    cache = {"name": "cache", "type": "PagedKVCache"}
    ids = {"name": "input_ids", "dtype": "int32"}
    logits = {"name": "logits", "dtype": "float32"}
    queries = {"name": "queries", "dtype": "float32"}
    budget = {
        "prefill_at": {
            "inputs": [
                {**ids, "shape": [1, "seq_len"]},
                {"name": "positions", "dtype": "int32", "shape": ["seq_len"]},
                cache,
            ],
            "outputs": [
                {**logits, "shape": [1, 1, cfg.vocab_size]},
                {**queries, "shape": [cfg.num_layers, 1, cfg.num_heads, cfg.head_dim]},
                cache,
            ],
        },
        "batch_decode_at": {
            "inputs": [
                {**ids, "shape": ["batch_size", 1]},
                {"name": "positions", "dtype": "int32", "shape": ["batch_size"]},
                cache,
            ],
            "outputs": [
                {**logits, "shape": ["batch_size", 1, cfg.vocab_size]},
                {**queries, "shape": [cfg.num_layers, "batch_size", cfg.num_heads, cfg.head_dim]},
                cache,
            ],
        },
    }
    return {
        **(budget if evictable else {}),
        "prefill": {
            "inputs": [{**ids, "shape": [1, "seq_len"]}, cache],
            "outputs": [{**logits, "shape": [1, 1, cfg.vocab_size]}, cache],
        },
        "prefill_rows": {  # a ragged pass over several sequences; the logits at ``rows`` (a server's mixed step)
            "inputs": [
                {**ids, "shape": [1, "seq_len"]},
                {"name": "rows", "dtype": "int32", "shape": ["num_rows"]},
                cache,
            ],
            "outputs": [{**logits, "shape": [1, "num_rows", cfg.vocab_size]}, cache],
        },
        "verify": {
            "inputs": [{**ids, "shape": [1, "seq_len"]}, cache],
            "outputs": [{**logits, "shape": [1, "seq_len", cfg.vocab_size]}, cache],
        },
        "decode": {
            "inputs": [{**ids, "shape": [1, 1]}, cache],
            "outputs": [{**logits, "shape": [1, 1, cfg.vocab_size]}, cache],
        },
        "batch_decode": {
            "inputs": [{**ids, "shape": ["batch_size", 1]}, cache],
            "outputs": [{**logits, "shape": ["batch_size", 1, cfg.vocab_size]}, cache],
        },
        **{
            f"verify_rows_{n}": {
                "inputs": [{**ids, "shape": [n, 1]}, cache],
                "outputs": [{**logits, "shape": [n, 1, cfg.vocab_size]}, cache],
            }
            for n in VERIFY_ROW_ENTRIES
        },
        **_layer_entry_points(cfg),
        "create_kv_cache": create_kv_cache_entry(cache),
    }


def _layer_entry_points(cfg: Any) -> dict[str, Any]:
    """``embed``, ``layer_<i>``, ``kv_fill_<i>``, ``head`` and the exit spans ``layers_<a>_<b>``, ``kv_fill_<a>_<b>``:
    the stack in pieces (early exit, drafting)."""
    cache = {"name": "cache", "type": "PagedKVCache"}
    hidden = {"name": "h", "dtype": "float32", "shape": [1, "seq_len", cfg.hidden_size]}
    attn = {"name": "attention", "dtype": "float32", "shape": [1, "seq_len", cfg.num_heads, cfg.head_dim]}
    entries: dict[str, Any] = {
        "embed": {"inputs": [{"name": "input_ids", "dtype": "int32", "shape": [1, "seq_len"]}], "outputs": [hidden]},
        "head": {
            "inputs": [hidden],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "seq_len", cfg.vocab_size]}],
        },
    }
    for i in range(cfg.num_layers):
        entries[f"layer_{i}"] = {"inputs": [hidden, cache], "outputs": [hidden, cache]}
        entries[f"kv_fill_{i}"] = {"inputs": [hidden, cache], "outputs": [attn, cache]}
    layer_spans, fill_spans = range_spans(cfg.num_layers)
    for a, b in layer_spans:
        entries[f"layers_{a}_{b}"] = {"inputs": [hidden, cache], "outputs": [hidden, cache]}
    for a, b in fill_spans:  # the attention outputs of the span, summed
        entries[f"kv_fill_{a}_{b}"] = {"inputs": [hidden, cache], "outputs": [attn, cache]}
    return entries
