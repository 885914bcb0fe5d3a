"""`compile_codec`: an EnCodec-architecture codec (safetensors + config.json) -> `.edgert` artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgert.compiler.compile import Build, BuildRequest, stage_library_and_weights
from edgert.compiler.layout import apply_cpu_layout, float_weights, packed_weights
from edgert.errors import ArtifactError, EdgertError, ModelFileError
from edgert.recipes import Recipe

CODEC_FILES = ("config.json", "model.safetensors")
DEFAULT_CHUNK_MS = 80.0  # a live link's usual frame (the benchmark's, and `roundtrip --stream`'s)


def read_codec(folder: Path) -> tuple[Any, dict[str, Any]]:
    """(CodecConfig, state dict as numpy arrays) from a codec folder."""
    import numpy as np

    from edgert.artifact.tensorfile import read_tensors
    from edgert.families.codec.mimi import MimiCodecConfig
    from edgert.families.codec.model import CodecConfig

    for f in CODEC_FILES:
        if not (folder / f).is_file():
            raise ModelFileError(f"{folder} is not a codec folder: {f} is missing")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except ValueError as exc:
        raise ModelFileError(f"{folder}/config.json is not valid JSON: {exc}") from exc
    try:
        # edgert's own safetensors reader (the format is public): `safetensors` is a test extra only.
        tensors = {k: np.array(v) for k, v in read_tensors(folder / "model.safetensors").items()}
    except (ArtifactError, KeyError, ValueError, TypeError) as exc:
        raise ModelFileError(f"{folder}/model.safetensors cannot be read: {exc}") from exc
    cfg = MimiCodecConfig.from_dict(raw) if raw.get("model_type") == "mimi" else CodecConfig.from_dict(raw)
    cfg.name = raw.get("name", folder.name)
    return cfg, tensors


def compile_codec(
    folder: Path,
    target: str = "host",
    output: str | Path | None = None,
    weight_dtype: str | None = None,
    threads: int | None = None,
    as_dir: bool = False,
    recipe: Recipe | None = None,
    progress: Any = None,
    chunk_ms: float | None = None,
) -> Any:
    """Compile the codec in ``folder`` for ``target``; returns a `CompileResult`.

    ``chunk_ms``: the streaming chunk that gets fixed-shape entry points (rounded to whole frames;
    default: the recipe's, else 80 ms).
    """
    import numpy as np

    from edgert.families.codec import model as codec

    progress = progress or (lambda *_: None)
    options = dict(recipe.compile) if recipe else {}
    job = Build.start(recipe.name if recipe else folder.name, "codec", target, threads, output, as_dir, gpu=True)
    weight_dtype = float_weights(weight_dtype or options.get("weight_dtype", "f32"), "codec", job.on_gpu)
    progress("reading codec", None)
    with job.timed("read"):
        cfg, tensors = read_codec(folder)
        net, weights, architecture, (first_samples, first_frames) = _network(cfg, tensors)  # a bad file fails fast

    progress("building Relax module", None)
    with job.timed("export"):
        if job.on_gpu:  # plain Relax ops for dlight's GPU rules; the GPU forms of the hand-written kernels
            repack = {}
            _use_gpu_kernels(net)
        else:
            repack = apply_cpu_layout(net, weight_dtype)
        chunk_ms = float(chunk_ms if chunk_ms is not None else options.get("chunk_ms", DEFAULT_CHUNK_MS))
        if not 0 < chunk_ms <= 10_000:
            raise EdgertError(f"--chunk-ms must lie in (0, 10000] ms, got {chunk_ms:g}")
        chunk_frames = codec.chunk_frames_for(cfg.frame_rate, chunk_ms)
        with job.tvm_target:
            mod, named_params = net.export_tvm(spec=codec.streaming_spec(net, chunk_frames))

    progress("compiling with TVM", None)
    # Every fixed-shape kernel gets edgert's rules, however small: a codec's chunk kernels are all small.
    executable = job.compile(mod, static_min_elements=1)

    with job.staging() as stage_dir:
        stage = Path(stage_dir)
        order, staged_seconds = stage_library_and_weights(
            executable, named_params, weights.items(), repack, stage, job.fcompile, folder
        )
        job.seconds.update(staged_seconds)
        progress("writing artifact", None)
        result = job.finish(
            {"model.so": stage / "model.so", "weights.safetensors": stage / "weights.safetensors"},
            source={"file": folder.name, "architecture": architecture},
            model=cfg.to_dict(),
            entry_points=_entry_points(net, chunk_frames),
            codec={
                "sample_rate": cfg.sampling_rate,
                "hop_length": cfg.hop_length,
                "frame_rate": cfg.frame_rate,
                "num_codebooks": cfg.num_quantizers,
                "codebook_size": cfg.codebook_size,
                "bits_per_code": float(np.log2(cfg.codebook_size)),
                "encoder_state": net.encoder_state_size,
                "decoder_state": net.decoder_state_size,
                "pad_mode": cfg.pad_mode,
                "first_chunk_samples": first_samples,
                "first_chunk_frames": first_frames,
                "algorithmic_latency_samples": codec.algorithmic_latency(cfg),
                "min_codebooks": cfg.min_codebooks,
                "chunk_frames": chunk_frames,
            },
            weights=packed_weights(weight_dtype, order, job.on_gpu),
            library="model.so",
            defaults=dict(recipe.run) if recipe else {},
        )
    progress("done", 1.0)
    return result


def _network(cfg: Any, tensors: dict[str, Any]) -> tuple[Any, dict[str, Any], str, tuple[int, int]]:
    """(module, its weights, architecture name, first chunk (samples, frames)) for an EnCodec or Mimi config."""
    from edgert.families.codec import mimi as codec_mimi
    from edgert.families.codec import model as codec

    if isinstance(cfg, codec_mimi.MimiCodecConfig):
        net = codec_mimi.MimiCodec(cfg)
        return net, codec_mimi.mimi_weights(tensors, net), "mimi", codec_mimi.first_chunk(cfg)
    net = codec.CodecModel(cfg)
    return net, codec.encodec_weights(tensors, net), "encodec", codec.min_first_chunk(net)


def _entry_points(net: Any, chunk_frames: int) -> dict[str, Any]:
    enc, dec = net.encoder_state_size, net.decoder_state_size
    first = {"name": "first", "shape": [1], "dtype": "float32"}

    def entry(data: dict[str, Any], out: dict[str, Any], state: int) -> dict[str, Any]:
        vector = {"name": "state", "shape": [state], "dtype": "float32"}
        return {"inputs": [data, vector, first], "outputs": [out, vector]}

    hop, books = net.cfg.hop_length, net.cfg.num_quantizers
    samples, fixed = chunk_frames * hop, chunk_frames
    return {
        "encode": entry(
            {"name": "audio", "shape": ["n"], "dtype": "float32"},
            {"name": "codes", "shape": ["n / hop", books], "dtype": "int32"},
            enc,
        ),
        "decode": entry(
            {"name": "codes", "shape": ["t", "q"], "dtype": "int32"},
            {"name": "audio", "shape": ["t * hop"], "dtype": "float32"},
            dec,
        ),
        "encode_chunk": entry(
            {"name": "audio", "shape": [samples], "dtype": "float32"},
            {"name": "codes", "shape": [fixed, books], "dtype": "int32"},
            enc,
        ),
        "decode_chunk": entry(
            {"name": "codes", "shape": [fixed, "q"], "dtype": "int32"},
            {"name": "audio", "shape": [samples], "dtype": "float32"},
            dec,
        ),
    }


def _use_gpu_kernels(net: Any) -> None:
    """Mark every module of ``net`` to build its GPU form (no CPU-only hand-written kernels)."""
    from tvm.relax.frontend import nn

    class _Mark(nn.Mutator):
        def visit_module(self, name: str, node: nn.Module) -> nn.Module:
            node.on_gpu = True
            return self.visit(name, node)

    _Mark().visit("", net)


def build(req: BuildRequest) -> Any:
    """The registry's entry: `compile_codec` with the request's options."""
    return compile_codec(
        req.source,
        req.target,
        req.output,
        req.options.get("weight_dtype"),
        req.options.get("threads"),
        req.as_dir,
        req.recipe,
        req.progress,
        req.options.get("chunk_ms"),
    )
