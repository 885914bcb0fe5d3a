"""`edgert targets` and `edgert models`: what edgert compiles for, and which models it knows."""

from __future__ import annotations

from rich.table import Column, Table

from edgert.cli.common import out


def targets() -> None:
    """List the target devices edgert compiles for."""
    from edgert.targets import list_targets

    table = Table(Column("target", no_wrap=True), "arch", "cpu", "features", "threads", "link", "description")
    for t in list_targets():
        table.add_row(t.name, t.arch, t.cpu, " ".join(t.features), str(t.default_threads()), t.link, t.description)
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
