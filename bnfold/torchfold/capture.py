"""Turn a PyTorch model into an fx graph that folding can read and rewrite.

Decision: an ``nn.Module`` is captured with **torch.fx symbolic tracing first**, and with
``torch.export`` only when symbolic tracing fails (data-dependent control flow, unsupported
Python), which needs ``example_inputs``. Symbolic tracing is preferred because

- it keeps ``call_module`` nodes that name the user's own submodules, so the folded result
  can be a copy of the user's module (same class, same methods, same ``state_dict`` names)
  with parameters updated and folded BNs replaced by ``nn.Identity`` (or deleted from a
  plain ``nn.Sequential``);
- it needs no example input, and costs no compilation;
- it shows functional ``F.batch_norm`` calls as such.

Conv, ConvTranspose, Linear and BatchNorm modules (subclasses included, e.g. SyncBatchNorm,
and the BN-like layers of :mod:`bnfold.torchfold.bnlike`, e.g. timm ``BatchNormAct2d`` and
``FrozenBatchNorm2d``) are kept as leaves so that a user subclass is judged as a module rather
than traced into.

A ``torch.fx.GraphModule`` is used as is. A ``torch.export.ExportedProgram`` is unlifted with
``program.module()`` (parameters become ``get_attr`` nodes with their ``state_dict`` names),
folded, and exported again from the folded module with the program's example inputs and
its dynamic dimensions (see :func:`bnfold.torchfold.fold.fold_torch`).

Shapes: with example inputs, fx ``ShapeProp`` records every node's shape; exported graphs
carry fake-tensor shapes already.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.conv import _ConvNd

from bnfold.errors import BadInputError, UnsupportedModelError
from bnfold.torchfold.bnlike import is_bn_like

__all__ = ["Captured", "CaptureError", "capture", "as_example"]

Kind = Literal["module", "graph", "program"]


class CaptureError(UnsupportedModelError):
    """An ``nn.Module`` that neither torch.fx nor torch.export could capture whole.

    :mod:`bnfold.torchfold.partial` catches it to fold the subtrees that can be captured.
    """


class _Tracer(fx.Tracer):
    """fx tracer that keeps every BN, Conv and Linear module (subclasses too) as a leaf.

    A TorchScript submodule is a leaf too: tracing into it would only record an opaque call
    of its compiled ``forward`` on its ``_c`` handle, hiding which module it is.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (_ConvNd, nn.Linear, torch.jit.ScriptModule)) or is_bn_like(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class Captured:
    """A model as a graph module, and how it was obtained.

    Attributes:
        gm: the graph module that folding edits.
        kind: ``module`` (symbolic trace of ``root``), ``graph`` (a GraphModule given by the
            user), or ``program`` (unlifted from an ExportedProgram, or exported as a fallback).
        root: for ``module``, the (copied) module whose submodules ``gm`` shares.
        example: example inputs as a tuple, or None.
        from_program: True when the user gave an ExportedProgram (the result is one too).
    """

    gm: fx.GraphModule
    kind: Kind
    root: nn.Module | None
    example: tuple[Any, ...] | None
    from_program: bool = False


def as_example(example_inputs: Any) -> tuple[Any, ...] | None:
    """Normalise ``example_inputs`` (a tensor, a tuple/list of them, or None) to a tuple."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def _program_example(program: Any) -> tuple[Any, ...] | None:
    """The program's stored example inputs, else zeros shaped like its input placeholders."""
    stored = getattr(program, "example_inputs", None)
    if stored:
        args, kwargs = stored
        if not kwargs:
            return tuple(args)
    user_inputs = set(program.graph_signature.user_inputs)
    vals = [
        n.meta.get("val")
        for n in program.graph.nodes
        if n.op == "placeholder" and n.name in user_inputs
    ]
    if any(not isinstance(v, torch.Tensor) for v in vals):
        return None
    return tuple(torch.zeros(tuple(int(d) for d in v.shape), dtype=v.dtype) for v in vals)


def _export_quietly(root: nn.Module, example: tuple[Any, ...]) -> torch.export.ExportedProgram:
    """``torch.export.export``, without its partial-graph dump when it fails.

    On a failed capture torch.export prints the partial FX graph to stderr (450 KB for
    torchvision's SSDlite) before raising; bnfold then falls back to partial capture and
    reports the export error itself, so the dump is dropped. What export writes to stderr on
    success (warnings) is passed on.
    """
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        program = torch.export.export(root, example)
    if buffer.getvalue():
        sys.stderr.write(buffer.getvalue())
    return program


def _require_initialised(model: nn.Module) -> None:
    """Refuse a model with lazy modules that have not run yet (their weights have no shape).

    Initialising them would mean running the user's model, which changes it; the user does
    that once, on purpose, before folding.
    """
    lazy = (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if isinstance(t, lazy):
            raise BadInputError(
                f"{name} is an uninitialised lazy parameter; run the model once on an example "
                "input (model(x)) to initialise it, then fold"
            )


def _propagate(gm: fx.GraphModule, example: tuple[Any, ...]) -> None:
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example)
    except Exception as e:
        raise BadInputError(
            f"the example inputs do not run through the model ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); pass inputs the model accepts"
        ) from e


def capture(model: Any, example_inputs: Any = None, *, inplace: bool = False) -> Captured:
    """Capture ``model`` as an fx graph module (see the module docstring for the order).

    Args:
        model: an ``nn.Module``, ``fx.GraphModule`` or ``ExportedProgram``.
        example_inputs: inputs to record shapes with (and to export with, as a fallback).
        inplace: for a GraphModule, edit it rather than a copy. An ``nn.Module`` is always
            traced from a copy; the caller transplants results when asked to work in place.

    Raises:
        UnsupportedModelError: a TorchScript module, or a module that neither symbolic
            tracing nor torch.export can capture.
        BadInputError: not a PyTorch model, or example inputs the model rejects.
    """
    example = as_example(example_inputs)
    if isinstance(model, torch.export.ExportedProgram):
        example = example or _program_example(model)
        gm = model.module()
        if example is None:
            raise BadInputError(
                "the ExportedProgram stores no example inputs; pass example_inputs to fold it"
            )
        return Captured(gm, "program", None, example, from_program=True)
    if isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        raise UnsupportedModelError(
            "TorchScript models cannot be folded; fold the nn.Module, or save it with "
            "torch.export.save and fold the .pt2"
        )
    if isinstance(model, fx.GraphModule):
        _require_initialised(model)
        gm = model if inplace else copy.deepcopy(model)
        if example is not None:
            _propagate(gm, example)
        return Captured(gm, "graph", None, example)
    if not isinstance(model, nn.Module):
        raise BadInputError(
            f"cannot fold a {type(model).__name__}; give an nn.Module, a torch.fx.GraphModule, "
            "a torch.export.ExportedProgram or an ONNX model"
        )
    _require_initialised(model)
    root = copy.deepcopy(model)
    try:
        graph = _Tracer().trace(root)
        gm = fx.GraphModule(root, graph, type(root).__name__)
    except Exception as trace_error:
        if example is None:
            raise CaptureError(
                f"{type(model).__name__} cannot be traced symbolically ({type(trace_error).__name__}); "
                "pass example_inputs so bnfold can capture it with torch.export"
            ) from trace_error
        try:
            program = _export_quietly(root, example)
        except Exception as export_error:
            raise CaptureError(
                f"{type(model).__name__} can be captured neither by torch.fx symbolic tracing "
                f"({type(trace_error).__name__}) nor by torch.export "
                f"({type(export_error).__name__}); fold a traceable submodule instead"
            ) from export_error
        return Captured(program.module(), "program", None, example)
    if example is not None:
        _propagate(gm, example)
    return Captured(gm, "module", root, example)
