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
    folded_by, skipped_by = s["folded_by_direction"], s["skipped_by_code"]
    # summary() values are typed ``object`` for its JSON form; these two are count dicts
    assert isinstance(folded_by, dict) and isinstance(skipped_by, dict)
    by_direction = ", ".join(f"{n} {k}" for k, n in folded_by.items())
    line = f"{s['folded']}/{s['batchnorms']} BatchNorms folded"
    if by_direction:
        line += f" ({by_direction})"
    line += f", {s['skipped']} kept"
    if skipped_by:
        codes = ", ".join(f"{n} {k}" for k, n in skipped_by.items())
        line += f" ({codes})"
    console.print(line)
