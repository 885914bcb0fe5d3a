"""A plain graph through TVM: import (ONNX or TFLite to Relax), graph-level rewrites, compile.

Shared by the CPU build (`edgert.families.graph.build`) and the CPU partitions of NPU builds
(`edgert.families.graph.npu`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgert.errors import ModelFileError


def import_graph(source: Path, input_shapes: dict[str, list[int]]) -> tuple[Any, list, list, str]:
    """(Relax module, inputs, outputs, source format) for an .onnx or .tflite file."""
    suffix = source.suffix.lower()
    if suffix == ".onnx":
        from edgert.frontend.onnx_graph import import_onnx

        mod, inputs, outputs = import_onnx(source, input_shapes)
        return mod, inputs, outputs, "onnx"
    if suffix == ".tflite":
        from edgert.frontend.tflite_graph import import_tflite

        mod, inputs, outputs = import_tflite(source, input_shapes)
        return mod, inputs, outputs, "tflite"
    raise ModelFileError(f"{source}: a graph must be an .onnx or .tflite file")


def optimize(mod: Any, tvm_target: Any, quant: str, gpu: bool = False) -> tuple[Any, list, float | None]:
    """Graph-level rewrites (weight layouts, quantization), then lift the weights to parameters.

    For a GPU target (``gpu``) the CPU's packed dense layouts are skipped: dlight's GPU rules
    schedule the plain Relax ops. Returns (module, weights, relative RMS error of the quantized
    matmul weights or None).
    """
    import tvm
    from tvm import relax

    from edgert.compiler.params import lift_constants
    from edgert.compiler.schedules import rewrite_graph

    seq = tvm.transform.Sequential(
        [
            relax.transform.DecomposeOpsForInference(),
            relax.transform.FoldConstant(),
        ]
    )
    with tvm_target:
        mod = seq(mod)
        weight_error = None
        if not gpu:
            mod, weight_error = rewrite_graph(mod, tvm_target, quant=quant)
        # exp/erf/tanh/softmax as TOPI's polynomial forms: they vectorize, where libm calls do not
        # (GELU's erf took 3x its matmul's time). Relative error ~1e-7 (tests compare at 1e-5).
        mod = relax.transform.FastMathTransform()(mod)
    mod, arrays = lift_constants(mod)
    return mod, arrays, weight_error


def build_module(
    mod: Any,
    tvm_target: Any,
    tuning_db: Path | None = None,
    stats: dict[str, int] | None = None,
    report: dict[str, Any] | None = None,
) -> Any:
    """Legalize, schedule (edgert's rules, or a tuning database when one is given) and compile."""
    import tvm

    from edgert.compiler.passes.pipeline import graph_pipeline

    if tvm_target.kind.name == "opencl":
        from edgert.compiler.gpu import gpu_pipeline

        return tvm.compile(mod, target=tvm_target, relax_pipeline=gpu_pipeline(tvm_target))
    pipeline = graph_pipeline(tvm_target, tuning_db, stats, report)
    return tvm.compile(mod, target=tvm_target, relax_pipeline=pipeline)
