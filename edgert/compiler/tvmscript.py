"""Faster frame searches for TVMScript, installed on import.

Macros (`T.macro`, `T.inline`): TVM's `ScriptMacro._find_parser_def` finds the parser that calls a
macro with ``inspect.getouterframes``, which builds a `FrameInfo` with source lines for every frame of
the stack; for the parser's own frames (code compiled from ``"<ast>"``) each one makes `inspect.getmodule`
scan every loaded module. The kernels here call macros thousands of times per model, and that
search took 7% of a SmolLM2 compile and more of Gemma 3's. Walking ``f_back`` finds the same frame
(the first one outward whose globals hold the parser) without reading any source.

Decorators (`T.prim_func`, `I.ir_module`): each call takes ``inspect.stack()`` first, the
same `FrameInfo` with source lines for every frame of the caller's stack (40 and more under the CLI),
while TVM reads the source line of the third frame only (`is_defined_in_class`) and the others'
``frame`` (`resolve_closure_vars`). A tiny Gemma 3's export makes 110 of these calls: 11 s of a 63 s
profiled rpi5 build went to `inspect.getmodule` under them. `_stack` gives the first three frames as
``inspect.stack`` does and the outer ones as `_LazyFrameInfo`, whose source is read only if asked for.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from typing import Any

from tvm.script.parser.core.parser import ScriptMacro


def _find_parser_def(self: ScriptMacro) -> Any:
    frame = sys._getframe(1)
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


ScriptMacro._find_parser_def = _find_parser_def

EAGER_FRAMES = 3  # TVM reads the source line of frames[2] (`utils.is_defined_in_class`)


class _LazyFrameInfo:
    """An `inspect.FrameInfo` whose fields other than ``frame`` are computed when first read, for the
    line the frame was at when taken (a traceback entry holds it, as `inspect.getframeinfo` reads it)."""

    __slots__ = ("_info", "_where", "frame")

    def __init__(self, frame: types.FrameType) -> None:
        self.frame = frame
        self._where = types.TracebackType(None, frame, frame.f_lasti, frame.f_lineno)
        self._info: inspect.FrameInfo | None = None

    def _full(self) -> inspect.FrameInfo:
        if self._info is None:
            info = inspect.getframeinfo(self._where, 1)
            self._info = inspect.FrameInfo(self.frame, *info, positions=info.positions)
        return self._info

    def __getattr__(self, name: str) -> Any:
        return getattr(self._full(), name)

    def __getitem__(self, index: Any) -> Any:
        return self._full()[index]

    def __iter__(self) -> Any:
        return iter(self._full())

    def __len__(self) -> int:
        return len(self._full())


def _stack(context: int = 1) -> list[Any]:
    """``inspect.stack(context)`` of the caller, the frames past the first three read lazily."""
    frame = sys._getframe(1)
    if context != 1:
        return inspect.getouterframes(frame, context)
    out: list[Any] = []
    while frame is not None:
        if len(out) < EAGER_FRAMES:
            info = inspect.getframeinfo(frame, 1)
            out.append(inspect.FrameInfo(frame, *info, positions=info.positions))
        else:
            out.append(_LazyFrameInfo(frame))
        frame = frame.f_back
    return out


class _InspectWithLazyStack(types.ModuleType):
    """The `inspect` module as TVMScript's decorators see it: ``stack`` is `_stack`."""

    stack = staticmethod(_stack)

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)


_INSPECT = _InspectWithLazyStack("inspect")
# Not `R.function`'s module: importing `tvm.relax.script` changes how TVMScript folds some TIR
# expressions (a kernel's `T.if_then_else(causal * 0 > 0, a, b)` kept as `T.GT(0, 0)` without it,
# folded to `b` with it), so this module imports nothing a build would not.
DECORATOR_MODULES = (
    "tvm.tirx.script.parser.entry",  # T.prim_func
    "tvm.script.parser.ir.entry",  # I.ir_module
)
for _name in DECORATOR_MODULES:
    _module = importlib.import_module(_name)
    if getattr(_module, "inspect", None) is inspect:
        _module.inspect = _INSPECT  # type: ignore[attr-defined]
