"""The fold guards, decided once for both front ends.

A front end gathers :class:`SiteFacts` about a (BN, neighbour) pair from its own graph and
asks :func:`check`; the first guard that fails becomes the BN's skip reason. Keeping the order
and the sentences here means an ONNX model and the PyTorch model it came from are explained
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bnfold.sites import Direction, SkipCode

__all__ = ["SiteFacts", "check", "both_sides"]


@dataclass
class SiteFacts:
    """What a front end knows about folding one BN into one neighbour.

    Attributes:
        bn: the BN's name.
        direction: backward (into the producer) or forward (into the consumer).
        partner: the neighbour's name, or None when there is no foldable neighbour.
        partner_op: the neighbour's operator/module type, for messages.
        training: the BN normalises with batch statistics at inference.
        running_stats: the BN has running statistics to fold.
        extra_users: names of other readers of the tensor between BN and partner.
        graph_output: the tensor between BN and partner is a model output.
        non_constant: parameter names that are not constants (graph inputs, computed).
        shared: description of a module/parameter used at another site, or None.
        bn_axis / partner_axis: the channel axis the BN normalises and the one the partner's
            channels live on, in the same tensor's coordinates (None when unknown).
        padding: a sentence describing zero padding that makes a forward fold inexact.
        dtype: a sentence describing a dtype inconsistency, or None.
        unsupported: a sentence describing any other reason the pair cannot be folded.
        non_finite: channels whose BN scale or shift is inf/NaN
            (:func:`bnfold.foldmath.non_finite_channels`).
        neighbour: what sits where a partner was looked for (``"Relu relu_3"``, ``"a graph
            input"``), named in the reason when there is no foldable partner.
        via: the operator the fold reaches through (``"Concat cat_1"``), named in reasons.
        axis_problem: a sentence when an operator in between moves the BN's channel axis.
    """

    bn: str
    direction: Direction
    partner: str | None = None
    partner_op: str = ""
    training: bool = False
    running_stats: bool = True
    extra_users: list[str] = field(default_factory=list)
    graph_output: bool = False
    non_constant: list[str] = field(default_factory=list)
    shared: str | None = None
    bn_axis: int | None = 1
    partner_axis: int | None = 1
    padding: str | None = None
    dtype: str | None = None
    unsupported: str | None = None
    non_finite: list[int] = field(default_factory=list)
    neighbour: str | None = None
    via: str | None = None
    axis_problem: str | None = None


def check(f: SiteFacts) -> tuple[SkipCode, str] | None:
    """The first failing guard as ``(code, sentence)``, or None when the fold is exact."""
    verdict = _first_failure(f)
    if verdict is None or f.via is None or verdict[0] in _BN_OWN:
        return verdict
    return verdict[0], f"through {f.via}, {verdict[1]}"


#: Codes about the BN itself, whatever its neighbours: no "through ..." prefix.
_BN_OWN = (SkipCode.TRAINING_MODE, SkipCode.NO_RUNNING_STATS)


def both_sides(
    backward: tuple[SkipCode, str] | None, forward: tuple[SkipCode, str] | None
) -> tuple[SkipCode, str]:
    """One skip decision from what blocked each direction.

    The code is the more informative one (a real neighbour's problem beats a missing
    neighbour, backward first); the sentence names both: ``"backward: ...; forward: ..."``,
    so a reader sees what would have to change on either side. A BN-level reason (training
    mode, no running statistics) is the same for both directions and is said once.
    """
    options = [r for r in (backward, forward) if r is not None]
    if not options:
        raise ValueError("both_sides needs at least one failed direction")
    named = [r for r in options if r[0] is not SkipCode.NO_PARTNER]
    code = (named or options)[0][0]
    if code in _BN_OWN or backward is None or forward is None:
        return code, (named or options)[0][1]
    return code, f"backward: {backward[1]}; forward: {forward[1]}"


def _first_failure(f: SiteFacts) -> tuple[SkipCode, str] | None:
    into = "producer" if f.direction is Direction.BACKWARD else "consumer"
    between = f"output of {f.partner}" if f.direction is Direction.BACKWARD else f"output of {f.bn}"
    if f.training:
        return SkipCode.TRAINING_MODE, (
            "BN normalises with batch statistics (training mode); export in eval mode to fold it"
        )
    if not f.running_stats:
        return SkipCode.NO_RUNNING_STATS, (
            "BN has no running statistics (track_running_stats=False); recalibrate or enable them"
        )
    if f.partner is None:
        found = f": {f.neighbour}" if f.neighbour else ""
        return SkipCode.NO_PARTNER, (
            f"no foldable {into} (Conv, ConvTranspose, Linear/Gemm, MatMul){found}"
        )
    if f.unsupported:
        return SkipCode.UNSUPPORTED, f.unsupported
    if f.graph_output:
        return SkipCode.GRAPH_OUTPUT, f"the {between} is a model output, which folding would change"
    if f.extra_users:
        return SkipCode.MULTIPLE_USERS, (
            f"the {between} is also read by {', '.join(f.extra_users)}, which must not see the BN"
        )
    if f.non_constant:
        return SkipCode.NOT_CONSTANT, (
            f"parameter(s) {', '.join(f.non_constant)} are not constants (graph input or computed)"
        )
    if f.non_finite:
        shown = ", ".join(str(c) for c in f.non_finite[:8]) + (
            ", ..." if len(f.non_finite) > 8 else ""
        )
        return SkipCode.NON_FINITE, (
            f"BN's scale or shift is not finite on channel(s) {shown} (var + eps is 0, or a "
            "statistic is NaN/Inf); folding would spread NaN to other outputs; recalibrate or "
            "raise epsilon"
        )
    if f.shared:
        return SkipCode.SHARED_MODULE, f.shared
    if f.bn_axis is None or f.partner_axis is None:
        return (
            SkipCode.UNKNOWN_SHAPE,
            "tensor shapes are unknown, so the channel axes cannot be matched",
        )
    if f.axis_problem:
        return SkipCode.CHANNEL_AXIS, f.axis_problem
    if f.bn_axis != f.partner_axis:
        return SkipCode.CHANNEL_AXIS, (
            f"BN normalises axis {f.bn_axis} but {f.partner_op or f.partner}'s channels are on "
            f"axis {f.partner_axis}"
        )
    if f.padding:
        return SkipCode.PADDING, f.padding
    if f.dtype:
        return SkipCode.DTYPE, f.dtype
    return None
