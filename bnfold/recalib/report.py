"""What a recalibration did, per BatchNorm, as data (``to_dict``/``to_json``) and text."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BNStats", "RecalibrationReport"]


@dataclass
class BNStats:
    """The outcome for one BatchNorm.

    Attributes:
        name: module path (torch) or node name (ONNX).
        status: ``"updated"``; ``"unreached"`` (no batch ever reached it: left untouched);
            ``"no-running-stats"`` (a torch BN with ``track_running_stats=False``, which always
            normalises with batch statistics: nothing to store).
        channels: number of channels.
        samples: calls times batch size that reached it (a BN called at two sites counts both).
        elements: values per channel that entered the statistics.
        batches: calls that contributed.
        level: the pass that measured it (``mode="population"``; 1 in ``"batch"`` mode).
        old_mean_abs / new_mean_abs: mean over channels of ``|mean|``, before and after.
        old_var_mean / new_var_mean: mean over channels of the stored variance.
        max_rel_var_change: ``max |new - old| / old`` over channels of the stored variance.
        zero_variance_channels: channels whose every value was identical (variance 0); a fold
            divides by ``sqrt(var + eps)``, so these channels are dominated by ``eps``.
    """

    name: str
    status: str
    channels: int
    samples: int = 0
    elements: int = 0
    batches: int = 0
    level: int = 0
    old_mean_abs: float = 0.0
    new_mean_abs: float = 0.0
    old_var_mean: float = 0.0
    new_var_mean: float = 0.0
    max_rel_var_change: float = 0.0
    zero_variance_channels: list[int] = field(default_factory=list)


@dataclass
class RecalibrationReport:
    """The result of :func:`bnfold.recalibrate`.

    Attributes:
        model: the recalibrated model. For an ``nn.Module`` this is the caller's module itself
            (updated in place, see :func:`bnfold.recalibrate`) or its copy with
            ``inplace=False``; for an ExportedProgram the GraphModule that was updated; for
            ONNX a new ``onnx.ModelProto``. Not part of :meth:`to_dict`.
        framework: ``"torch"`` or ``"onnx"``.
        mode: ``"population"`` or ``"batch"`` (what upstream BNs used while measuring).
        estimator: ``"exact"`` or ``"batch-variance-mean"``.
        variance: what was stored as variance (``"unbiased"`` for both frameworks).
        batches: batches drawn from the data (on this rank).
        samples: samples drawn from the data (on this rank).
        passes: passes over the data.
        world_size: ``torch.distributed`` ranks merged (1 when not distributed).
        strategy: how the passes ran: ``"one-pass"`` (``mode="batch"``), ``"frontier"``
            (population mode over the captured graph: each layer once per sample, the
            activations between levels kept), or ``"per-level"`` (one forward per level).
        strategy_note: why ``"per-level"`` ran, or where the frontier was kept.
        peak_memory_mb: the most host (or device) memory the kept frontier held, in MiB.
        peak_spill_mb: the most it held in its memory-mapped spill file, in MiB.
        recomputed_segments: segments run again because a frontier found no room (batches
            times segments).
        bns: one :class:`BNStats` per BatchNorm, in model order.
    """

    model: Any = field(repr=False, default=None)
    framework: str = "torch"
    mode: str = "population"
    estimator: str = "exact"
    variance: str = "unbiased"
    batches: int = 0
    samples: int = 0
    passes: int = 0
    world_size: int = 1
    strategy: str = "per-level"
    strategy_note: str = ""
    peak_memory_mb: float = 0.0
    peak_spill_mb: float = 0.0
    recomputed_segments: int = 0
    bns: list[BNStats] = field(default_factory=list)

    @property
    def updated(self) -> list[str]:
        """Names of the BatchNorms whose statistics were replaced."""
        return [b.name for b in self.bns if b.status == "updated"]

    @property
    def unreached(self) -> list[str]:
        """Names of the BatchNorms no batch reached (left untouched)."""
        return [b.name for b in self.bns if b.status == "unreached"]

    @property
    def zero_variance(self) -> dict[str, list[int]]:
        """BatchNorm name -> channels with zero variance."""
        return {b.name: b.zero_variance_channels for b in self.bns if b.zero_variance_channels}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (everything but the model), ready for JSON."""
        d = {k: v for k, v in asdict(self).items() if k != "model"}
        d["updated"] = self.updated
        d["unreached"] = self.unreached
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """One line: how many BNs were updated, unreached, and with zero-variance channels."""
        zero = sum(len(v) for v in self.zero_variance.values())
        return (
            f"{len(self.updated)}/{len(self.bns)} BatchNorms recalibrated on {self.samples} "
            f"samples ({self.batches} batches, {self.passes} pass(es), mode={self.mode}, "
            f"estimator={self.estimator}); {len(self.unreached)} unreached; "
            f"{zero} zero-variance channel(s); strategy: {self.strategy}"
            + (f" ({self.strategy_note})" if self.strategy_note else "")
        )
