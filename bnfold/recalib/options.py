"""The settings of one recalibration run, validated once and shared by both drivers.

:func:`bnfold.recalibrate` documents every field; the drivers receive one :class:`Options`
instead of repeating its keyword list, so a new setting is added in one place.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bnfold.errors import BadInputError
from bnfold.recalib.data import ForwardFn, Replay
from bnfold.recalib.stats import ESTIMATORS

__all__ = ["MODES", "Options"]

MODES: tuple[str, ...] = ("population", "batch")


@dataclass(frozen=True)
class Options:
    """What :func:`bnfold.recalibrate` was asked to do (see there for each field)."""

    num_samples: int | None = None
    num_batches: int | None = None
    forward_fn: ForwardFn | None = None
    mode: str = "population"
    estimator: str = "exact"
    device: Any = None
    progress: bool = True
    inplace: bool = True
    check_finite: bool = True
    providers: list[str] | None = None
    data_cache_mb: float = 1024.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BadInputError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if self.estimator not in ESTIMATORS:
            raise BadInputError(
                f"unknown estimator {self.estimator!r}; choose one of: {', '.join(ESTIMATORS)}"
            )
        if not 0 <= self.data_cache_mb < float("inf"):  # also refuses NaN
            raise BadInputError(
                f"data_cache_mb must be a finite number >= 0, got {self.data_cache_mb}"
            )
        for name in ("num_samples", "num_batches"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise BadInputError(f"{name} must be positive, got {value}")

    def replayable(self, data: Iterable[Any]) -> Iterable[Any]:
        """``data`` for a multi-pass run: within the budget, its batches replayed from memory."""
        return Replay(
            data,
            int(self.data_cache_mb * 2**20),
            num_samples=self.num_samples,
            num_batches=self.num_batches,
        )
