"""The Relax pipeline every edgert build uses: TVM's default one, plus a codegen workaround."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def restrict_kernels() -> Any:
    """A module pass marking every TIR function ``tirx.noalias`` (its buffers never overlap).

    Why: TVM 0.27's LLVM codegen declares every function of a module before emitting any, and its
    "parameters do not alias" flag keeps the value of the *last declared* function (by symbol name)
    for all of them. The VM's ``shape_func`` and TVM's paged-KV kernels (``tree_attn_*``,
    ``batch_prefill_*``) carry no ``tirx.noalias`` and sort late, so every kernel of the module lost
    ``noalias`` on its buffers and its ``noinline`` compute scope: LLVM then kept per-thread
    accumulators in memory (the q4 GEMV: 1.6x slower than the same TIR built alone).
    The attribute is exact here: Relax never hands one buffer to two parameters of a call (an
    in-place call passes it once), storage planning never overlaps a call's input and output, the
    shape functions take one pointer, and the KV-cache runtime calls its kernels with distinct tensors.
    """
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="edgert.RestrictKernels")
    def _pass(mod: Any, _ctx: Any) -> Any:
        names = unrestricted_kernels(mod)
        for gv, func in list(mod.functions_items()):
            if gv.name_hint in names:
                mod[gv] = func.with_attr("tirx.noalias", True)
        log.debug("marked noalias: %s", names)
        return mod

    return _pass


def relax_pipeline(target: Any, static_min_elements: int | None = None, report: dict[str, Any] | None = None) -> Any:
    """TVM's default Relax pipeline for ``target``, with :func:`schedule_static_kernels` on CPUs,
    followed by :func:`restrict_kernels`; ``report`` receives :func:`record_kernels`' findings."""
    import tvm
    from tvm import relax

    if target.kind.name != "llvm":
        return tvm.transform.Sequential([relax.get_default_pipeline(target), restrict_kernels()])
    return cpu_pipeline(target, [schedule_static_kernels(static_min_elements or STATIC_MIN_ELEMENTS)], report)


def cpu_pipeline(target: Any, scheduling: list[Any], report: dict[str, Any] | None = None) -> Any:
    """TVM's CPU Relax pipeline with the ``scheduling`` passes between legalization and lowering,
    then :func:`record_kernels` (into ``report``, when given) and :func:`restrict_kernels`.

    First TVM's ``RemoveRedundantReshape`` (:func:`remove_redundant_reshape`: a reshape of a
    reshape becomes one reshape; a reshape to the shape it has, none). Why: ``FuseOps`` makes a
    run of two or three reshapes one kernel, and ``RewriteDataflowReshape`` turns only a kernel of
    a single reshape back into a free ``vm.builtin.reshape``; the rest stay copies. A Llama layer
    reshapes its q/k/v, its attention output and its gate/up rows that way (views in the model's
    code): 90 copy kernels per SmolLM2 decode step or multi-row pass, each a VM call and an
    allocation (docs/performance.md).
    """
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return within_target(
        target,
        "edgert.CpuPipeline",
        lambda: [
            # Before fusion: a chain of reshapes fused on its own is a copy kernel (below).
            remove_redundant_reshape(),
            *cpu.library_dispatch_passes(target),
            *cpu.legalize_passes(target),
            *scheduling,
            *([record_kernels(report)] if report is not None else []),
            *cpu.dataflow_lower_passes(target),
            *cpu.finalize_passes(target),
            restrict_kernels(),
        ],
    )


def remove_redundant_reshape() -> Any:
    """TVM's ``RemoveRedundantReshape``, run on each Relax function without its unused bindings
    and with its parameter tuple's unpacking taken out (:func:`_without_unpacking`).

    Why: the pass's rewriter cleans up after every round of rewrites (``CanonicalizeBindings``,
    ``EliminateCommonSubexpr``, ``RemoveAllUnused``, until nothing changes), and the CSE hashes
    each ``packed_params[i]`` with the struct info of the whole parameter tuple (423 tensors in
    SmolLM2). A per-layer entry point (``layer_i``, ``kv_fill_i``) unpacks every parameter and
    uses a dozen: without the others the pass takes 0.03-0.08 s instead of 0.4-0.9 s. The entry
    points that use every weight (``decode``, ``prefill``, ``verify*``: 2-3.5 s each) keep all
    423; there the unpacking is taken out of the function while the pass runs, which it cannot
    rewrite anyway (0.1-0.2 s). The result is the same function: where the pass rewrites, its own
    ``RemoveAllUnused`` drops the unused bindings too; where it does not, the function is kept as
    it was (with its unused bindings, as TVM's pass leaves it).
    """
    import tvm
    from tvm import relax
    from tvm_ffi import structural_equal

    @tvm.transform.module_pass(opt_level=0, name="edgert.RemoveRedundantReshape")
    def _pass(mod: Any, _ctx: Any) -> Any:
        inner = relax.transform.RemoveRedundantReshape()

        def rewrite(gv: Any, func: Any) -> Any:
            return inner(tvm.IRModule({gv: func}))[gv]

        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            lean = relax.analysis.remove_all_unused(func)
            out = _without_unpacking(lean, lambda f, gv=gv: rewrite(gv, f))
            if out is None:
                out = rewrite(gv, lean)
            if not structural_equal(out, lean):  # nothing rewritten: the function as it came
                updates[gv] = out
        if not updates:
            return mod
        mod = mod.clone()  # the caller's module stays as it was
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def _without_unpacking(func: Any, transform: Any) -> Any:
    """``transform`` applied to ``func`` with the bindings that unpack its last parameter (a tuple)
    taken out, then put back; None where ``func`` does not have that form.

    The form: ``func``'s first block (a dataflow block) opens with ``w_i = params[i]`` bindings,
    and the last parameter ``params`` is used nowhere else. While ``transform`` runs, each ``w_i``
    is a parameter of its own (``relax.FunctionBindParams`` swaps the variables); afterwards the
    bindings open the first block again, so a ``transform`` that leaves parameters alone (TVM's
    reshape pass) gives what it gives on ``func``. Why: TVM's CSE hashes every ``params[i]``
    with the struct info of the whole tuple, O(n^2) in the number of weights.
    """
    import tvm
    from tvm import relax

    if not func.params or not isinstance(func.body, relax.SeqExpr) or not func.body.blocks:
        return None
    tuple_param = func.params[-1]
    first = func.body.blocks[0]
    if not isinstance(tuple_param.ty, relax.TupleType) or not isinstance(first, relax.DataflowBlock):
        return None
    bindings = list(first.bindings)
    n = 0
    while n < len(bindings) and _unpacks(bindings[n], tuple_param):
        n += 1
    if n == 0:
        return None
    unpacking, rest = bindings[:n], bindings[n:]
    bind = tvm.get_global_func("relax.FunctionBindParams")

    def like(params: list[Any], body: Any) -> Any:
        return relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)

    head = list(func.params[:-1])
    unpacked = [b.var for b in unpacking]
    as_params = [relax.Var(v.name, v.ty) for v in unpacked]
    body = relax.SeqExpr([relax.DataflowBlock(rest), *func.body.blocks[1:]], func.body.body)
    # The dataflow variables stand as parameters only to be swapped for plain ones.
    swapped = bind(like(head + unpacked, body), dict(zip(unpacked, as_params, strict=True)))
    inner = like(head + as_params, swapped.body)
    if any(v.same_as(tuple_param) for v in relax.analysis.free_vars(inner)):
        return None  # the tuple is used past its unpacking
    out = bind(transform(inner), dict(zip(as_params, unpacked, strict=True)))
    blocks = list(out.body.blocks)
    if not blocks or not isinstance(blocks[0], relax.DataflowBlock):
        return None
    blocks[0] = relax.DataflowBlock(unpacking + list(blocks[0].bindings))
    whole = like(list(func.params), relax.SeqExpr(blocks, out.body.body))
    return relax.BlockBuilder().normalize(whole)


def _unpacks(binding: Any, tuple_param: Any) -> bool:
    """Whether ``binding`` is ``w = tuple_param[i]``."""
    from tvm import relax

    value = getattr(binding, "value", None)
    return isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(tuple_param)


def within_target(target: Any, name: str, passes: Any) -> Any:
    """A module pass running the passes ``passes()`` makes, in order, inside ``with target``
    (TVM's backend passes read the current target when they are made and when they run)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            return tvm.transform.Sequential(passes())(mod)

    return _pipeline


def graph_pipeline(
    target: Any,
    tuning_db: Path | None = None,
    stats: dict[str, int] | None = None,
    report: dict[str, Any] | None = None,
) -> Any:
    """The Relax pipeline for graphs: TVM's CPU passes, with edgert's rules (or a tuning database).

    ``stats`` (if given) receives ``kernels`` and ``tuned_kernels``: how many kernels the module
    has and how many took their schedule from the tuning database; ``report`` receives
    :func:`record_kernels`' findings.
    """
    from tvm.s_tir import dlight

    from edgert.compiler.schedules import schedule_rules
    from edgert.compiler.tuning import apply_tuning

    # Tuned kernels first; the rules then schedule only what tuning did not cover.
    scheduling = [] if tuning_db is None else [apply_tuning(tuning_db, stats)]
    scheduling.append(dlight.ApplyDefaultSchedule(*schedule_rules()))
    return cpu_pipeline(target, scheduling, report)


def record_kernels(report: dict[str, Any]) -> Any:
    """A module pass that writes into ``report`` how many kernels the module has (``total``) and the
    names of those left on TVM's default lowering (``fallback``): not marked scheduled and without
    one parallel, vectorized or unrolled loop. The build stores it; `edgert inspect` lists it."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="edgert.RecordKernels")
    def _pass(mod: Any, _ctx: Any) -> Any:
        kernels = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
        report["total"] = len(kernels)
        report["fallback"] = sorted(name for name, f in kernels.items() if _on_default_schedule(f))
        return mod

    return _pass


def _on_default_schedule(func: Any) -> bool:
    """True if ``func`` is as TVM's default lowering leaves it: every loop serial, never marked scheduled."""
    if func.attrs and func.attrs.get("tirx.is_scheduled"):
        return False
    # TVM 0.27 has no Python visitor for TIR statements; the printed TVMScript names each loop kind.
    text = func.script()
    return not any(kind in text for kind in ("T.parallel(", "T.vectorized(", "T.unroll(", "T.thread_binding("))


STATIC_MIN_ELEMENTS = 1 << 16  # below this a kernel costs less than waking the thread pool


def schedule_static_kernels(min_elements: int = STATIC_MIN_ELEMENTS) -> Any:
    """The graph rules (`edgert.compiler.schedules`) for the big fixed-shape kernels nobody scheduled.

    Big: some block runs ``min_elements`` iterations or more.

    Why: TVM's CPU pipeline leaves every kernel a family does not hand-write (norms, layout copies,
    im2col, residual adds) a serial scalar loop; over Whisper's 1500 encoder frames that is 1-3 ms
    each. Kernels with a symbolic dimension (the decoder's, the LLM's) are left alone: most run over
    one token, where spreading them over threads costs more than it saves.
    """
    from tvm.s_tir import dlight

    from edgert.compiler.schedules import _Guarded
    from edgert.compiler.schedules.rules import Elementwise, Fallback, RowWise

    class _StaticOnly(_Guarded):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            return super().apply(func, target, tunable) if _big_and_static(func, min_elements) else None

    return dlight.ApplyDefaultSchedule(*(_StaticOnly(r) for r in (RowWise(), Elementwise(), Fallback())))


def _big_and_static(func: Any, min_elements: int = STATIC_MIN_ELEMENTS) -> bool:
    """Whether every loop of a TIR function has a fixed extent and some block runs ``min_elements`` or more."""
    import tvm
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except s_tir.ScheduleError:  # a kernel written without blocks (hand-scheduled): nothing to do
        return False
    most = 0
    for block in blocks:
        total = 1
        for loop in sch.get_loops(block):
            extent = sch.get(loop).extent
            if not isinstance(extent, tvm.tirx.IntImm):
                return False
            total *= int(extent)
        most = max(most, total)
    return most >= min_elements


# Stack for scratch tiles, per kernel: far below the smallest thread stack edgert runs on (Android's
# 1 MiB for TVM's pool workers; Linux gives 8 MiB), whatever LLVM hoists to one frame.
STACK_SCRATCH_BYTES = 1 << 16
TIR_PIPELINE = "edgert-cpu"  # `tvm.tirx.build` takes its pipeline by registered name only
TIR_PIPELINE_VERSION = 2  # part of `cached_library`'s key: raise it when the lowering changes (2: reshapes)


def stack_scratch(limit: int = STACK_SCRATCH_BYTES) -> Any:
    """A module pass keeping constant-size ``local`` buffers on the stack, up to ``limit`` bytes per kernel.

    Why: TVM 0.27's ``LowerTVMBuiltin`` puts only *global* buffers under 1 KiB on the stack; every
    other allocation, ``local`` scratch included, becomes a ``TVMBackendAllocWorkspace`` /
    ``TVMBackendFreeWorkspace`` pair, run wherever the buffer is declared: in a parallel loop's
    body, once per iteration. The q4/q8 matmuls declare five such tiles per column block (a
    SmolLM2 decode step: ~30,000 pairs, 12 % of its CPU time in the workspace pool's linear
    searches, `docs/performance.md`). Marked ``disable_lower_builtin``, the buffer stays an LLVM
    ``alloca`` at the entry of the function (or parallel body) holding it: the same memory,
    allocated for free. Runs after the TIR lowering made every buffer an ``AllocBuffer``, before
    ``LowerTVMBuiltin``.
    """
    import tvm
    import tvm_ffi

    left = [limit]  # bytes still free in the kernel being rewritten

    def _on_stack(op: Any) -> Any:
        buf = op.buffer
        if buf.scope() != "local" or op.annotations.get("disable_lower_builtin"):
            return op
        size = tvm_ffi.dtype(str(buf.dtype)).itemsize  # vector lanes included
        for dim in buf.shape:
            if not isinstance(dim, tvm.tirx.IntImm):
                return op
            size *= int(dim)
        if not 0 < size <= left[0]:
            return op
        left[0] -= size
        return tvm.tirx.AllocBuffer(buf, {**op.annotations, "disable_lower_builtin": tvm.tirx.IntImm("int32", 1)})

    @tvm.transform.module_pass(opt_level=0, name="edgert.StackScratch")
    def _pass(mod: Any, _ctx: Any) -> Any:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tvm.tirx.PrimFunc):
                left[0] = limit
                new = tvm_ffi.structural_map(func, [(tvm.tirx.AllocBuffer, _on_stack)])
                if not new.same_as(func):
                    mod[gv] = new
        return mod

    return _pass


def tir_pipeline() -> str:
    """The name of TVM's default CPU TIR pipeline with :func:`stack_scratch` before its host
    finalization (registered on first use), for ``tvm.compile(..., tir_pipeline=...)``."""
    import tvm
    from tvm.tirx import compilation_pipeline as tir

    if TIR_PIPELINE not in tir.PIPELINE_MAP:

        def _factory() -> tuple[Any, Any, Any]:
            lower, finalize_host, finalize_device = tir.get_tir_pipeline("s_tir")
            return lower, lambda: tvm.transform.Sequential([stack_scratch(), finalize_host()]), finalize_device

        tir.register_tir_pipeline(TIR_PIPELINE, _factory)
    return TIR_PIPELINE


def unrestricted_kernels(mod: Any) -> list[str]:
    """Names of the TIR functions of a module that lack ``tirx.noalias``."""
    import tvm

    return sorted(
        gv.name_hint
        for gv, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and not f.attrs.get("tirx.noalias")
    )
