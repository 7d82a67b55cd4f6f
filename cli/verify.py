"""``bnfold verify``: compare a candidate model with its original on onnxruntime providers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bnfold.cli.common import EXIT_FAILED, EXIT_PROVIDER, AllowPickle, Quiet, console, fail, guarded
from bnfold.cli.model_options import MODEL_HELP, FactoryArgs, Weights, model_spec

__all__ = ["verify", "parse_tolerances"]


def parse_tolerances(values: list[str] | None, option: str) -> float | dict[str, float] | None:
    """``--rtol 1e-3`` (every output) and/or ``--rtol NAME:1e-3`` (one output), repeatable."""
    from bnfold.errors import BadInputError

    if not values:
        return None
    out: dict[str, float] = {}
    for text in values:
        name, sep, value = text.rpartition(":")
        key = name if sep else "*"
        if sep and not name:
            raise BadInputError(f"{option} {text!r}: give VALUE or OUTPUT:VALUE")
        try:
            number = float(value)
        except ValueError:
            raise BadInputError(
                f"{option} {text!r}: {value!r} is not a number; give VALUE or OUTPUT:VALUE"
            ) from None
        if key in out:
            raise BadInputError(f"{option} given twice for {key if sep else 'every output'}")
        out[key] = number
    if list(out) == ["*"]:
        return out["*"]
    return out


def _load_model(
    src: str,
    allow_pickle: bool,
    weights: str | None = None,
    factory_args: list[str] | None = None,
) -> Any:
    """An ONNX path as is; anything else through the model-source loader."""
    from bnfold.sources import load_source

    loaded = load_source(model_spec(src, weights, factory_args, allow_pickle))
    model = loaded.model
    if loaded.kind == "program":
        model = model.module()  # an ExportedProgram runs through its GraphModule
    return model


def _resolve_data(data: str | None) -> Any:
    """A ``module:function`` spec becomes its iterable (so torch models can be checked on it);
    a file path stays a path, read and checked by the verification library."""
    if data is None:
        return None
    from bnfold.data import is_function_spec, load_function_spec

    return load_function_spec(data) if is_function_spec(data) else data


def verify(
    original: Annotated[
        str, typer.Argument(help="The reference model: an .onnx file, or " + MODEL_HELP)
    ],
    candidate: Annotated[
        str, typer.Argument(help="The model to check, e.g. the folded .onnx file.")
    ],
    providers: Annotated[
        str,
        typer.Option(
            "--providers",
            help="Comma-separated providers to run the candidate on: cpu, cuda, or onnxruntime "
            "names such as TensorrtExecutionProvider.",
        ),
    ] = "cpu",
    shape: Annotated[
        list[str] | None,
        typer.Option(
            "--shape",
            help="Size of an input with symbolic dims, NAME:8x3x224x224 (repeatable). An unset "
            "symbolic leading dim is 1.",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Real inputs: a .npy (single input) or .npz (by name) file, or module:function "
            "returning an iterable of batches.",
        ),
    ] = None,
    rtol: Annotated[
        list[str] | None,
        typer.Option(
            "--rtol", help="Relative tolerance: VALUE, or OUTPUT:VALUE for one output (repeatable)."
        ),
    ] = None,
    atol: Annotated[
        list[str] | None,
        typer.Option(
            "--atol", help="Absolute tolerance: VALUE, or OUTPUT:VALUE for one output (repeatable)."
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the full report as JSON here.")
    ] = None,
    fold_report: Annotated[
        Path | None,
        typer.Option(
            "--fold-report",
            help="The JSON of `bnfold fold --json`: on failure, name the first fold that differs.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated inputs.")] = 0,
    batches: Annotated[
        int | None,
        typer.Option(
            "--batches", help="Batches to compare (default: 1 generated, or all of --data)."
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            "--baseline",
            help="The unfolded model (e.g. the plain export): its error against ORIGINAL is "
            "the noise floor, and CANDIDATE passes within 4x that floor plus 4 ulps.",
        ),
    ] = None,
    weights: Weights = None,
    factory_arg: FactoryArgs = None,
    allow_pickle: AllowPickle = False,
    quiet: Quiet = False,
) -> None:
    """Check that CANDIDATE computes what ORIGINAL computes, output by output.

    ORIGINAL runs on onnxruntime's CPU provider with graph optimizations off (an independent
    reference: with them on, onnxruntime folds the original's BatchNorms too); CANDIDATE runs
    as deployed, with default optimizations, on each provider of --providers. Default
    tolerances come from each output's dtype (float32: rtol 2e-5, atol 2e-6 x max|output|);
    with --baseline (and no --rtol/--atol) the verdict is against the baseline's own error.
    --weights/--factory-arg apply to ORIGINAL when it is a factory.

    Exit codes: 0 every provider ran and every output passed; 1 an output differs beyond
    tolerance; 2 bad input (missing/corrupt file, bad option); 3 a requested provider could
    not run here (the message lists the providers that exist).
    """

    def run() -> tuple[str, int] | None:
        from bnfold.atomic import check_writable, write_text
        from bnfold.cli.render_verify import render_verify_report
        from bnfold.verification import verify as run_verify

        if json_path is not None:
            check_writable(json_path, inputs=(Path(original), Path(candidate)))
        report = run_verify(
            _load_model(original, allow_pickle, weights, factory_arg),
            _load_model(candidate, allow_pickle),
            data=_resolve_data(data),
            providers=providers,
            rtol=parse_tolerances(rtol, "--rtol"),
            atol=parse_tolerances(atol, "--atol"),
            shapes=shape or None,
            seed=seed,
            num_batches=batches,
            fold_report=fold_report,
            progress=False if quiet else None,
            baseline=None if baseline is None else _load_model(baseline, allow_pickle),
        )
        render_verify_report(report)
        if json_path is not None:
            write_text(json_path, report.to_json() + "\n")
            console.print(f"wrote {json_path}")
        if report.verdict == "fail":
            return "the candidate differs from the original beyond tolerance", EXIT_FAILED
        if report.verdict == "not-run":
            names = ", ".join(p.provider for p in report.not_run)
            return (
                f"requested provider(s) {names} could not run here; available providers: "
                + ", ".join(report.available_providers),
                EXIT_PROVIDER,
            )
        return None

    # The verdict is reported after the JSON is in place: a failing check is a result.
    outcome = guarded(run)
    if outcome is not None:
        fail(*outcome)
