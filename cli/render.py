"""Rich rendering of reports, shared by every command that prints one."""

from __future__ import annotations

from rich.table import Table

from bnfold.cli.common import console
from bnfold.report import FoldReport

__all__ = ["render_fold_report"]


def render_fold_report(report: FoldReport) -> None:
    """Print one row per BatchNorm (decision, direction, target, reason) and a summary line."""
    table = Table(title=f"BatchNorm folding: {report.model}", title_justify="left")
    table.add_column("BN", overflow="fold")
    table.add_column("decision")
    table.add_column("direction")
    table.add_column("target", overflow="fold")
    table.add_column("reason", overflow="fold")
    for d in report.decisions:
        if d.folded:
            table.add_row(
                d.bn,
                "[green]folded[/]",
                d.direction.value if d.direction else "",
                d.target or "",
                "",
            )
        else:
            code = d.code.value if d.code else "skipped"
            table.add_row(d.bn, f"[yellow]kept[/] ({code})", "", "", d.reason or "")
    if report.decisions:
        console.print(table)
    s = report.summary()
    by_direction = ", ".join(f"{n} {k}" for k, n in s["folded_by_direction"].items())  # type: ignore[union-attr]
    line = f"{s['folded']}/{s['batchnorms']} BatchNorms folded"
    if by_direction:
        line += f" ({by_direction})"
    line += f", {s['skipped']} kept"
    if s["skipped_by_code"]:
        codes = ", ".join(f"{n} {k}" for k, n in s["skipped_by_code"].items())  # type: ignore[union-attr]
        line += f" ({codes})"
    console.print(line)
