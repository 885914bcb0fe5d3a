"""Compile a Whisper model (CTranslate2 `model.bin`) into an `.edgert` artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgert.compiler.compile import Build, BuildRequest, create_kv_cache_entry, stage_library_and_weights
from edgert.compiler.gpu_layout import clip_embeddings
from edgert.compiler.kernels.seq2seq import apply_seq2seq_kernels
from edgert.compiler.layout import apply_cpu_layout, float_weights, packed_weights
from edgert.compiler.passes.attention import use_fast_decode_attention
from edgert.errors import ModelFileError
from edgert.recipes import Recipe
from edgert.targets import TargetSpec, load_target

MEL_FILTERS = "audio.mel_filters"  # extra tensor in weights.safetensors, outside the entry points' order
MAX_BEAMS = 8
# A verify pass of up to a page of tokens (16) runs as decode rows of one sequence (the cache holds
# 2 * MAX_BEAMS = 16 batch entries): `rows_append` parks rows within one page's free tail.
VERIFY_ROWS = 16
# Projections that run over the encoder's frames (1500 in a full window): the many-row GEMM kernel
# (the decoder keeps GEMVs).
ENCODER_GEMMS = r"conv\d\.matmul|encoder_layers\.\d+\.\w+|decoder_layers\.\d+\.cross_kv"
# The decoder's projections and tied head, over one token or a few (a speculative verify pass, beams):
# kernels that read each weight once for up to `decoder_rows` rows.
DECODER_ROWS = r"decoder_layers\.\d+\.(self_qkv|self_out|cross_q|cross_out|fc1|fc2)|lm_head"


def compile_whisper(
    source: Path,
    recipe: Recipe | None,
    spec: TargetSpec,
    output: Path | None,
    weight_dtype: str | None,
    threads: int | None,
    as_dir: bool,
    progress: Any,
    audio_ctx: int | None = None,
    calibration: Any = None,
) -> Any:
    """Read ``source`` (a `model.bin` or its folder), build encode/prefill/decode, write the artifact.

    ``audio_ctx`` (encoder positions, 20 ms each; default the model's 1500 = 30 s) shortens the
    encoder's window: the runtime then pads or cuts audio to that length and seeks by it.
    For an NPU target the encoder becomes int8 partitions calibrated on ``calibration`` (see
    `edgert.families.whisper.npu`); the decoder and the NPU plan's CPU parts are built for this host.
    """
    from edgert.families.whisper import model as whisper
    from edgert.families.whisper.assets import decoding_config, mel_filters
    from edgert.families.whisper.ct2 import read_ct2

    model_dir = source if source.is_dir() else source.parent
    options = dict(recipe.compile) if recipe else {}
    npu_spec = spec if spec.kind == "npu" else None
    if npu_spec is not None:  # the NPU target's own CPU is not a TVM target yet (as for graph NPU builds)
        spec = load_target("host")
    job = Build.start(recipe.name if recipe else model_dir.name, "whisper", spec, threads, output, as_dir, gpu=True)
    # On a GPU: plain float32 matrices for dlight's GPU rules (the f16 packing is the CPU's layout).
    weight_dtype = "f32" if job.on_gpu else float_weights(weight_dtype or options.get("weight_dtype", "f16"))

    progress("reading model", None)
    with job.timed("read"):
        ct2 = read_ct2(source)
        full = whisper.WhisperConfig.from_ct2(ct2)
        audio_ctx = audio_ctx if audio_ctx is not None else options.get("audio_ctx")
        cfg = full.with_window(audio_ctx)
        tokenizer_path = model_dir / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise ModelFileError(f"{model_dir}: tokenizer.json is missing (it ships next to model.bin)")
        tokenizer_json = tokenizer_path.read_text(encoding="utf-8")
        decoding = decoding_config(tokenizer_json, ct2.config, cfg.vocab_size)

    progress("building Relax module", None)
    with job.timed("export"):
        net = whisper.WhisperModel(cfg)
        if job.on_gpu:  # Relax's own ops, scheduled by dlight: no CPU layouts or hand-written CPU kernels
            repack = {}
            clip_embeddings(net)
        else:
            repack = apply_cpu_layout(net, weight_dtype)
            apply_seq2seq_kernels(net, gemm=ENCODER_GEMMS, rows=DECODER_ROWS)
        with job.tvm_target:
            mod, named_params = net.export_tvm(spec=net.get_default_spec(npu_encoder=npu_spec is not None))
        if not job.on_gpu:
            # Vectorized self-attention over the paged cache (TVM's CPU kernels are scalar: 0.9 ms of
            # a 7-token verify pass against 0.07 for a step), and the row append that lets a verify
            # pass run as decode rows of one sequence (`VERIFY_ROWS`), each row a decode step's.
            mod = use_fast_decode_attention(mod, cfg.num_heads, cfg.num_heads, cfg.head_dim)

    progress("compiling with TVM", None)
    executable = job.compile(mod)

    with job.staging() as stage_dir:
        stage = Path(stage_dir)
        order, staged_seconds = stage_library_and_weights(
            executable,
            named_params,
            whisper.ct2_weights(ct2, cfg),
            repack,
            stage,
            job.fcompile,
            source,
            extra_tensors={MEL_FILTERS: mel_filters(n_mels=cfg.n_mels)},
        )
        job.seconds.update(staged_seconds)
        (stage / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        staged = {n: stage / n for n in ("model.so", "weights.safetensors", "tokenizer.json")}
        cross = [2 * cfg.decoder_layers, cfg.num_heads, cfg.audio_ctx * cfg.head_dim]
        entry_points = _entry_points(cfg, cross)
        sections: dict[str, Any] = {}
        if npu_spec is not None:
            from edgert.families.whisper.npu import build_encoder_partitions

            job.record.update(
                name=npu_spec.name,
                description=npu_spec.description,
                cpu_parts="built for this host: LiteRT and TVM run the artifact here "
                "(the NPU's CPU is not a TVM target yet)",
            )
            sections["npu"], more = build_encoder_partitions(job, ct2, cfg, npu_spec, calibration, stage, progress)
            staged.update(more)
            encode = entry_points.pop("encode")
            entry_points = {
                "cross_kv": {"inputs": [sections["npu"]["encoder"]["outputs"][0]], "outputs": encode["outputs"]},
                **entry_points,
            }

        progress("writing artifact", None)
        result = job.finish(
            staged,
            source={"file": source.name, "format": "ctranslate2", "spec": ct2.spec, "revision": ct2.revision},
            model=cfg.to_dict(),
            entry_points=entry_points,
            kv_cache={
                "kind": "paged",
                "page_size": 16,
                "context_length": cfg.text_ctx,
                "prefill_chunk_size": cfg.text_ctx,
                "max_sequences": 2 * MAX_BEAMS,
                "dtype": "float32",
                "num_layers": cfg.decoder_layers,
                "num_kv_heads": cfg.num_heads,
                "head_dim": cfg.head_dim,
                "cross": {"shape": cross, "dtype": "float32", "filled_by": "encode"},
                **({} if job.on_gpu else {"verify_rows": VERIFY_ROWS}),
            },
            audio={
                "mel_filters": MEL_FILTERS,
                "n_mels": cfg.n_mels,
                "frames": cfg.mel_frames,  # one encoder window, in 10 ms mel frames
                "audio_ctx": cfg.audio_ctx,
                "trained_audio_ctx": full.audio_ctx,
            },
            whisper=decoding,
            weights=packed_weights(weight_dtype, order, job.on_gpu),
            library="model.so",
            tokenizer={"file": "tokenizer.json"},
            defaults=dict(recipe.run) if recipe else {},
            **sections,
        )
    progress("done", 1.0)
    return result


def _entry_points(cfg: Any, cross: list[int]) -> dict[str, Any]:
    cache = {"name": "cache", "type": "PagedKVCache"}
    kv = {"name": "cross_kv", "dtype": "float32", "shape": cross}
    logits = {"name": "logits", "dtype": "float32"}
    return {
        "encode": {
            "inputs": [{"name": "mel", "dtype": "float32", "shape": [1, cfg.n_mels, cfg.mel_frames]}],
            "outputs": [kv],
        },
        "prefill": {
            "inputs": [
                {"name": "input_ids", "dtype": "int32", "shape": [1, "seq_len"]},
                {"name": "positions", "dtype": "int32", "shape": [1, "seq_len"]},
                kv,
                cache,
            ],
            "outputs": [{**logits, "shape": [1, 1, cfg.vocab_size]}, cache],
        },
        "decode": {
            "inputs": [
                {"name": "input_ids", "dtype": "int32", "shape": ["batch", 1]},
                {"name": "positions", "dtype": "int32", "shape": ["batch", 1]},
                kv,
                cache,
            ],
            "outputs": [{**logits, "shape": ["batch", 1, cfg.vocab_size]}, cache],
        },
        **_layer_entry_points(cfg, kv, cache),
        "create_kv_cache": create_kv_cache_entry(cache),
    }


def _layer_entry_points(cfg: Any, kv: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
    """``embed``, ``layer_<i>``, ``kv_fill_<i>`` and ``head``: the decoder in pieces (drafting, early exit);
    ``verify``: the whole decoder's logits of every token (lookup drafting's verify pass in one call)."""
    ids = {"dtype": "int32", "shape": [1, "seq_len"]}
    hidden = {"name": "h", "dtype": "float32", "shape": [1, "seq_len", cfg.d_model]}
    attn = {"name": "attention", "dtype": "float32", "shape": [1, "seq_len", cfg.num_heads, cfg.head_dim]}
    entries: dict[str, Any] = {
        "embed": {"inputs": [{"name": "input_ids", **ids}, {"name": "positions", **ids}], "outputs": [hidden]},
        "head": {
            "inputs": [hidden],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "seq_len", cfg.vocab_size]}],
        },
    }
    entries["verify"] = {
        "inputs": [{"name": "input_ids", **ids}, {"name": "positions", **ids}, kv, cache],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "seq_len", cfg.vocab_size]}, cache],
    }
    for i in range(cfg.decoder_layers):
        entries[f"layer_{i}"] = {"inputs": [hidden, kv, cache], "outputs": [hidden, cache]}
        entries[f"kv_fill_{i}"] = {"inputs": [hidden, cache], "outputs": [attn, cache]}
    return entries


def build(req: BuildRequest) -> Any:
    """The registry's entry: `compile_whisper` with the request's options."""
    return compile_whisper(
        req.source,
        req.recipe,
        load_target(req.target),
        req.output,
        req.option("weight_dtype"),
        req.options.get("threads"),
        req.as_dir,
        req.progress,
        req.options.get("audio_ctx"),
        req.options.get("calibrate"),
    )
