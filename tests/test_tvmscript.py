"""edgert.compiler.tvmscript: TVMScript's decorators see the stack `inspect.stack` gives them, and
parse the same kernels with edgert's lazy frames as with it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

tvm = pytest.importorskip("tvm")

import tvm.script.parser.ir.entry as ir_entry  # noqa: E402
import tvm.tirx.script.parser.entry as tir_entry  # noqa: E402
import tvm_ffi  # noqa: E402
from tvm.script import ir as I  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from edgert.compiler import tvmscript  # noqa: E402

FIELDS = ("frame", "filename", "lineno", "function", "code_context", "index", "positions")


def _through(call: Callable[[], Any]) -> Any:
    return call()  # one more frame between the caller and ``call``


def test_lazy_stack_gives_inspects_frames_and_fields() -> None:
    assert tir_entry.inspect.stack is tvmscript._stack and ir_entry.inspect.stack is tvmscript._stack
    assert tir_entry.inspect.isfunction is inspect.isfunction  # the rest is inspect's

    def both() -> list[list[Any]]:
        return [stack() for stack in (tvmscript._stack, inspect.stack)]  # from the same instruction

    ours, theirs = _through(both)
    assert len(ours) == len(theirs) > tvmscript.EAGER_FRAMES
    assert not isinstance(ours[tvmscript.EAGER_FRAMES - 1], tvmscript._LazyFrameInfo)
    assert all(isinstance(f, tvmscript._LazyFrameInfo) for f in ours[tvmscript.EAGER_FRAMES :])
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for name in FIELDS:
            assert getattr(a, name) == getattr(b, name), (i, name)
        assert tuple(a) == tuple(b) and a[3] == b[3]


def _kernels() -> dict[str, Any]:
    """Kernels whose parse reads the stack: a closure variable seen only in an annotation (PEP 563:
    `resolve_closure_vars` finds it in the frame of an enclosing function, past the eager frames),
    a prim_func in an `I.ir_module` class (`is_defined_in_class` reads the third frame's source), and
    edgert's window prefill attention."""
    from edgert.compiler.passes.attention import paged_prefill_window_attention

    def outer(n: int) -> Any:
        def inner() -> Any:
            @T.prim_func
            def scale(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32")):
                for i in range(16):
                    b[i] = a[i] * T.float32(2)

            return scale

        return _through(inner)

    @I.ir_module
    class Module:
        @T.prim_func
        def add_one(a: T.Buffer((8,), "float32"), b: T.Buffer((8,), "float32")):
            for i in range(8):
                b[i] = a[i] + T.float32(1)

    return {"annotation": outer(16), "module": Module, "window": paged_prefill_window_attention(1, 4, 32, 4)}


def test_kernels_parse_as_with_inspects_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    ours = _kernels()
    monkeypatch.setattr(tir_entry, "inspect", inspect)
    monkeypatch.setattr(ir_entry, "inspect", inspect)
    theirs = _kernels()
    assert 'T.Buffer((16,), "float32")' in ours["annotation"].script()  # n found in outer's frame
    for name, kernel in ours.items():
        assert tvm_ffi.structural_equal(kernel, theirs[name]), name
