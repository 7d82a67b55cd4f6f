"""bnfold: exact BatchNorm folding, recalibration, verification and export.

Deployment pipelines import only from here::

    import bnfold
    folded, report = bnfold.fold(model, example_inputs)        # nn.Module / GraphModule / EP / ONNX
    stats = bnfold.recalibrate(model, loader)                  # exact population statistics
    result = bnfold.verify(original_onnx, folded_onnx)         # onnxruntime, per-output errors
    result = bnfold.export("resnet-mini", "m.onnx")            # load -> fold -> ONNX -> verify
    model, inputs = bnfold.load_model("pkg.nets:build", weights="w.pt", input_shape=(1, 3, 224, 224))

Heavy dependencies (torch, onnx, onnxruntime) are imported on first use, so ``import bnfold``
and ``bnfold --help`` stay instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bnfold.errors import (
    BadInputError,
    BnfoldError,
    ProviderUnavailableError,
    RecalibrationError,
    UnsupportedModelError,
    VerificationError,
)
from bnfold.report import FoldReport
from bnfold.sites import Direction, FoldDecision, SkipCode

__version__ = "0.1.0"

__all__ = [
    "fold",
    "recalibrate",
    "verify",
    "export",
    "load_model",
    "FoldReport",
    "FoldDecision",
    "Direction",
    "SkipCode",
    "RecalibrationReport",
    "VerifyReport",
    "ExportResult",
    "BnfoldError",
    "BadInputError",
    "UnsupportedModelError",
    "VerificationError",
    "ProviderUnavailableError",
    "RecalibrationError",
]

# public name -> module that defines it (imported lazily)
_LAZY = {
    "fold": "bnfold.api",
    "recalibrate": "bnfold.recalib",
    "RecalibrationReport": "bnfold.recalib",
    "verify": "bnfold.verification",
    "VerifyReport": "bnfold.verification",
    "export": "bnfold.pipeline",
    "ExportResult": "bnfold.pipeline",
    "load_model": "bnfold.sources",
}

if TYPE_CHECKING:
    from bnfold.api import fold
    from bnfold.pipeline import ExportResult, export
    from bnfold.recalib import RecalibrationReport, recalibrate
    from bnfold.sources import load_model
    from bnfold.verification import VerifyReport, verify


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
