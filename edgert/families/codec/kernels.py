"""The codec's hand-written kernels: the LSTM recurrence (CPU and GPU forms, over weights packed by
`pack_recurrent`) and the one-output-channel convolution as a row dot product."""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T


def lstm_block(hidden: int) -> int:
    """Gate columns per register tile of the LSTM kernel: 64 (8 AVX2 vectors) or the widest that divides 4H."""
    return next(b for b in (64, 32, 16, 8, 4) if (4 * hidden) % b == 0)


def pack_recurrent(w_hh: np.ndarray) -> np.ndarray:
    """``W_hh`` (4H x H) in the LSTM kernel's layout ``[4H / B, H, B]``: each tile's B gate columns contiguous."""
    g4, hidden = w_hh.shape
    block = lstm_block(hidden)
    return np.ascontiguousarray(w_hh.T.reshape(hidden, g4 // block, block).transpose(1, 0, 2), dtype=np.float32)


def lstm_kernel(hidden: int) -> tirx.PrimFunc:
    """One LSTM layer over a chunk: ``xw`` holds ``W_ih x_t + b`` for every step; h and c carry.

    Written by hand because the recurrence is a serial loop that Relax has no operator for. The
    gate GEMV keeps a tile of B gate columns in registers over all of ``h`` (``w`` packed by
    `pack_recurrent`), so each step streams the weights once and never reloads the gates.
    """
    g4, block = 4 * hidden, lstm_block(hidden)
    tiles = g4 // block

    @T.prim_func
    def lstm(
        xw_h: T.handle,
        w: T.Buffer((tiles, hidden, block), "float32"),
        h0: T.Buffer((hidden,), "float32"),
        c0: T.Buffer((hidden,), "float32"),
        y_h: T.handle,
        h1: T.Buffer((hidden,), "float32"),
        c1: T.Buffer((hidden,), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        steps = T.int64()
        xw = T.match_buffer(xw_h, (steps, g4), "float32")
        y = T.match_buffer(y_h, (steps, hidden), "float32")
        g = T.alloc_buffer((g4,), "float32")
        for i in range(hidden):
            h1[i] = h0[i]
            c1[i] = c0[i]
        for t in range(steps):
            for jo in T.parallel(tiles):
                acc = T.alloc_buffer((block,), "float32", scope="local")
                for ji in T.vectorized(block):
                    acc[ji] = xw[t, jo * block + ji]
                for kk in range(hidden):
                    for ji in T.vectorized(block):
                        acc[ji] = acc[ji] + h1[kk] * w[jo, kk, ji]
                for ji in T.vectorized(block):
                    g[jo * block + ji] = acc[ji]
            for i in range(hidden):
                c1[i] = T.sigmoid(g[hidden + i]) * c1[i] + T.sigmoid(g[i]) * T.tanh(g[2 * hidden + i])
                h1[i] = T.sigmoid(g[3 * hidden + i]) * T.tanh(c1[i])
                y[t, i] = h1[i]

    return lstm.with_attr("global_symbol", f"codec_lstm_h{hidden}")


def lstm_gpu_kernel(hidden: int) -> tirx.PrimFunc:
    """`lstm_kernel` for a GPU: one work-group of ``hidden`` work items, item j computing unit j's four
    gates over ``h`` (kept in local memory, a barrier around each step's update); the steps stay serial.

    The same packed ``w`` as the CPU kernel (`pack_recurrent`). One group: the recurrence leaves no
    parallelism across steps, and a chunk has a few frames.
    """
    g4, block = 4 * hidden, lstm_block(hidden)
    tiles = g4 // block

    @T.prim_func
    def lstm(
        xw_h: T.handle,
        w: T.Buffer((tiles, hidden, block), "float32"),
        h0: T.Buffer((hidden,), "float32"),
        c0: T.Buffer((hidden,), "float32"),
        y_h: T.handle,
        h1: T.Buffer((hidden,), "float32"),
        c1: T.Buffer((hidden,), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        steps = T.int64()
        xw = T.match_buffer(xw_h, (steps, g4), "float32")
        y = T.match_buffer(y_h, (steps, hidden), "float32")
        hs = T.alloc_buffer((hidden,), "float32", scope="shared")
        for _bx in T.thread_binding(1, thread="blockIdx.x"):
            for j in T.thread_binding(hidden, thread="threadIdx.x"):
                c = T.alloc_buffer((1,), "float32", scope="local")
                g = T.alloc_buffer((4,), "float32", scope="local")
                hs[j] = h0[j]
                c[0] = c0[j]
                for t in range(steps):
                    T.tvm_storage_sync("shared")
                    for q in range(4):
                        g[q] = xw[t, q * hidden + j]
                    for k in range(hidden):
                        for q in range(4):
                            g[q] = g[q] + hs[k] * w[(q * hidden + j) // block, k, (q * hidden + j) % block]
                    T.tvm_storage_sync("shared")
                    c[0] = T.sigmoid(g[1]) * c[0] + T.sigmoid(g[0]) * T.tanh(g[2])
                    hs[j] = T.sigmoid(g[3]) * T.tanh(c[0])
                    y[t, j] = hs[j]
                h1[j] = hs[j]
                c1[j] = c[0]

    return lstm.with_attr("global_symbol", f"codec_lstm_gpu_h{hidden}")


def row_dot_kernel(k: int, lanes: int = 8) -> tirx.PrimFunc:
    """``y[i, 0] = b + x[i, :] · w``: a convolution with one output channel (the audio).

    Written by hand: as a matmul it has no column tile to pack, and TVM left it a serial loop.
    Rows go over threads; each row is ``lanes`` partial sums, added up at the end.
    """
    body = k // lanes * lanes

    @T.prim_func
    def dot(x_h: T.handle, w: T.Buffer((k,), "float32"), b: T.Buffer((1,), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        y = T.match_buffer(y_h, (m, 1), "float32")
        for i in T.parallel(m):
            acc = T.alloc_buffer((lanes,), "float32", scope="local")
            for li in T.vectorized(lanes):
                acc[li] = T.float32(0)
            for ko in range(body // lanes):
                for li in T.vectorized(lanes):
                    acc[li] = acc[li] + x[i, ko * lanes + li] * w[ko * lanes + li]
            for kt in range(k - body):
                acc[0] = acc[0] + x[i, body + kt] * w[body + kt]
            y[i, 0] = b[0]
            for li in range(lanes):
                y[i, 0] = y[i, 0] + acc[li]

    return dot.with_attr("global_symbol", f"codec_row_dot_k{k}")
