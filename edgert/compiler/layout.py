"""Weight layouts chosen at compile time: module swaps on the nn model and the matching repack.

Like MLC-LLM's quantization, a layout replaces `nn.Linear` modules by modules whose parameters
have the packed shape, and provides the function that turns a source weight into that shape.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from edgert.compiler.kernels import packed_matmul, pick_block

WEIGHT_DTYPES = {"f32": "float32", "f16": "float16"}


class PackedLinear(nn.Module):
    """A bias-free linear layer whose weight is stored as ``[N/B, K, B]`` (see kernels.py)."""

    def __init__(self, in_features: int, out_features: int, block: int, dtype: str):
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.weight = nn.Parameter((out_features // block, in_features, block), dtype)

    def forward(self, x: Tensor) -> Tensor:
        *lead, k = x.shape
        rows = 1
        for d in lead:
            rows = rows * d
        kernel = packed_matmul(k, self.out_features, self.block, self.weight.dtype)
        y = op.tensor_ir_op(
            kernel,
            "packed_matmul",
            [op.reshape(x, (rows, k)), self.weight],
            Tensor.placeholder((rows, self.out_features), "float32"),
        )
        return op.reshape(y, (*lead, self.out_features))


class CompactEmbedding(nn.Module):
    """Embedding table stored in a smaller dtype, rows widened to float32 after the lookup."""

    def __init__(self, num: int, dim: int, dtype: str):
        self.num, self.dim = num, dim
        self.weight = nn.Parameter((num, dim), dtype)

    def forward(self, ids: Tensor) -> Tensor:
        # "clip" keeps a bad token id from reading outside the table (the runtime also checks).
        flat = op.reshape(ids, (-1,))
        rows = op.wrap_nested(relax.op.take(self.weight._expr, flat._expr, axis=0, mode="clip"), "embedding")
        return op.reshape(op.astype(rows, "float32"), (*ids.shape, self.dim))


Repack = Callable[[np.ndarray], np.ndarray]


def pack_columns(w: np.ndarray, block: int, dtype: str) -> np.ndarray:
    """[N, K] (PyTorch/GGUF row-major out x in) to [N/B, K, B] in the storage dtype."""
    n, k = w.shape
    return np.ascontiguousarray(w.reshape(n // block, block, k).transpose(0, 2, 1)).astype(dtype)


def apply_cpu_layout(model: nn.Module, weight_dtype: str) -> dict[str, Repack]:
    """Swap linears and embeddings in place; return, per parameter name, its repack function."""
    dtype = WEIGHT_DTYPES[weight_dtype]
    repack: dict[str, Repack] = {}

    class _Swap(nn.Mutator):
        def visit_module(self, name: str, node: nn.Module) -> nn.Module:
            if isinstance(node, nn.Linear) and node.bias is None:
                block = pick_block(node.out_features)
                if block is not None:
                    repack[f"{name}.weight"] = lambda w, b=block: pack_columns(w, b, dtype)
                    return PackedLinear(node.in_features, node.out_features, block, dtype)
            if isinstance(node, nn.Embedding):
                repack[f"{name}.weight"] = lambda w: np.ascontiguousarray(w, dtype=dtype)
                return CompactEmbedding(node.num, node.dim, dtype)
            return self.visit(name, node)

    _Swap().visit("", model)
    return repack
