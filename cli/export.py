"""``bnfold export``: load, [recalibrate], fold, export to ONNX, fold, verify, write."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from bnfold.cli.common import (
    EXIT_FAILED,
    EXIT_PROVIDER,
    EXIT_UNSUPPORTED,
    AllowPickle,
    Quiet,
    console,
    fail,
    guarded,
)
from bnfold.cli.model_options import (
    MODEL_HELP,
    Dtype,
    FactoryArgs,
    InputShape,
    Shapes,
    Weights,
)

if TYPE_CHECKING:
    from bnfold.api import DirectionArg


def export(
    model: Annotated[
        str,
        typer.Argument(help=MODEL_HELP),
    ] = "resnet-mini",
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="ONNX file to write [default: bnfold-out/NAME.onnx]"),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Recalibrate BN statistics first on this data: .npy/.npz file, folder of "
            "them, or module:function returning an iterable.",
        ),
    ] = None,
    num_batches: Annotated[
        int | None, typer.Option("--num-batches", help="Recalibration budget in batches.")
    ] = None,
    direction: Annotated[
        str, typer.Option("--direction", help="backward, forward or both.")
    ] = "both",
    providers: Annotated[
        str, typer.Option("--providers", help="Comma-separated execution providers to verify on.")
    ] = "cpu",
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip verification.")] = False,
    rtol: Annotated[
        float | None,
        typer.Option(help="Fixed relative tolerance (replaces the noise-floor verdict)."),
    ] = None,
    atol: Annotated[
        float | None,
        typer.Option(help="Fixed absolute tolerance (replaces the noise-floor verdict)."),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the full report as JSON here.")
    ] = None,
    weights: Weights = None,
    factory_arg: FactoryArgs = None,
    input_shape: InputShape = None,
    shape: Shapes = None,
    dtype: Dtype = None,
    dynamic_batch: Annotated[
        bool,
        typer.Option(
            "--dynamic-batch/--static-batch",
            help="Keep the batch axis symbolic in the ONNX file (verified at two batch sizes).",
        ),
    ] = True,
    opset: Annotated[
        int | None, typer.Option("--opset", help="ONNX opset [default: the exporter's].")
    ] = None,
    fp16: Annotated[
        bool,
        typer.Option(
            "--fp16",
            help="Write float16 parameters: folded in float64, each rounded once to float16; "
            "verified against the float64 model.",
        ),
    ] = False,
    allow_pickle: AllowPickle = False,
    quiet: Quiet = False,
) -> None:
    """Fold every exactly foldable BatchNorm of a PyTorch model and ship it as verified ONNX.

    With no arguments, exports the embedded default model (resnet-mini) to
    bnfold-out/resnet-mini.onnx. A user's model:
    `bnfold export mypkg.nets:build --weights w.pt --input-shape 1x3x224x224`.

    The verdict is about the fold: the unfolded model is exported too, and the folded file
    passes when its error against the float64 PyTorch model is at most 4x the unfolded
    export's own error plus 4 ulps.

    Exit codes: 0 written and verified, 1 verification failed (nothing written), 2 bad input,
    3 a requested provider could not run, 4 model not exportable (or the unfolded export is
    itself far off: an exporter problem).
    """

    def run() -> tuple[str, int] | None:
        from bnfold.cli.render import render_fold_report
        from bnfold.pipeline import export as run_export
        from bnfold.pipeline import write_report
        from bnfold.sources import parse_factory_args

        if json_path is not None:
            from bnfold.atomic import check_writable

            sources = (Path(model),) if model and Path(model).exists() else ()
            check_writable(json_path, inputs=sources + ((output,) if output else ()))
        recal_data = None
        if data is not None:
            from bnfold.data import load_data_spec

            recal_data = load_data_spec(data)
        result = run_export(
            model,
            output,
            data=recal_data,
            num_batches=num_batches,
            # typer passes plain text; the fold checks it and refuses anything else
            direction=cast("DirectionArg", direction),
            verify=not no_verify,
            providers=tuple(p.strip() for p in providers.split(",") if p.strip()),
            rtol=rtol,
            atol=atol,
            allow_pickle=allow_pickle,
            progress=not quiet,
            weights=weights,
            factory_args=parse_factory_args(factory_arg or []),
            input_shape=input_shape,
            shapes=shape or None,
            dtype=dtype,
            dynamic_batch=dynamic_batch,
            opset=opset,
            fp16=fp16,
        )
        if result.recalibration is not None:
            console.print(result.recalibration.summary())
        console.print("[bold]PyTorch fold[/]")
        render_fold_report(result.torch_report)
        console.print("[bold]ONNX fold (exported graph)[/]")
        render_fold_report(result.onnx_report)
        if result.verify_report is not None:
            from bnfold.cli.render_verify import render_verify_report

            render_verify_report(result.verify_report)
        for note in result.notes:
            console.print(f"note: {note}", soft_wrap=True)
        if json_path is not None:
            write_report(result, json_path)
        report = result.verify_report
        if report is not None and report.verdict == "not-run":
            names = ", ".join(p.provider for p in report.not_run)
            return (
                f"provider(s) {names} could not run here; available providers: "
                f"{', '.join(report.available_providers)}; the model was not written",
                EXIT_PROVIDER,
            )
        if result.exporter_problem:
            return (
                "the unfolded export already differs from the PyTorch model (an exporter or "
                "runtime problem, not a fold failure); nothing was written",
                EXIT_UNSUPPORTED,
            )
        if not result.passed:
            return "verification failed: the folded model was not written", EXIT_FAILED
        console.print(
            f"wrote [bold]{result.output}[/] ({result.batchnorms_left} BatchNormalization left)"
        )
        return None

    # A failed verification is a result: its JSON report is written (it says why), the model
    # is not. Errors (bad input, a full disk) write nothing at all.
    failure = guarded(run)
    if failure is not None:
        fail(*failure)
