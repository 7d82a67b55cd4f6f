"""``bnfold recalibrate``: replace BatchNorm statistics by exact ones measured on data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bnfold.cli.common import AllowPickle, console, guarded
from bnfold.cli.model_options import MODEL_HELP, FactoryArgs, InputShape, Weights, model_spec


def _cast_floats(batch: Any, dtype: Any) -> Any:
    """Floating numpy/torch arrays in ``batch`` -> torch tensors of the model's dtype."""
    import torch

    if isinstance(batch, dict):
        return {k: _cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_cast_floats(v, dtype) for v in batch)
    if type(batch).__module__ == "numpy" and hasattr(batch, "dtype"):
        batch = torch.from_numpy(batch)
    if isinstance(batch, torch.Tensor) and batch.is_floating_point():
        return batch.to(dtype)
    return batch


class _Cast:
    """Re-iterable view of the data with float inputs cast to the model's dtype."""

    def __init__(self, data: Any, dtype: Any) -> None:
        self.data, self.dtype = data, dtype

    def __iter__(self) -> Any:
        for batch in self.data:
            yield _cast_floats(batch, self.dtype)


def _fixed_batch_size(model: Any) -> int | None:
    """The batch size a model's inputs fix, or None when none does (or they disagree).

    An ONNX model fixes it with a ``dim_value`` on the first axis of an input; a ``.pt2``
    ExportedProgram exported without ``dynamic_shapes`` (the default) with a static first
    dimension on a user input's example value. Scalar inputs and inputs whose first axis is
    free say nothing about it and are passed over.
    """
    sizes: set[int] = set()
    if hasattr(model, "graph") and hasattr(model.graph, "initializer"):  # onnx.ModelProto
        initializers = {t.name for t in model.graph.initializer}
        for i in model.graph.input:
            if i.name in initializers or not i.type.HasField("tensor_type"):
                continue
            dims = i.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value"):
                sizes.add(dims[0].dim_value)
    else:
        import torch

        if not isinstance(model, torch.export.ExportedProgram):
            return None
        user = set(model.graph_signature.user_inputs)
        for node in model.graph.nodes:
            val = node.meta.get("val") if node.op == "placeholder" and node.name in user else None
            if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], int):
                sizes.add(val.shape[0])
    if len(sizes) != 1 or (size := sizes.pop()) <= 0:
        return None
    return size


def _fit_fixed_batch(model: Any, data: str, batches: Any, batch_size: int) -> Any:
    """Cut file data in batches of the size the model fixes, and drop a short last one.

    Only data bnfold reads itself (array files, image folders) can be re-cut; a
    ``module:function`` loader keeps its own batches.
    """
    from bnfold.data import ArrayBatches, FullBatches, ImageBatches, load_data_spec

    if not isinstance(batches, ArrayBatches | ImageBatches):
        return batches
    size = _fixed_batch_size(model)
    if size is None:
        return batches
    if size != batch_size:
        console.print(f"note: the model fixes the batch size to {size}; reading the data so")
        batches = load_data_spec(data, batch_size=size)
    return FullBatches(batches, size)


def _note_dropped(batches: Any) -> None:
    if getattr(batches, "dropped", 0):
        console.print(
            f"note: left out the last {batches.dropped} sample(s): a short batch that "
            "the model's fixed batch size cannot take (padding would bias the statistics)"
        )


def _render(report: Any) -> None:
    from rich.table import Table

    table = Table(title="BatchNorm recalibration", title_justify="left")
    for col in ("BN", "status", "level", "values/ch", "var before", "var after", "max rel Δvar"):
        # BN names are what users search for: wrap them rather than cut them off
        table.add_column(
            col,
            justify="left" if col in ("BN", "status") else "right",
            overflow="fold" if col == "BN" else "ellipsis",
            min_width=12 if col == "BN" else None,
        )
    table.add_column("zero-var ch", justify="right")
    for b in report.bns:
        zero = ",".join(map(str, b.zero_variance_channels[:6]))
        if len(b.zero_variance_channels) > 6:
            zero += ",…"
        updated = b.status == "updated"
        table.add_row(
            b.name,
            b.status,
            str(b.level) if updated else "",
            f"{b.elements:,}" if updated else "",
            f"{b.old_var_mean:.4g}" if updated else "",
            f"{b.new_var_mean:.4g}" if updated else "",
            f"{b.max_rel_var_change:.3g}" if updated else "",
            zero,
        )
    console.print(table)
    console.print(report.summary())


def _save_torch(model: Any, example: Any, output: Path) -> None:
    """``.pt2``: an ExportedProgram (needs an example input); ``.pt``/``.pth``: a state_dict."""
    import torch

    from bnfold.atomic import atomic_path
    from bnfold.errors import BadInputError, UnsupportedModelError

    suffix = output.suffix.lower()
    if suffix in (".pt", ".pth"):
        with atomic_path(output) as tmp:
            torch.save(model.state_dict(), tmp)
        return
    if suffix != ".pt2":
        raise BadInputError(
            f"cannot write a torch model to {output.name}; use .pt2 (ExportedProgram) or "
            ".pt/.pth (state_dict)"
        )
    try:
        program = torch.export.export(model, tuple(example))
    except Exception as e:
        raise UnsupportedModelError(
            f"torch.export cannot export the recalibrated model ({type(e).__name__}); write a "
            f"state_dict with -o {output.with_suffix('.pt')}"
        ) from None
    with atomic_path(output) as tmp:
        torch.export.save(program, tmp)


def recalibrate(
    model: Annotated[
        str,
        typer.Argument(help="An .onnx file, or a PyTorch model: " + MODEL_HELP),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="A .npy/.npz file (samples first), a folder of them, or module:function "
            "returning an iterable of batches.",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "-o",
            "--output",
            help="Where to write the result: .onnx for ONNX input; .pt2 (ExportedProgram) or "
            ".pt/.pth (state_dict) for a torch model.",
        ),
    ],
    num_samples: Annotated[
        int | None, typer.Option("--num-samples", help="Use at most this many samples.")
    ] = None,
    num_batches: Annotated[
        int | None, typer.Option("--num-batches", help="Use at most this many batches.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Samples per batch when reading array files.")
    ] = 32,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="population: upstream BNs use their new statistics, as at inference (one "
            "pass per depth level); batch: upstream BNs use batch statistics (one pass).",
        ),
    ] = "population",
    estimator: Annotated[
        str,
        typer.Option(
            "--estimator",
            help="exact (whole-data mean and unbiased variance) or batch-variance-mean "
            "(update_bn's equal-weight average, for comparison only).",
        ),
    ] = "exact",
    data_cache_mb: Annotated[
        float,
        typer.Option(
            "--data-cache-mb",
            help="population mode: keep up to this many MiB of batches from the first pass "
            "and replay them (0: read the data again every pass).",
        ),
    ] = 1024.0,
    json: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON here.")
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar on stderr.")
    ] = True,
    weights: Weights = None,
    factory_arg: FactoryArgs = None,
    input_shape: InputShape = None,
    allow_pickle: AllowPickle = False,
) -> None:
    """Measure every BatchNorm's exact population statistics on data and store them.

    Exits 0 when the output was written; 2 with a one-line message for bad input (missing
    file, bad --data, empty data, NaN activations, unwritable output); 4 when the model
    cannot be processed.
    """

    def run() -> None:
        from bnfold.atomic import check_writable, write_text
        from bnfold.data import load_data_spec
        from bnfold.errors import UnsupportedModelError
        from bnfold.recalib import recalibrate as recalibrate_api
        from bnfold.sources import load_source

        sources = (Path(model), *((Path(weights),) if weights else ()))
        check_writable(output, inputs=sources)
        if json is not None:
            check_writable(json, inputs=(*sources, output))
        loaded = load_source(model_spec(model, weights, factory_arg, allow_pickle))
        batches = load_data_spec(data, batch_size=batch_size)

        def measure(target: Any, batches: Any) -> Any:
            return recalibrate_api(
                target,
                batches,
                num_samples=num_samples,
                num_batches=num_batches,
                mode=mode,
                estimator=estimator,
                progress=progress,
                data_cache_mb=data_cache_mb,
            )

        if loaded.kind == "onnx":
            from bnfold.errors import BadInputError
            from bnfold.onnx_io import load_onnx, save_onnx

            if output.suffix.lower() != ".onnx":
                raise BadInputError(f"an ONNX model is written as .onnx, not {output.name}")
            proto = load_onnx(model)
            batches = _fit_fixed_batch(proto, data, batches, batch_size)
            report = measure(proto, batches)
            _render(report)
            _note_dropped(batches)
            save_onnx(report.model, output)
        else:
            import torch

            from bnfold.inputspec import example_inputs

            if loaded.kind == "torchscript":
                raise UnsupportedModelError(
                    f"{model} is TorchScript, whose BatchNorms cannot be observed; pass a .pt2 "
                    "ExportedProgram, a factory or a reference model name"
                )
            example = example_inputs(loaded, input_shape=input_shape, required=False)
            target = loaded.model
            module = target.module() if isinstance(target, torch.export.ExportedProgram) else target
            dtype = next((p.dtype for p in module.parameters()), torch.float32)
            batches = _fit_fixed_batch(target, data, batches, batch_size)
            report = measure(module, _Cast(batches, dtype))
            _render(report)
            _note_dropped(batches)
            if example is None:
                from bnfold.recalib.data import first_input

                first = next(iter(_Cast(batches, dtype)))
                example = (first_input(first),)
            _save_torch(report.model, example, output)
        console.print(f"wrote {output}")
        if json is not None:
            write_text(json, report.to_json() + "\n")
            console.print(f"wrote {json}")

    guarded(run)
