"""What every family's build shares: the request it gets, the result it returns, and how the
compiled library and the weights are written into an artifact's staging folder.

`edgert.families.registry.compile_model` chooses the family and calls its build with a
`BuildRequest`; nothing here knows a family by name.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgert.errors import ModelFileError
from edgert.recipes import Recipe
from edgert.version import __version__

Progress = Callable[[str, float | None], None]


def quiet(_stage: str, _fraction: float | None) -> None:
    """A progress callback that reports nothing."""
    return None


@dataclass
class CompileResult:
    """What a build wrote and how long each stage took."""

    path: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]


@dataclass
class BuildRequest:
    """One compile: the model source, its recipe (if named by one), the target and the options.

    ``options`` holds only the options the user set (``quant``, ``threads``, ``context_length``,
    ...); the registry has already refused any the family does not take.
    """

    model: str
    source: Path
    recipe: Recipe | None
    target: str
    output: Path | None
    as_dir: bool = False
    progress: Progress = quiet
    options: dict[str, Any] = field(default_factory=dict)
    parsed: Any = None  # the source as already parsed while choosing the family (a GGUF), or None

    @property
    def name(self) -> str:
        """The artifact's name: the recipe's, else the source file's stem."""
        return self.recipe.name if self.recipe else self.source.stem

    def option(self, key: str, default: Any = None) -> Any:
        """An option as the user set it, else the recipe's ``[compile]`` value, else ``default``."""
        value = self.options.get(key)
        if value is not None:
            return value
        if self.recipe is not None and key in self.recipe.compile:
            return self.recipe.compile[key]
        return default

    def default_output(self) -> Path:
        """``output`` if given, else ``NAME.edgert`` in the working folder."""
        return Path(self.output) if self.output else Path(f"{self.name}.edgert")


@dataclass
class Build:
    """One build's target, output and bookkeeping, as every family's build starts and ends it.

    `start` resolves the target (TVM target, the record the manifest keeps, the library's
    compiler) and checks the output path before any work; `compile` lowers with the pipeline
    every build uses and records which kernels stayed on TVM's default schedule; `finish`
    writes the manifest's common fields, the family's sections and the timings, and the artifact.
    """

    name: str
    family: str
    out: Path
    as_dir: bool
    spec: Any
    tvm_target: Any
    record: dict[str, Any]
    fcompile: Any
    seconds: dict[str, float] = field(default_factory=dict)
    kernels: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        name: str,
        family: str,
        target: Any,
        threads: int | None,
        output: Path | None,
        as_dir: bool,
        gpu: bool = False,
    ) -> Build:
        """Resolve ``target`` (a name or a `TargetSpec`) and check the output (default ``NAME.edgert``).

        A GPU target (``kind = "gpu"``) is taken only by a family whose build passes ``gpu=True``
        (kernels in OpenCL, host code for the target's CPU); any other family's build is refused,
        naming the family, rather than silently built for the CPU.
        """
        from edgert.artifact.writer import check_output_path
        from edgert.compiler.target import library_compiler, resolve
        from edgert.errors import TargetError
        from edgert.targets import load_target

        spec = load_target(target) if isinstance(target, str) else target
        if spec.kind == "gpu" and not gpu:
            raise TargetError(f"--target {spec.name}: the {family} family has no GPU build yet")
        out = check_output_path(Path(output) if output else Path(f"{name}.edgert"), as_dir)
        if spec.kind == "gpu":
            from edgert.compiler.gpu import gpu_target

            tvm_target, record = gpu_target(spec, threads)
        else:
            tvm_target, record = resolve(spec, threads)
        return cls(name, family, out, as_dir, spec, tvm_target, record, library_compiler(spec, record["arch"]))

    @property
    def on_gpu(self) -> bool:
        """True when the kernels run on a GPU (OpenCL) and the host code on the target's CPU."""
        return self.record.get("kind") == "gpu"

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the time the block takes to ``seconds[stage]``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t

    def compile(self, mod: Any, static_min_elements: int | None = None, stack_scratch: bool = False) -> Any:
        """`tvm.compile` with `relax_pipeline`, timed as ``compile``; fills `kernels`.

        ``stack_scratch``: lower the kernels' ``local`` tiles to the stack (`passes.pipeline.tir_pipeline`),
        for builds whose kernels were checked to stay inside their tiles: a write past one, which
        TVM's workspace pool absorbs in its 4 KiB pages, overwrites the stack frame instead.
        """
        import tvm

        from edgert.compiler.passes.pipeline import relax_pipeline, tir_pipeline

        if self.on_gpu:
            from edgert.compiler.gpu import gpu_pipeline

            pipeline, tir = gpu_pipeline(self.tvm_target), "default"
        else:
            pipeline = relax_pipeline(self.tvm_target, static_min_elements, self.kernels)
            tir = tir_pipeline() if stack_scratch else "default"
        with self.timed("compile"):
            return tvm.compile(mod, target=self.tvm_target, relax_pipeline=pipeline, tir_pipeline=tir)

    def staging(self) -> Any:
        """A temporary folder beside the output for the members (a context manager giving its path)."""
        return tempfile.TemporaryDirectory(dir=self.out.parent, prefix=f".{self.out.name}.stage.")

    def finish(self, staged: dict[str, Path], **sections: Any) -> CompileResult:
        """Write the artifact from the ``staged`` members; ``sections`` are the family's manifest fields."""
        import tvm

        from edgert.artifact.writer import write_artifact

        manifest = {
            "name": self.name,
            "family": self.family,
            "created_by": f"edgert {__version__}",
            "tvm_version": tvm.__version__,
            "target": self.record,
            **sections,
            "kernels": self.kernels,
            "compile_seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }
        manifest = write_artifact(self.out, manifest, staged, as_dir=self.as_dir)
        return CompileResult(self.out, manifest, self.seconds)


def create_kv_cache_entry(cache: dict[str, Any]) -> dict[str, Any]:
    """The manifest's entry for ``create_kv_cache``: TVM's paged KV cache, made by the runtime."""
    inputs = ["max_batch_size", "max_total_seq_len", "prefill_chunk_size", "page_size", "support_sliding_window"]
    return {"inputs": inputs, "outputs": [cache]}


def cached_library(folder: str | Path, mod: Any, target: Any, cc: str | None) -> Path:
    """Where ``folder`` keeps the library of ``mod`` built for ``target`` (it may not exist yet).

    The key is TVM's structural hash of the whole module (every Relax function and TIR kernel)
    with the target, the cross compiler and the TVM version, so only an identical build is reused.
    """
    import hashlib

    import tvm
    from tvm_ffi import structural_hash

    from edgert.compiler.passes.pipeline import TIR_PIPELINE_VERSION

    # The pipeline's version: a library built before a change of the TIR lowering is not reused.
    key = f"{structural_hash(mod)}|{target}|{cc}|{tvm.__version__}|{__version__}|{TIR_PIPELINE_VERSION}"
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.so"


def main_dtype(arrays: dict[str, Any]) -> str:
    """The dtype that holds most of the weight bytes."""
    totals: dict[str, int] = {}
    for a in arrays.values():
        totals[str(a.dtype)] = totals.get(str(a.dtype), 0) + a.nbytes
    return max(totals, key=totals.__getitem__)


def stage_library_and_weights(
    executable: Any,
    named_params: list[tuple[str, Any]],
    weights: Any,
    repack: dict[str, Callable[[Any], dict[str, Any]]],
    stage: Path,
    fcompile: Any,
    source: Path,
    extra_tensors: dict[str, Any] | None = None,
) -> tuple[list[str], dict[str, float]]:
    """Write ``model.so`` and ``weights.safetensors`` into ``stage``; return the weights' order and timings.

    ``weights`` yields (parameter name, source array); a name the layout packed goes through its
    ``repack`` function (which may turn one source tensor into several parameters), any other is
    cast to the parameter's dtype. Every parameter of the exported module must get an array of
    its exact shape and dtype. ``extra_tensors`` (e.g. Whisper's mel filters) follow the
    parameters, outside the order the entry points take them in.
    """

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    executable.export_library(str(stage / "model.so"), fcompile=fcompile)
    seconds["link"] = time.perf_counter() - t

    t = time.perf_counter()
    order, _ = write_weights(named_params, weights, repack, stage, source, extra_tensors)
    seconds["weights"] = time.perf_counter() - t
    return order, seconds


def write_weights(
    named_params: list[tuple[str, Any]],
    weights: Any,
    repack: dict[str, Callable[[Any], dict[str, Any]]],
    stage: Path,
    source: Path,
    extra_tensors: dict[str, Any] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Write ``stage/weights.safetensors`` in the parameters' order; return that order and the arrays by name.

    ``weights`` yields (parameter name, source array); a packed name goes through ``repack``, any
    other is cast to the parameter's dtype; each array must have its parameter's exact shape and dtype.
    """
    import numpy as np

    from edgert.artifact.tensorfile import write_tensors

    shapes = {n: tuple(int(d) for d in p.shape) for n, p in named_params}
    dtypes = {n: p.dtype for n, p in named_params}
    arrays: dict[str, Any] = {}
    for pname, w in weights:
        packed = repack[pname](w) if pname in repack else {pname: np.asarray(w, dtype=dtypes.get(pname))}
        for n, a in packed.items():
            if n not in shapes or a.shape != shapes[n] or str(a.dtype) != dtypes[n]:
                raise ModelFileError(
                    f"{source}: weight '{n}' is {a.dtype}{list(a.shape)}, expected "
                    f"{dtypes.get(n)}{list(shapes.get(n, ()))}"
                )
            arrays[n] = a
    missing = [n for n in shapes if n not in arrays]
    if missing:
        raise ModelFileError(f"{source}: weights missing for {', '.join(missing[:5])}")
    order = [n for n, _ in named_params]
    with (stage / "weights.safetensors").open("wb") as fh:
        write_tensors(fh, {**{n: arrays[n] for n in order}, **(extra_tensors or {})}, {"format": "edgert"})
    return order, arrays
