"""Kernels for mobile GPUs through OpenCL: the TVM target, the Relax pipeline, the export.

The device kernels are OpenCL C that the driver compiles when a kernel first runs; the host
code (the Relax VM's shape and launch code) is compiled by LLVM for the target's CPU, as for CPU
targets. Running needs edgert's OpenCL runtime library (`edgert.runtime.opencl`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgert.compiler.passes.pipeline import restrict_kernels, within_target
from edgert.compiler.target import library_compiler, resolve
from edgert.errors import TargetError
from edgert.targets import TargetSpec, host_arch

GPUS = ("mali", "adreno", "generic")
HOST_OPT_LEVEL = 0  # LLVM's for the host code of GPU builds (see `gpu_target`)
log = logging.getLogger(__name__)


def gpu_target(spec: TargetSpec, threads: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(tvm.target.Target for OpenCL with the spec's CPU as host, manifest record) for a GPU target.

    ``gpu = "mali"`` or ``"adreno"`` selects TVM's tuned defaults for that GPU (work-group size,
    local memory); ``"generic"`` is plain OpenCL.
    """
    import tvm

    if spec.kind != "gpu" or spec.gpu not in GPUS:
        raise TargetError(f"target '{spec.name}' is not an OpenCL GPU target (kind = \"gpu\", gpu = one of {GPUS})")
    host, record = resolve(spec, threads, host_code=True)
    # The host code of a GPU build is launch glue (argument checks, shape functions, kernel calls):
    # LLVM's -O3 on it took 7-12 s of a tiny codec's build for nothing a launch would notice.
    host = tvm.target.Target({**host.export(), "opt-level": HOST_OPT_LEVEL})
    config: dict[str, Any] = {"kind": "opencl"}
    if spec.gpu != "generic":
        config["device"] = spec.gpu
    target = tvm.target.Target(config, host=host)
    # float16 in kernels needs cl_khr_fp16: Mali and Adreno have it; a generic OpenCL device may not.
    fp16 = spec.gpu != "generic"
    return target, {**record, "kind": "gpu", "gpu": spec.gpu, "device": "opencl", "fp16": fp16}


def gpu_rules() -> list[Any]:
    """dlight's GPU schedule rules in the order TVM and MLC-LLM apply them: the first that
    applies to a kernel schedules it; Fallback binds whatever is left to threads, and
    `GridFallback` what Fallback cannot bind (`apply_gpu_rules` passes a kernel a rule fails on
    to the next rule)."""
    from tvm.s_tir import dlight as dl

    rules = (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    return [*rules, GridFallback()]


def apply_gpu_rules(rules: list[Any]) -> Any:
    """dlight's ``ApplyDefaultSchedule`` (the first of ``rules`` that applies schedules a kernel)
    where a rule failing on a kernel leaves it to the next rule.

    dlight's rules fail, rather than decline, on some forms they did not foresee: Reduction asserts
    on a reduction that reads no buffer (`detect_dominant_read`), and Fallback's fusing of loops
    whose extent is symbolic plus a constant (a KV cache of ``window + t`` frames) fails TVM's
    iter-map check. Only those errors are caught (a schedule primitive refused, an assertion,
    TVM's internal check), and logged with the kernel's name; any other is a bug and propagates.
    The GPU tests compare the kernels the later rules schedule with the CPU build's.
    """
    import tvm
    from tvm import s_tir, tirx
    from tvm.target import Target

    caught = (s_tir.ScheduleError, AssertionError, tvm.error.InternalError)

    def first(name: str, func: Any, target: Any) -> Any:
        for rule in rules:
            try:
                space = rule.apply(func, target, False)
            except caught as exc:
                text = (str(exc).strip().splitlines() or [""])[0][:160]
                log.info(
                    "%s: dlight rule %s failed (%s %s), next rule", name, type(rule).__name__, type(exc).__name__, text
                )
                continue
            if space is not None:
                return space if isinstance(space, s_tir.Schedule) else space[0]
        return None

    @tvm.transform.module_pass(opt_level=0, name="edgert.ApplyGpuRules")
    def _apply(mod: Any, _ctx: Any) -> Any:
        updated = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or int(func.attrs.get("tirx.is_scheduled", 0) if func.attrs else 0):
                continue
            target = (func.attrs.get("target") if func.attrs else None) or Target.current(allow_none=False)
            sch = first(gvar.name_hint, func, target)
            if sch is not None:
                updated[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod

    return _apply


class GridFallback:
    """dlight's Fallback with each block's leading spatial loop on the grid's second axis.

    Fallback fuses all of a block's spatial loops into one before splitting it into work-groups;
    when a middle loop's extent is symbolic plus a constant (``(H, W + t, D)``), TVM 0.27 cannot
    prove the fused extent divisible by it and fails. Here ``blockIdx.y`` runs the first loop and
    only the remaining ones are fused (``(W + t) * D``: a constant divisor).
    """

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
        from tvm import s_tir, tirx
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.base import max_threads_per_block, try_inline

        if not isinstance(func, tirx.PrimFunc) or "gpu" not in target.keys:
            return None
        threads = max_threads_per_block(target)
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = []
        for info in try_inline(sch, infos):
            block = info.block_rv
            loops = sch.get_loops(block)
            if not loops or any(sch.get(loop).thread_binding is not None for loop in loops):
                return None  # kernels binding their own threads are Fallback's (it applied if it could)
            kinds: dict[str, list[Any]] = {"S": [], "R": [], "O": []}
            for loop, kind in zip(loops, info.dom_kind(), strict=True):
                kinds[kind].append(loop)
            spatial, reduce, other = kinds["S"], kinds["R"], kinds["O"]
            if len(spatial) < 2:
                return None  # nothing to take off a fused loop: Fallback's form, which failed
            sch.reorder(*spatial, *reduce, *other)
            sch.bind(spatial[0], "blockIdx.y")
            bx, tx = sch.split(sch.fuse(*spatial[1:]), factors=[None, threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
            if reduce:
                reductions.append((block, reduce[0]))
        for block, loop in reductions:
            sch.decompose_reduction(block, loop)
        return sch


def gpu_pipeline(target: Any, rules: list[Any] | None = None) -> Any:
    """TVM's generic GPU Relax pipeline with ``rules`` (default :func:`gpu_rules`) applied after
    legalization and fusion, then TVM's lowering, then `restrict_kernels` (host code is LLVM).

    Why not ``relax.get_default_pipeline``: for ``device = "adreno"`` it switches to TVM's
    texture-memory pipeline, which edgert's OpenCL runtime does not run (buffers only).
    """
    from tvm.relax.backend import gpu_generic as gpu

    return within_target(
        target,
        "edgert.GpuPipeline",
        lambda: [
            *_schedule_passes(target, rules),
            *gpu.dataflow_lower_passes(target),
            *gpu.finalize_passes(target),
            restrict_kernels(),
        ],
    )


def _schedule_passes(target: Any, rules: list[Any] | None) -> list[Any]:
    from tvm import relax
    from tvm.relax.backend import gpu_generic as gpu

    return [
        race_free_merge_state(),
        # `x @ W^T` as one kernel that reads W's rows (MLC-LLM's NT_matmul): legalized apart, every
        # nn.Linear call transposed its whole weight first (Whisper's tied head: 80 MB a decode step).
        relax.transform.FuseTransposeMatmul(),
        *gpu.library_dispatch_passes(target),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        short_kernel_names(),
        apply_gpu_rules(rules or gpu_rules()),
    ]


KERNEL_NAME_LIMIT = 64
MERGE_STATE = ("tir_attention_merge_state", "tir_attention_merge_state_mla")


def merge_state_kernel(dtype: str = "float32", threads: int = 32) -> Any:
    """The paged KV cache's attention-state merge ``V, S <- merge(V, S, V', S')`` without a data race.

    TVM's kernel (`_merge_state_inplace`) has every work item of a head read ``S`` and then write it
    in place: on a GPU whose work items of a group run in lock-step (a CUDA warp) the reads all come
    first, but OpenCL promises no such order, and on PoCL a work item wrote ``S`` before the next one
    read it, so attention over cached tokens plus new ones (a second prompt chunk, beams sharing a
    prefix) came out wrong. Here each work-group holds one (token, head): its items read ``S`` into
    registers, meet at a barrier, and only then does item 0 write it.
    """
    from tvm.script import tirx as T

    @T.prim_func
    def merge_state_inplace(v: T.handle, s: T.handle, v_other: T.handle, s_other: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int32()
        h = T.int32()
        d = T.int32()
        V = T.match_buffer(v, (n, h, d), dtype)
        S = T.match_buffer(s, (n, h), "float32")
        V_other = T.match_buffer(v_other, (n, h, d), dtype)
        S_other = T.match_buffer(s_other, (n, h), "float32")
        for bx in T.thread_binding(n, thread="blockIdx.x"):
            for by in T.thread_binding(h, thread="blockIdx.y"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    st = T.alloc_buffer((3,), "float32", scope="local")
                    st[0] = S[bx, by]
                    st[1] = S_other[bx, by]
                    st[2] = T.max(st[0], st[1])
                    st[0] = T.exp2(st[0] - st[2])
                    st[1] = T.exp2(st[1] - st[2])
                    for k in range(T.ceildiv(d, threads)):
                        if k * threads + tx < d:
                            V[bx, by, k * threads + tx] = T.Cast(
                                dtype,
                                (
                                    T.Cast("float32", V[bx, by, k * threads + tx]) * st[0]
                                    + T.Cast("float32", V_other[bx, by, k * threads + tx]) * st[1]
                                )
                                / (st[0] + st[1]),
                            )
                    T.tvm_storage_sync("shared")  # every item has read S before item 0 overwrites it
                    if tx == 0:
                        S[bx, by] = T.log2(st[0] + st[1]) + st[2]

    return merge_state_inplace


def race_free_merge_state() -> Any:
    """Swap the paged KV cache's merge-state kernels for `merge_state_kernel` (same arguments), also
    those of caches whose kernels carry a suffix (`families.shared.kv_cache`)."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="edgert.RaceFreeMergeState")
    def _swap(mod: Any, _ctx: Any) -> Any:
        for gvar, func in list(mod.functions.items()):
            # a module's further caches (Gemma 3's local layers) name theirs with a suffix
            merge = any(gvar.name_hint == m or gvar.name_hint.startswith(f"{m}_") for m in MERGE_STATE)
            if isinstance(func, tirx.PrimFunc) and merge:
                dtype = str(getattr(func.params[0], "dtype", "float32"))  # V's buffer (0.27: params are buffers)
                dtype = dtype if dtype.startswith(("float", "bfloat")) else "float32"
                mod.update_func(gvar, merge_state_kernel(dtype).with_attr("global_symbol", gvar.name_hint))
        return mod

    return _swap


def short_kernel_names(limit: int = KERNEL_NAME_LIMIT) -> Any:
    """Rename fused kernels whose names run past ``limit`` characters to their head and a hash.

    Fusion names a kernel after every op it holds (a codec's concatenated slices made 400
    characters); OpenCL drivers write files named after kernels, and PoCL failed to link one past
    the file system's 255-character limit.
    """
    import hashlib

    import tvm
    from tvm import relax, tirx

    @tvm.transform.module_pass(opt_level=0, name="edgert.ShortKernelNames")
    def _rename(mod: Any, _ctx: Any) -> Any:
        changed = False
        for gvar, func in list(mod.functions.items()):
            name = gvar.name_hint
            if isinstance(func, tirx.PrimFunc) and len(name) > limit:
                short = f"{name[: limit - 9]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
                mod.update_func(gvar, func.with_attr("global_symbol", short))
                changed = True
        return relax.transform.NormalizeGlobalVar()(mod) if changed else mod

    return _rename


def scheduled(mod: Any, target: Any, rules: list[Any] | None = None) -> Any:
    """``mod`` as `gpu_pipeline` has it after fusion and dlight's rules, before lowering: its TIR
    kernels carry their thread bindings (work-group and grid extents), for reading."""
    import tvm

    with target:
        return tvm.transform.Sequential(_schedule_passes(target, rules))(mod)


def work_groups(mod: Any) -> dict[str, dict[str, Any]]:
    """Per TIR kernel of a `scheduled` module: its thread bindings (``threadIdx.x``: extent, ...,
    ``blockIdx.x``: extent; symbolic extents as text). The OpenCL kernel is ``NAME_kernel``, its
    work-group the ``threadIdx`` extents and its grid of groups the ``blockIdx`` extents."""
    import re

    from tvm import tirx

    # Read from the TVMScript text: this TVM exposes no TIR statement visitor to Python.
    loop = re.compile(r'T\.thread_binding\((?:0, )?([^,()]+(?:\([^()]*\))?), thread="(\w+\.\w)"')
    launch = re.compile(r'T\.launch_thread\("(\w+\.\w)", ([^)]+)\)')
    found: dict[str, dict[str, Any]] = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        text = func.script()
        binds: dict[str, Any] = {}
        pairs = [(tag, ext) for ext, tag in loop.findall(text)] + launch.findall(text)
        for tag, ext in pairs:
            ext = ext.strip()
            binds[tag] = int(ext) if ext.isdigit() else ext
        found[gvar.name_hint] = binds
    return found


def opencl_source(executable: Any) -> str:
    """The OpenCL C of every kernel in a compiled executable (for reading, or a driver's offline compiler)."""
    found: list[str] = []

    def walk(module: Any) -> None:
        if module.kind == "opencl":
            found.append(module.inspect_source())
        for sub in module.imports:
            walk(sub)

    walk(executable.mod)
    return "\n".join(found)


def export(executable: Any, path: str | Path, spec: TargetSpec) -> Path:
    """Write ``path`` (the shared library) and, first, ``path`` with suffix ``.cl`` (the kernels).

    The kernels are written even when the host code cannot be linked (a missing cross compiler or
    Android NDK ends in a TargetError naming it), since they need no toolchain here.
    """
    path = Path(path)
    path.with_suffix(".cl").write_text(opencl_source(executable))
    arch = host_arch() if spec.is_host else spec.arch
    fcompile = library_compiler(spec, arch)
    executable.export_library(str(path), fcompile=fcompile)
    return path
