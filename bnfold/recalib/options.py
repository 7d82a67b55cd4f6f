"""The settings of one recalibration run, validated once and shared by both drivers.

:func:`bnfold.recalibrate` documents every field; the drivers receive one :class:`Options`
instead of repeating its keyword list, so a new setting is added in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from bnfold.errors import BadInputError
from bnfold.recalib.data import ForwardFn, Replay
from bnfold.recalib.stats import ESTIMATORS

__all__ = ["MODES", "STRATEGIES", "Options"]

MODES: tuple[str, ...] = ("population", "batch")
#: how population mode runs its passes: "auto" keeps the activations between levels when the
#: model can be captured as a graph; "per-level" always makes one forward per level
STRATEGIES: tuple[str, ...] = ("auto", "per-level")


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
    spill_mb: float | None = None
    strategy: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BadInputError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if self.strategy not in STRATEGIES:
            raise BadInputError(
                f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}"
            )
        if self.estimator not in ESTIMATORS:
            raise BadInputError(
                f"unknown estimator {self.estimator!r}; choose one of: {', '.join(ESTIMATORS)}"
            )
        if not 0 <= self.data_cache_mb < float("inf"):  # also refuses NaN
            raise BadInputError(
                f"data_cache_mb must be a finite number >= 0, got {self.data_cache_mb}"
            )
        if self.spill_mb is not None and not 0 <= self.spill_mb < float("inf"):
            raise BadInputError(
                f"spill_mb must be a finite number >= 0 or None, got {self.spill_mb}"
            )
        for name in ("num_samples", "num_batches"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise BadInputError(f"{name} must be positive, got {value}")

    @property
    def cache_bytes(self) -> int:
        """The memory budget shared by the data cache and the kept frontier."""
        return int(self.data_cache_mb * 2**20)

    @property
    def spill_bytes(self) -> int | None:
        """The spill file limit (None: what the temporary directory has free)."""
        return None if self.spill_mb is None else int(self.spill_mb * 2**20)

    def replayable(
        self, data: Iterable[Any], started: Iterator[Any] | None = None
    ) -> Iterable[Any]:
        """``data`` for a multi-pass run: within the budget, its batches replayed from memory."""
        return Replay(
            data,
            self.cache_bytes,
            num_samples=self.num_samples,
            num_batches=self.num_batches,
            started=started,
        )
