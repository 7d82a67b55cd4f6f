"""Render a VerifyReport as a rich table (shared by ``bnfold verify`` and ``bnfold export``)."""

from __future__ import annotations

import math
from typing import Any

from bnfold.cli.common import console
from rich.table import Table

__all__ = ["render_verify_report"]

_STYLE = {"pass": "green", "fail": "bold red", "not-run": "yellow"}


def _num(x: float, fmt: str = ".3g") -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if math.isnan(x):
        return "nan"
    return format(x, fmt)


def render_verify_report(report: Any) -> None:
    """Print one row per provider and output, then the verdict and any localised fold."""
    table = Table(title=f"verify: {report.candidate} vs {report.reference}", title_justify="left")
    for col, justify in (
        ("provider", "left"),
        ("output", "left"),
        ("dtype", "left"),
        ("max abs", "right"),
        ("max rel", "right"),
        ("ULP", "right"),
        ("cosine", "right"),
        ("SQNR dB", "right"),
        ("p99 abs", "right"),
        ("rtol / atol", "right"),
        ("result", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for p in report.providers:
        if p.verdict == "not-run":
            table.add_row(
                p.provider, "-", "-", "-", "-", "-", "-", "-", "-", "-", "[yellow]not run[/]"
            )
            continue
        for o in p.outputs:
            verdict = "pass" if o.passed else "fail"
            result = f"[{_STYLE[verdict]}]{verdict}[/]"
            if not o.passed:
                result += f" ({o.mismatches}/{o.elements})"
            table.add_row(
                f"{p.provider} ({p.runtime})",
                o.output,
                o.dtype,
                _num(o.max_abs),
                _num(o.max_rel),
                _num(o.max_ulp, ".0f"),
                _num(o.cosine, ".9f"),
                _num(o.sqnr_db, ".1f"),
                _num(o.p99_abs),
                f"{_num(o.rtol)} / {_num(o.atol)}",
                result,
            )
    console.print(table)
    for p in report.not_run:
        console.print(f"[yellow]{p.provider} not run:[/] {p.reason}", soft_wrap=True)
    loc = report.localisation
    if loc is not None:
        if loc.bn:
            console.print(
                f"[bold red]first differing fold:[/] {loc.bn} -> {loc.target} "
                f"(tensor {loc.tensor}, max abs {_num(loc.max_abs)})",
                soft_wrap=True,
            )
        else:
            console.print(f"localisation: {loc.note}", soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}", soft_wrap=True)
    style = _STYLE[report.verdict]
    console.print(
        f"[{style}]{report.verdict.upper()}[/] ({report.batches} batch(es); reference: "
        f"{report.reference})",
        soft_wrap=True,
    )
