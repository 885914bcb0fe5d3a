"""Weight layouts chosen at compile time: module swaps on the nn model and the matching repack.

Like MLC-LLM's quantization, a layout replaces `nn.Linear` modules by modules whose parameters
have the packed shape, and provides the function that turns a source weight into those
parameters. Float weights are packed ``[N/B, K, B]``; group-quantized ones (q4, q8) as
`kernels.quant_matmul` reads them. A tied embedding reads its rows from the LM head's
parameters, so the table is stored once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from edgert.compiler.kernels.int8 import i8mm_quant_matmul, int8_quant_matmul, multirow_quant_matmul, vnni_layout
from edgert.compiler.kernels.quant import packed_matmul, pick_block, quant_block, quant_matmul
from edgert.frontend.quantized import QuantizedRows, is_quantized, parse_kind

WEIGHT_DTYPES = {"f32": "float32", "f16": "float16"}


def float_weights(weight_dtype: str, family: str = "", on_gpu: bool = False) -> str:
    """``weight_dtype`` (f32 or f16) checked; a one-line error names the choices. GPU builds of the
    float families take f32 only (their kernels are dlight's, on float32 weights)."""
    from edgert.errors import EdgertError

    if weight_dtype not in WEIGHT_DTYPES:
        raise EdgertError(f"weight dtype '{weight_dtype}' is not one of {', '.join(WEIGHT_DTYPES)}")
    if on_gpu and weight_dtype != "f32":
        raise EdgertError(f"--weight-dtype {weight_dtype}: {family} builds for a GPU target take f32 weights only")
    return weight_dtype


def packed_weights(weight_dtype: str, order: list[str], on_gpu: bool = False) -> dict[str, object]:
    """The manifest's ``weights`` section of a float build: CPU-packed columns, or rows as the model
    has them on a GPU."""
    return {
        "file": "weights.safetensors",
        "dtype": WEIGHT_DTYPES[weight_dtype],
        "layout": "rows as the model has them" if on_gpu else "cpu-packed-columns",
        "order": order,
    }


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

    def gather(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` of the weight matrix in float32 (an embedding lookup)."""
        block, k, n = self.block, self.in_features, self.out_features

        def rows(flat: te.Tensor, w: te.Tensor) -> te.Tensor:
            def value(i: Any, c: Any) -> Any:
                r = tirx.max(tirx.min(flat[i].astype("int64"), n - 1), 0)
                return w[r // block, c, r % block].astype("float32")

            return te.compute((flat.shape[0], k), value, name="gather_rows")

        flat = op.reshape(ids, (-1,))
        return op.reshape(op.tensor_expr_op(rows, "embedding", [flat, self.weight]), (*ids.shape, k))


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


class QuantLinear(nn.Module):
    """A bias-free linear layer with group-quantized weights (q4 or q8 and the K-quant variants of
    `parse_kind`), dequantized in the kernel."""

    def __init__(self, in_features: int, out_features: int, storage: str, isa: str | None = None):
        # isa (avx2, avx512vnni, amx, dotprod, i8mm): the int8-activation kernels of kernels_int8 and their
        # weight layout (plain q4/q8 only).
        self.fmt = parse_kind(storage)
        kind = self.fmt.base
        self.storage, self.group = storage, self.fmt.group
        self.in_features, self.out_features, self.kind, self.isa = in_features, out_features, kind, isa
        self.block = quant_block(out_features)
        nb, ng = -(-out_features // self.block), in_features // self.group
        if isa == "i8mm":
            shape = (nb, in_features // (16 if kind == "q4" else 8), self.block, 8)
            self.qweight = nn.Parameter(shape, "uint8" if kind == "q4" else "int8")
        elif isa is not None:
            shape = (nb, in_features // (8 if kind == "q4" else 4), self.block, 4)
            self.qweight = nn.Parameter(shape, "uint8" if kind == "q4" else "int8")
        elif kind == "q4":
            self.qweight = nn.Parameter((nb, in_features // 8, self.block), "uint32")
        else:
            self.qweight = nn.Parameter((nb, in_features, self.block), "int8")
        self.scale = nn.Parameter((nb, ng, self.block), self.fmt.scale_dtype)
        if self.fmt.has_min:
            self.min = nn.Parameter((nb, ng, self.block), self.fmt.scale_dtype)

    def _params(self) -> list[Tensor]:
        return [self.qweight, self.scale] + ([self.min] if self.fmt.has_min else [])

    def _over_rows(
        self, kernel: Any, name: str, x: Tensor, before: tuple = (), residual: Tensor | None = None
    ) -> Tensor:
        """``kernel`` over ``x``'s rows (its leading axes as one): ``x [rows, K]``, ``before``, the
        weights, then ``residual [rows, N]`` when given; the output in ``x``'s leading shape."""
        *lead, k = x.shape
        rows = 1
        for d in lead:
            rows = rows * d
        res = [] if residual is None else [op.reshape(residual, (rows, self.out_features))]
        y = op.tensor_ir_op(
            kernel,
            name,
            [op.reshape(x, (rows, k)), *before, *self._params(), *res],
            Tensor.placeholder((rows, self.out_features), "float32"),
        )
        return op.reshape(y, (*lead, self.out_features))

    def forward(self, x: Tensor) -> Tensor:
        k = x.shape[-1]
        if self.isa == "i8mm":
            kernel = i8mm_quant_matmul(k, self.out_features, self.block, self.kind)
        elif self.isa is not None:
            kernel = int8_quant_matmul(k, self.out_features, self.block, self.kind, self.isa)
        else:
            kernel = quant_matmul(k, self.out_features, self.block, self.storage)
        return self._over_rows(kernel, "quant_matmul", x)

    @property
    def takes_swiglu(self) -> bool:
        """Whether `swiglu` computes ``silu(gate) * up`` in the kernel (the multi-row VNNI kernel's prologue)."""
        return vnni_layout(self.isa)

    def swiglu(self, gate_up: Tensor, residual: Tensor | None = None) -> Tensor:
        """``forward(silu(gate) * up)`` of ``gate_up = [gate | up]`` (last axis ``2 K``), with the
        SwiGLU product formed as the kernel quantizes its rows: no separate kernel, no ``[.., K]``
        intermediate; plus ``residual`` (the shape of the output) in the kernel's write-back when given."""
        k, n, added = self.in_features, self.out_features, residual is not None
        kernel = multirow_quant_matmul(k, n, self.block, self.kind, self.isa, "swiglu", residual=added)
        return self._over_rows(kernel, "quant_matmul_swiglu", gate_up, residual=residual)

    @property
    def takes_residual(self) -> bool:
        """Whether `add_to` and `swiglu` add a residual in the kernel's write-back (the multi-row VNNI kernel)."""
        return vnni_layout(self.isa)

    def add_to(self, residual: Tensor, x: Tensor) -> Tensor:
        """``residual + forward(x)``, the add in the kernel's write-back: a block's residual add without
        a kernel (and an output) of its own."""
        kernel = multirow_quant_matmul(
            self.in_features, self.out_features, self.block, self.kind, self.isa, residual=True
        )
        return self._over_rows(kernel, "quant_matmul_residual", x, residual=residual)

    @property
    def takes_rmsnorm(self) -> bool:
        """Whether `rmsnorm` normalizes its input in the kernel (the multi-row VNNI kernel's prologue)."""
        return vnni_layout(self.isa)

    def rmsnorm(self, x: Tensor, norm: nn.RMSNorm) -> Tensor:
        """``forward(norm(x))`` for a bias-free RMSNorm over the last axis, the norm taken as the
        kernel quantizes its rows: no norm kernel, no normalized copy of x."""
        kernel = multirow_quant_matmul(
            self.in_features,
            self.out_features,
            self.block,
            self.kind,
            self.isa,
            "rmsnorm",
            float(norm.epsilon),
            norm.weight.dtype,
        )
        return self._over_rows(kernel, "quant_matmul_rmsnorm", x, before=(norm.weight,))

    def gather(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` of the weight matrix, dequantized to float32 (an embedding lookup)."""
        block, k, n, q4, group = self.block, self.in_features, self.out_features, self.kind == "q4", self.group
        # Byte layouts (`_pack_runs`): runs of 4 (avx2, dotprod) or 8 (i8mm) rows of a column.
        run = 0 if self.isa is None else 8 if self.isa == "i8mm" else 4

        def rows(flat: te.Tensor, qw: te.Tensor, sc: te.Tensor, *mn: te.Tensor) -> te.Tensor:
            def value(i: Any, c: Any) -> Any:
                # Out-of-range ids are clipped so a bad id cannot read outside the table (the runtime also checks).
                r = tirx.max(tirx.min(flat[i].astype("int64"), n - 1), 0)
                t, j, g = r // block, r % block, c // group
                if q4 and run:  # byte c % run of the column's run bytes; the high nibble holds the next run
                    byte = qw[t, c // (2 * run), j, c % run]
                    shift = (4 * ((c % (2 * run)) // run)).astype("uint8")
                    code = ((byte >> shift) & tirx.const(15, "uint8")).astype("float32")
                    return code * sc[t, g, j].astype("float32") + mn[0][t, g, j].astype("float32")
                if q4:
                    word = qw[t, c // 8, j]
                    code = ((word >> (4 * (c % 8)).astype("uint32")) & tirx.const(15, "uint32")).astype("float32")
                    return code * sc[t, g, j].astype("float32") + mn[0][t, g, j].astype("float32")
                if run:
                    return qw[t, c // run, j, c % run].astype("float32") * sc[t, g, j].astype("float32")
                value = qw[t, c, j].astype("float32") * sc[t, g, j].astype("float32")
                return value + mn[0][t, g, j].astype("float32") if mn else value

            return te.compute((flat.shape[0], k), value, name="gather_rows")

        flat = op.reshape(ids, (-1,))
        out = op.tensor_expr_op(rows, "embedding", [flat, *self._params()])
        return op.reshape(out, (*ids.shape, k))


class TiedEmbedding(nn.Module):
    """An embedding whose table is the LM head's weight: rows are gathered from the head's layout."""

    def __init__(self, head: nn.Module):
        self._head = (head,)  # in a tuple so that the head's parameters are not listed twice

    def forward(self, ids: Tensor) -> Tensor:
        return self._head[0].gather(ids)


Repack = Callable[[Any], dict[str, np.ndarray]]


def pack_columns(w: np.ndarray, block: int, dtype: str) -> np.ndarray:
    """[N, K] (PyTorch/GGUF row-major out x in) to [N/B, K, B] in the storage dtype."""
    n, k = w.shape
    return np.ascontiguousarray(w.reshape(n // block, block, k).transpose(0, 2, 1)).astype(dtype)


def pack_quantized(q: QuantizedRows, block: int) -> tuple[np.ndarray, ...]:
    """Codes and scales ``[N, K]`` / ``[N, K/G]`` to the tiled layout of `kernels.quant_matmul`.

    Returns (qweight, scale) and the min where the format has one (q4, Q5_K's q8); the last column
    tile is zero-padded when ``block`` does not divide N.
    """
    n, k = q.shape
    pad = -n % block

    def tiles(a: np.ndarray) -> np.ndarray:  # [N, X] -> [N/B, X, B]
        a = np.pad(a, ((0, pad), (0, 0)))
        return np.ascontiguousarray(a.reshape(-1, block, a.shape[1]).transpose(0, 2, 1))

    if q.kind == "q4":
        nibbles = q.codes.reshape(n, k // 8, 8).astype(np.uint32)
        words = np.zeros((n, k // 8), np.uint32)
        for s in range(8):
            words |= nibbles[:, :, s] << np.uint32(4 * s)
        assert q.min is not None
        return tiles(words), tiles(q.scale), tiles(q.min)
    mins = () if q.min is None else (tiles(q.min),)
    return (tiles(q.codes.astype(np.int8)), tiles(q.scale), *mins)


class GatherEmbedding(nn.Module):
    """An embedding that gathers (and dequantizes) rows of a matrix stored in a linear layout.

    A tied embedding reads the LM head's own parameters (kept in a tuple so they are not
    listed twice); an untied one owns its table.
    """

    def __init__(self, table: nn.Module, tied: bool):
        if tied:
            self._tied = (table,)
        else:
            self.table = table

    def forward(self, ids: Tensor) -> Tensor:
        table = self._tied[0] if hasattr(self, "_tied") else self.table
        return table.gather(ids)


def _layout_for(
    name: str, in_features: int, out_features: int, kind: str, isa: str | None = None
) -> tuple[nn.Module, Repack]:
    """The module for an ``[out, in]`` matrix stored as ``kind``, and its repack function."""
    if is_quantized(kind):
        module = QuantLinear(in_features, out_features, kind, isa)
        names = [f"{name}.{p}" for p in ("qweight", "scale", "min")[: 3 if module.fmt.has_min else 2]]
        pack = {None: pack_quantized, "i8mm": pack_quantized_mmla}.get(isa, pack_quantized_dot)
        return module, lambda w, b=module.block: dict(zip(names, pack(w, b), strict=True))
    dtype = WEIGHT_DTYPES[kind]
    block = pick_block(out_features)
    if block is None:
        raise ValueError(f"{name}: {out_features} columns fit no float tile")
    return PackedLinear(in_features, out_features, block, dtype), lambda w: {
        f"{name}.weight": pack_columns(np.asarray(w), block, dtype)
    }


def _int8_for(kind: str, isa: str | None) -> str | None:
    """The int8-activation ISA for a matrix of ``kind``, or None for the float kernel.

    On AVX2 only q4 gains: `vpmaddubsw` multiplies unsigned by signed bytes, so q8's signed codes
    need sign fixes, and SmolLM2's q8 head ran 2.01 ms per token against 1.50 ms with floats
    (q4 matrices: 5.38 against 6.46 ms; `edgert.profile.measure.operator_times`, 40 steps).
    AVX-512 VNNI takes q8 too (the +128 offset of `multirow_quant_matmul` costs one xor per
    register of codes, shared by every row).
    """
    if isa == "avx2" and kind != "q4":
        return None
    if is_quantized(kind) and not parse_kind(kind).plain:
        return None  # K-quant variants (groups of 16, f32 scales, q8 min): the float-activation kernels
    return isa


def apply_cpu_layout(
    model: nn.Module,
    storage: dict[str, str] | str,
    default: str = "f16",
    tied: tuple[str, str] | None = None,
    int8_isa: str | None = None,
) -> dict[str, Repack]:
    """Swap linears and embeddings in place; return, per source weight name, its repack function.

    ``storage`` names the kind (q4, q8, f16, f32) of each matrix by its weight name (``default``
    for the others), or is one kind for every matrix; ``tied`` = (embedding, head) makes the
    embedding read the head's table. ``int8_isa`` (avx2, avx512vnni, amx, dotprod, i8mm) gives q4/q8 matrices the
    int8-activation kernels of `kernels_int8` instead of the float ones (on AVX2 q4 only).
    """
    if isinstance(storage, str):
        storage, default = {}, storage
    repack: dict[str, Repack] = {}
    modules: dict[str, nn.Module] = {}

    class _Swap(nn.Mutator):
        def visit_module(self, name: str, node: nn.Module) -> nn.Module:
            kind = storage.get(f"{name}.weight", default)
            if isinstance(node, nn.Linear) and node.bias is None:
                if is_quantized(kind) or pick_block(node.out_features) is not None:
                    module, repack[f"{name}.weight"] = _layout_for(
                        name, node.in_features, node.out_features, kind, _int8_for(kind, int8_isa)
                    )
                    modules[name] = module
                    return module
            if isinstance(node, nn.Embedding) and (tied is None or name != tied[0]):
                if is_quantized(kind):
                    table, fn = _layout_for(f"{name}.table", node.dim, node.num, kind, _int8_for(kind, int8_isa))
                    repack[f"{name}.weight"] = fn
                    return GatherEmbedding(table, tied=False)
                dtype = WEIGHT_DTYPES[kind]
                repack[f"{name}.weight"] = lambda w, n=name: {f"{n}.weight": np.ascontiguousarray(w, dtype=dtype)}
                return CompactEmbedding(node.num, node.dim, dtype)
            return self.visit(name, node)

    _Swap().visit("", model)
    if tied is not None:
        embed, head = tied
        if head not in modules:
            raise ValueError(f"tied embedding: '{head}' has no packed layout")
        setattr(model, embed, GatherEmbedding(modules[head], tied=True))
    return repack


def _column_tiles(a: np.ndarray, block: int) -> np.ndarray:
    """[N, X, ...] -> [N/B, X, B, ...], the last tile zero-padded."""
    a = np.pad(a, [(0, -a.shape[0] % block)] + [(0, 0)] * (a.ndim - 1))
    a = a.reshape(-1, block, *a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(a, 1, 2))


def pack_quantized_mmla(q: QuantizedRows, block: int) -> tuple[np.ndarray, ...]:
    """Codes and scales to the layout of `kernels_int8.i8mm_quant_matmul` (8 rows of a column per 8 bytes)."""
    return _pack_runs(q, block, 8)


def pack_quantized_dot(q: QuantizedRows, block: int) -> tuple[np.ndarray, ...]:
    """Codes and scales to the layout of `kernels_int8.int8_quant_matmul` (4 rows of a column per 4 bytes)."""
    return _pack_runs(q, block, 4)


def _pack_runs(q: QuantizedRows, block: int, run: int) -> tuple[np.ndarray, ...]:
    """``run`` consecutive rows of a column in ``run`` adjacent bytes, columns in tiles of ``block``.

    q4 packs two runs per byte: rows ``2 run kk + t`` in the low nibble, ``2 run kk + run + t`` in the
    high one. Returns (qweight, scale) for q8 and (qweight, scale, min) for q4; the last column
    tile is zero-padded when ``block`` does not divide N.
    """
    n, k = q.shape
    if q.kind == "q4":
        c = q.codes.reshape(n, k // (2 * run), 2, run).astype(np.uint8)
        assert q.min is not None
        codes = c[:, :, 0] | (c[:, :, 1] << 4)
        return _column_tiles(codes, block), _column_tiles(q.scale, block), _column_tiles(q.min, block)
    return _column_tiles(q.codes.astype(np.int8).reshape(n, k // run, run), block), _column_tiles(q.scale, block)
