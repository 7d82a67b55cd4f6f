"""Compare a candidate's outputs with a reference's: error statistics and a pass rule.

The pass rule is numpy ``allclose`` element-wise: ``|a - b| <= atol + rtol * |b|`` with ``a``
the candidate and ``b`` the reference, NaN equal to NaN, an infinity equal only to the same
infinity. Its defaults come from the candidate's dtype, because that dtype alone decides how
much a correct fold may change a result (weights rounded once, sums accumulated in another
order):

=========  ========  =====================================
dtype      rtol      atol
=========  ========  =====================================
float64    1e-10     1e-11 x max|reference of the output|
float32    2e-5      2e-6  x max|reference of the output|
float16    1e-2      1e-3  x max|reference of the output|
bfloat16   5e-2      1e-2  x max|reference of the output|
integer    0         0 (exact)
bool       0         0 (exact)
=========  ========  =====================================

The float32 row sits between what folding does and what breaking a fold does, measured on
the reference models (``bnfold.models``, exported to ONNX, folded, 4 random batches): a
correct fold needs ``rtol = 10 x atol/max`` of at most ~1e-6 (ResNet-50-sized: ~4e-6), while
scaling any single folded weight by 1 + 1e-3 needs at least ~5e-5 to pass. The float16 and
bfloat16 rows are about ten units in the last place of their own precision (2^-10 and 2^-7).

The default ``atol`` is relative to the output's largest reference magnitude since the
rounding error of a dot product scales with its terms, not with its (possibly cancelled)
result: an output element near zero between large ones carries the error of its large terms.
An ``atol`` that the user gives is absolute, as in numpy. Both can be set for every output or
per output name.

Statistics (over all batches): max abs, max rel (``|a-b| / |b|``, ``inf`` where ``b == 0 != a``),
the largest ULP distance measured in the candidate's dtype (the reference is rounded to it
first), cosine similarity, SQNR in dB (``10 log10(sum b^2 / sum (a-b)^2)``, ``inf`` when equal)
and the 50th/99th percentiles and the maximum of the abs error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from bnfold.errors import BadInputError

if TYPE_CHECKING:
    from bnfold.verification.floor import FloorVerdict

__all__ = [
    "DEFAULT_TOLERANCES",
    "Tolerance",
    "OutputStats",
    "Accumulator",
    "default_tolerance",
    "resolve_tolerance",
    "ulp_distance",
    "compare_arrays",
]

#: dtype name -> (rtol, atol relative to max |reference|).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-11),
    "float32": (2e-5, 2e-6),
    "float16": (1e-2, 1e-3),
    "bfloat16": (5e-2, 1e-2),
}

ToleranceArg = float | Mapping[str, float] | None


@dataclass(frozen=True)
class Tolerance:
    """The pass rule of one output.

    Attributes:
        rtol: relative tolerance.
        atol: absolute tolerance, or None while it is still the default.
        atol_scale: the default atol as a fraction of max |reference| (used when atol is None).
    """

    rtol: float
    atol: float | None
    atol_scale: float = 0.0

    def absolute(self, ref_max: float) -> float:
        """The atol that applies, given the output's largest reference magnitude."""
        if self.atol is not None:
            return self.atol
        return self.atol_scale * ref_max


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def default_tolerance(dtype: np.dtype) -> Tolerance:
    """The default pass rule for a candidate output of ``dtype`` (see the module table)."""
    dtype = np.dtype(dtype)
    if not _is_float(dtype):
        return Tolerance(0.0, 0.0)
    rtol, scale = DEFAULT_TOLERANCES.get(dtype.name, DEFAULT_TOLERANCES["float32"])
    return Tolerance(rtol, None, scale)


def _pick(arg: ToleranceArg, output: str, what: str) -> float | None:
    if arg is None:
        return None
    value = arg.get(output, arg.get("*")) if isinstance(arg, Mapping) else arg
    if value is None:
        return None
    value = float(value)
    if not value >= 0 or math.isinf(value):
        raise BadInputError(f"{what} for output {output!r} must be a finite number >= 0")
    return value


def resolve_tolerance(
    output: str, dtype: np.dtype, rtol: ToleranceArg = None, atol: ToleranceArg = None
) -> Tolerance:
    """The pass rule of ``output``: user values (global float, or by name; ``"*"`` for the
    rest) over the dtype default."""
    base = default_tolerance(dtype)
    r = _pick(rtol, output, "rtol")
    a = _pick(atol, output, "atol")
    return Tolerance(
        base.rtol if r is None else r, a if a is not None else base.atol, base.atol_scale
    )


def _ordered_ints(x: np.ndarray) -> np.ndarray:
    """Map floats to int64 so that adjacent representable values differ by 1."""
    bits_per = x.dtype.itemsize * 8
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize]
    bits = np.ascontiguousarray(x).view(uint).astype(np.uint64)
    sign = np.uint64(1) << np.uint64(bits_per - 1)
    magnitude = (bits & (sign - np.uint64(1))).astype(np.int64)
    return np.where((bits & sign) != 0, -magnitude, magnitude)


def ulp_distance(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Elementwise distance in units in the last place of the candidate's float dtype.

    The reference is rounded to the candidate's dtype first (a float64 reference measured in
    float32 ULPs). NaN pairs count 0; a NaN against a number counts as the largest distance.
    """
    dtype = candidate.dtype
    ref = np.asarray(reference)
    if ref.dtype != dtype:
        ref = ref.astype(np.float64).astype(dtype) if dtype.name != "bfloat16" else _to_bf16(ref)
    ia = _ordered_ints(candidate)
    ib = _ordered_ints(ref)
    # Same sign: the int64 difference is exact. Opposite signs: the distance can pass int64's
    # range (float64), and is then far too large for its last digits to matter.
    same_sign = (ia >= 0) == (ib >= 0)
    exact = np.abs(np.where(same_sign, ia - ib, 0)).astype(np.float64)
    across = np.abs(ia.astype(np.float64)) + np.abs(ib.astype(np.float64))
    dist = np.where(same_sign, exact, across)
    a_nan = np.isnan(candidate.astype(np.float32) if dtype.name == "bfloat16" else candidate)
    b_nan = np.isnan(ref.astype(np.float32) if dtype.name == "bfloat16" else ref)
    dist[a_nan & b_nan] = 0
    dist[a_nan ^ b_nan] = np.inf
    return dist


def _to_bf16(x: np.ndarray) -> np.ndarray:
    from bnfold.foldmath import round_to

    return round_to(np.asarray(x, dtype=np.float64), "bfloat16")


@dataclass
class OutputStats:
    """Error statistics of one output on one provider, over every batch compared."""

    output: str
    dtype: str
    shape: tuple[int, ...]
    elements: int
    mismatches: int
    max_abs: float
    max_rel: float
    max_ulp: float
    cosine: float
    sqnr_db: float
    p50_abs: float
    p99_abs: float
    rtol: float
    atol: float
    passed: bool
    ref_max_abs: float = 0.0
    #: the verdict against the unfolded model's own error (:mod:`bnfold.verification.floor`)
    floor: FloorVerdict | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "output": self.output,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "elements": self.elements,
            "mismatches": self.mismatches,
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "max_ulp": _json_float(self.max_ulp),
            "cosine": _json_float(self.cosine),
            "sqnr_db": _json_float(self.sqnr_db),
            "p50_abs": _json_float(self.p50_abs),
            "p99_abs": _json_float(self.p99_abs),
            "rtol": self.rtol,
            "atol": self.atol,
            "passed": self.passed,
            "ref_max_abs": _json_float(self.ref_max_abs),
            "floor": self.floor.to_dict() if self.floor is not None else None,
        }


def _json_float(x: float) -> float | str:
    """JSON has no inf/NaN: write them as strings, finite values as numbers."""
    return x if math.isfinite(x) else str(x)


@dataclass
class Accumulator:
    """Streams batches of one output and yields :class:`OutputStats` at the end.

    The pass rule's default atol depends on the largest reference magnitude over all batches,
    so element verdicts are decided at the end from the kept errors (outputs are small next
    to activations; intermediate tensors are compared batch by batch with
    :func:`compare_arrays` instead).
    """

    output: str
    tolerance: Tolerance
    dtype: np.dtype | None = None
    shape: tuple[int, ...] = ()
    _abs: list[np.ndarray] = field(default_factory=list)
    _ref_abs: list[np.ndarray] = field(default_factory=list)
    _special: int = 0
    _max_rel: float = 0.0
    _max_ulp: float = 0.0
    _dot: float = 0.0
    _na: float = 0.0
    _nb: float = 0.0
    _err2: float = 0.0
    _elements: int = 0

    def add(self, candidate: np.ndarray, reference: np.ndarray) -> None:
        """Add one batch of this output."""
        if candidate.shape != reference.shape:
            raise BadInputError(
                f"output {self.output!r}: candidate shape {candidate.shape} differs from the "
                f"reference shape {reference.shape}"
            )
        self.dtype = candidate.dtype
        self.shape = tuple(candidate.shape)
        a = candidate.astype(np.float64).ravel()
        b = np.asarray(reference).astype(np.float64).ravel()
        self._elements += a.size
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        finite = np.isfinite(a) & np.isfinite(b)
        # Non-finite values must match exactly; they are left out of the error statistics.
        self._special += int(np.count_nonzero(~finite & ~same))
        a_f, b_f = a[finite], b[finite]
        err = np.abs(a_f - b_f)
        self._abs.append(err)
        self._ref_abs.append(np.abs(b_f))
        if err.size:
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(err == 0, 0.0, err / np.abs(b_f))
            self._max_rel = max(self._max_rel, float(rel.max()))
        if _is_float(candidate.dtype):
            ulps = ulp_distance(candidate.ravel(), np.asarray(reference).ravel())
            if ulps.size:
                self._max_ulp = max(self._max_ulp, float(ulps.max()))
        elif err.size:
            self._max_ulp = max(self._max_ulp, float(err.max()))
        self._dot += float(a_f @ b_f)
        self._na += float(a_f @ a_f)
        self._nb += float(b_f @ b_f)
        self._err2 += float(err @ err)
        if self._special:
            self._max_rel = math.inf

    def result(self) -> OutputStats:
        err = np.concatenate(self._abs) if self._abs else np.zeros(0)
        ref_abs = np.concatenate(self._ref_abs) if self._ref_abs else np.zeros(0)
        ref_max = float(ref_abs.max()) if ref_abs.size else 0.0
        atol = self.tolerance.absolute(ref_max)
        mismatches = self._special + int(
            np.count_nonzero(err > atol + self.tolerance.rtol * ref_abs)
        )
        if self._na == 0 and self._nb == 0:
            cosine = 1.0
        elif self._na == 0 or self._nb == 0:
            cosine = 0.0
        else:
            cosine = self._dot / math.sqrt(self._na * self._nb)
        if self._err2 == 0:
            sqnr = math.inf
        elif self._nb == 0:
            sqnr = -math.inf
        else:
            sqnr = 10.0 * math.log10(self._nb / self._err2)
        p50, p99 = (float(q) for q in np.quantile(err, [0.5, 0.99])) if err.size else (0.0, 0.0)
        max_abs = math.inf if self._special else (float(err.max()) if err.size else 0.0)
        return OutputStats(
            output=self.output,
            dtype=self.dtype.name if self.dtype is not None else "?",
            shape=self.shape,
            elements=self._elements,
            mismatches=mismatches,
            max_abs=max_abs,
            max_rel=self._max_rel,
            max_ulp=self._max_ulp,
            cosine=cosine,
            sqnr_db=sqnr,
            p50_abs=p50,
            p99_abs=p99,
            rtol=self.tolerance.rtol,
            atol=atol,
            passed=mismatches == 0,
            ref_max_abs=ref_max,
        )


def compare_arrays(
    candidate: np.ndarray, reference: np.ndarray, tolerance: Tolerance, name: str = "tensor"
) -> OutputStats:
    """Statistics and verdict of one pair of arrays (one batch, one tensor)."""
    acc = Accumulator(name, tolerance)
    acc.add(candidate, reference)
    return acc.result()
