"""Compile a Marian translation model (transformers `config.json` + `model.safetensors`) into an artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgert.compiler.compile import Build, BuildRequest, stage_library_and_weights
from edgert.compiler.gpu_layout import clip_embeddings
from edgert.compiler.layout import apply_cpu_layout, float_weights, packed_weights
from edgert.errors import ModelFileError
from edgert.targets import TargetSpec, load_target

MAX_BEAMS = 8
MAX_TARGET_LENGTH = 256


def compile_marian(
    source: Path, spec: TargetSpec, output: Path | None, weight_dtype: str | None, threads: int | None, as_dir: bool
) -> Any:
    """Read the folder ``source``, build encode/prefill/decode, write the artifact."""
    from edgert.artifact.tensorfile import read_tensors
    from edgert.families.marian import model as marian

    job = Build.start(source.name, "marian", spec, threads, output, as_dir, gpu=True)
    weight_dtype = float_weights(weight_dtype or "f32", "Marian", job.on_gpu)
    with job.timed("read"):
        try:
            raw = json.loads((source / "config.json").read_text())
        except ValueError as exc:
            raise ModelFileError(f"{source}/config.json is not valid JSON: {exc}") from exc
        cfg = marian.MarianConfig.from_hf(raw)
        weights_path = source / "model.safetensors"
        if not weights_path.is_file():
            raise ModelFileError(f"{source}: model.safetensors is missing")
        state = read_tensors(weights_path)

    net = marian.MarianModel(cfg)
    # On a GPU: Relax's own ops, scheduled by dlight (the packed columns are the CPU's layout).
    repack = {} if job.on_gpu else apply_cpu_layout(net, weight_dtype)
    if job.on_gpu:
        clip_embeddings(net)
    with job.tvm_target:
        mod, named_params = net.export_tvm(spec=net.get_default_spec())
    executable = job.compile(mod)

    with job.staging() as stage_dir:
        stage = Path(stage_dir)
        order, staged_seconds = stage_library_and_weights(
            executable, named_params, marian.hf_weights(state, cfg), repack, stage, job.fcompile, source
        )
        job.seconds.update(staged_seconds)
        return job.finish(
            {n: stage / n for n in ("model.so", "weights.safetensors")},
            source={"file": "model.safetensors", "format": "transformers"},
            model=cfg.to_dict(),
            entry_points={
                "encode": {"inputs": [{"name": "input_ids", "dtype": "int32", "shape": [1, "src_len"]}]},
                "prefill": {"inputs": ["input_ids [1, seq_len]", "positions", "cross_kv", "cache"]},
                "decode": {"inputs": ["input_ids [batch, 1]", "positions", "cross_kv", "cache"]},
                "create_kv_cache": {"inputs": ["max_batch_size", "max_total_seq_len", "prefill_chunk_size"]},
            },
            kv_cache={
                "kind": "paged",
                "page_size": 16,
                "context_length": min(MAX_TARGET_LENGTH, cfg.max_position_embeddings),
                "prefill_chunk_size": min(MAX_TARGET_LENGTH, cfg.max_position_embeddings),
                "max_sequences": 2 * MAX_BEAMS,
                "dtype": "float32",
                "num_layers": cfg.decoder_layers,
                "cross": {"shape": [2 * cfg.decoder_layers, cfg.decoder_attention_heads, "src_len", cfg.head_dim]},
            },
            weights=packed_weights(weight_dtype, order, job.on_gpu),
            library="model.so",
        )


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
