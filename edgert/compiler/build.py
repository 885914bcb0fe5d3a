"""`compile_model`: model source -> Relax -> optimized module -> `.edgert` artifact."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgert import __version__
from edgert.compiler.attention import use_fast_decode_attention
from edgert.compiler.layout import apply_cpu_layout
from edgert.compiler.package import check_output_path, write_artifact
from edgert.compiler.pipeline import relax_pipeline
from edgert.compiler.quantize import QUANT_MODES, choose_storage, storage_kind
from edgert.compiler.recipes import Recipe, find_recipe
from edgert.compiler.target import library_compiler, resolve
from edgert.errors import EdgertError, ModelFileError
from edgert.targets import load_target

Progress = Callable[[str, float | None], None]


@dataclass
class CompileResult:
    """What `compile_model` wrote and how long each stage took."""

    path: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]


def _quiet(_stage: str, _fraction: float | None) -> None:
    return None


def _resolve_source(model: str) -> tuple[Path, Recipe | None]:
    recipe = find_recipe(model)
    if recipe is not None:
        return recipe.source_path(), recipe
    path = Path(model)
    if path.suffix.lower() == ".gguf" or path.exists():
        return path, None
    from edgert.compiler.recipes import list_recipes

    names = ", ".join(r.name for r in list_recipes())
    raise ModelFileError(f"'{model}' is neither a model recipe ({names}) nor a model file")


def compile_model(
    model: str,
    target: str = "host",
    output: str | Path | None = None,
    weight_dtype: str | None = None,
    quant: str | None = None,
    context_length: int | None = None,
    prefill_chunk_size: int | None = None,
    threads: int | None = None,
    as_dir: bool = False,
    progress: Progress = _quiet,
    library_cache: str | Path | None = None,
    activations: str | None = None,
    audio_ctx: int | None = None,
    chunk_ms: float | None = None,
    **graph_options: Any,
) -> CompileResult:
    """Compile a recipe name, a GGUF path or a codec folder for ``target`` into an artifact at ``output``.

    ``quant`` (source, q4, q8, f16, f32; see `edgert.compiler.quantize`) chooses the weight
    storage; ``weight_dtype`` (f16 or f32) is the older name for the float choices.
    An .onnx or .tflite file goes to `compile_graph` (options ``quant``, ``input_shapes``).
    ``library_cache`` (a folder; GGUF models only) reuses the compiled library of a structurally
    identical module for the same target, e.g. the same architecture with other weights.
    ``activations`` (GGUF models): ``f32`` (default) multiplies float activations with the
    dequantized q4/q8 weights; ``int8`` quantizes the decode activations to int8 and uses
    integer dot products (`edgert.compiler.kernels_int8`; x86 AVX2 or aarch64 dotprod).
    ``audio_ctx`` (Whisper only) shortens the encoder's window to that many 20 ms positions.
    ``chunk_ms`` (codecs only): the streaming chunk that gets fixed-shape entry points (default 80 ms).
    """
    if Path(str(model)).suffix.lower() in (".onnx", ".tflite"):
        from edgert.compiler.graph_build import compile_graph

        if activations not in (None, "f32"):
            raise EdgertError(f"--activations {activations} applies to GGUF models, not to .onnx/.tflite graphs")

        _no_audio_ctx(audio_ctx, model)
        if chunk_ms is not None:
            raise EdgertError(f"--chunk-ms applies to codecs only, not to '{model}'")
        return compile_graph(
            model,
            target=target,
            output=output,
            quant=quant,
            threads=threads,
            as_dir=as_dir,
            progress=progress,
            **graph_options,
        )
    import tvm

    from edgert.compiler.codec_build import codec_source, compile_codec
    from edgert.families import llama
    from edgert.frontend import read_gguf
    from edgert.frontend.gguf_tokenizer import build_tokenizer_json, tokenizer_config
    from edgert.frontend.quantized import QuantizedRows

    codec_folder, codec_recipe = codec_source(model)
    if codec_folder is not None:
        _no_audio_ctx(audio_ctx, model)
        return compile_codec(
            codec_folder, target, output, weight_dtype, threads, as_dir, codec_recipe, progress, chunk_ms
        )
    if chunk_ms is not None:
        raise EdgertError(f"--chunk-ms applies to codecs only, not to '{model}'")
    spec = load_target(target)
    source, recipe = _resolve_source(model)
    if _is_whisper(source, recipe):
        from edgert.compiler.build_whisper import compile_whisper

        return compile_whisper(source, recipe, spec, output, weight_dtype, threads, as_dir, progress, audio_ctx)
    _no_audio_ctx(audio_ctx, model)
    from edgert.compiler.build_marian import compile_marian, is_marian_dir

    if recipe is None and is_marian_dir(source):
        return compile_marian(source, spec, output, weight_dtype, threads, as_dir)
    name = recipe.name if recipe else source.stem
    out = check_output_path(Path(output) if output else Path(f"{name}.edgert"), as_dir)
    options = dict(recipe.compile) if recipe else {}
    if weight_dtype is not None and weight_dtype not in ("f16", "f32"):
        raise EdgertError(f"weight dtype '{weight_dtype}' is not one of f16, f32")
    quant = quant or weight_dtype or options.get("quant", "source")
    if quant not in QUANT_MODES:
        raise EdgertError(f"--quant '{quant}' is not one of {', '.join(QUANT_MODES)}")
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    progress("reading model", None)
    gguf_model = read_gguf(source)
    cfg = llama.LlamaConfig.from_gguf(gguf_model)
    gguf_model.check_tensor_types()  # fail before the minutes of building, not after
    context = min(context_length or options.get("context_length", 2048), cfg.context_length)
    chunk = min(prefill_chunk_size or options.get("prefill_chunk_size", 256), context)
    tokenizer_json = build_tokenizer_json(gguf_model.metadata)
    tvm_target, target_record = resolve(spec, threads)
    fcompile = library_compiler(spec, target_record["arch"])
    activations = activations or options.get("activations", "f32")
    int8_isa = _int8_isa(activations, target_record)
    seconds["read"] = time.perf_counter() - t

    progress("reading weights", None)
    t = time.perf_counter()
    weights: dict[str, Any] = {}
    keep_blocks = quant in ("source", "q4", "q8")
    for i, (pname, w) in enumerate(llama.gguf_weights(gguf_model, cfg, keep_blocks=keep_blocks)):
        matrix = isinstance(w, QuantizedRows) or w.ndim == 2
        weights[pname] = choose_storage(w, quant) if matrix else w
        progress("reading weights", (i + 1) / (6 * cfg.num_layers + 3))
    storage = {n: storage_kind(w) for n, w in weights.items() if isinstance(w, QuantizedRows) or w.ndim == 2}
    seconds["weights"] = time.perf_counter() - t

    progress("building Relax module", None)
    t = time.perf_counter()
    net = llama.LlamaForCausalLM(cfg)
    repack = apply_cpu_layout(net, storage, tied=llama.tied_weights(cfg), int8_isa=int8_isa)
    with tvm_target:
        mod, named_params = net.export_tvm(spec=net.get_default_spec())
    mod = use_fast_decode_attention(mod, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim)
    seconds["export"] = time.perf_counter() - t

    cached = _cached_library(library_cache, mod, tvm_target, spec.cc) if library_cache is not None else None
    if cached is None or not cached.is_file():
        progress("compiling with TVM", None)
        t = time.perf_counter()
        executable = tvm.compile(mod, target=tvm_target, relax_pipeline=relax_pipeline(tvm_target))
        seconds["compile"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.stage.") as stage_dir:
        stage = Path(stage_dir)
        t = time.perf_counter()
        if cached is not None and cached.is_file():
            shutil.copyfile(cached, stage / "model.so")
        else:
            executable.export_library(str(stage / "model.so"), fcompile=fcompile)
            if cached is not None:
                shutil.copyfile(stage / "model.so", cached)
        seconds["link"] = time.perf_counter() - t

        t = time.perf_counter()
        order, arrays = write_weights(named_params, weights.items(), repack, stage, source)
        (stage / "tokenizer.json").write_text(tokenizer_json)
        seconds["pack"] = time.perf_counter() - t

        progress("writing artifact", None)
        manifest = {
            "name": name,
            "family": "llama",
            "created_by": f"edgert {__version__}",
            "tvm_version": tvm.__version__,
            "source": {"file": source.name, "tensor_types": sorted(set(gguf_model.tensor_types.values()))},
            "target": target_record,
            "model": cfg.to_dict(),
            "entry_points": _entry_points(cfg),
            "kv_cache": {
                "kind": "paged",
                "page_size": 16,
                "context_length": context,
                "prefill_chunk_size": chunk,
                "dtype": "float32",
                "num_layers": cfg.num_layers,
                "num_kv_heads": cfg.num_kv_heads,
                "head_dim": cfg.head_dim,
            },
            "weights": {
                "file": "weights.safetensors",
                "dtype": _main_dtype(arrays),
                "quant": quant,
                "activations": activations,
                "storage": {kind: list(storage.values()).count(kind) for kind in sorted(set(storage.values()))},
                "layout": "cpu-packed-columns",
                "order": order,
            },
            "library": "model.so",
            "tokenizer": {"file": "tokenizer.json", **tokenizer_config(gguf_model.metadata)},
            "defaults": dict(recipe.run) if recipe else {},
            "compile_seconds": {k: round(v, 2) for k, v in seconds.items()},
        }
        staged = {
            "model.so": stage / "model.so",
            "weights.safetensors": stage / "weights.safetensors",
            "tokenizer.json": stage / "tokenizer.json",
        }
        manifest = write_artifact(out, manifest, staged, as_dir=as_dir)
    progress("done", 1.0)
    return CompileResult(out, manifest, seconds)


def _int8_isa(activations: str, record: dict[str, Any]) -> str | None:
    """The dot-product instruction set for ``activations`` int8 on the target (None for f32)."""
    from edgert.compiler.kernels_int8 import dot_isa

    if activations not in ("f32", "int8"):
        raise EdgertError(f"--activations '{activations}' is not one of f32, int8")
    if activations == "f32":
        return None
    isa = dot_isa(record["cpu_flags"])
    if isa is None:
        raise EdgertError(
            f"--activations int8 needs integer dot products (x86 AVX2, aarch64 dotprod or i8mm); target "
            f"'{record['name']}' ({record['cpu']}) has {', '.join(record['cpu_flags']) or 'neither'}"
        )
    return isa


def _cached_library(folder: str | Path, mod: Any, target: Any, cc: str | None) -> Path:
    """Where ``folder`` keeps the library of ``mod`` built for ``target`` (it may not exist yet).

    The key is TVM's structural hash of the whole module (every Relax function and TIR kernel)
    with the target, the cross compiler and the TVM version, so only an identical build is reused.
    """
    import hashlib

    import tvm
    from tvm_ffi import structural_hash

    key = f"{structural_hash(mod)}|{target}|{cc}|{tvm.__version__}|{__version__}"
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.so"


def _main_dtype(arrays: dict[str, Any]) -> str:
    """The dtype that holds most of the weight bytes."""
    totals: dict[str, int] = {}
    for a in arrays.values():
        totals[str(a.dtype)] = totals.get(str(a.dtype), 0) + a.nbytes
    return max(totals, key=totals.__getitem__)


def _no_audio_ctx(audio_ctx: int | None, model: str) -> None:
    if audio_ctx is not None:
        raise EdgertError(f"--audio-ctx applies to Whisper models only, not to '{model}'")


def _is_whisper(source: Path, recipe: Recipe | None) -> bool:
    """A Whisper recipe, or a CTranslate2 model (its folder or its model.bin)."""
    if recipe is not None:
        return recipe.family == "whisper"
    return source.name == "model.bin" or (source.is_dir() and (source / "model.bin").is_file())


def stage_library_and_weights(
    executable: Any,
    named_params: list[tuple[str, Any]],
    weights: Any,
    repack: dict[str, Callable[[Any], dict[str, Any]]],
    stage: Path,
    fcompile: Any,
    source: Path,
    extra_tensors: dict[str, Any] | None = None,
) -> tuple[list[str], dict[str, float]]:
    """Write ``model.so`` and ``weights.safetensors`` into ``stage``; return the weights' order and timings.

    ``weights`` yields (parameter name, source array); a name the layout packed goes through its
    ``repack`` function (which may turn one source tensor into several parameters), any other is
    cast to the parameter's dtype. Every parameter of the exported module must get an array of
    its exact shape and dtype. ``extra_tensors`` (e.g. Whisper's mel filters) follow the
    parameters, outside the order the entry points take them in.
    """

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    executable.export_library(str(stage / "model.so"), fcompile=fcompile)
    seconds["link"] = time.perf_counter() - t

    t = time.perf_counter()
    order, _ = write_weights(named_params, weights, repack, stage, source, extra_tensors)
    seconds["weights"] = time.perf_counter() - t
    return order, seconds


def write_weights(
    named_params: list[tuple[str, Any]],
    weights: Any,
    repack: dict[str, Callable[[Any], dict[str, Any]]],
    stage: Path,
    source: Path,
    extra_tensors: dict[str, Any] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Write ``stage/weights.safetensors`` in the parameters' order; return that order and the arrays by name.

    ``weights`` yields (parameter name, source array); a packed name goes through ``repack``, any
    other is cast to the parameter's dtype; each array must have its parameter's exact shape and dtype.
    """
    import numpy as np

    from edgert.runtime.tensorfile import write_tensors

    shapes = {n: tuple(int(d) for d in p.shape) for n, p in named_params}
    dtypes = {n: p.dtype for n, p in named_params}
    arrays: dict[str, Any] = {}
    for pname, w in weights:
        packed = repack[pname](w) if pname in repack else {pname: np.asarray(w, dtype=dtypes.get(pname))}
        for n, a in packed.items():
            if n not in shapes or a.shape != shapes[n] or str(a.dtype) != dtypes[n]:
                raise ModelFileError(
                    f"{source}: weight '{n}' is {a.dtype}{list(a.shape)}, expected "
                    f"{dtypes.get(n)}{list(shapes.get(n, ()))}"
                )
            arrays[n] = a
    missing = [n for n in shapes if n not in arrays]
    if missing:
        raise ModelFileError(f"{source}: weights missing for {', '.join(missing[:5])}")
    order = [n for n, _ in named_params]
    with (stage / "weights.safetensors").open("wb") as fh:
        write_tensors(fh, {**{n: arrays[n] for n in order}, **(extra_tensors or {})}, {"format": "edgert"})
    return order, arrays


def _entry_points(cfg: Any) -> dict[str, Any]:
    cache = {"name": "cache", "type": "PagedKVCache"}
    ids = {"name": "input_ids", "dtype": "int32"}
    logits = {"name": "logits", "dtype": "float32"}
    return {
        "prefill": {
            "inputs": [{**ids, "shape": [1, "seq_len"]}, cache],
            "outputs": [{**logits, "shape": [1, 1, cfg.vocab_size]}, cache],
        },
        "verify": {
            "inputs": [{**ids, "shape": [1, "seq_len"]}, cache],
            "outputs": [{**logits, "shape": [1, "seq_len", cfg.vocab_size]}, cache],
        },
        "decode": {
            "inputs": [{**ids, "shape": [1, 1]}, cache],
            "outputs": [{**logits, "shape": [1, 1, cfg.vocab_size]}, cache],
        },
        **_layer_entry_points(cfg),
        "create_kv_cache": {
            "inputs": [
                "max_batch_size",
                "max_total_seq_len",
                "prefill_chunk_size",
                "page_size",
                "support_sliding_window",
            ],
            "outputs": [cache],
        },
    }


def _layer_entry_points(cfg: Any) -> dict[str, Any]:
    """``embed``, ``layer_<i>``, ``kv_fill_<i>`` and ``head``: the stack in pieces (early exit, drafting)."""
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
    return entries
