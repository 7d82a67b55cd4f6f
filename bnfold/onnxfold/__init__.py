"""The ONNX front end: fold every exactly foldable BatchNormalization of an ONNX model.

Each BN, in graph order, gets one decision. With ``direction="both"`` the fold into the
producer (backward) is tried first and the fold into the consumer (forward) second; a BN that
neither can take stays, with the code of the direction that got further (a missing partner
is the least informative reason) and a reason naming what blocked each direction. Folds see the graph as earlier folds left it, so a chain
``Conv -> BN -> BN`` folds both BNs into the Conv.

Modules: :mod:`.graph` (index, shapes, constant evaluation), :mod:`.discover` (sites and guard
facts), :mod:`.rewrite` (new parameters and rewiring).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from bnfold.errors import BadInputError
from bnfold.guards import both_sides, check
from bnfold.onnx_check import check_onnx_model
from bnfold.onnx_io import check_output_path, load_onnx, load_onnx_info, save_onnx
from bnfold.onnxfold.discover import Site, backward_site, forward_site
from bnfold.onnxfold.graph import GraphIndex
from bnfold.onnxfold.rewrite import Rewriter
from bnfold.report import FoldReport
from bnfold.sites import Direction, FoldDecision, SkipCode

__all__ = ["fold_onnx", "fold_file"]

_DIRECTIONS = ("backward", "forward", "both")


def fold_onnx(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    direction: str = "both",
    inplace: bool = False,
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold the BatchNormalization nodes of an ONNX model.

    Args:
        model: a ``ModelProto``, or the path of an ``.onnx`` file (loaded with its external
            data).
        direction: ``"backward"`` (into the producer), ``"forward"`` (into the consumer) or
            ``"both"`` (backward first).
        inplace: edit the given ``ModelProto`` instead of a copy.

    Returns:
        ``(folded_model, report)``; the report has one decision per BN, in graph order.

    Raises:
        BadInputError: an unknown direction, a path that is not a readable ONNX model, or a
            model that is not valid ONNX (:func:`bnfold.onnx_check.check_onnx_model`).
    """
    if direction not in _DIRECTIONS:
        raise BadInputError(f"direction must be backward, forward or both, not {direction!r}")
    if isinstance(model, (str, os.PathLike)):
        label = str(model)
        proto = load_onnx(model)
    elif isinstance(model, onnx.ModelProto):
        label = model.graph.name or "model"
        if inplace:
            proto = model
        else:
            proto = onnx.ModelProto()
            proto.CopyFrom(model)
    else:
        raise BadInputError(
            f"expected an onnx.ModelProto or an .onnx path, got {type(model).__name__}"
        )
    check_onnx_model(proto, label)
    report = FoldReport(model=label, framework="onnx")
    report.decisions = _fold_graph(proto, direction)
    return proto, report


def fold_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    direction: str = "both",
    external_data: bool | None = None,
) -> FoldReport:
    """Fold an ONNX file into a new file, written atomically.

    Args:
        src: the input model.
        dst: the output path; must differ from ``src``.
        direction: see :func:`fold_onnx`.
        external_data: True/False forces the output layout; None keeps the input's (external
            data when the input had it, or when the model exceeds 2 GB).

    Returns:
        The fold report.
    """
    if direction not in _DIRECTIONS:
        raise BadInputError(f"direction must be backward, forward or both, not {direction!r}")
    out = check_output_path(dst, src)
    loaded = load_onnx_info(src)
    model, report = fold_onnx(loaded.model, direction=direction, inplace=True)
    report.model = str(src)
    if external_data is None:
        external_data = loaded.external_data or None  # None: external only past 2 GB
    save_onnx(model, out, external_data=external_data)
    return report


def _is_bn(n: onnx.NodeProto) -> bool:
    return n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _nested_bns(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The BNs inside ``node``'s subgraphs (If branches, Loop/Scan bodies), recursively."""
    found: list[onnx.NodeProto] = []
    for sub in _subgraphs(node):
        for n in sub.node:
            if _is_bn(n):
                found.append(n)
            found.extend(_nested_bns(n))
    return found


def _bn_names(nodes: list[onnx.NodeProto], nested: list[onnx.NodeProto]) -> dict[int, str]:
    """A unique report name per BN (``nested``: those in subgraphs): its node name, or
    ``BatchNormalization_<k>``, written onto the node so report and model agree.

    Keys are ``id()`` of the given node objects, which the caller keeps alive: protobuf
    hands out a new wrapper per access to a nested message.
    """
    everything = [*nodes, *nested]
    taken = {n.name for n in everything if n.name}
    seen: set[str] = set()
    names: dict[int, str] = {}
    k = 0
    for n in everything:
        if not _is_bn(n):
            continue
        if not n.name or n.name in seen:  # a nameless or repeated name cannot be reported
            while f"BatchNormalization_{k}" in taken:
                k += 1
            n.name = f"BatchNormalization_{k}"
            taken.add(n.name)
        seen.add(n.name)
        names[id(n)] = n.name
    return names


def _fold_graph(model: onnx.ModelProto, direction: str) -> list[FoldDecision]:
    nodes = list(model.graph.node)
    nested = {id(n): _nested_bns(n) for n in nodes}
    names = _bn_names(nodes, [b for bs in nested.values() for b in bs])
    if not names:
        return []
    main = [n for n in nodes if id(n) in names]
    g = GraphIndex(model)
    rewriter = Rewriter(g)
    decided = {id(n): _decide(g, rewriter, n, names[id(n)], direction) for n in main}
    # A fold can give a skipped BN a partner: in BN -> BN -> Conv the first BN reads a BN
    # until the second one folds forward. Retry the skipped ones while folds keep happening.
    progress = any(d.folded for d in decided.values())
    while progress:
        progress = False
        for n in main:
            if not decided[id(n)].folded:
                again = _decide(g, rewriter, n, names[id(n)], direction)
                if again.folded:
                    decided[id(n)] = again
                    progress = True
    g.commit()
    decisions = []
    for n in nodes:
        if id(n) in decided:
            decisions.append(decided[id(n)])
        decisions.extend(
            FoldDecision.skip(
                names[id(b)],
                SkipCode.UNSUPPORTED,
                f"BN is inside the subgraph of {n.op_type} {n.name or ''}".rstrip()
                + "; only BNs of the main graph are folded",
            )
            for b in nested[id(n)]
        )
    return decisions


def _decide(
    g: GraphIndex, rewriter: Rewriter, bn: onnx.NodeProto, name: str, direction: str
) -> FoldDecision:
    """Fold ``bn`` if a permitted direction passes every guard; else say why not."""
    # An adjacent partner first, then one through an operation in between (a Concat, a
    # reshape, average pooling), so a BN that has both keeps its adjacent partner, as in the
    # PyTorch front end.
    tried: list[tuple[Site, tuple[SkipCode, str] | None]] = []
    for reach in (False, True):
        tried = []
        for d in (Direction.BACKWARD, Direction.FORWARD):
            make = backward_site if d is Direction.BACKWARD else forward_site
            site = make(g, bn, name, reach=reach)
            verdict = check(site.facts)
            allowed = direction in ("both", d.value)
            if verdict is None and allowed:
                return rewriter.apply(site)
            tried.append((site, verdict))
    back, fwd = tried
    for site, verdict in tried:
        if verdict is None:  # foldable only in the direction that was not allowed
            return FoldDecision.skip(
                name,
                SkipCode.DIRECTION_DISABLED,
                f"BN could fold {site.direction.value} into {site.facts.partner}, but "
                f"direction={direction} was asked for",
            )
    code, reason = both_sides(back[1], fwd[1])
    if direction != "both":  # the code says what blocked the direction asked for
        asked = fwd[1] if direction == "forward" else back[1]
        assert asked is not None
        code = asked[0]
    return FoldDecision.skip(name, code, reason)


def default_output(src: str | os.PathLike[str]) -> Path:
    """``model.onnx`` -> ``model.folded.onnx`` next to it."""
    p = Path(src)
    return p.with_name(p.stem + ".folded" + p.suffix)
