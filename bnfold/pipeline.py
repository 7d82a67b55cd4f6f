"""``bnfold.export``: the whole deployment path in one call.

    load -> [recalibrate] -> fold (torch) -> ONNX export -> fold (ONNX) -> verify -> write

Why fold twice: the torch fold keeps the PyTorch model exact and traceable to its state_dict;
the ONNX fold then catches what only the exported graph shows (BNs the exporter decomposed or
that a functional call hid), and reports on the file that actually ships. Verification compares
the written ONNX model, run by onnxruntime as deployed, against the *original* PyTorch model
run in float64: an independent reference, never a fold compared with a fold.

Nothing is written unless every step succeeds and verification passes; the model goes to a
temporary file first and is renamed into place (``bnfold.atomic``).
"""

from __future__ import annotations

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

    @property
    def passed(self) -> bool:
        return self.verify_report is None or bool(self.verify_report.passed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "passed": self.passed,
            "batchnorms_left": self.batchnorms_left,
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


def _load(model: Any, example_inputs: Any, allow_pickle: bool) -> tuple[Any, Any, str]:
    """Resolve ``model`` (a registry name, a file, or an in-memory model) and its inputs."""
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        if name.lower().endswith(".onnx"):
            raise BadInputError(
                f"{name} is already ONNX; use `bnfold fold` to fold it, `bnfold export` takes "
                "a PyTorch model"
            )
        from bnfold.torchfold.load import load_torch

        loaded, loaded_inputs = load_torch(name, allow_pickle=allow_pickle)
        return loaded, example_inputs if example_inputs is not None else loaded_inputs, name
    return model, example_inputs, type(model).__name__


def _export_onnx(model: Any, inputs: tuple[Any, ...], path: Path, opset: int | None) -> None:
    """torch.onnx.export with a dynamic batch dimension on every input."""
    import torch

    exported = model if isinstance(model, torch.export.ExportedProgram) else None
    dynamic = None
    if exported is None:
        batch = torch.export.Dim("batch", min=1)
        dynamic = tuple({0: batch} if getattr(x, "dim", lambda: 0)() > 0 else None for x in inputs)
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
                external_data=False,
                verbose=False,
            )
        except Exception as e:  # the exporter raises many types; all mean "cannot export"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsupportedModelError(f"torch.onnx.export failed: {first}") from e
        finally:
            registration_log.setLevel(level)


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
) -> ExportResult:
    """Recalibrate (optionally), fold, export to ONNX, fold again, verify, write.

    Args:
        model: a name from ``bnfold.models`` (default ``resnet-mini``), a ``.pt2``
            ExportedProgram or other file ``load_torch`` accepts, or an ``nn.Module`` /
            ``ExportedProgram``.
        output: the ``.onnx`` file to write (default ``bnfold-out/<name>.onnx``).
        example_inputs: inputs for capture, export and verification (required for an
            in-memory module; files and registry names bring their own).
        data: a data loader/iterable to recalibrate BatchNorm statistics on before folding.
        num_batches: budget for recalibration.
        direction: fold direction, as in :func:`bnfold.fold`.
        verify: compare the written model with the original in float64 via onnxruntime.
        providers: execution providers to verify on (``cpu``, ``cuda``, or onnxruntime names).
        rtol, atol: verification tolerances (default: derived from the dtype).
        opset: ONNX opset for the exporter (default: the exporter's).
        allow_pickle: allow loading pickled whole-model files (runs arbitrary code).
        progress: show progress bars.

    Returns:
        An :class:`ExportResult`.

    Raises:
        VerificationError: the folded model does not match the original; nothing is written.
    """
    import torch

    from bnfold.onnx_io import load_onnx, save_onnx
    from bnfold.onnxfold import fold_onnx
    from bnfold.torchfold import fold_torch

    if verify:
        _require_providers(providers)
    loaded, inputs, name = _load(model, example_inputs, allow_pickle)
    if inputs is None:
        raise BadInputError("example_inputs are required to export an in-memory model")
    inputs = _as_tuple(inputs)
    stem = Path(name).stem if isinstance(model, (str, os.PathLike)) else name.lower()
    out = Path(output) if output is not None else DEFAULT_OUTPUT_DIR / f"{stem}.onnx"
    if output is None:
        out.parent.mkdir(parents=True, exist_ok=True)
    sources = (Path(model),) if isinstance(model, (str, os.PathLike)) else ()
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
    folded, torch_report = fold_torch(loaded, inputs, direction=direction)

    with tempfile.TemporaryDirectory(prefix="bnfold-export-") as tmp:
        raw = Path(tmp) / "exported.onnx"
        _export_onnx(folded, inputs, raw, opset)
        onnx_model, onnx_report = fold_onnx(load_onnx(raw), direction=direction, inplace=True)

    left = sum(1 for n in onnx_model.graph.node if n.op_type == "BatchNormalization")
    result = ExportResult(
        output=None,
        torch_report=torch_report,
        onnx_report=onnx_report,
        recalibration=recalibration,
        batchnorms_left=left,
    )
    if verify:
        from bnfold.verification import verify as run_verify

        result.verify_report = run_verify(
            reference,
            onnx_model,
            inputs=inputs,
            providers=providers,
            rtol=rtol,
            atol=atol,
            progress=progress,
        )
        # the proto being checked is what gets written: name it by its destination
        result.verify_report.candidate = f"{out} (as written)"
        if not result.verify_report.passed:
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
