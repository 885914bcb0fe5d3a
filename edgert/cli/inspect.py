"""`edgert inspect`: verify every member of an artifact and show its manifest, section by section."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from edgert.cli.common import ArtifactArg, out

# The fields every manifest has (`edgert.artifact.format.Manifest`); the rest are the family's sections.
COMMON = {
    "format", "format_version", "name", "family", "created_by", "tvm_version", "target",
    "entry_points", "weights", "library", "defaults", "files",
}  # fmt: skip


def inspect(
    artifact: ArtifactArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole manifest as JSON.")] = False,
) -> None:
    """Verify an artifact and show its manifest (target, entry points, KV cache, files)."""
    from edgert.artifact.reader import open_artifact

    art = open_artifact(artifact, check_host=False, trust_stamp=False)  # always hash every member here
    m, signature = art.manifest, art.signature()
    if as_json:
        print(json.dumps(m, indent=2))
        return
    t = m["target"]
    out.print(
        f"[bold]{escape(m['name'])}[/] ({m['family']}), format version {m['format_version']}, "
        f"{m['created_by']}, TVM {m['tvm_version']}"
    )
    out.print(f"target    {t['name']}: {t['arch']} {t['triple']} cpu={t['cpu']} flags={','.join(t['cpu_flags'])}")
    for key, value in m.items():
        if key == "npu":
            npu_section(value)
        elif key not in COMMON:
            line(key, SECTIONS.get(key, facts)(value))
    w = m.get("weights", {})
    if w:
        line("weights", ", ".join(filter(None, [facts({k: v for k, v in w.items() if k != "order"}),
                                                f"{len(w.get('order', []))} tensors"])))  # fmt: skip
    table = Table("entry point", "inputs", "outputs")
    for name, ep in m["entry_points"].items():
        table.add_row(name, tensors(ep.get("inputs")), tensors(ep.get("outputs")))
    out.print(table)
    files = Table("member", "bytes", "sha256")
    for name, f in m["files"].items():
        files.add_row(name, f"{f['size']:,}", f["sha256"][:16] + "…")
    out.print(files)
    out.print("[green]all members match their sha256[/]")
    colour = "green" if signature.trusted else "red"
    out.print(f"[{colour}]signature: {escape(signature.describe())}[/]", highlight=False)


def line(label: str, text: str) -> None:
    """One section of the manifest: its name in a column, then its facts (text, not markup)."""
    out.print(f"{label.replace('_', ' '):<9} {escape(text)}", soft_wrap=True, highlight=False)


def facts(value: Any) -> str:
    """A section as one line: ``key value, ...`` for an object, compact JSON below the top level."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_compact(v)}" for k, v in value.items())
    return _compact(value)


def _compact(value: Any, width: int = 80) -> str:
    """One value on one line, cut at ``width`` characters (a chat template, a long token list)."""
    text = " ".join(value.split()) if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
    return text if len(text) <= width else text[: width - 1] + "…"


def tensors(items: Any) -> str:
    """Entry-point inputs or outputs: ``name dtype[shape]`` each where they say so, else their JSON."""
    if isinstance(items, list) and all(isinstance(i, dict) and {"name", "dtype", "shape"} <= set(i) for i in items):
        return ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in items)
    return json.dumps(items)


def kernels(value: Any) -> str:
    """``N, K on TVM's default schedule: a, b`` from ``{"fallback": [names], "total": N}``."""
    fallback = list(value.get("fallback", []))
    total = value.get("total", "?")
    if not fallback:
        return f"{total}, none on TVM's default schedule"
    return f"{total}, {len(fallback)} on TVM's default schedule: {', '.join(fallback)}"


def exits(value: Any) -> str:
    """The calibrated exit layers, policies and draft skip set."""
    parts = [f"layers {', '.join(map(str, value.get('layers', [])))}"]
    points = value.get("policies") or {}
    if points:
        parts.append("calibrated " + ", ".join(f"{name}:{p['threshold']:g}" for name, p in points.items()))
    if value.get("refused"):
        parts.append("not faster than the full model: " + ", ".join(value["refused"]))
    if value.get("probes"):
        parts.append(f"state probes at {', '.join(map(str, value['probes'].get('layers', [])))}")
    if "draft_skip" in value:
        parts.append(f"draft skips {value['draft_skip']}")
    return "; ".join(parts)


def kv_cache(value: Any) -> str:
    """The KV cache: kind, context, page and prefill chunk when it has them, then anything else."""
    named = {"context_length": "context", "page_size": "page", "prefill_chunk_size": "prefill chunk"}
    parts = [str(value.get("kind", ""))] if "kind" in value else []
    parts += [f"{label} {value[k]}" for k, label in named.items() if k in value]
    rest = {k: v for k, v in value.items() if k not in named and k != "kind"}
    return ", ".join(filter(None, [*parts, facts(rest)]))


SECTIONS = {"kernels": kernels, "exits": exits, "kv_cache": kv_cache}


def npu_section(npu: dict[str, Any]) -> None:
    """An NPU artifact: the partition plan (device, operators, MACs per partition), the share of
    MACs on the NPU, and Vela's estimate (cycles, latency at the target's clock, SRAM, flash, the
    10 layers with the most cycles)."""
    t, plan = npu.get("target", {}), npu["plan"]
    line("npu", f"{t.get('name')}: {t.get('description', '')}; calibrated on {npu.get('calibration_samples')} samples")
    table = Table("#", "device", "ops", "op types", "MACs", "inputs → outputs", title="partition plan")
    for p in plan["partitions"]:
        kinds = ", ".join(f"{k}×{v}" if v > 1 else k for k, v in p["op_types"].items())
        ios = f"{len(p['inputs'])} → {len(p['outputs'])}"
        table.add_row(str(p["index"]), p["device"], str(len(p["nodes"])), escape(kinds), f"{p['macs']:,}", ios)
    out.print(table)
    d = plan["devices"]
    line(
        "devices",
        f"NPU {d['npu']['ops']} ops, {d['npu']['macs']:,} MACs in {d['npu']['partitions']} partitions; "
        f"CPU {d['cpu']['ops']} ops, {d['cpu']['macs']:,} MACs in {d['cpu']['partitions']} partitions; "
        f"NPU share of MACs {plan['npu_mac_share']:.1%}",
    )
    reasons: dict[str, str] = {}
    for c in plan.get("cpu_ops", []):
        reasons.setdefault(c["op"], c["reason"])
    if reasons:
        line("cpu ops", "; ".join(f"{op}: {why}" for op, why in reasons.items()))
    vela = npu.get("vela")
    if not vela:
        line("vela", "none (the target's NPU compiles the int8 TFLite partitions itself, e.g. through a delegate)")
        return
    clock = vela.get("clock_hz") or 0
    out.print(
        f"[bold]Vela's estimate[/] (not a measurement) for {escape(str(vela.get('accelerator')))} @ "
        f"{clock / 1e6:.0f} MHz, {escape(str(vela.get('system_config')))}, {escape(str(vela.get('memory_mode')))}",
        highlight=False,
    )
    line(
        "estimate",
        f"{vela['cycles_total']:,} cycles = {vela['latency_ms']:.3f} ms at {clock / 1e6:.0f} MHz; "
        f"SRAM peak {vela['sram_bytes_peak'] / 1024:.1f} KiB, flash {vela['flash_bytes'] / 1024:.1f} KiB; "
        f"{vela['npu_ops']} NPU ops, {vela['cpu_ops_in_partitions']} left on the CPU inside partitions; "
        f"NPU share of MACs {vela['npu_mac_share']:.1%}",
    )
    layers = [(i, layer) for i, part in enumerate(vela.get("partitions", [])) for layer in part.get("layers", [])]
    layers.sort(key=lambda item: -item[1]["cycles"])
    top = Table(
        "partition", "layer", "op", "on", "cycles", "MACs", "µs", title="Vela's estimate: top 10 layers by cycles"
    )
    for i, layer in layers[:10]:
        top.add_row(
            f"npu_{i}", escape(str(layer["name"])), escape(str(layer["op"])), str(layer["target"]),
            f"{layer['cycles']:,}", f"{layer['macs']:,}", f"{layer['latency_us']:.1f}",
        )  # fmt: skip
    out.print(top)
