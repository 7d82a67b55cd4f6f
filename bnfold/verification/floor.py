"""A verdict about the fold, not about two runtimes: the unfolded model's error is the floor.

A float32 ONNX model never reproduces a float64 PyTorch model exactly: the exporter rewrites
the graph (it fuses Conv -> BN itself), onnxruntime picks its own kernels and summation
orders. On real networks that noise alone can exceed a fixed tolerance (SQNR 86-109 dB, some
logits off by more than 2e-5 relative) although nothing was folded. So the folded model is
judged against the *unfolded* export of the same model, run on the same provider, on the
same inputs, against the same float64 reference:

    floor  = max |unfolded - reference|          (per output and provider)
    error  = max |folded   - reference|
    pass  <=> error <= FLOOR_FACTOR * floor + FLOOR_ULPS * ulp(max |reference|)

``FLOOR_FACTOR`` is 4: a correct fold changes the rounding of each folded weight once and the
order of a few sums, which moves the maximum error by a small factor either way (measured on
the reference models and torchvision/timm networks: folded/floor between about 0.5 and 2),
while a fold that is wrong by 1e-3 relative in one weight tensor is tens to thousands of
floors off. The ``FLOOR_ULPS`` term (4 units in the last place of the output's dtype at its
largest reference magnitude) keeps an exact-looking floor (0 for a tiny graph) from demanding
bit-identical outputs.

An unfolded export whose floor exceeds ``EXPORTER_FAR_OFF`` (1%) of the output's largest
reference magnitude does not compute what the PyTorch model computes: that is the
exporter's (or the runtime's) problem, reported as such, and not a failure of the fold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bnfold.verification.compare import OutputStats, _json_float

__all__ = [
    "FLOOR_FACTOR",
    "FLOOR_ULPS",
    "EXPORTER_FAR_OFF",
    "FloorVerdict",
    "floor_verdict",
    "ulp_at",
]

FLOOR_FACTOR = 4.0
FLOOR_ULPS = 4
EXPORTER_FAR_OFF = 1e-2


@dataclass(frozen=True)
class FloorVerdict:
    """The fold's verdict on one output and provider.

    Attributes:
        floor: max abs error of the unfolded model against the reference.
        error: max abs error of the folded model against the reference.
        factor: ``error / floor`` (0 when error is 0; inf when only the floor is 0).
        bound: the largest error that passes.
        passed: ``error <= bound``.
        exporter_problem: the unfolded model is itself far off (see the module docstring).
    """

    floor: float
    error: float
    factor: float
    bound: float
    passed: bool
    exporter_problem: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "floor": _json_float(self.floor),
            "error": _json_float(self.error),
            "factor": _json_float(self.factor),
            "bound": _json_float(self.bound),
            "allowed_factor": FLOOR_FACTOR,
            "passed": self.passed,
            "exporter_problem": self.exporter_problem,
        }


def ulp_at(value: float, dtype: str) -> float:
    """The spacing of ``dtype``'s grid at ``|value|`` (bfloat16: 8 significant bits)."""
    magnitude = abs(value)
    if dtype == "bfloat16":
        if magnitude == 0 or not math.isfinite(magnitude):
            return 2.0**-133
        return 2.0 ** (math.floor(math.log2(magnitude)) - 7)
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        np_dtype = np.dtype(np.float32)
    if not np.issubdtype(np_dtype, np.floating):
        return 0.0
    return float(np.spacing(np_dtype.type(magnitude)))


def floor_verdict(candidate: OutputStats, baseline: OutputStats) -> FloorVerdict:
    """Judge ``candidate`` (folded) by ``baseline`` (unfolded), both against one reference."""
    floor = baseline.max_abs
    error = candidate.max_abs
    if error == 0:
        factor = 0.0
    elif floor == 0:
        factor = math.inf
    else:
        factor = error / floor
    ref_max = max(candidate.ref_max_abs, baseline.ref_max_abs)
    bound = FLOOR_FACTOR * floor + FLOOR_ULPS * ulp_at(ref_max, candidate.dtype)
    exporter_problem = not floor <= EXPORTER_FAR_OFF * ref_max
    return FloorVerdict(
        floor=floor,
        error=error,
        factor=factor,
        bound=bound,
        passed=bool(error <= bound),
        exporter_problem=bool(exporter_problem),
    )
