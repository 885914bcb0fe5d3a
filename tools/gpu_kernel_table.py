#!/usr/bin/env python3
"""The kernel table of a Llama GPU build's decode step: each OpenCL kernel, its work-group shape, and
the bytes of global memory it reads per generated token, split into weights, activations and KV cache.

    tools/gpu_kernel_table.py smollm2-135m --context 64            # a table on stdout
    tools/gpu_kernel_table.py tiny.gguf --json table.json

The model is compiled for ``--target`` (default host-opencl) and one decode step is run on the OpenCL
device at ``--context`` cached tokens with the VM's instrument, which sees every kernel the module calls
and its arguments (the last argument is the output; every other one is read in full, except the
embedding, which reads one row). The KV cache's own kernels (RoPE, append, paged attention) run inside
TVM's cache object, out of the instrument's sight: their bytes are computed from the cache's shape.
Work-group shapes are the ``threadIdx`` extents of the kernels as dlight scheduled them, the grid the
``blockIdx`` extents (``seq_len`` symbolic ones are 1 in decode).

No times are printed: on PoCL (an OpenCL device emulated on the CPU) they say nothing about a phone's
GPU. The weight-bytes share is what bounds a real GPU's decode, which is memory-bound.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KV_KERNELS = ("fused_rope", "tir_kv_cache_transpose_append", "batch_decode_paged_kv")


def nbytes(t: Any) -> int:
    n = 1
    for d in t.shape:
        n *= int(d)
    return n * np.dtype(str(t.dtype)).itemsize


def scheduled_module(model: str, target_name: str, quant: str | None) -> Any:
    """The Relax module of ``model`` as the GPU build makes it, after fusion and dlight's schedules."""
    from edgert.compiler import gpu
    from edgert.compiler.gpu_layout import apply_gpu_layout
    from edgert.compiler.quantize import choose_storage, storage_kind
    from edgert.families.llama import loader
    from edgert.families.llama.model import LlamaConfig, LlamaForCausalLM
    from edgert.frontend import read_gguf
    from edgert.frontend.quantized import QuantizedRows
    from edgert.recipes import find_recipe
    from edgert.targets import load_target

    recipe = find_recipe(model)
    source = recipe.source_path() if recipe else Path(model)
    g = read_gguf(source)
    cfg = LlamaConfig.from_gguf(g)
    mode = quant or "source"
    storage = {}
    for name, w in loader.gguf_weights(g, cfg, keep_blocks=mode in ("source", "q4", "q8")):
        if isinstance(w, QuantizedRows) or w.ndim == 2:
            storage[name] = storage_kind(choose_storage(w, mode))
    target, record = gpu.gpu_target(load_target(target_name))
    net = LlamaForCausalLM(cfg)
    apply_gpu_layout(net, storage, tied=loader.tied_weights(cfg), half=record["fp16"])
    with target:
        mod, _ = net.export_tvm(spec=net.get_default_spec())
    return gpu.scheduled(mod, target), cfg


def decode_calls(artifact: Path, context: int) -> tuple[list[dict[str, Any]], Any]:
    """The module's calls during one decode step at ``context`` cached tokens, with bytes read."""
    import edgert

    model = edgert.load(artifact)
    assert model.session.on_gpu, f"{artifact} is not a GPU build"
    weights = {p.data_ptr(): nbytes(p) for p in model.session.params}
    ids = [int(i) % model.vocab_size for i in np.arange(context) * 7919 + 11]
    model.prefill(ids)
    model.step([ids[-1]])  # every kernel built (PoCL compiles on first use)
    calls: list[dict[str, Any]] = []

    def instrument(func: Any, name: str, before: bool, _ret: Any, *args: Any) -> int:
        if not before:
            return 0
        tensors = [a for a in args if hasattr(a, "data_ptr") and hasattr(a, "shape")]
        reads = tensors[:-1]
        w = sum(nbytes(t) for t in reads if t.data_ptr() in weights)
        a = sum(nbytes(t) for t in reads if t.data_ptr() not in weights)
        out = nbytes(tensors[-1]) if tensors else 0
        if str(name).startswith("embedding"):  # a gather: one row of the table, not all of it
            rows = max(1, sum(int(t.shape[0]) for t in reads if t.data_ptr() not in weights))
            table = [t for t in reads if t.data_ptr() in weights]
            w = sum(nbytes(t) * rows // int(t.shape[0]) for t in table)
        calls.append({"name": str(name), "weights": w, "activations": a, "written": out})
        return 0

    model.session.vm.set_instrument(instrument)
    model.step([ids[0]])
    model.session.vm.set_instrument(lambda *a: 0)
    return calls, model


def table(model: str, artifact: Path, context: int, target: str, quant: str | None) -> dict[str, Any]:
    mod, cfg = scheduled_module(model, target, quant)
    groups = gpu_work_groups(mod)
    calls, _ = decode_calls(artifact, context)
    rows: list[dict[str, Any]] = []
    for c in calls:
        if c["name"].startswith("vm.builtin.") and "attention" not in c["name"]:
            continue
        if c["name"].startswith("vm.builtin."):  # attention: the cache's own kernels, from its shape
            rows.extend(_kv_rows(cfg, context, groups))
            continue
        rows.append({**c, "kernel": f"{c['name']}_kernel", **_shape(groups.get(c["name"], {}))})
    merged: dict[str, dict[str, Any]] = {}
    for r in rows:
        m = merged.setdefault(r["kernel"], {**r, "calls": 0, "weights": 0, "activations": 0, "kv": 0, "written": 0})
        m["calls"] += 1
        for k in ("weights", "activations", "kv", "written"):
            m[k] += r.get(k, 0)
    total = {k: sum(r[k] for r in merged.values()) for k in ("weights", "activations", "kv", "written")}
    read = total["weights"] + total["activations"] + total["kv"]
    return {
        "model": model,
        "target": target,
        "context_tokens": context,
        "kernels": sorted(merged.values(), key=lambda r: -(r["weights"] + r["activations"] + r["kv"])),
        "total": total,
        "weight_share_of_bytes_read": round(total["weights"] / read, 4) if read else None,
        "note": "bytes per decode token; no timings (PoCL timings say nothing about a phone's GPU)",
    }


def gpu_work_groups(mod: Any) -> dict[str, dict[str, Any]]:
    from edgert.compiler.gpu import work_groups

    return work_groups(mod)


def _shape(binds: dict[str, Any]) -> dict[str, str]:
    def dims(prefix: str) -> str:
        ext = [binds.get(f"{prefix}.{a}", 1) for a in "xyz"]
        text = "x".join(str(e).replace("seq_len", "1") for e in ext)
        return re.sub(r"T\.int64\((\w+)\)", r"\1", text)

    return {"work_group": dims("threadIdx"), "grid": dims("blockIdx")}


def _kv_rows(cfg: Any, context: int, groups: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Bytes of the cache's kernels for one layer's decode step (float32 cache)."""
    hd, kv, h = cfg.head_dim, cfg.num_kv_heads, cfg.num_heads
    qkv = (h + 2 * kv) * hd * 4
    pages_read = 2 * (context + 1) * kv * hd * 4  # K and V of every cached token and the new one
    index = (context // 16 + 2) * 4 * 3  # page table, lengths, positions (int32)
    return [
        {"kernel": "fused_rope_kernel", "name": "fused_rope", "weights": 0, "activations": qkv, "written": qkv,
         **_shape(groups.get("fused_rope", {}))},
        {"kernel": "tir_kv_cache_transpose_append_kernel", "name": "tir_kv_cache_transpose_append", "weights": 0,
         "activations": 2 * kv * hd * 4, "written": 2 * kv * hd * 4,
         **_shape(groups.get("tir_kv_cache_transpose_append", {}))},
        {"kernel": "batch_decode_paged_kv_kernel", "name": "batch_decode_paged_kv", "weights": 0,
         "activations": h * hd * 4 + index, "kv": pages_read, "written": h * hd * 4 + h * 4,
         **_shape(groups.get("batch_decode_paged_kv", {}))},
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a recipe name (smollm2-135m) or a Llama GGUF file")
    ap.add_argument("--artifact", type=Path, help="its GPU build (default: compiled here into a temporary folder)")
    ap.add_argument("--target", default="host-opencl")
    ap.add_argument("--quant", default=None)
    ap.add_argument("--context", type=int, default=64, help="tokens in the cache when the decode step runs")
    ap.add_argument("--json", type=Path, help="write the table as JSON here")
    args = ap.parse_args()
    import edgert

    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact
        if artifact is None:
            artifact = Path(tmp) / "gpu.edgert"
            options = {"quant": args.quant} if args.quant else {}
            edgert.compile(args.model, target=args.target, output=artifact, **options)
        result = table(args.model, artifact, args.context, args.target, args.quant)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    mb = 1 / 1e6
    print(f"{result['model']} on {result['target']}: one decode step at {args.context} cached tokens "
          "(bytes of global memory read per token; no timings: PoCL says nothing about a phone's GPU)")  # fmt: skip
    print(f"{'kernel':46} {'calls':>5} {'work-group':>11} {'grid':>14} {'weights MB':>11} {'act. MB':>9} {'KV MB':>8}")
    for r in result["kernels"]:
        print(
            f"{r['kernel'][:46]:46} {r['calls']:5d} {r['work_group']:>11} {r['grid']:>14} "
            f"{r['weights'] * mb:11.3f} {r['activations'] * mb:9.4f} {r['kv'] * mb:8.4f}"
        )
    t = result["total"]
    print(
        f"total read per token: weights {t['weights'] * mb:.2f} MB, activations {t['activations'] * mb:.3f} MB, "
        f"KV cache {t['kv'] * mb:.3f} MB; weights are {result['weight_share_of_bytes_read']:.1%} of bytes read"
    )


if __name__ == "__main__":
    main()
