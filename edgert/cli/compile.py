"""`edgert compile`: a recipe or model file into an artifact (`edgert.families.compile.compile_model`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgert.cli.common import ContextOpt, ThreadsOpt, err, stages


def compile(
    model: Annotated[str, typer.Argument(help="A model recipe name (see `edgert models`) or a .gguf file.")],
    target: Annotated[str, typer.Option("--target", help="Target device (see `edgert targets`).")] = "host",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Artifact to write (default: NAME.edgert).")
    ] = None,
    weight_dtype: Annotated[str | None, typer.Option("--weight-dtype", help="Weight storage: f16 or f32.")] = None,
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant",
            help="Weights: source (keep the file's Q4_0/Q4_1/Q8_0 blocks; default for GGUF), q4, q8 "
            "(group-wise, 32 per group), f16 or f32 (default for ONNX/TFLite graphs).",
        ),
    ] = None,
    context: ContextOpt = None,
    threads: ThreadsOpt = None,
    as_dir: Annotated[bool, typer.Option("--dir", help="Write the artifact as a folder instead of one file.")] = False,
    input_shape: Annotated[
        list[str] | None, typer.Option("--input-shape", help="Fix a graph input's shape: NAME=1,128 (repeatable).")
    ] = None,
    activations: Annotated[
        str | None,
        typer.Option(
            "--activations",
            help="GGUF models: auto (default: int8 on AVX-512 VNNI CPUs, f32 elsewhere), f32, or int8 "
            "(activations quantized to int8, integer dot products with the q4/q8 weights; x86 AVX2 or "
            "AVX-512 VNNI, aarch64 dotprod or i8mm).",
        ),
    ] = None,
    audio_ctx: Annotated[
        int | None,
        typer.Option(
            "--audio-ctx",
            help="Whisper models: encoder window in 20 ms positions (default 1500 = 30 s, as trained); "
            "e.g. 300 = 6 s encodes about 7x faster on short clips, accuracy can drop.",
        ),
    ] = None,
    chunk_ms: Annotated[
        float | None,
        typer.Option(
            "--chunk-ms",
            help="Codecs: the streaming chunk compiled with fixed shapes (default 80 ms); chunks of "
            "this length stream fastest, others run through the general entry points.",
        ),
    ] = None,
    evictable_kv: Annotated[
        bool,
        typer.Option(
            "--evictable-kv",
            help="Llama GGUF models: RoPE before the KV cache and the entry points that evict from it "
            "(needed by `edgert serve --kv-budget`).",
        ),
    ] = False,
    kv_dtype: Annotated[
        str | None,
        typer.Option(
            "--kv-dtype",
            help="Llama GGUF models: the KV cache's keys and values, auto (default: f16 with int8 "
            "activations, else f32), f16 or f32. f16 halves the cache's memory and the bytes attention "
            "reads a step.",
        ),
    ] = None,
    library_cache: Annotated[
        Path | None,
        typer.Option(
            "--library-cache",
            help="GGUF language models: a folder that keeps compiled libraries by the module's structural "
            "hash; a build of an identical module (same model code, target and versions) reuses its "
            "library instead of running TVM again.",
        ),
    ] = None,
    calibrate: Annotated[
        Path | None,
        typer.Option(
            "--calibrate",
            help="NPU targets: an .npz of calibration inputs by name (axis 0 = samples) to fit the int8 "
            "partitions' ranges.",
        ),
    ] = None,
) -> None:
    """Compile MODEL (a recipe, .gguf, .onnx or .tflite file) for TARGET into an .edgert artifact."""
    from edgert.families.compile import compile_model

    with stages("starting") as progress:
        result = compile_model(
            model,
            target=target,
            output=output,
            as_dir=as_dir,
            progress=progress,
            weight_dtype=weight_dtype,
            quant=quant,
            context_length=context,
            threads=threads,
            input_shapes=input_shape or None,  # NAME=1,128 strings; the graph build parses them
            activations=activations,
            audio_ctx=audio_ctx,
            chunk_ms=chunk_ms,
            calibrate=calibrate,
            library_cache=library_cache,
            evictable_kv=evictable_kv or None,
            kv_dtype=kv_dtype,
        )
    size = sum(f["size"] for f in result.manifest["files"].values())
    t = result.manifest["target"]
    err.print(
        f"[green]wrote[/] {result.path} ({size / 1e6:.1f} MB) for {t['name']} ({t['arch']}, {t['cpu']}) "
        f"in {sum(result.seconds.values()):.1f} s"
    )
