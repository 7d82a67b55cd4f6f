"""The framework-neutral vocabulary of fold sites and decisions.

Both front ends describe what they found with these types, so the report, the CLI and the
tests speak one language whatever the model came from. A skipped BN is a *value* with a code
and a sentence, never an exception: every BN in a model gets exactly one decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

__all__ = ["Direction", "SkipCode", "FoldDecision"]


class Direction(str, Enum):
    """Where a BN goes: into the layer before it, or into the layer after it."""

    BACKWARD = "backward"
    FORWARD = "forward"


class SkipCode(str, Enum):
    """Why a BN was left in the model. The value is the stable, machine-readable code."""

    TRAINING_MODE = "training-mode"
    NO_RUNNING_STATS = "no-running-stats"
    NO_PARTNER = "no-foldable-neighbour"
    MULTIPLE_USERS = "multiple-users"
    GRAPH_OUTPUT = "graph-output"
    NOT_CONSTANT = "non-constant-parameter"
    SHARED_MODULE = "shared-module"
    CHANNEL_AXIS = "channel-axis-mismatch"
    PADDING = "zero-padding"
    DTYPE = "dtype-mismatch"
    NON_FINITE = "non-finite-affine"
    UNKNOWN_SHAPE = "unknown-shape"
    UNSUPPORTED = "unsupported"
    DIRECTION_DISABLED = "direction-disabled"


@dataclass(frozen=True)
class FoldDecision:
    """What happened to one BatchNorm.

    Attributes:
        bn: the BN's name in the model (ONNX node name, or fx node / module path).
        folded: True when the BN was removed.
        direction: backward or forward, for a folded BN.
        target: the node or module the BN was folded into.
        code: why the BN stays, for a skipped BN.
        reason: a sentence a person can act on, for a skipped BN.
        params: new parameter name -> the original parameter names it was computed from.
        tensor: the value a fold must preserve, named as in both the original and the folded
            graph: the BN's output for a backward fold, the consumer's output for a forward
            fold. Verification compares it to localise a broken fold.
    """

    bn: str
    folded: bool
    direction: Direction | None = None
    target: str | None = None
    code: SkipCode | None = None
    reason: str | None = None
    params: dict[str, list[str]] = field(default_factory=dict)
    tensor: str | None = None

    @classmethod
    def fold(
        cls,
        bn: str,
        direction: Direction,
        target: str,
        params: dict[str, list[str]] | None = None,
        tensor: str | None = None,
    ) -> FoldDecision:
        return cls(
            bn=bn,
            folded=True,
            direction=direction,
            target=target,
            params=params or {},
            tensor=tensor,
        )

    @classmethod
    def skip(cls, bn: str, code: SkipCode, reason: str) -> FoldDecision:
        return cls(bn=bn, folded=False, code=code, reason=reason)

    def to_dict(self) -> dict[str, object]:
        return {
            "bn": self.bn,
            "folded": self.folded,
            "direction": self.direction.value if self.direction else None,
            "target": self.target,
            "code": self.code.value if self.code else None,
            "reason": self.reason,
            "params": {k: list(v) for k, v in self.params.items()},
            "tensor": self.tensor,
        }
