"""Verification: prove that a folded model computes what the original computes.

The logic lives in named modules: :mod:`bnfold.verification.check` (``verify``),
:mod:`~bnfold.verification.compare` (error statistics and the pass rule),
:mod:`~bnfold.verification.inputs` (input specs and batches),
:mod:`~bnfold.verification.runners` (onnxruntime and torch runners),
:mod:`~bnfold.verification.localize` (which fold broke) and
:mod:`~bnfold.verification.report`.
"""

from bnfold.verification.check import verify
from bnfold.verification.compare import OutputStats
from bnfold.verification.report import Localisation, ProviderResult, VerifyReport

__all__ = ["verify", "VerifyReport", "ProviderResult", "Localisation", "OutputStats"]
