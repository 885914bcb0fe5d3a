"""Compile a model: find its family in the registry (by recipe, file format or GGUF architecture),
refuse options that family does not take, and hand its build a `BuildRequest`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgert.errors import EdgertError, ModelFileError
from edgert.families.registry import FAMILIES, Family, for_gguf_architecture, get

# How each option is spelled on the command line, for errors.
_FLAGS = {
    "quant": "--quant",
    "weight_dtype": "--weight-dtype",
    "context_length": "--context",
    "prefill_chunk_size": "--prefill-chunk",
    "threads": "--threads",
    "library_cache": "--library-cache",
    "activations": "--activations",
    "audio_ctx": "--audio-ctx",
    "chunk_ms": "--chunk-ms",
    "input_shapes": "--input-shape",
    "tuning": "--no-tuning",
    "calibrate": "--calibrate",
    "evictable_kv": "--evictable-kv",
    "kv_dtype": "--kv-dtype",
}


def source_format(path: Path) -> str | None:
    """The format of a model file or folder, from its name and (for folders) its config; None if unknown."""
    suffix = path.suffix.lower()
    if suffix in (".gguf", ".onnx", ".tflite"):
        return suffix[1:]
    if path.name == "model.bin" or (path.is_dir() and (path / "model.bin").is_file()):
        return "ctranslate2"
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None  # the codec reader names what is wrong with the file
        if model_type == "marian":
            return "marian"
        if (path / "model.safetensors").is_file():
            return "codec"
    return None


def family_for_source(source: Path) -> tuple[Family, Any]:
    """The family that reads ``source`` (for GGUF: by the file's architecture), and the source as
    parsed to find it (the GGUF; None for other formats), so that the build does not read it again."""
    fmt = source_format(source)
    if fmt == "gguf":
        from edgert.frontend import read_gguf

        parsed = read_gguf(source)
        return for_gguf_architecture(parsed.architecture, source), parsed
    for family in FAMILIES:
        if fmt in family.formats:
            return family, None
    if not source.exists():
        raise ModelFileError(f"model file not found: {source}")
    raise ModelFileError(
        f"{source}: not a model edgert reads (GGUF, ONNX, TFLite, a CTranslate2 Whisper folder, "
        "or a folder with config.json and model.safetensors)"
    )


def compile_model(
    model: str | Path,
    target: str = "host",
    output: str | Path | None = None,
    as_dir: bool = False,
    progress: Any = None,
    **options: Any,
) -> Any:
    """Compile a recipe name or a model file/folder for ``target`` into an artifact at ``output``.

    ``options`` are the family's compile options (see each family's ``build``); one the family
    does not take is refused, naming the families that do. Returns a `CompileResult`.
    """
    from edgert.compiler.compile import BuildRequest, quiet
    from edgert.recipes import find_recipe, list_recipes

    recipe = find_recipe(str(model))
    parsed = None
    if recipe is not None:
        family, source = get(recipe.family), recipe.source_path()
    else:
        source = Path(model)
        if not source.exists() and source_format(source) is None:
            listed = ", ".join(r.name for r in list_recipes())
            raise ModelFileError(f"'{model}' is neither a model recipe ({listed}) nor a model file")
        family, parsed = family_for_source(source)
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in family.options:
            takers = [f.name for f in FAMILIES if key in f.options]
            flag = _FLAGS.get(key, key)
            if not takers:
                raise EdgertError(f"unknown compile option '{key}'")
            raise EdgertError(f"{flag} applies to {', '.join(takers)} models, not to '{model}' ({family.name})")
    request = BuildRequest(
        model=str(model),
        source=source,
        recipe=recipe,
        target=target,
        output=Path(output) if output else None,
        as_dir=as_dir,
        progress=progress or quiet,
        options=given,
        parsed=parsed,
    )
    return family.build_function()(request)
