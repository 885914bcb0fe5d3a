"""Run a TFLite partition (int8 NPU partitions of an artifact) with LiteRT or tflite-runtime.

``ai_edge_litert.interpreter`` is preferred; ``tflite_runtime.interpreter`` is the fallback
(it refuses numpy 2). A delegate is loaded by name where the device offers one (an NNAPI or
vendor delegate library on a phone); without one, the plain int8 model runs on LiteRT's CPU
kernels: the reference kernels (``BUILTIN_REF``) by default, which edgert's numpy model of
TFLite integer arithmetic matches bit for bit. Never imports edgert's compiler.

Partitions have int8 inputs and outputs; their scales and zero points sit in the model. Float
arrays fed in are quantized with them (round half away from zero, saturated), and outputs are
dequantized unless ``raw=True``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from edgert.errors import EdgertError


class LiteRTError(EdgertError):
    """No TFLite interpreter, or a model or delegate it refused."""


def interpreter_module():
    """The importable interpreter module: LiteRT's, else tflite-runtime's."""
    try:
        from ai_edge_litert import interpreter

        return interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter

        return interpreter
    except ImportError as e:
        raise LiteRTError(
            "no TFLite interpreter is installed (pip install ai-edge-litert, or tflite-runtime on numpy 1)"
        ) from e


class LiteRTPartition:
    """One TFLite model loaded for calls with numpy arrays."""

    def __init__(
        self,
        model: bytes | str | Path,
        delegate: str | None = None,
        delegate_options: dict | None = None,
        reference_kernels: bool = True,
        threads: int | None = 1,
    ) -> None:
        mod = interpreter_module()
        kwargs: dict = {"num_threads": threads}
        if isinstance(model, bytes | bytearray):
            kwargs["model_content"] = bytes(model)
        else:
            kwargs["model_path"] = str(model)
        if delegate:
            import ctypes

            try:  # LiteRT's Delegate prints a traceback when it dies half-made: find the library first
                ctypes.CDLL(delegate)
            except OSError as e:
                raise LiteRTError(f"the delegate '{delegate}' could not be loaded: {e}") from e
            try:
                kwargs["experimental_delegates"] = [mod.load_delegate(delegate, delegate_options or {})]
            except (ValueError, OSError) as e:
                raise LiteRTError(f"the delegate '{delegate}' could not be loaded: {e}") from e
        elif hasattr(mod, "OpResolverType"):
            # Without the reference kernels: the optimized ones, without XNNPACK (deterministic int8).
            kind = "BUILTIN_REF" if reference_kernels else "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
            kwargs["experimental_op_resolver_type"] = getattr(mod.OpResolverType, kind)
        try:
            self.interpreter = mod.Interpreter(**kwargs)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise LiteRTError(f"LiteRT refused the model: {e}") from e
        self.delegate: str | None = delegate
        self.fallback: str | None = None
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()

    @property
    def input_names(self) -> list[str]:
        return [d["name"] for d in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [d["name"] for d in self.outputs]

    def __call__(self, *arrays: np.ndarray, raw: bool = False) -> list[np.ndarray]:
        """Outputs for ``arrays`` given in input order (float arrays are quantized first)."""
        if len(arrays) != len(self.inputs):
            raise LiteRTError(f"the partition takes {len(self.inputs)} inputs, got {len(arrays)}")
        for d, a in zip(self.inputs, arrays, strict=True):
            a = np.asarray(a)
            if tuple(a.shape) != tuple(d["shape"]):
                raise LiteRTError(f"input '{d['name']}' has shape {tuple(d['shape'])}, got {a.shape}")
            self.interpreter.set_tensor(d["index"], _to_dtype(a, d))
        self.interpreter.invoke()
        outs = []
        for d in self.outputs:
            y = self.interpreter.get_tensor(d["index"])
            scale, zp = d["quantization"]
            if not raw and y.dtype == np.int8 and scale:
                y = (np.float64(np.float32(scale)) * (y.astype(np.float64) - zp)).astype(np.float32)
            outs.append(y)
        return outs


_FALLBACKS_SAID: set[str] = set()


def open_partition(model: bytes, delegate: str | None = None, reference_kernels: bool = True) -> LiteRTPartition:
    """A partition on ``delegate`` when the device has it, else on LiteRT's CPU kernels.

    A delegate that does not load (no such library here: a host, or a phone without that vendor's
    NPU) is not an error: the plain int8 model runs on the CPU, and the first time per delegate
    name a one-line message on stderr says so. ``partition.delegate`` is the delegate in use (None
    on the CPU kernels) and ``partition.fallback`` why it is not the one asked for.
    """
    if delegate:
        try:
            part = LiteRTPartition(model, delegate=delegate)
            part.delegate, part.fallback = delegate, None
            return part
        except LiteRTError as e:
            reason = str(e)
            if delegate not in _FALLBACKS_SAID:
                _FALLBACKS_SAID.add(delegate)
                print(
                    f"edgert: the NPU delegate '{delegate}' is not available here; the int8 partitions run on "
                    "LiteRT's CPU kernels instead",
                    file=sys.stderr,
                )
    else:
        reason = None
    part = LiteRTPartition(model, reference_kernels=reference_kernels)
    part.delegate, part.fallback = None, reason
    return part


def _to_dtype(a: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    if a.dtype == dtype:
        return a
    scale, zp = detail["quantization"]
    if dtype == np.int8 and a.dtype.kind == "f" and scale:
        q = np.nan_to_num(np.asarray(a, np.float32) / np.float32(scale), nan=0.0)
        q = np.clip(np.sign(q) * np.floor(np.abs(q) + np.float32(0.5)), -(2.0**31), 2.0**31)
        return np.clip(q.astype(np.int64) + zp, -128, 127).astype(np.int8)
    return a.astype(dtype)
