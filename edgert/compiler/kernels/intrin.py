"""TIR calls of single CPU instructions that several kernel files share."""

from __future__ import annotations

from typing import Any

from tvm.script import tirx as T


def prefetch(value: Any) -> Any:
    """A prefetch of the cache line holding ``value`` (a buffer element) for reading, kept in every level
    (an expression: wrap it in ``T.evaluate``)."""
    return T.call_intrin("void", "tirx.prefetch", T.address_of(value), 0, 3, 1)


def amx(name: str, *args: Any) -> Any:
    """An AMX instruction (``llvm.x86.<name>``; tile operands are tile numbers, immediates), as a statement."""
    return T.evaluate(T.call_llvm_intrin("void", T.llvm_lookup_intrinsic_id(f"llvm.x86.{name}"), *args))
