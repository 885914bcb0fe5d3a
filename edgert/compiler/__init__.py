"""The ahead-of-time compiler: layouts, kernels, the TVM build and packaging."""

from edgert.compiler.build import CompileResult, compile_model

__all__ = ["CompileResult", "compile_model"]
