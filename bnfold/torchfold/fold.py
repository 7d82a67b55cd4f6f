"""``fold_torch`` and ``fold_file``: capture, judge every BN, fold, hand back a model.

Order: every BN is first tried *backward* (into the layer that computes its input) in graph
order, so chains such as Conv -> BN -> BN collapse one BN at a time; the BNs left are then
tried *forward* (into the layer reading their output) in reverse graph order, so
BN -> BN -> Conv collapses from the Conv outwards. The BNs still left get the same two passes
through an operation between them and a layer (:mod:`.reach`: an Add of a constant, a channel
``cat``, a channel-keeping reshape, average pooling). Each fold re-reads the graph, so a second
fold into the same layer starts from the first one's parameters.

What comes back:

- an ``nn.Module`` whose folds all joined a BN *module* to a Conv/Linear *module* comes back
  as a copy of itself (same class and methods; other layers keep their ``state_dict`` names)
  with the layer parameters updated and the folded BN modules replaced by ``nn.Identity``
  (deleted from a plain ``nn.Sequential``, whose other entries keep their keys: see
  :func:`bnfold.torchfold.bnlike.put_after_fold`);
- otherwise (a functional ``F.batch_norm`` or ``F.conv2d`` fold, a GraphModule input, or a
  module that needed torch.export) the rewritten ``torch.fx.GraphModule``;
- an ``ExportedProgram`` input comes back as a new ExportedProgram, exported from the folded
  graph with the program's example inputs and its dynamic dimensions (each input symbol
  becomes a ``Dim`` with the program's range), so it accepts the same input shapes.

``inplace=True`` edits the given ``nn.Module`` (when the result can be that module) or the
given GraphModule; an ExportedProgram is never edited in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from bnfold.atomic import atomic_path, check_writable
from bnfold.errors import BadInputError, UnsupportedModelError
from bnfold.guards import both_sides, check
from bnfold.report import FoldReport
from bnfold.sites import Direction, FoldDecision, SkipCode
from bnfold.torchfold.bnlike import put_after_fold
from bnfold.torchfold.capture import Captured, CaptureError, capture
from bnfold.torchfold.discover import Site, backward_site, forward_site, usage_map
from bnfold.torchfold.load import load_torch, require_foldable
from bnfold.torchfold.ops import ParamRef, as_batchnorm, is_bn_module
from bnfold.torchfold.reach import ReachSite, apply_reach, reach_site, site_layers
from bnfold.torchfold.rewrite import Exact, apply_fold, prune
from bnfold.torchfold.surgery import surgery_from_graph

__all__ = ["fold_torch", "fold_whole", "fold_file", "fold_graph", "count_batchnorms"]


def _judge(site: Site) -> tuple[SkipCode, str] | None:
    return check(site.facts)


def _site(node: fx.Node, gm: fx.GraphModule, direction: Direction, reach: bool) -> Site | None:
    bn = as_batchnorm(node, gm)
    if bn is None:
        return None
    make = backward_site if direction is Direction.BACKWARD else forward_site
    uses = usage_map(gm)
    site = make(bn, gm, uses)
    if reach and site.layer is None:  # through an operation in between, or say what is there
        site = reach_site(bn, gm, uses, direction)
    if direction is Direction.FORWARD and bn.keeps and site.layer is not None:
        site.facts.unsupported = site.facts.unsupported or (
            f"{bn.name} applies its {' and '.join(bn.keeps)} after normalising, so a later "
            "layer does not read the affine map; only a fold into the layer before it is exact"
        )
    return site


def _skip(
    name: str,
    backward: tuple[SkipCode, str] | None,
    forward: tuple[SkipCode, str] | None,
) -> FoldDecision:
    """The more informative code (a real neighbour's, backward first), and both reasons."""
    code, reason = both_sides(backward, forward)
    return FoldDecision.skip(name, code, reason)


def fold_graph(
    gm: fx.GraphModule, direction: str = "both"
) -> tuple[list[FoldDecision], list[Site]]:
    """Fold every exact site of ``gm`` in place.

    Returns:
        the decisions (one per BN, in graph order) and the sites that were folded.
    """
    bn_nodes = [n for n in gm.graph.nodes if as_batchnorm(n, gm) is not None]
    names = {n: as_batchnorm(n, gm).name for n in bn_nodes}  # type: ignore[union-attr]
    want_back = direction in ("backward", "both")
    want_fwd = direction in ("forward", "both")
    decisions: dict[fx.Node, FoldDecision] = {}
    reasons: dict[fx.Node, dict[Direction, tuple[SkipCode, str] | None]] = {n: {} for n in bn_nodes}
    folded: list[Site] = []
    origin: dict[str, list[str]] = {}
    exact: Exact = {}
    # Folds into an adjacent layer first, then folds through an operation in between
    # (bnfold.torchfold.reach), so a BN that has both keeps its adjacent partner.
    passes = [
        (Direction.BACKWARD, bn_nodes, want_back, False),
        (Direction.FORWARD, bn_nodes[::-1], want_fwd, False),
        (Direction.BACKWARD, bn_nodes, want_back, True),
        (Direction.FORWARD, bn_nodes[::-1], want_fwd, True),
    ]
    for way, order, wanted, reach in passes:
        for node in order:
            if node in decisions:
                continue
            site = _site(node, gm, way, reach)
            assert site is not None
            result = _judge(site)
            reasons[node][way] = result
            if result is None and wanted:
                fold = apply_reach if isinstance(site, ReachSite) else apply_fold
                decisions[node] = fold(site, gm, origin, exact)  # type: ignore[arg-type]
                folded.append(site)
    asked = {Direction.BACKWARD: want_back, Direction.FORWARD: want_fwd}
    for node in bn_nodes:
        if node in decisions:
            continue
        seen = reasons[node]
        disabled = [w for w in Direction if not asked[w] and w in seen and seen[w] is None]
        if disabled:
            decisions[node] = _disabled(names[node], disabled[0])
        else:
            back, fwd = seen.get(Direction.BACKWARD), seen.get(Direction.FORWARD)
            decisions[node] = _skip(names[node], back, fwd)
    return _one_per_bn([decisions[n] for n in bn_nodes]) + _scripted_bns(gm), folded


def _scripted_bns(gm: fx.GraphModule) -> list[FoldDecision]:
    """Skip decisions for BNs inside TorchScript submodules the graph calls.

    fx sees a scripted submodule as one opaque call; its compiled code cannot be rewritten,
    so its BNs stay. They still get a decision, so the report accounts for every BN.
    """
    out: list[FoldDecision] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or str(node.target) in seen:
            continue
        seen.add(str(node.target))
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, torch.jit.ScriptModule):
            continue
        for sub_name, sub in mod.named_modules():
            if "BatchNorm" not in str(getattr(sub, "original_name", "")):
                continue
            name = f"{node.target}.{sub_name}" if sub_name else str(node.target)
            out.append(
                FoldDecision.skip(
                    name,
                    SkipCode.UNSUPPORTED,
                    f"the BN is inside TorchScript submodule {node.target}, whose compiled code "
                    "cannot be rewritten; fold the eager module before scripting it",
                )
            )
    return out


def _disabled(name: str, possible: Direction) -> FoldDecision:
    """The decision for a BN that only the direction the caller turned off could fold."""
    other = Direction.FORWARD if possible is Direction.BACKWARD else Direction.BACKWARD
    where = "before" if possible is Direction.BACKWARD else "after"
    return FoldDecision.skip(
        name,
        SkipCode.DIRECTION_DISABLED,
        f"the BN can be folded {possible.value} into the layer {where} it, but only "
        f"{other.value} folding was requested",
    )


def _one_per_bn(decisions: list[FoldDecision]) -> list[FoldDecision]:
    """One decision per BN: a BN module called at several sites is one BN of the model.

    Such a BN is never folded (its statistics are shared between the calls), so its calls'
    decisions are all skips; the one naming a real neighbour is kept.
    """
    by_name: dict[str, FoldDecision] = {}
    for d in decisions:
        kept = by_name.get(d.bn)
        if kept is None or (kept.code is SkipCode.NO_PARTNER and d.code is not SkipCode.NO_PARTNER):
            by_name[d.bn] = d
    return list(by_name.values())


def count_batchnorms(model: Any) -> int:
    """BatchNorms left in a module, GraphModule or ExportedProgram (modules and graph ops)."""
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if isinstance(model, fx.GraphModule):
        return sum(1 for n in model.graph.nodes if as_batchnorm(n, model) is not None)
    return sum(1 for m in model.modules() if is_bn_module(m))


def _module_result(cap: Captured, folded: list[Site]) -> bool:
    return cap.kind == "module" and all(
        s.bn.module is not None
        and s.layer is not None
        and all(layer.module is not None for layer in site_layers(s))
        for s in folded
    )


def _transplant(model: nn.Module, root: nn.Module, decisions: list[FoldDecision]) -> None:
    """Copy folded parameters from ``root`` (the traced copy) into the user's ``model``."""
    for d in decisions:
        if not d.folded:
            continue
        for name in d.params:
            ref = ParamRef.from_target(name)
            value = ref.get(root)
            assert isinstance(value, nn.Parameter)
            model.get_submodule(ref.owner).register_parameter(ref.attr, value)
        put_after_fold(model, d.bn)


def _unseen(model: nn.Module, decisions: list[FoldDecision], kind: str) -> list[FoldDecision]:
    """Skip decisions for BN-like modules of ``model`` that the captured graph does not show.

    fx never shows a module the forward does not call; torch.export traces *into* modules, so
    a ``FrozenBatchNorm2d`` becomes separate multiply/add ops that no BN pattern reads. Both
    are reported under their module path, so every BN-like layer of the model has a decision.
    Children of a BN-like layer that has a decision (``SplitBatchNorm2d``'s training-only
    auxiliary BNs) go with it.
    """
    named = {d.bn for d in decisions}
    out: list[FoldDecision] = []
    for path, mod in model.named_modules():
        if not path or not is_bn_module(mod) or path in named:
            continue
        if any(path.startswith(p + ".") for p in named | {d.bn for d in out}):
            continue
        if kind == "module":
            why = "the model's forward never calls it, so nothing of it is in the traced graph"
        else:
            why = (
                "torch.export traced into it, and its graph ops are not read as a BatchNorm; "
                "fold a submodule that torch.fx can trace to keep it whole"
            )
        out.append(FoldDecision.skip(path, SkipCode.UNSUPPORTED, why))
    return out


def _describe(model: Any, cap: Captured, folded: list[Site]) -> str:
    """The result type in words, for the report."""
    cls = type(model).__name__
    if isinstance(model, torch.export.ExportedProgram):
        return "torch.export.ExportedProgram, exported again from the folded graph"
    if _module_result(cap, folded):
        return (
            f"{cls}, the given model's own class: folded layers updated, each folded BN "
            "replaced by nn.Identity (deleted from an nn.Sequential; the other entries keep "
            "their keys) or by the activation a BN+act layer applied"
        )
    if cap.kind == "graph":
        return "torch.fx.GraphModule, the given graph rewritten"
    if cap.kind == "program":
        return (
            f"torch.fx.GraphModule captured from {cls} by torch.export (torch.fx could not "
            "trace it); it accepts the example inputs' shapes only"
        )
    return (
        f"torch.fx.GraphModule traced from {cls}: a fold joined a functional call, which "
        "only the traced graph can express; parameters keep their state_dict names"
    )


def fold_torch(
    model: Any,
    example_inputs: Any = None,
    *,
    direction: str = "both",
    inplace: bool = False,
) -> tuple[Any, FoldReport]:
    """Fold every exactly foldable BatchNorm of a PyTorch model.

    Args:
        model: an ``nn.Module``, ``torch.fx.GraphModule`` or ``torch.export.ExportedProgram``.
        example_inputs: a tensor or tuple of tensors. They give the shapes that prove channel
            axes: without them, a Linear -> BatchNorm1d pair (or any pair whose ranks the
            module types do not pin down) is skipped as ``unknown-shape``.
        direction: ``backward``, ``forward`` or ``both``.
        inplace: edit the given model (see the module docstring for what that covers).

    Returns:
        ``(folded, report)``; the report holds one decision per BN.
    """
    if direction not in ("backward", "forward", "both"):
        raise BadInputError(f"direction must be backward, forward or both, not {direction!r}")
    try:
        return fold_whole(model, example_inputs, direction=direction, inplace=inplace)
    except CaptureError as whole_error:
        from bnfold.torchfold.partial import fold_parts

        return fold_parts(model, example_inputs, whole_error, direction=direction, inplace=inplace)


def fold_whole(
    model: Any,
    example_inputs: Any = None,
    *,
    direction: str = "both",
    inplace: bool = False,
) -> tuple[Any, FoldReport]:
    """:func:`fold_torch` on a model captured whole (raises :class:`CaptureError` otherwise)."""
    # Read the program's dynamic dims before ``capture``: unlifting with ``program.module()``
    # leaves the placeholders' symbolic sizes as expressions no longer keyed by their symbol.
    program = model if isinstance(model, torch.export.ExportedProgram) else None
    dynamic = _dynamic_shapes(program) if program is not None else None
    cap = capture(model, example_inputs, inplace=inplace)
    decisions, folded = fold_graph(cap.gm, direction)
    name = type(model).__name__
    if isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule):
        decisions += _unseen(model, decisions, cap.kind)
    report = FoldReport(model=name, framework="torch", decisions=decisions)
    report.result = _describe(model, cap, folded)
    if cap.kind == "program" and not cap.from_program and not inplace:
        own = surgery_from_graph(model, cap.gm, folded, decisions)
        if own is not None:
            report.result = (
                f"{name}, the given model's own class: torch.export captured it (torch.fx "
                "could not), and every fold was module surgery, applied to a copy"
            )
            return own, report
    if _module_result(cap, folded):
        assert cap.root is not None
        if inplace and isinstance(model, nn.Module):
            _transplant(model, cap.root, decisions)
            return model, report
        for site in folded:
            assert site.bn.module is not None
            put_after_fold(cap.root, site.bn.module)
        return cap.root, report
    prune(cap.gm)
    if cap.from_program:
        assert cap.example is not None
        try:
            return torch.export.export(cap.gm, cap.example, dynamic_shapes=dynamic), report
        except Exception as e:
            raise UnsupportedModelError(
                f"the folded graph cannot be exported again ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); fold the nn.Module the program "
                "was exported from, then export the result"
            ) from e
    return cap.gm, report


def _dynamic_shapes(program: torch.export.ExportedProgram) -> tuple[Any, ...] | None:
    """``dynamic_shapes`` that re-create ``program``'s dynamic input dimensions.

    Folding changes parameters, never shapes, so the folded program is exported again with
    the same symbolic dimensions: one ``Dim`` per input symbol, bounded by the program's
    ``range_constraints``; a dimension given by an expression of symbols is left to export
    (``Dim.AUTO``), which derives it again from the graph.

    Returns:
        one spec per user input (None for a fully static one), or None when all are static.
    """
    user_inputs = list(program.graph_signature.user_inputs)
    by_name = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    ranges = program.range_constraints
    dims: dict[str, Any] = {}
    specs: list[dict[int, Any] | None] = []
    dynamic = False
    for name in user_inputs:
        val = by_name[name].meta.get("val") if name in by_name else None
        if not isinstance(val, torch.Tensor):
            specs.append(None)
            continue
        spec: dict[int, Any] = {}
        for axis, size in enumerate(val.shape):
            if not isinstance(size, torch.SymInt):
                continue
            dynamic = True
            expr = size.node.expr
            if not expr.is_symbol:
                spec[axis] = torch.export.Dim.AUTO
                continue
            key = str(expr)
            if key not in dims:
                bounds = ranges.get(expr)
                low = _finite(bounds.lower) if bounds is not None else None
                high = _finite(bounds.upper) if bounds is not None else None
                dims[key] = torch.export.Dim(f"dim_{key}", min=low or 0, max=high)
            spec[axis] = dims[key]
        specs.append(spec or None)
    return tuple(specs) if dynamic else None


def _finite(bound: Any) -> int | None:
    """A range bound as an int, or None for an infinite one."""
    if bound is None or not bool(getattr(bound, "is_finite", True)):
        return None
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def fold_file(
    src: str,
    dst: Path,
    *,
    direction: str = "both",
    allow_pickle: bool = False,
    progress: bool = False,
    loaded: tuple[Any, Any] | None = None,
) -> FoldReport:
    """Fold a PyTorch model file (or reference model name) and write a ``.pt2`` atomically.

    Args:
        src: a ``.pt2``, TorchScript or pickled-module file, or a :mod:`bnfold.models` name.
        dst: where to write the folded ExportedProgram (``torch.export.save``).
        direction: ``backward``, ``forward`` or ``both``.
        allow_pickle: accept a pickled whole-module file (unpickling runs its code).
        progress: show a progress bar on stderr.
        loaded: ``(model, example_inputs)`` already loaded by :mod:`bnfold.sources` (a
            factory and its weights); ``src`` then only names it.

    Raises:
        BadInputError: unreadable input, an output path equal to the input or unwritable, or
            a model without example inputs to export with.
        UnsupportedModelError: TorchScript input, or a model that cannot be captured.
    """
    from rich.console import Console
    from rich.progress import Progress

    dst = Path(dst)
    inputs = (Path(src),) if Path(src).exists() else ()
    check_writable(dst, inputs=inputs)
    with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("loading", total=3)
        model, example = loaded or load_torch(src, allow_pickle=allow_pickle)
        require_foldable(model, src)
        bar.update(task, advance=1, description="folding")
        folded, report = fold_torch(model, example, direction=direction)
        report.model = src
        bar.update(task, advance=1, description="saving")
        if not isinstance(folded, torch.export.ExportedProgram):
            if example is None:
                raise BadInputError(
                    f"{src} has no example inputs to export the folded model with; save it as "
                    "a .pt2 ExportedProgram (which stores them) and fold that"
                )
            folded = torch.export.export(folded, example)
        with atomic_path(dst, suffix=".pt2") as tmp:
            torch.export.save(folded, str(tmp))
        bar.update(task, advance=1)
    return report
