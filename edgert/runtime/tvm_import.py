"""Import the TVM runtime for running a model, without paying for PyTorch.

`tvm_ffi` (imported by `tvm`) imports torch unconditionally when torch is installed, to
support torch tensors and streams: with torch present that makes ``import tvm`` take 4-7 s
and 385 MiB instead of about 1 s and 190 MiB (80 MiB with ``TVM_USE_RUNTIME_LIB=1``). Running
an artifact never needs torch, and a device has none, so a process that has not imported torch
imports TVM with torch hidden. The block is lifted afterwards: the program can still import
torch itself later; only tvm_ffi's optional torch fast paths stay off in that process. A
program that imported torch first keeps TVM's torch support untouched.
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_tvm() -> ModuleType:
    """``import tvm``, with torch kept out of the process unless it is loaded already."""
    if "tvm" in sys.modules:
        return sys.modules["tvm"]
    if "torch" in sys.modules:
        import tvm

        return tvm
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        import tvm
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tvm
