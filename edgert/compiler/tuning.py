"""Where MetaSchedule tuning databases live: ``targets/tuning/<target>/<model hash>/``.

`tools/tune.py` writes them; `compile_graph` applies one when it exists for the same target and
the same model file (by content hash), so a default compile never waits for tuning.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from edgert.paths import TARGETS_DIR


def model_hash(path: str | Path) -> str:
    """The first 16 hex digits of the sha256 of a model file."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def database_dir(target: str, model: str | Path) -> Path:
    """The folder of the tuning database for ``model`` on ``target`` (may not exist)."""
    base = Path(os.environ.get("EDGERT_TUNING_DIR") or TARGETS_DIR / "tuning")
    return base / target / model_hash(model)


def database_for(target: str, model: str | Path) -> Path | None:
    """The tuning database folder for ``model`` on ``target`` if one has been stored."""
    folder = database_dir(target, model)
    return folder if (folder / "database_workload.json").is_file() else None


def register_cpu_intrinsics_only(arch: str = "x86_64") -> None:
    """Make ``import tvm.s_tir.tensor_intrin`` register only the CPU tensor intrinsics of ``arch``.

    MetaSchedule imports that package in every tuning context and every build worker; it parses
    the TVMScript of every GPU intrinsic too (CUDA, ROCm: 1.5 CPU-minutes, far more on a loaded
    2-core machine), none of which a CPU target can use. Here the package is entered in
    ``sys.modules`` as an empty package and only ``x86`` or ``arm_cpu`` is imported into it.
    Call it before the first MetaSchedule import of the process (tools/tune.py does, and passes
    it as the builder workers' initializer); once the full package is loaded it does nothing.
    """
    import importlib
    import importlib.util
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations is not None
        package = types.ModuleType(name, "CPU tensor intrinsics only (see edgert.compiler.tuning)")
        package.__path__ = list(spec.submodule_search_locations)
        package.__package__ = name
        sys.modules[name] = package
    importlib.import_module(f"{name}.{'arm_cpu' if arch == 'aarch64' else 'x86'}")


def apply_tuning(tuning_db: Path, stats: dict[str, int] | None) -> Any:
    """A pass giving kernels their schedules from a MetaSchedule database (and counting them)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    @tvm.transform.module_pass(opt_level=0, name="edgert.ApplyTuning")
    def _apply(mod: Any, _ctx: Any) -> Any:
        db = ms.database.JSONDatabase(
            str(tuning_db / "database_workload.json"), str(tuning_db / "database_tuning_record.json")
        )
        with db:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        if stats is not None:
            kernels = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
            stats["kernels"] = len(kernels)
            stats["tuned_kernels"] = sum(bool(f.attrs and f.attrs.get("tirx.is_scheduled")) for f in kernels)
        return mod

    return _apply


CROSS_EXPORT = "edgert.tuning.cross_export"


def tuning_worker_init(arch: str, cc: str | None = None) -> None:
    """A MetaSchedule build worker's set-up: the CPU intrinsics of ``arch`` and, with ``cc``, the export
    function ``edgert.tuning.cross_export`` that links each candidate into a shared library with that
    cross compiler (a device measured over RPC loads a .so; it has no compiler to link TVM's tar)."""
    register_cpu_intrinsics_only(arch)
    if cc is None:
        return
    import tempfile

    import tvm_ffi
    from tvm.support import cc as tvm_cc

    fcompile = tvm_cc.cross_compiler(cc)

    def export(mod: Any) -> str:
        path = os.path.join(tempfile.mkdtemp(prefix="edgert-tune-"), "tvm_tmp_mod.so")
        mod.export_library(path, fcompile=fcompile)
        return path

    tvm_ffi.register_global_func(CROSS_EXPORT, export, override=True)
