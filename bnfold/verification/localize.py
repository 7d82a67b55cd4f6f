"""Find the fold that broke a model: the first folded site whose preserved tensor differs.

Every folded decision of a :class:`~bnfold.report.FoldReport` names a ``tensor`` that exists in
both the original and the folded graph and that the fold must leave unchanged (the BN's
output for a backward fold, the consumer's output for a forward fold). The sites are put in
graph order (the position of the node producing the tensor in the original, topologically
sorted graph) and scanned in chunks: each run exposes at most ``chunk`` of those tensors as
extra outputs of a copy of each model, so a large model never has every tensor marked as an
output at once. The scan stops at the first chunk holding a differing tensor, and the first
differing site of that chunk is reported. An error introduced at a site reaches only the
sites downstream of it, which come later in graph order, so the first differing site is the
broken one (or one broken before it).

Both models run on the CPU provider with graph optimizations off: a fold's arithmetic does
not depend on the provider, and an unoptimised run keeps every compared value as computed by
the graph itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.errors import BadInputError
from bnfold.report import FoldReport
from bnfold.sites import Direction, FoldDecision, SkipCode
from bnfold.verification.compare import ToleranceArg, compare_arrays, resolve_tolerance
from bnfold.verification.inputs import Batch
from bnfold.verification.report import Localisation
from bnfold.verification.runners import ModelSource, OrtRunner

if TYPE_CHECKING:
    import onnx

__all__ = ["DEFAULT_CHUNK", "ordered_sites", "localise", "load_fold_report"]

#: Intermediate tensors exposed per run.
DEFAULT_CHUNK = 16


def _producers(model: onnx.ModelProto) -> dict[str, int]:
    """Value name -> index of the node producing it (graph order)."""
    out: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.output:
            if name:
                out[name] = i
    return out


def ordered_sites(
    report: FoldReport, original: onnx.ModelProto, folded: onnx.ModelProto
) -> tuple[list[FoldDecision], list[str]]:
    """The folded decisions whose tensor both graphs compute, in the original's graph order.

    Returns:
        ``(sites, notes)``; notes say which folded decisions cannot be compared and why.
    """
    in_original = _producers(original)
    in_folded = _producers(folded)
    sites: list[tuple[int, FoldDecision]] = []
    notes: list[str] = []
    for d in report.folded:
        if not d.tensor:
            notes.append(f"fold of {d.bn} names no tensor to compare; it was not checked")
        elif d.tensor not in in_original or d.tensor not in in_folded:
            notes.append(
                f"tensor {d.tensor!r} of the fold of {d.bn} is not computed by both graphs; "
                "it was not checked"
            )
        else:
            sites.append((in_original[d.tensor], d))
    sites.sort(key=lambda s: s[0])
    return [d for _, d in sites], notes


def localise(
    reference: ModelSource,
    candidate: ModelSource,
    report: FoldReport,
    batch: Batch,
    *,
    rtol: ToleranceArg = None,
    atol: ToleranceArg = None,
    chunk: int = DEFAULT_CHUNK,
    on_chunk: Callable[[int, int], None] | None = None,
) -> tuple[Localisation, list[str]]:
    """Name the first folded site whose tensor differs beyond tolerance on ``batch``.

    Args:
        reference: the original (unfolded) ONNX model.
        candidate: the folded ONNX model.
        report: the fold report of ``candidate``.
        batch: inputs on which the outputs differed.
        rtol: relative tolerance (a float applies; per-output mappings do not name
            intermediate tensors and fall back to their ``"*"`` entry or the dtype default).
        atol: absolute tolerance, likewise.
        chunk: intermediate tensors exposed per run.
        on_chunk: called with ``(sites checked, sites total)`` after each run (progress).

    Returns:
        ``(localisation, notes)``.
    """
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    sites, notes = ordered_sites(report, reference.load(), candidate.load())
    checked = 0
    for start in range(0, len(sites), chunk):
        part = sites[start : start + chunk]
        names = [d.tensor for d in part if d.tensor]
        ref_vals = OrtRunner(reference, optimized=False, extra_outputs=names).run(batch)
        cand_vals = OrtRunner(candidate, optimized=False, extra_outputs=names).run(batch)
        for d in part:
            name = str(d.tensor)
            cand = np.asarray(cand_vals[name])
            tol = resolve_tolerance(name, cand.dtype, _star(rtol), _star(atol))
            stats = compare_arrays(cand, np.asarray(ref_vals[name]), tol, name)
            checked += 1
            if not stats.passed:
                return (
                    Localisation(
                        bn=d.bn,
                        target=d.target,
                        tensor=name,
                        max_abs=stats.max_abs,
                        max_rel=stats.max_rel,
                        checked=checked,
                        note=(
                            f"the fold of {d.bn} into {d.target} changes {name!r} "
                            f"(max abs {stats.max_abs:.3g}, {stats.mismatches} of "
                            f"{stats.elements} elements out of tolerance)"
                        ),
                    ),
                    notes,
                )
        if on_chunk is not None:
            on_chunk(checked, len(sites))
    return (
        Localisation(
            bn=None,
            target=None,
            tensor=None,
            max_abs=None,
            max_rel=None,
            checked=checked,
            note=(
                f"all {checked} compared fold sites match; the difference arises outside them "
                "(an unfolded node, a provider kernel, or a site that could not be compared)"
            ),
        ),
        notes,
    )


def _star(arg: ToleranceArg) -> ToleranceArg:
    if not isinstance(arg, Mapping):
        return arg
    return {"*": arg["*"]} if "*" in arg else None


def load_fold_report(source: FoldReport | Mapping[str, Any] | str | Path) -> FoldReport:
    """A FoldReport from itself, its ``to_dict()`` form, or the JSON ``bnfold fold --json`` wrote."""
    if isinstance(source, FoldReport):
        return source
    where = "fold report"
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = str(path)
        try:
            source = json.loads(path.read_text())
        except FileNotFoundError:
            raise BadInputError(
                f"fold report {path} does not exist; give the JSON written by bnfold fold --json"
            ) from None
        except (OSError, ValueError) as e:
            raise BadInputError(f"cannot read fold report {path}: {e}") from None
    if not isinstance(source, Mapping) or not isinstance(source.get("decisions"), list):
        raise BadInputError(f"{where} has no 'decisions' list; give the JSON of bnfold fold --json")
    try:
        decisions = [
            FoldDecision(
                bn=str(d["bn"]),
                folded=bool(d["folded"]),
                direction=Direction(d["direction"]) if d.get("direction") else None,
                target=d.get("target"),
                code=SkipCode(d["code"]) if d.get("code") else None,
                reason=d.get("reason"),
                params={k: list(v) for k, v in (d.get("params") or {}).items()},
                tensor=d.get("tensor"),
            )
            for d in source["decisions"]
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadInputError(f"{where} holds a malformed decision ({e!r})") from None
    return FoldReport(
        model=str(source.get("model", "")),
        framework=str(source.get("framework", "onnx")),
        decisions=decisions,
    )
