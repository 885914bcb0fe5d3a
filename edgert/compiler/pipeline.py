"""The Relax pipeline every edgert build uses: TVM's default one, plus a codegen workaround."""

from __future__ import annotations

import logging
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


def relax_pipeline(target: Any) -> Any:
    """TVM's default Relax pipeline for ``target`` followed by :func:`restrict_kernels`."""
    import tvm
    from tvm import relax

    return tvm.transform.Sequential([relax.get_default_pipeline(target), restrict_kernels()])


def unrestricted_kernels(mod: Any) -> list[str]:
    """Names of the TIR functions of a module that lack ``tirx.noalias``."""
    import tvm

    return sorted(
        gv.name_hint
        for gv, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and not f.attrs.get("tirx.noalias")
    )
