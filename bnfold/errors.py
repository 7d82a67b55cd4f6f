"""The errors bnfold raises on purpose.

Every message is one line and says how to fix the problem; the CLI prints it as is and exits
non-zero, so users never see a traceback for bad input.
"""

from __future__ import annotations

__all__ = [
    "BnfoldError",
    "BadInputError",
    "UnsupportedModelError",
    "VerificationError",
    "ProviderUnavailableError",
    "RecalibrationError",
]


class BnfoldError(Exception):
    """Base class of every error bnfold raises deliberately."""


class BadInputError(BnfoldError, ValueError):
    """A file, argument or data source that bnfold cannot use as given."""


class UnsupportedModelError(BnfoldError):
    """A model that bnfold can read but cannot process (e.g. an untraceable module)."""


class VerificationError(BnfoldError):
    """A candidate model that does not compute what its reference computes."""


class ProviderUnavailableError(BnfoldError):
    """A requested onnxruntime execution provider that this machine cannot run."""


class RecalibrationError(BnfoldError):
    """Statistics that cannot be gathered (empty data, NaN/Inf activations, ...)."""
