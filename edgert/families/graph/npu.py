"""The graph family on NPU targets: run a compiled plan (its int8 TFLite partitions and the float
CPU parts) to measure what int8 costs in accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgert.compiler.npu import _session


def run_plan(onnx_model, the_plan: dict, tflites: list[bytes], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the graph as planned on one batch-of-one sample: CPU partitions with onnxruntime,
    NPU partitions with LiteRT (int8, reference kernels). Returns the graph outputs."""
    return PlanRunner(onnx_model, the_plan, tflites)(feeds)


class PlanRunner:
    """`run_plan` with its sessions and interpreters made once, for many calls (streaming a
    stateful graph chunk by chunk)."""

    def __init__(self, onnx_model, the_plan: dict, tflites: list[bytes]):
        import onnx

        from edgert.runtime.litert import LiteRTPartition

        model = onnx.load(str(onnx_model)) if isinstance(onnx_model, str | Path) else onnx_model
        self.model, self.plan, self.tflites = model, the_plan, tflites
        self.outputs = [o.name for o in model.graph.output]
        self.by_name = {n.name or n.output[0]: n for n in model.graph.node}
        self.consts = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
        self.parts: list = [
            LiteRTPartition(tflites[p["tflite"]]) if p["device"] == "npu" else None for p in the_plan["partitions"]
        ]

    def _cpu_session(self, p: dict, env: dict):
        import onnx

        model = self.model
        nodes = [self.by_name[n] for n in p["nodes"]]
        needed = [n for n in p["inputs"] if n not in self.consts]
        sub = onnx.helper.make_graph(
            [*(n for n in model.graph.node if n.output[0] in self.consts), *nodes],
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
        return _session(m), needed

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = dict(feeds)
        for k, p in enumerate(self.plan["partitions"]):
            if p["device"] == "npu":
                part = self.parts[k]
                scales = p.get("boundary_scales", {"inputs": {}, "outputs": {}})
                for name, s in scales["inputs"].items():
                    env[name] = env[s["source"]] / np.asarray(s["divide_by"], np.float32)
                outs = part(*(env[n].astype(np.float32) for n in part.input_names))
                for name, y in zip(part.output_names, outs, strict=True):
                    if name in scales["outputs"]:
                        y = y * np.asarray(scales["outputs"][name]["multiply_by"], np.float32)
                    env[name] = y
                continue
            if self.parts[k] is None:  # made on the first call, when the input types are known
                self.parts[k] = self._cpu_session(p, env)
            sess, needed = self.parts[k]
            outs = sess.run(p["outputs"], {n: env[n] for n in needed})
            env.update(zip(p["outputs"], outs, strict=True))
        return {name: env[name] for name in self.outputs}


def cpu_subgraph(model, part: dict, shapes: dict, dtypes: dict):
    """The ONNX model of one CPU partition: its nodes (with the Constant nodes and initializers they
    read), its inputs and outputs typed with the shapes the calibration run gave them."""
    import onnx
    from onnx import helper

    by_name = {n.name or n.output[0]: n for n in model.graph.node}
    nodes = [by_name[n] for n in part["nodes"]]
    read = {i for n in nodes for i in n.input if i}
    inside = {n.output[0] for n in nodes}
    consts = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] in read - inside]
    inits = [i for i in model.graph.initializer if i.name in read]
    known = {i.name for i in inits} | {n.output[0] for n in consts}
    needed = [n for n in part["inputs"] if n not in known]

    def info(name: str):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtypes[name]), list(shapes[name]))

    graph = helper.make_graph(
        [*consts, *nodes], f"cpu_{part['index']}", [info(n) for n in needed], [info(n) for n in part["outputs"]], inits
    )
    m = helper.make_model(graph, opset_imports=model.opset_import)
    m.ir_version = model.ir_version
    onnx.checker.check_model(m)
    return m, needed


def compile_npu_artifact(
    source: Path,
    spec,
    calibration,
    output=None,
    threads: int | None = None,
    as_dir: bool = False,
    progress=None,
):
    """An NPU artifact for an ONNX graph: the int8 TFLite partitions (and Vela's for Ethos-U), the CPU
    partitions compiled with TVM (for this host: the NPU target's own CPU cannot load a TVM library
    yet), the plan and Vela's estimates in the manifest's ``npu`` section."""

    import onnx
    from rich.console import Console

    from edgert.compiler.compile import Build
    from edgert.compiler.npu import calibrate, compile_npu_graph, model_inputs, print_vela
    from edgert.compiler.npu.partition import print_plan
    from edgert.compiler.npu.quantize import load_calibration
    from edgert.errors import EdgertError, ModelFileError
    from edgert.targets import load_target

    progress = progress or (lambda _s, _f: None)
    if calibration is None:
        raise EdgertError(
            f"target '{spec.name}' runs int8 partitions on an NPU: give calibration samples with "
            "--calibrate inputs.npz (arrays by input name, axis 0 = samples)"
        )
    if source.suffix.lower() != ".onnx":
        raise ModelFileError(f"{source}: NPU targets compile ONNX graphs (got {source.suffix or 'no suffix'})")
    if not source.is_file():
        raise ModelFileError(f"model file not found: {source}")
    job = Build.start(source.stem, "graph", load_target("host"), threads, output, as_dir)
    job.record.update(
        name=spec.name,
        description=spec.description,
        cpu_parts="built for this host: LiteRT and TVM run the artifact here (the NPU's CPU is not a TVM target yet)",
    )
    model = onnx.load(str(source))
    data = load_calibration(calibration, model_inputs(model))
    progress("partitioning and quantizing", None)
    with job.timed("npu"):
        tflites, velas, plan, report = compile_npu_graph(source, spec.name, data)
    console = Console(stderr=True)
    print_plan(plan, console)
    if report is not None:
        print_vela(report, console)
    one = calibrate(model, {k: v[:1] for k, v in data.items()})  # the shapes and dtypes of every tensor
    graph_inputs = list(model_inputs(model))
    outputs = [o.name for o in model.graph.output]

    def spec_of(name: str) -> dict:
        return {"name": name, "dtype": str(one.dtypes[name]), "shape": [int(d) for d in one.shapes[name]]}

    with job.staging() as stage_dir:
        stage = Path(stage_dir)
        staged: dict[str, Path] = {}
        for i, t in enumerate(tflites):
            (stage / f"npu_{i}.tflite").write_bytes(t)
            staged[f"npu_{i}.tflite"] = stage / f"npu_{i}.tflite"
            if velas is not None:
                (stage / f"npu_{i}.vela.tflite").write_bytes(velas[i])
                staged[f"npu_{i}.vela.tflite"] = stage / f"npu_{i}.vela.tflite"
        staged.update(stage_cpu_partitions(job, model, plan, one, stage, source, progress))
        progress("writing artifact", None)
        result = job.finish(
            staged,
            source={"file": source.name, "format": "onnx"},
            entry_points={
                "main": {"inputs": [spec_of(n) for n in graph_inputs], "outputs": [spec_of(n) for n in outputs]}
            },
            npu={
                "target": {"name": spec.name, "description": spec.description, **spec.npu},
                "calibration_samples": len(next(iter(data.values()))),
                "plan": plan,
                "vela": report,
            },
        )
    progress("done", 1.0)
    return result


def stage_cpu_partitions(job, model, plan: dict, one, stage: Path, source: Path, progress=None) -> dict[str, Path]:
    """Compile each CPU partition of ``plan`` with TVM into ``stage`` (``cpu_<i>.so`` and its weights) and
    name the NPU partitions' TFLite members in the plan; returns the staged files by member name.

    ``one`` is a calibration run of one sample (`edgert.compiler.npu.calibrate`): the shapes and
    dtypes of every tensor. The plan's partitions get ``tflite``/``vela`` member names (NPU) or
    ``library``, ``weights``, ``order`` and ``entry`` (CPU), which `PartitionedGraph` reads.
    """
    import tempfile

    import onnx

    from edgert.artifact.tensorfile import write_tensors
    from edgert.errors import EdgertError
    from edgert.families.graph.lower import build_module, import_graph, optimize

    progress = progress or (lambda _s, _f: None)
    staged: dict[str, Path] = {}

    def spec_of(name: str) -> dict:
        return {"name": name, "dtype": str(one.dtypes[name]), "shape": [int(d) for d in one.shapes[name]]}

    has_vela = (stage / "npu_0.vela.tflite").is_file()
    cpu_index = 0
    for p in plan["partitions"]:
        if p["device"] == "npu":
            p["tflite"] = f"npu_{p['tflite']}.tflite"
            if has_vela:
                p["vela"] = p["tflite"].replace(".tflite", ".vela.tflite")
            continue
        progress(f"compiling CPU partition {p['index']} with TVM", None)
        sub, needed = cpu_subgraph(model, p, one.shapes, one.dtypes)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"cpu_{cpu_index}.onnx"
            onnx.save(sub, str(path))
            with job.timed("import"):
                mod, _ins, _outs, _fmt = import_graph(path, {})
        with job.timed("optimize"):
            mod, arrays, _err = optimize(mod, job.tvm_target, "f32")
        with job.timed("compile"):
            try:
                executable = build_module(mod, job.tvm_target, None, None, job.kernels)
            except EdgertError:
                raise
            except Exception as exc:  # TVM reports lowering failures as assorted errors
                raise EdgertError(
                    f"{source}: TVM could not compile CPU partition {p['index']}: {str(exc).splitlines()[-1]}"
                ) from exc
        lib, weights = f"cpu_{cpu_index}.so", f"cpu_{cpu_index}.safetensors"
        with job.timed("link"):
            executable.export_library(str(stage / lib), fcompile=job.fcompile)
        order = [f"w{k}" for k in range(len(arrays))]
        with (stage / weights).open("wb") as fh:
            write_tensors(fh, dict(zip(order, arrays, strict=True)), {"format": "edgert"})
        staged[lib], staged[weights] = stage / lib, stage / weights
        p.update(
            library=lib,
            weights=weights,
            order=order,
            entry={"inputs": [spec_of(n) for n in needed], "outputs": [spec_of(n) for n in p["outputs"]]},
        )
        cpu_index += 1
    return staged
