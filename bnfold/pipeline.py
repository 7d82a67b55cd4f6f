"""``bnfold.export``: the whole deployment path in one call.

    load -> [recalibrate] -> fold (torch) -> ONNX export -> fold (ONNX) -> verify -> write

The model comes from :mod:`bnfold.sources` (a factory and its weights, ``timm:``/
``torchvision:`` names, ``.pt2``, reference models) and its example inputs from
:mod:`bnfold.inputspec` (``input_shape``, ``shapes``, ``dtype``, or what the model declares).

Why fold twice: the torch fold keeps the PyTorch model exact and traceable to its state_dict;
the ONNX fold then catches what only the exported graph shows (BNs the exporter decomposed or
that a functional call hid), and reports on the file that actually ships. Verification compares
the written ONNX model, run by onnxruntime as deployed, against the *original* PyTorch model
run in float64: an independent reference, never a fold compared with a fold.

The verdict is about the fold: the *unfolded* model is exported the same way and its error
against the same reference, on the same inputs and providers, is the noise floor
(:mod:`bnfold.verification.floor`). The folded file passes when its error stays within a small
factor of that floor; an unfolded export that is itself far off is reported as an exporter
problem and nothing is written. PyTorch's exporter fuses many Conv -> BN pairs itself; the
result's notes say so when it did.

``dynamic_batch`` keeps the batch axis symbolic in the file and verifies it at two batch
sizes (the example's and one more). ``fp16`` folds in float64 and rounds every parameter
once to float16 (never float64 -> float32 -> float16); the unfolded baseline is rounded the
same way, and the comparison is against the float64 model with float16 inputs on both sides.
Models over 2 GB are exported, verified and written with external data (``<output>.data``).

Nothing is written unless every step succeeds and verification passes; the model goes to a
temporary file first and is renamed into place (``bnfold.atomic``).
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bnfold.atomic import check_writable, write_text
from bnfold.errors import BadInputError, UnsupportedModelError
from bnfold.report import FoldReport

__all__ = ["ExportResult", "export"]

DEFAULT_OUTPUT_DIR = Path("bnfold-out")


@dataclass
class ExportResult:
    """What :func:`export` did.

    Attributes:
        output: the ONNX file written (None when verification failed and nothing was written).
        torch_report: decisions of the PyTorch fold.
        onnx_report: decisions of the ONNX fold on the exported graph.
        verify_report: the equivalence check (None when ``verify=False``).
        recalibration: the recalibration report, when data was given.
        batchnorms_left: BatchNormalization nodes in the written model.
    """

    output: Path | None
    torch_report: FoldReport
    onnx_report: FoldReport
    verify_report: Any = None
    recalibration: Any = None
    batchnorms_left: int = 0
    notes: list[str] = field(default_factory=list)
    exporter_fused: int = 0

    @property
    def exporter_problem(self) -> bool:
        """The unfolded export itself differs from PyTorch: not the fold's failure."""
        return self.verify_report is not None and bool(self.verify_report.exporter_problems)

    @property
    def passed(self) -> bool:
        if self.verify_report is None:
            return True
        return bool(self.verify_report.passed) and not self.exporter_problem

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "passed": self.passed,
            "batchnorms_left": self.batchnorms_left,
            "exporter_fused_batchnorms": self.exporter_fused,
            "exporter_problem": self.exporter_problem,
            "torch_fold": self.torch_report.to_dict(),
            "onnx_fold": self.onnx_report.to_dict(),
            "verify": self.verify_report.to_dict() if self.verify_report is not None else None,
            "recalibration": (
                self.recalibration.to_dict() if self.recalibration is not None else None
            ),
            "notes": self.notes,
        }


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _load(
    model: Any, example_inputs: Any, spec: dict[str, Any]
) -> tuple[Any, tuple[Any, ...], str, tuple[Path, ...]]:
    """Resolve ``model`` (a source string or an in-memory model) and its example inputs.

    Returns the model, its inputs, a name for the default output, and the files read.
    """
    from bnfold.inputspec import example_inputs as build_inputs
    from bnfold.sources import LoadedSource, ModelSpec, load_source
    from bnfold.torchfold.load import require_foldable

    if isinstance(model, (str, os.PathLike)):
        loaded = load_source(
            ModelSpec(
                str(model),
                weights=spec["weights"],
                factory_args=dict(spec["factory_args"] or {}),
                allow_pickle=spec["allow_pickle"],
            ),
            onnx_ok=False,
        )
        require_foldable(loaded.model, str(model))
    else:
        if spec["weights"] is not None or spec["factory_args"]:
            raise BadInputError(
                "weights= and factory_args= apply to a model source string (e.g. "
                "'pkg.module:factory'); load them into an in-memory model yourself"
            )
        loaded = LoadedSource(model, "module", type(model).__name__.lower())
    files = loaded.files + ((Path(spec["weights"]),) if spec["weights"] else ())
    if example_inputs is not None:
        return loaded.model, _as_tuple(example_inputs), loaded.label, files
    given = spec["input_shape"] is not None or bool(spec["shapes"])
    if not given and not isinstance(model, (str, os.PathLike)):
        raise BadInputError(
            "example_inputs (or input_shape=) are required to export an in-memory model"
        )
    inputs = build_inputs(
        loaded,
        input_shape=spec["input_shape"],
        shapes=spec["shapes"],
        dtype=spec["dtype"],
        required=True,
    )
    assert inputs is not None  # required=True raises instead
    return loaded.model, inputs, loaded.label, files


def _batch_of(inputs: tuple[Any, ...]) -> int | None:
    """The common leading size of the tensor inputs (None when there is none)."""
    sizes = {x.shape[0] for x in inputs if getattr(x, "dim", lambda: 0)() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def _grow_batch(inputs: tuple[Any, ...], batch: int, seed: int) -> tuple[Any, ...]:
    """The inputs at another batch size: fresh values for floats, repeats for the rest."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            out.append(x)
        elif x.is_floating_point():
            shape = (batch, *x.shape[1:])
            out.append(torch.randn(shape, generator=gen, dtype=torch.float32).to(x.dtype))
        else:
            reps = -(-batch // x.shape[0])
            out.append(x.repeat(reps, *([1] * (x.dim() - 1)))[:batch])
    return tuple(out)


def _param_bytes(model: Any) -> int:
    import torch

    target = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    tensors = [*target.parameters(), *target.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _export_onnx(
    model: Any, inputs: tuple[Any, ...], path: Path, opset: int | None, dynamic_batch: bool
) -> None:
    """torch.onnx.export, with a symbolic batch dimension on every input when asked."""
    import torch

    from bnfold.onnx_io import PROTOBUF_LIMIT

    exported = model if isinstance(model, torch.export.ExportedProgram) else None
    dynamic = None
    if exported is None and dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic = tuple({0: batch} if getattr(x, "dim", lambda: 0)() > 0 else None for x in inputs)
        if _batch_of(inputs) == 1:
            # torch.export specialises a size-1 dim to the constant 1: trace at batch 2.
            inputs = _grow_batch(inputs, 2, seed=0)
    # Close to protobuf's 2 GiB limit the exporter must write tensors beside the model.
    external = _param_bytes(model) > PROTOBUF_LIMIT // 2
    # The exporter logs a warning per missing optional library (torchvision ops); not ours.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                exported if exported is not None else model,
                inputs,
                str(path),
                dynamo=True,
                dynamic_shapes=dynamic,
                opset_version=opset,
                external_data=external,
                verbose=False,
            )
        except Exception as e:  # the exporter raises many types; all mean "cannot export"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsupportedModelError(f"torch.onnx.export failed: {first}") from e
        finally:
            registration_log.setLevel(level)


def _round_once_to_half(module: Any) -> Any:
    """Every floating parameter and buffer rounded once, to nearest, into float16.

    ``Tensor.half()`` of a float64 tensor goes through float32 and can round twice; numpy's
    float64 -> float16 cast (:func:`bnfold.foldmath.round_to`) rounds once.
    """
    import torch

    from bnfold.foldmath import round_to

    def convert(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        values = t.detach().cpu().to(torch.float64).numpy()
        return torch.from_numpy(round_to(values, "float16")).to(t.device)

    return module._apply(convert)


def _half_inputs(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    import torch

    return tuple(
        x.half() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs
    )


def _double_inputs(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    import torch

    return tuple(
        x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs
    )


def _large(model: Any) -> bool:
    """Whether an ONNX model is too large to hand to onnxruntime as one serialised message."""
    from bnfold.onnx_io import PROTOBUF_LIMIT

    size = sum(len(t.raw_data) for t in model.graph.initializer)
    return size > PROTOBUF_LIMIT // 2


def _runs(model: Any, inputs: tuple[Any, ...]) -> bool:
    """Whether onnxruntime (CPU) runs ``model`` (a ModelProto or path) on ``inputs``."""
    import numpy as np
    import onnxruntime as ort

    arg = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    try:
        session = ort.InferenceSession(arg, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        feed = {n: np.asarray(x.detach().cpu().numpy()) for n, x in zip(names, inputs, strict=True)}
        session.run(None, feed)
    except Exception:  # onnxruntime raises its own types; any failure means "does not run"
        return False
    return True


def _symbolic_batch(model: Any) -> bool:
    """Whether every input of rank > 0 has a symbolic leading dim (a ``.pt2`` keeps its own
    dynamic shapes, which may fix the batch)."""
    inputs = [i.type.tensor_type.shape.dim for i in model.graph.input]
    leading = [dims[0] for dims in inputs if len(dims) > 0]
    return bool(leading) and all(d.dim_param and not d.dim_value for d in leading)


def _bn_nodes(model: Any) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "BatchNormalization")


def export(
    model: Any = "resnet-mini",
    output: str | os.PathLike[str] | None = None,
    *,
    example_inputs: Any = None,
    data: Any = None,
    num_batches: int | None = None,
    direction: Literal["backward", "forward", "both"] = "both",
    verify: bool = True,
    providers: tuple[str, ...] = ("cpu",),
    rtol: float | None = None,
    atol: float | None = None,
    opset: int | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
    weights: str | os.PathLike[str] | None = None,
    factory_args: dict[str, Any] | None = None,
    input_shape: Any = None,
    shapes: Any = None,
    dtype: Any = None,
    dynamic_batch: bool = True,
    fp16: bool = False,
) -> ExportResult:
    """Recalibrate (optionally), fold, export to ONNX, fold again, verify, write.

    Args:
        model: a model source (:mod:`bnfold.sources`: ``package.module:factory``,
            ``timm:NAME``, ``torchvision:NAME``, a ``.pt2`` or other file ``load_torch``
            accepts, a ``bnfold.models`` name; default ``resnet-mini``), or an ``nn.Module`` /
            ``ExportedProgram``.
        output: the ``.onnx`` file to write (default ``bnfold-out/<name>.onnx``).
        example_inputs: inputs for capture, export and verification (default: built from
            ``input_shape``/``shapes``/``dtype``, or what the source carries or declares).
        data: a data loader/iterable to recalibrate BatchNorm statistics on before folding.
        num_batches: budget for recalibration.
        direction: fold direction, as in :func:`bnfold.fold`.
        verify: compare the written model with the original in float64 via onnxruntime.
        providers: execution providers to verify on (``cpu``, ``cuda``, or onnxruntime names).
        rtol, atol: fixed verification tolerances, which replace the noise-floor rule.
        opset: ONNX opset for the exporter (default: the exporter's).
        allow_pickle: allow loading pickled whole-model files (runs arbitrary code).
        progress: show progress bars.
        weights: a state_dict file (``.pt``/``.pth``/``.safetensors``) for a factory source.
        factory_args: keyword arguments for the factory.
        input_shape: the single input's shape, ``(1, 3, 224, 224)`` or ``"1x3x224x224"``.
        shapes: one shape per input by ``forward`` parameter name.
        dtype: the example inputs' dtype (default: the model's parameter dtype).
        dynamic_batch: keep the batch axis symbolic in the file (verified at two sizes).
        fp16: fold in float64 and write float16 parameters, each rounded once.

    Returns:
        An :class:`ExportResult`.

    Raises:
        BadInputError: an unusable source, weights, shape or option.
        UnsupportedModelError: a model that cannot be captured or exported.
    """
    import torch

    from bnfold.onnx_io import load_onnx, save_onnx
    from bnfold.onnxfold import fold_onnx
    from bnfold.torchfold import fold_torch

    if verify:
        _require_providers(providers)
    spec = {
        "weights": None if weights is None else str(weights),
        "factory_args": factory_args,
        "allow_pickle": allow_pickle,
        "input_shape": input_shape,
        "shapes": shapes,
        "dtype": dtype,
    }
    loaded, inputs, stem, sources = _load(model, example_inputs, spec)
    out = Path(output) if output is not None else DEFAULT_OUTPUT_DIR / f"{Path(stem).stem}.onnx"
    if output is None:
        out.parent.mkdir(parents=True, exist_ok=True)
    check_writable(out, inputs=sources)

    recalibration = None
    if data is not None:
        from bnfold.recalib import recalibrate

        if isinstance(loaded, torch.export.ExportedProgram):
            loaded = loaded.module()
        recalibration = recalibrate(
            loaded, data, num_batches=num_batches, progress=progress, inplace=False
        )
        if getattr(recalibration, "model", None) is not None:
            loaded = recalibration.model

    reference = loaded.module() if isinstance(loaded, torch.export.ExportedProgram) else loaded
    if fp16:
        # the fold's arithmetic is float64 throughout; each parameter is rounded once at the end
        folded64, torch_report = fold_torch(
            copy.deepcopy(reference).double(), _double_inputs(inputs), direction=direction
        )
        if isinstance(folded64, torch.export.ExportedProgram):
            folded64 = folded64.module()
        folded = _round_once_to_half(folded64)
        baseline_model = _round_once_to_half(copy.deepcopy(reference))
        inputs = _half_inputs(inputs)
    else:
        folded, torch_report = fold_torch(loaded, inputs, direction=direction)
        baseline_model = loaded

    with tempfile.TemporaryDirectory(prefix="bnfold-export-") as tmp:
        raw = Path(tmp) / "exported.onnx"
        _export_onnx(folded, inputs, raw, opset, dynamic_batch)
        onnx_model, onnx_report = fold_onnx(load_onnx(raw), direction=direction, inplace=True)
        baseline = None
        if verify:
            raw_base = Path(tmp) / "unfolded.onnx"
            _export_onnx(baseline_model, inputs, raw_base, opset, dynamic_batch)
            baseline = load_onnx(raw_base)

        left = _bn_nodes(onnx_model)
        result = ExportResult(
            output=None,
            torch_report=torch_report,
            onnx_report=onnx_report,
            recalibration=recalibration,
            batchnorms_left=left,
        )
        if baseline is not None:
            in_torch = len(torch_report.decisions)
            result.exporter_fused = max(0, in_torch - _bn_nodes(baseline))
            if result.exporter_fused:
                result.notes.append(
                    f"torch.onnx.export fused {result.exporter_fused} of {in_torch} "
                    "BatchNorm(s) itself in the unfolded export; the noise floor includes its "
                    "fusion"
                )
        if verify:
            from bnfold.verification import verify as run_verify

            candidate_arg: Any = onnx_model
            baseline_arg: Any = baseline
            if _large(onnx_model):
                # onnxruntime takes a model over 2 GB only as a file with external data
                candidate_arg = save_onnx(onnx_model, Path(tmp) / "folded.onnx")
                if baseline is not None:
                    baseline_arg = save_onnx(baseline, Path(tmp) / "baseline.onnx")
            batch = _batch_of(inputs)
            check_inputs: dict[str, Any] = {"inputs": inputs}
            if dynamic_batch and batch is not None and _symbolic_batch(onnx_model):
                second = _grow_batch(inputs, batch + 1, seed=1)
                if baseline_arg is None or _runs(baseline_arg, second):
                    check_inputs = {"data": [inputs, second]}
                    result.notes.append(f"verified at batch sizes {batch} and {batch + 1}")
                else:
                    result.notes.append(
                        f"the unfolded export does not run at batch {batch + 1} (the exporter "
                        f"fixed a batch-dependent shape in it): verified at batch {batch} only"
                    )
            result.verify_report = run_verify(
                reference,
                candidate_arg,
                baseline=baseline_arg,
                providers=providers,
                rtol=rtol,
                atol=atol,
                progress=progress,
                **check_inputs,
            )
            # the proto being checked is what gets written: name it by its destination
            result.verify_report.candidate = f"{out} (as written)"
            if result.verify_report.baseline is not None:
                result.verify_report.baseline = "the unfolded model, exported the same way"
            if not result.passed:
                return result
        save_onnx(onnx_model, out)
    result.output = out
    return result


def _require_providers(providers: Sequence[str]) -> None:
    """Refuse, before any work, a provider this onnxruntime does not have (exit 3)."""
    from bnfold.errors import ProviderUnavailableError
    from bnfold.verification.runners import available_providers, ort_provider_name

    available = available_providers()
    missing = [p for p in providers if ort_provider_name(p) not in available]
    if missing:
        raise ProviderUnavailableError(
            f"requested provider(s) {', '.join(missing)} cannot run here; available providers: "
            f"{', '.join(available)} (CUDA needs the cuda extra: onnxruntime-gpu)"
        )


def write_report(result: ExportResult, path: str | os.PathLike[str]) -> None:
    """Write the export report as JSON, atomically."""
    import json

    write_text(path, json.dumps(result.to_dict(), indent=2))
