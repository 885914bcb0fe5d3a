"""The graph family on NPU targets: run a compiled plan (its int8 TFLite partitions and the float
CPU parts) to measure what int8 costs in accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgert.compiler.npu import _session


def run_plan(onnx_model, the_plan: dict, tflites: list[bytes], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the graph as planned on one batch-of-one sample: CPU partitions with onnxruntime,
    NPU partitions with LiteRT (int8, reference kernels). Returns the graph outputs."""
    import onnx

    from edgert.runtime.litert import LiteRTPartition

    model = onnx.load(str(onnx_model)) if isinstance(onnx_model, str | Path) else onnx_model
    env = dict(feeds)
    by_name = {n.name or n.output[0]: n for n in model.graph.node}
    consts = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    for p in the_plan["partitions"]:
        if p["device"] == "npu":
            part = LiteRTPartition(tflites[p["tflite"]])
            scales = p.get("boundary_scales", {"inputs": {}, "outputs": {}})
            for name, s in scales["inputs"].items():
                env[name] = env[s["source"]] / np.asarray(s["divide_by"], np.float32)
            outs = part(*(env[n].astype(np.float32) for n in part.input_names))
            for name, y in zip(part.output_names, outs, strict=True):
                if name in scales["outputs"]:
                    y = y * np.asarray(scales["outputs"][name]["multiply_by"], np.float32)
                env[name] = y
            continue
        nodes = [by_name[n] for n in p["nodes"]]
        needed = [n for n in p["inputs"] if n not in consts]
        sub = onnx.helper.make_graph(
            [*(n for n in model.graph.node if n.output[0] in consts), *nodes],
            "cpu",
            [
                onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(env[n].dtype), env[n].shape)
                for n in needed
            ],
            [onnx.ValueInfoProto(name=o) for o in p["outputs"]],
            [i for i in model.graph.initializer],
        )
        m = onnx.helper.make_model(sub, opset_imports=model.opset_import)
        m.ir_version = model.ir_version
        sess = _session(m)
        outs = sess.run(p["outputs"], {n: env[n] for n in needed})
        env.update(zip(p["outputs"], outs, strict=True))
    return {o.name: env[o.name] for o in model.graph.output}
