"""``bnfold fold``: fold an ONNX file (or a PyTorch model) and print what happened to each BN."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnfold.cli.common import AllowPickle, console, guarded

_DIRECTIONS = ("backward", "forward", "both")


def fold(
    input: Annotated[
        str,
        typer.Argument(
            help="An .onnx file, or a PyTorch model (reference model name, .pt2 or TorchScript)."
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the result.")],
    json: Annotated[
        Path | None, typer.Option("--json", help="Also write the fold report as JSON here.")
    ] = None,
    direction: Annotated[
        str,
        typer.Option("--direction", help="backward, forward or both (backward first)."),
    ] = "both",
    allow_pickle: AllowPickle = False,
) -> None:
    """Fold every exactly foldable BatchNorm and print one decision per BN.

    Exits 0 when the output was written, also if some BNs had to stay (the table says why);
    2 with a one-line message for bad input (missing or corrupt file, unwritable output,
    output equal to input).
    """

    def run() -> None:
        from bnfold.atomic import check_writable, write_text
        from bnfold.cli.render import render_fold_report
        from bnfold.errors import BadInputError

        if direction not in _DIRECTIONS:
            raise BadInputError(f"--direction must be backward, forward or both, not {direction!r}")
        if json is not None:
            check_writable(json, inputs=(Path(input), output))
        if input.lower().endswith(".onnx"):
            from bnfold.onnxfold import fold_file

            report = fold_file(input, output, direction=direction)
        else:
            from bnfold.torchfold import fold_file as fold_torch_file

            report = fold_torch_file(input, output, direction=direction, allow_pickle=allow_pickle)
        render_fold_report(report)
        console.print(f"wrote {output}")
        if json is not None:
            write_text(json, report.to_json() + "\n")
            console.print(f"wrote {json}")

    guarded(run)
