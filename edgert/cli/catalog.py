"""`edgert targets` and `edgert models`: what edgert compiles for, and which models it knows."""

from __future__ import annotations

from rich.table import Column, Table

from edgert.cli.common import out


def targets() -> None:
    """List the target devices edgert compiles for."""
    from edgert.targets import list_targets

    found = list_targets()
    table = Table(
        Column("target", no_wrap=True, min_width=max(len(t.name) for t in found)), Column("kind", no_wrap=True),
        Column("arch", no_wrap=True), "cpu", "link", "description",
    )  # fmt: skip
    for t in found:
        # What runs the kernels beside the host CPU: the GPU's OpenCL flavour, the NPU or its delegate.
        accelerator = {"gpu": t.gpu or "opencl", "npu": t.npu.get("accelerator") or t.npu.get("delegate", "")}
        extra = [f"{t.kind}: {accelerator[t.kind]}"] if accelerator.get(t.kind) else []
        extra += [" ".join(t.features) or "CPU features detected", f"{t.default_threads()} threads"]
        table.add_row(t.name, t.kind, t.arch, t.cpu, t.link, f"{t.description} ({'; '.join(extra)})")
    out.print(table)


def models() -> None:
    """List the model recipes and whether their weights are installed."""
    from edgert.recipes import list_recipes

    table = Table("model", "family", "source", "installed", "description")
    for r in list_recipes():
        missing = r.missing()
        table.add_row(r.name, r.family, r.source.get("file", ""), "yes" if missing is None else f"no: {missing}",
                      r.description)  # fmt: skip
    out.print(table)
