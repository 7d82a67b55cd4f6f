"""``bnfold fold``: fold an ONNX file (or a PyTorch model) and print what happened to each BN."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnfold.cli.common import AllowPickle, console, guarded
from bnfold.cli.model_options import (
    MODEL_HELP,
    Dtype,
    FactoryArgs,
    InputShape,
    Shapes,
    Weights,
    model_spec,
)

_DIRECTIONS = ("backward", "forward", "both")


def fold(
    input: Annotated[
        str,
        typer.Argument(help="An .onnx file, or a PyTorch model: " + MODEL_HELP),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the result.")],
    json: Annotated[
        Path | None, typer.Option("--json", help="Also write the fold report as JSON here.")
    ] = None,
    direction: Annotated[
        str,
        typer.Option("--direction", help="backward, forward or both (backward first)."),
    ] = "both",
    weights: Weights = None,
    factory_arg: FactoryArgs = None,
    input_shape: InputShape = None,
    shape: Shapes = None,
    dtype: Dtype = None,
    allow_pickle: AllowPickle = False,
) -> None:
    """Fold every exactly foldable BatchNorm and print one decision per BN.

    A PyTorch model is written as a .pt2 ExportedProgram, exported with its example inputs
    (--input-shape/--shape for a factory that does not declare its input size).

    Exits 0 when the output was written, also if some BNs had to stay (the table says why);
    2 with a one-line message for bad input (missing or corrupt file, unknown factory,
    weights that do not match, a missing --input-shape, unwritable output, output equal to
    input); 4 for a model that cannot be folded (TorchScript).
    """

    def run() -> None:
        from bnfold.atomic import check_writable, write_text
        from bnfold.cli.render import render_fold_report
        from bnfold.errors import BadInputError

        if direction not in _DIRECTIONS:
            raise BadInputError(f"--direction must be backward, forward or both, not {direction!r}")
        if json is not None:
            check_writable(json, inputs=(Path(input), output))
        from bnfold.inputspec import example_inputs
        from bnfold.sources import load_source
        from bnfold.torchfold.load import require_foldable

        spec = model_spec(input, weights, factory_arg, allow_pickle)
        loaded = load_source(spec)
        if loaded.kind == "onnx":
            from bnfold.onnxfold import fold_file

            if input_shape or shape or dtype:
                raise BadInputError(
                    "--input-shape/--shape/--dtype apply to PyTorch models; an ONNX model's "
                    "inputs are in the file"
                )
            report = fold_file(input, output, direction=direction)
        else:
            from bnfold.torchfold import fold_file as fold_torch_file

            require_foldable(loaded.model, input)
            check_writable(output, inputs=(*loaded.files, *((Path(weights),) if weights else ())))
            example = example_inputs(
                loaded, input_shape=input_shape, shapes=shape, dtype=dtype, required=True
            )
            report = fold_torch_file(
                input,
                output,
                direction=direction,
                allow_pickle=allow_pickle,
                loaded=(loaded.model, example),
            )
        render_fold_report(report)
        console.print(f"wrote {output}")
        if json is not None:
            write_text(json, report.to_json() + "\n")
            console.print(f"wrote {json}")

    guarded(run)
