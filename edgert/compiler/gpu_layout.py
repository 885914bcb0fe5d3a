"""Weight layouts for GPU builds: module swaps on the nn model and the matching repack, as MLC-LLM's
q4f16_1 stores weights.

A group-quantized ``[N, K]`` matrix keeps its rows (output features) and packs its codes into
uint32 words along K, with float16 scales (and mins) per group of 32:

    q4:  qweight uint32 [N, K/8]  (code k in bits 4(k%8).., low nibble first), scale, min f16 [N, K/32]
         w = scale * code + min
    q8:  qweight uint32 [N, K/4]  (code k + 128 in byte k%4), scale f16 [N, K/32]
         w = scale * (byte - 128)

Each linear layer is one TE function: a ``dequantize`` block feeding an ``NT_matmul`` reduction
(MLC-LLM's ``fused_dequantize_NT_matmul``). dlight's GPU rules (GEMV for decode, Matmul for prefill)
schedule it with the dequantize inlined into the weight loads, so the weights cross global memory
as codes, never as floats.
Float matrices stay ``[N, K]`` in their storage dtype and are widened inside the same kernel.
A tied embedding gathers (and dequantizes) rows of the LM head's parameters.

float16 needs the device's cl_khr_fp16: Mali and Adreno have it; OpenCL does not require it (PoCL's
CPU device lacks it), so the generic target stores scales and f16 matrices as float32 instead.

Nothing here is the CPU's packed-column layout of `edgert.compiler.layout`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from edgert.frontend.quantized import GROUP, QuantizedRows

Repack = Callable[[Any], dict[str, np.ndarray]]
FLOAT_DTYPES = {"f32": "float32", "f16": "float16"}
CODES_PER_WORD = {"q4": 8, "q8": 4}


class GpuLinear(nn.Module):
    """A bias-free linear layer whose weight ``[N, K]`` (q4, q8, f16 or f32) is dequantized in the matmul."""

    def __init__(self, in_features: int, out_features: int, kind: str, scale_dtype: str = "float16"):
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        n, k = out_features, in_features
        if kind in CODES_PER_WORD:
            self.qweight = nn.Parameter((n, k // CODES_PER_WORD[kind]), "uint32")
            self.scale = nn.Parameter((n, k // GROUP), scale_dtype)
            if kind == "q4":
                self.min = nn.Parameter((n, k // GROUP), scale_dtype)
        else:
            self.weight = nn.Parameter((n, k), FLOAT_DTYPES[kind])

    def _params(self) -> list[Tensor]:
        if self.kind == "q4":
            return [self.qweight, self.scale, self.min]
        if self.kind == "q8":
            return [self.qweight, self.scale]
        return [self.weight]

    def _value(self, w: list[te.Tensor], r: Any, c: Any) -> Any:
        """Element (r, c) of the matrix in float32, from its stored form."""
        if self.kind == "q4":
            word = w[0][r, c // 8]
            code = (word >> (4 * (c % 8)).astype("uint32")) & tirx.const(15, "uint32")
            g = c // GROUP
            return code.astype("float32") * w[1][r, g].astype("float32") + w[2][r, g].astype("float32")
        if self.kind == "q8":
            word = w[0][r, c // 4]
            byte = (word >> (8 * (c % 4)).astype("uint32")) & tirx.const(255, "uint32")
            code = byte.astype("int32") - tirx.const(128, "int32")
            return code.astype("float32") * w[1][r, c // GROUP].astype("float32")
        return w[0][r, c].astype("float32")

    def forward(self, x: Tensor) -> Tensor:
        """``x @ W^T`` as one TE function: a ``dequantize`` block feeding an ``NT_matmul`` reduction,
        the form in which dlight's GEMV and Matmul rules inline the dequantize into the weight loads
        (MLC-LLM's ``fused_dequantize_NT_matmul``)."""
        *lead, k = x.shape
        rows = 1
        for d in lead:
            rows = rows * d
        n = self.out_features

        def compute(a: te.Tensor, *w: te.Tensor) -> te.Tensor:
            if self.kind == "f32":
                weight = w[0]
            else:
                weight = te.compute((n, k), lambda r, c: self._value(list(w), r, c), name="dequantize")
            red = te.reduce_axis((0, k), name="k")
            return te.compute(
                (a.shape[0], n), lambda i, j: te.sum(a[i, red] * weight[j, red], axis=red), name="NT_matmul"
            )

        y = op.tensor_expr_op(compute, "dequantize_NT_matmul", [op.reshape(x, (rows, k)), *self._params()])
        return op.reshape(y, (*lead, n))

    def gather(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` of the matrix in float32 (an embedding lookup); bad ids are clipped."""
        n, k = self.out_features, self.in_features

        def rows(flat: te.Tensor, *w: te.Tensor) -> te.Tensor:
            def value(i: Any, c: Any) -> Any:
                r = tirx.max(tirx.min(flat[i].astype("int64"), n - 1), 0)
                return self._value(list(w), r, c)

            return te.compute((flat.shape[0], k), value, name="gather_rows")

        flat = op.reshape(ids, (-1,))
        out = op.tensor_expr_op(rows, "embedding", [flat, *self._params()])
        return op.reshape(out, (*ids.shape, k))


class GpuEmbedding(nn.Module):
    """An embedding reading its rows from a `GpuLinear` table: its own, or (tied) the LM head's."""

    def __init__(self, table: GpuLinear, tied: bool):
        if tied:
            self._tied = (table,)  # in a tuple so that the head's parameters are not listed twice
        else:
            self.table = table

    def forward(self, ids: Tensor) -> Tensor:
        table = self._tied[0] if hasattr(self, "_tied") else self.table
        return table.gather(ids)


def pack_rows(w: np.ndarray | QuantizedRows, kind: str, scale_dtype: str = "float16") -> tuple[np.ndarray, ...]:
    """A source matrix in the stored form of ``kind`` (see the module docstring)."""
    if kind in FLOAT_DTYPES:
        dense = w.dequantize() if isinstance(w, QuantizedRows) else np.asarray(w)
        return (np.ascontiguousarray(dense, dtype=FLOAT_DTYPES[kind]),)
    if not isinstance(w, QuantizedRows) or w.kind != kind:
        raise ValueError(f"a {kind} layout needs {kind} codes, got {getattr(w, 'kind', w.dtype)}")
    n, k = w.shape
    per = CODES_PER_WORD[kind]
    bits = 32 // per
    codes = w.codes.astype(np.int32) + (128 if kind == "q8" else 0)
    codes = codes.astype(np.uint32).reshape(n, k // per, per)
    words = np.zeros((n, k // per), np.uint32)
    for s in range(per):
        words |= codes[:, :, s] << np.uint32(bits * s)
    # The f16 scales are exact widenings of the file's; f32 copies of them are exact too.
    scale = np.ascontiguousarray(w.scale.astype(np.float32), dtype=scale_dtype)
    if kind == "q8":
        return words, scale
    assert w.min is not None
    return words, scale, np.ascontiguousarray(w.min.astype(np.float32), dtype=scale_dtype)


def _linear(name: str, in_features: int, out_features: int, kind: str, half: bool) -> tuple[GpuLinear, Repack]:
    if kind.startswith("q") and kind not in CODES_PER_WORD:
        kind = "f16"  # K-quant variants (groups of 16, f32 scales): dequantized; the GPU kernels take q4/q8
    if kind == "f16" and not half:
        kind = "f32"
    scale_dtype = "float16" if half else "float32"
    module = GpuLinear(in_features, out_features, kind, scale_dtype)
    names = {"q4": ("qweight", "scale", "min"), "q8": ("qweight", "scale")}.get(kind, ("weight",))
    keys = [f"{name}.{p}" for p in names]
    return module, lambda w: dict(zip(keys, pack_rows(w, kind, scale_dtype), strict=True))


def apply_gpu_layout(
    model: nn.Module,
    storage: dict[str, str],
    default: str = "f16",
    tied: tuple[str, str] | None = None,
    half: bool = True,
) -> dict[str, Repack]:
    """Swap bias-free linears and embeddings for their GPU forms in place; return, per source weight
    name, its repack function. ``storage`` names each matrix's kind (q4, q8, f16, f32) by weight name;
    ``tied`` = (embedding, head) makes the embedding read the head's table. Without ``half`` (a
    device that may lack cl_khr_fp16, as PoCL does) scales and f16 matrices are stored float32."""
    repack: dict[str, Repack] = {}
    modules: dict[str, GpuLinear] = {}

    class _Swap(nn.Mutator):
        def visit_module(self, name: str, node: nn.Module) -> nn.Module:
            kind = storage.get(f"{name}.weight", default)
            if isinstance(node, nn.Linear) and node.bias is None:
                module, repack[f"{name}.weight"] = _linear(name, node.in_features, node.out_features, kind, half)
                modules[name] = module
                return module
            if isinstance(node, nn.Embedding) and (tied is None or name != tied[0]):
                table, fn = _linear(f"{name}.table", node.dim, node.num, kind, half)
                repack[f"{name}.weight"] = fn
                return GpuEmbedding(table, tied=False)
            return self.visit(name, node)

    _Swap().visit("", model)
    if tied is not None:
        embed, head = tied
        setattr(model, embed, GpuEmbedding(modules[head], tied=True))
    return repack


def clip_embeddings(model: nn.Module) -> int:
    """Swap every plain `nn.Embedding` for one whose lookup clips bad ids (``take`` mode "clip", as the
    CPU layout's `CompactEmbedding`): TVM's default "fast" mode reads out of bounds on a bad id.
    Same parameter, same name: no repack. Returns how many were swapped."""
    from edgert.compiler.layout import CompactEmbedding

    swapped = [0]

    class _Swap(nn.Mutator):
        def visit_module(self, name: str, node: nn.Module) -> nn.Module:
            if isinstance(node, nn.Embedding):
                swapped[0] += 1
                return CompactEmbedding(node.num, node.dim, str(node.weight.dtype))
            return self.visit(name, node)

    _Swap().visit("", model)
    return swapped[0]
