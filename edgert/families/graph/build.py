"""`compile_graph`: a plain ONNX or TFLite graph -> Relax -> scheduled module -> `.edgert` artifact.

The artifact's family is ``graph``: one entry point ``main`` taking the graph's inputs, then the
weights (in the manifest's order) and returning the graph's outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgert.compiler.compile import Build, BuildRequest
from edgert.compiler.launch import export_with_claimed_launch
from edgert.errors import EdgertError, ModelFileError
from edgert.families.graph.lower import build_module, import_graph, optimize

GRAPH_SUFFIXES = (".onnx", ".tflite")
QUANT_MODES = ("f32", "f16", "q8", "q4")


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """``["name=1,128", ...]`` -> ``{"name": [1, 128]}``."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, _, dims = spec.partition("=")
        try:
            shapes[name.strip()] = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            raise EdgertError(f"--input-shape '{spec}': expected NAME=D0,D1,... with integer dims") from None
        if not name.strip() or not dims.strip():
            raise EdgertError(f"--input-shape '{spec}': expected NAME=D0,D1,...")
    return shapes


def compile_graph(
    model: str | Path,
    target: str = "host",
    output: str | Path | None = None,
    quant: str | None = None,
    threads: int | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    as_dir: bool = False,
    tuning: bool = True,
    progress: Any = None,
) -> Any:
    """Compile an ONNX/TFLite graph for ``target`` into an artifact; return a `CompileResult`."""
    from edgert.artifact.tensorfile import write_tensors
    from edgert.compiler.tuning import database_for

    progress = progress or (lambda _s, _f: None)
    source = Path(model)
    quant = quant or "f32"
    if quant not in QUANT_MODES:
        raise EdgertError(f"--quant '{quant}' is not one of {', '.join(QUANT_MODES)}")
    job = Build.start(source.stem, "graph", target, threads, output, as_dir, gpu=True)
    if not source.is_file():
        raise ModelFileError(f"model file not found: {source}")
    if job.on_gpu and quant != "f32":
        raise EdgertError(f"--quant {quant}: graph builds for a GPU target take f32 weights only")

    progress("importing graph", None)
    with job.timed("import"):
        mod, inputs, outputs, fmt = import_graph(source, input_shapes or {})

    progress("optimizing", None)
    with job.timed("optimize"):
        mod, arrays, weight_error = optimize(mod, job.tvm_target, quant, gpu=job.on_gpu)
        db = database_for(job.spec.name, source) if tuning and not job.on_gpu else None

    progress("compiling with TVM", None)
    tune_stats: dict[str, int] = {}
    with job.timed("compile"):
        try:
            executable = build_module(mod, job.tvm_target, db, tune_stats, job.kernels)
        except EdgertError:
            raise
        except Exception as exc:  # TVM reports shape and lowering failures as assorted errors
            raise EdgertError(f"{source}: TVM could not compile the graph: {str(exc).splitlines()[-1]}") from exc

    order = [f"w{i}" for i in range(len(arrays))]  # the names `lift_constants` gave the parameters
    with job.staging() as stage_dir:
        stage = Path(stage_dir)
        with job.timed("link"):
            export_with_claimed_launch(executable, stage / "model.so", job.fcompile)
        with (stage / "weights.safetensors").open("wb") as fh:
            write_tensors(fh, dict(zip(order, arrays, strict=True)), {"format": "edgert"})
        progress("writing artifact", None)
        result = job.finish(
            {"model.so": stage / "model.so", "weights.safetensors": stage / "weights.safetensors"},
            source={"file": source.name, "format": fmt},
            entry_points={"main": {"inputs": [i.to_dict() for i in inputs], "outputs": [o.to_dict() for o in outputs]}},
            weights={
                "file": "weights.safetensors",
                "quant": quant,
                "group_size": 32 if quant in ("q8", "q4") else None,
                "weight_rel_rms_error": None if weight_error is None else round(weight_error, 6),
                "layout": "as the graph has them" if job.on_gpu else "matmul weights packed [N/B, K, B]",
                "order": order,
            },
            library="model.so",
            tuning={"database": "/".join(db.parts[-3:]) if db else None, **tune_stats},
        )
    progress("done", 1.0)
    return result


def build(req: BuildRequest) -> Any:
    """The registry's entry: `compile_graph` with the request's options; for an NPU target, an NPU
    artifact (`edgert.families.graph.npu.compile_npu_artifact`) calibrated on ``calibrate``."""
    from edgert.targets import load_target

    spec = load_target(req.target)
    if spec.kind == "npu":
        from edgert.families.graph.npu import compile_npu_artifact

        for key in ("quant", "input_shapes"):
            if key in req.options:
                flag = {"quant": "--quant", "input_shapes": "--input-shape"}[key]
                raise EdgertError(f"{flag} does not apply to NPU targets (int8 partitions, shapes from --calibrate)")
        return compile_npu_artifact(
            req.source,
            spec,
            req.options.get("calibrate"),
            output=req.output,
            threads=req.options.get("threads"),
            as_dir=req.as_dir,
            progress=req.progress,
        )
    if "calibrate" in req.options:
        raise EdgertError(f"--calibrate applies to NPU targets; '{spec.name}' is a {spec.kind} target")
    extra = {k: req.options[k] for k in ("input_shapes", "tuning") if k in req.options}
    if isinstance(extra.get("input_shapes"), list | tuple):  # as given on the command line: ["NAME=1,128", ...]
        extra["input_shapes"] = parse_input_shapes(list(extra["input_shapes"]))
    return compile_graph(
        req.source,
        target=req.target,
        output=req.output,
        quant=req.options.get("quant"),
        threads=req.options.get("threads"),
        as_dir=req.as_dir,
        progress=req.progress,
        **extra,
    )
