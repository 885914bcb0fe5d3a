"""Compile a Marian translation model (transformers `config.json` + `model.safetensors`) into an artifact."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from edgert.artifact.writer import check_output_path, write_artifact
from edgert.compiler.compile import BuildRequest, CompileResult, stage_library_and_weights
from edgert.compiler.layout import WEIGHT_DTYPES, apply_cpu_layout
from edgert.compiler.passes.pipeline import relax_pipeline
from edgert.compiler.target import library_compiler, resolve
from edgert.errors import EdgertError, ModelFileError
from edgert.targets import TargetSpec, load_target
from edgert.version import __version__

MAX_BEAMS = 8
MAX_TARGET_LENGTH = 256


def is_marian_dir(path: Path) -> bool:
    """A folder holding a transformers config.json of model_type "marian"."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "marian"
    except ValueError:
        return False


def compile_marian(
    source: Path, spec: TargetSpec, output: Path | None, weight_dtype: str | None, threads: int | None, as_dir: bool
) -> Any:
    """Read the folder ``source``, build encode/prefill/decode, write the artifact."""
    import tvm

    from edgert.artifact.tensorfile import read_tensors
    from edgert.families.marian import model as marian

    out = check_output_path(Path(output) if output else Path(f"{source.name}.edgert"), as_dir)
    weight_dtype = weight_dtype or "f32"
    if weight_dtype not in WEIGHT_DTYPES:
        raise EdgertError(f"weight dtype '{weight_dtype}' is not one of {', '.join(WEIGHT_DTYPES)}")
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    try:
        raw = json.loads((source / "config.json").read_text())
    except ValueError as exc:
        raise ModelFileError(f"{source}/config.json is not valid JSON: {exc}") from exc
    cfg = marian.MarianConfig.from_hf(raw)
    weights_path = source / "model.safetensors"
    if not weights_path.is_file():
        raise ModelFileError(f"{source}: model.safetensors is missing")
    state = read_tensors(weights_path)
    tvm_target, target_record = resolve(spec, threads)
    fcompile = library_compiler(spec, target_record["arch"])
    seconds["read"] = time.perf_counter() - t

    t = time.perf_counter()
    net = marian.MarianModel(cfg)
    repack = apply_cpu_layout(net, weight_dtype)
    with tvm_target:
        mod, named_params = net.export_tvm(spec=net.get_default_spec())
    executable = tvm.compile(mod, target=tvm_target, relax_pipeline=relax_pipeline(tvm_target))
    seconds["compile"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.stage.") as stage_dir:
        stage = Path(stage_dir)
        order, staged_seconds = stage_library_and_weights(
            executable, named_params, marian.hf_weights(state, cfg), repack, stage, fcompile, source
        )
        seconds.update(staged_seconds)
        staged = {n: stage / n for n in ("model.so", "weights.safetensors")}
        manifest = {
            "name": source.name,
            "family": "marian",
            "created_by": f"edgert {__version__}",
            "tvm_version": tvm.__version__,
            "source": {"file": "model.safetensors", "format": "transformers"},
            "target": target_record,
            "model": cfg.to_dict(),
            "entry_points": {
                "encode": {"inputs": [{"name": "input_ids", "dtype": "int32", "shape": [1, "src_len"]}]},
                "prefill": {"inputs": ["input_ids [1, seq_len]", "positions", "cross_kv", "cache"]},
                "decode": {"inputs": ["input_ids [batch, 1]", "positions", "cross_kv", "cache"]},
                "create_kv_cache": {"inputs": ["max_batch_size", "max_total_seq_len", "prefill_chunk_size"]},
            },
            "kv_cache": {
                "kind": "paged",
                "page_size": 16,
                "context_length": min(MAX_TARGET_LENGTH, cfg.max_position_embeddings),
                "prefill_chunk_size": min(MAX_TARGET_LENGTH, cfg.max_position_embeddings),
                "max_sequences": 2 * MAX_BEAMS,
                "dtype": "float32",
                "num_layers": cfg.decoder_layers,
                "cross": {"shape": [2 * cfg.decoder_layers, cfg.decoder_attention_heads, "src_len", cfg.head_dim]},
            },
            "weights": {
                "file": "weights.safetensors",
                "dtype": WEIGHT_DTYPES[weight_dtype],
                "layout": "cpu-packed-columns",
                "order": order,
            },
            "library": "model.so",
            "compile_seconds": {k: round(v, 2) for k, v in seconds.items()},
        }
        manifest = write_artifact(out, manifest, staged, as_dir=as_dir)
    return CompileResult(out, manifest, seconds)


def build(req: BuildRequest) -> Any:
    """The registry's entry: `compile_marian` with the request's options."""
    return compile_marian(
        req.source,
        load_target(req.target),
        req.output,
        req.option("weight_dtype"),
        req.options.get("threads"),
        req.as_dir,
    )
