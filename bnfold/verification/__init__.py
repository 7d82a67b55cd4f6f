"""``bnfold.verify``: prove that a folded model computes what the original computes.

The logic lives in named modules; this package only re-exports the public names:
:mod:`.check` (the verify driver), :mod:`.compare` (statistics and pass rules),
:mod:`.floor` (the verdict against the unfolded model's own error), :mod:`.inputs`, :mod:`.runners`, :mod:`.localize` and :mod:`.report`.
"""

from bnfold.verification.check import verify
from bnfold.verification.compare import OutputStats
from bnfold.verification.report import Localisation, ProviderResult, VerifyReport

__all__ = ["verify", "VerifyReport", "ProviderResult", "Localisation", "OutputStats"]
