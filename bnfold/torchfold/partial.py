"""Fold a model that cannot be captured whole, one capturable subtree at a time.

Detection models (torchvision FasterRCNN, SSD, SSDlite) take lists of images, return lists of
dicts and branch on data, so neither torch.fx nor torch.export captures them whole; their
backbone, FPN and heads are plain networks. :func:`fold_parts` walks the module tree from the
root: a child whose subtree holds a BN-like layer is traced with torch.fx and folded as a
model of its own (:func:`bnfold.torchfold.fold.fold_whole`); a child that cannot be traced
is walked in turn. Each folded child is put back at its path in (a copy of) the user's model,
so the result is the user's model, its own class, with the capturable parts folded.

Decisions:

- **torch.fx only for parts.** A part captured by torch.export is specialised to the shapes
  it was exported with (the export guards reject any other), and a detection backbone sees a
  different image size per batch. An fx trace is shape-agnostic: a part folded in it comes
  back as its own class (module surgery), or as an fx GraphModule where a functional call was
  folded.
- **Shapes from a real run.** With ``example_inputs``, the model runs once on them with a
  forward pre-hook on every candidate part, recording the first call's arguments (cloned, as
  later in-place ops may change them); those give each part the shapes that prove channel
  axes. The run uses a copy whose BN buffers are restored afterwards, so a model in training
  mode keeps its statistics. Without example inputs, parts are folded where module types
  alone prove the axes (Conv2d -> BatchNorm2d).
- **Every part in the report.** ``FoldReport.parts`` lists each part tried: folded (and how),
  or left with the capture error; BNs in the parts left get a decision under their module
  path, and BN-like layers whose parent cannot be captured are kept with that reason.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from bnfold.errors import BadInputError, BnfoldError
from bnfold.report import FoldReport
from bnfold.sites import FoldDecision, SkipCode
from bnfold.torchfold.bnlike import is_bn_like
from bnfold.torchfold.capture import CaptureError, as_example

__all__ = ["fold_parts"]

Recorded = dict[str, tuple[tuple[Any, ...], dict[str, Any]]]


def _has_bn(module: nn.Module) -> bool:
    return any(is_bn_like(m) for m in module.modules())


def _first_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _record_inputs(root: nn.Module, example: tuple[Any, ...]) -> Recorded:
    """Run ``root`` once and keep each candidate part's first call arguments."""
    recorded: Recorded = {}
    handles = []

    def keep(path: str):  # type: ignore[no-untyped-def]
        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if path not in recorded:
                recorded[path] = (tree_map(_clone, args), tree_map(_clone, kwargs))

        return hook

    for path, mod in root.named_modules():
        if path and not is_bn_like(mod) and _has_bn(mod):
            handles.append(mod.register_forward_pre_hook(keep(path), with_kwargs=True))
    saved = {k: v.detach().clone() for k, v in root.state_dict(keep_vars=True).items()}
    try:
        with torch.no_grad():
            root(*example)
    except Exception as e:
        raise BadInputError(
            f"the example inputs do not run through the model ({_first_line(e)}); pass inputs "
            "the model accepts"
        ) from e
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for k, v in root.state_dict(keep_vars=True).items():
                v.copy_(saved[k])
    return recorded


def _prefixed(path: str, d: FoldDecision) -> FoldDecision:
    """``d`` with every name made a path in the whole model."""

    def full(name: str | None) -> str | None:
        return f"{path}.{name}" if name else name

    return FoldDecision(
        bn=full(d.bn) or path,
        folded=d.folded,
        direction=d.direction,
        target=full(d.target),
        code=d.code,
        reason=d.reason,
        params={full(k) or k: [full(v) or v for v in vs] for k, vs in d.params.items()},
        tensor=full(d.tensor),
    )


class _Walk:
    def __init__(self, recorded: Recorded, direction: str) -> None:
        self.recorded = recorded
        self.direction = direction
        self.decisions: list[FoldDecision] = []
        self.parts: list[dict[str, str]] = []

    def fold_child(self, parent: nn.Module, name: str, path: str) -> None:
        child = getattr(parent, name)
        args, kwargs = self.recorded.get(path, (None, {}))
        example = args if args is not None and not kwargs else None
        from bnfold.torchfold.fold import fold_whole

        if (
            type(child).forward is nn.Module.forward
        ):  # ModuleList, ModuleDict: the parent calls items
            self.walk(child, path, "a container without a forward of its own")
            return
        try:
            folded, report = self._fold(child, example, fold_whole)
        except BnfoldError as e:
            error = e.__cause__ if isinstance(e, CaptureError) and e.__cause__ else e
            self.walk(child, path, _first_line(error))
            return
        parent.register_module(name, folded)
        self.decisions += [_prefixed(path, d) for d in report.decisions]
        how = "torch.fx" + (" with recorded inputs" if example is not None else ", no shapes")
        self.parts.append({"path": path, "status": "folded", "detail": f"{how}; {report.result}"})

    def _fold(self, child: nn.Module, example: Any, fold_whole: Any) -> tuple[Any, FoldReport]:
        """Fold ``child`` from its fx trace only (see the module docstring: no torch.export)."""
        from bnfold.torchfold.capture import _Tracer

        try:
            _Tracer().trace(copy.deepcopy(child))
        except Exception as e:
            raise CaptureError(f"torch.fx cannot trace it ({_first_line(e)})") from e
        return fold_whole(child, example, direction=self.direction)  # type: ignore[no-any-return]

    def walk(self, module: nn.Module, path: str, error: str) -> None:
        """Fold what can be folded below ``module``, which cannot be captured (``error``)."""
        where = path or "the model"
        children = list(module.named_children())
        self.parts.append({"path": path, "status": "left", "detail": error})
        for name, child in children:
            full = f"{path}.{name}" if path else name
            if not _has_bn(child):
                continue
            if is_bn_like(child):
                self._kept(full, where, error)
                continue
            self.fold_child(module, name, full)

    def _kept(self, bn: str, where: str, error: str) -> None:
        self.decisions.append(
            FoldDecision.skip(
                bn,
                SkipCode.UNSUPPORTED,
                f"{where} calls it but cannot be captured ({error}), so the layers around the "
                "BN are not known",
            )
        )


def fold_parts(
    model: Any,
    example_inputs: Any,
    whole_error: CaptureError,
    *,
    direction: str = "both",
    inplace: bool = False,
) -> tuple[nn.Module, FoldReport]:
    """Fold the capturable subtrees of ``model`` (see the module docstring).

    Args:
        model: an ``nn.Module`` that could not be captured whole.
        example_inputs: what ``model`` is called with (a tensor, or a tuple of arguments;
            a detection model: ``([image],)``), or None.
        whole_error: why the whole model could not be captured (reported for the root).
        direction: ``backward``, ``forward`` or ``both``.
        inplace: fold the given model itself rather than a copy.

    Returns:
        the model (its own class) with every capturable part folded, and the report.
    """
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise whole_error
    root = model if inplace else copy.deepcopy(model)
    example = as_example(example_inputs)
    recorded = _record_inputs(root, example) if example is not None else {}
    walk = _Walk(recorded, direction)
    walk.walk(root, "", str(whole_error).splitlines()[0])
    report = FoldReport(model=type(model).__name__, framework="torch", decisions=walk.decisions)
    report.parts = walk.parts
    report.result = (
        f"{type(model).__name__}, the given model's own class, which neither torch.fx nor "
        "torch.export captures whole: the parts listed were folded and put back at their paths"
    )
    return root, report
