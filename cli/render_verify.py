"""Render a VerifyReport as a rich table (shared by ``bnfold verify`` and ``bnfold export``)."""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.table import Table

from bnfold.cli.common import console
from bnfold.verification.floor import FLOOR_FACTOR, FLOOR_ULPS

__all__ = ["render_verify_report"]

_STYLE = {"pass": "green", "fail": "bold red", "not-run": "yellow"}


def _num(x: float, fmt: str = ".3g") -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if math.isnan(x):
        return "nan"
    return format(x, fmt)


def render_verify_report(report: Any) -> None:
    """Print one row per provider and output, then tolerances, verdict and any broken fold.

    The table keeps what fits a terminal; cosine and p50 are in ``--json``. With a noise
    floor (an unfolded baseline), two more columns give the baseline's max abs error and the
    candidate's error as a multiple of it.
    """
    floored = any(o.floor is not None for p in report.providers for o in p.outputs)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    columns = ["provider", "output", "max abs", "max rel", "ULP", "SQNR dB", "p99 abs"]
    if floored:
        columns += ["floor", "x floor"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("provider", "output") else "right")
    table.add_column("result", no_wrap=True)
    tolerances: list[str] = []
    for p in report.providers:
        if p.verdict == "not-run":
            dashes = ["-"] * (len(columns) - 1)
            table.add_row(p.provider, *dashes, "[yellow]not run[/]")
            continue
        for o in p.outputs:
            verdict = "pass" if o.passed else "fail"
            result = f"[{_STYLE[verdict]}]{verdict}[/]"
            cells = [
                _num(o.max_abs, ".2g"),
                _num(o.max_rel, ".2g"),
                _num(o.max_ulp, ".0f"),
                _num(o.sqnr_db, ".0f"),
                _num(o.p99_abs, ".2g"),
            ]
            if floored:
                f = o.floor
                cells += [_num(f.floor, ".2g"), _num(f.factor, ".2f")] if f else ["-", "-"]
            table.add_row(p.provider, o.output, *cells, result)
            if o.floor is not None:
                tolerances.append(
                    f"{p.provider}/{o.output} {o.dtype}: max abs error <= "
                    f"{_num(o.floor.bound)} ({FLOOR_FACTOR:g} x floor + {FLOOR_ULPS} ulp)"
                    + (
                        " [exporter problem: the unfolded model is far off]"
                        if o.floor.exporter_problem
                        else ""
                    )
                )
                continue
            tolerances.append(
                f"{p.provider}/{o.output} {o.dtype}: rtol {_num(o.rtol)}, atol {_num(o.atol)}"
                + ("" if o.passed else f" ({o.mismatches}/{o.elements} elements outside)")
            )
    console.print(f"candidate: {report.candidate}", soft_wrap=True)
    console.print(f"reference: {report.reference}", soft_wrap=True)
    if report.baseline is not None:
        console.print(f"baseline (unfolded, the noise floor): {report.baseline}", soft_wrap=True)
    console.print(table)
    if tolerances:
        rule = "pass rule" if floored else "tolerances (|a-b| <= atol + rtol*|b|)"
        console.print(f"{rule}: " + "; ".join(tolerances), soft_wrap=True)
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
        f"[{style}]{report.verdict.upper()}[/] ({report.batches} batch(es) compared)",
        soft_wrap=True,
    )
