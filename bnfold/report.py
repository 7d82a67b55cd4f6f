"""The FoldReport: one decision per BatchNorm, summary counts, JSON."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from bnfold.sites import FoldDecision

__all__ = ["FoldReport"]


@dataclass
class FoldReport:
    """Every BN of a model and what bnfold did with it.

    Attributes:
        model: a name for the model (file path or class name).
        framework: ``"onnx"`` or ``"torch"``.
        decisions: one entry per BatchNorm, in graph order.
        result: what the folded model is, in words (PyTorch: the user's own class, or a traced
            GraphModule and why), or None where the result type needs no explaining (ONNX).
        parts: for a PyTorch model that could not be captured whole, one entry per part
            tried: ``{"path", "status": "folded" | "left", "detail"}`` (how it was captured,
            or the capture error).
    """

    model: str
    framework: str
    decisions: list[FoldDecision] = field(default_factory=list)
    result: str | None = None
    parts: list[dict[str, str]] = field(default_factory=list)

    @property
    def folded(self) -> list[FoldDecision]:
        return [d for d in self.decisions if d.folded]

    @property
    def skipped(self) -> list[FoldDecision]:
        return [d for d in self.decisions if not d.folded]

    def summary(self) -> dict[str, object]:
        return {
            "batchnorms": len(self.decisions),
            "folded": len(self.folded),
            "skipped": len(self.skipped),
            "folded_by_direction": dict(
                Counter(d.direction.value for d in self.folded if d.direction)
            ),
            "skipped_by_code": dict(Counter(d.code.value for d in self.skipped if d.code)),
        }

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "model": self.model,
            "framework": self.framework,
            "summary": self.summary(),
            "decisions": [d.to_dict() for d in self.decisions],
        }
        if self.result is not None:
            out["result"] = self.result
        if self.parts:
            out["parts"] = [dict(p) for p in self.parts]
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        s = self.summary()
        return (
            f"{self.model}: {s['folded']}/{s['batchnorms']} BatchNorms folded, {s['skipped']} kept"
        )
