"""``bnfold.fold``: one entry point that dispatches on the kind of model."""

from __future__ import annotations

import os
from typing import Any, Literal

from bnfold.report import FoldReport

__all__ = ["fold"]

DirectionArg = Literal["backward", "forward", "both"]


def _is_onnx(model: Any) -> bool:
    if isinstance(model, (str, os.PathLike)):
        return str(model).lower().endswith(".onnx")
    return type(model).__name__ == "ModelProto"


def fold(
    model: Any,
    example_inputs: Any = None,
    *,
    direction: DirectionArg = "both",
    inplace: bool = False,
) -> tuple[Any, FoldReport]:
    """Fold every exactly foldable BatchNorm of ``model``.

    Args:
        model: an ``onnx.ModelProto`` or ``.onnx`` path, or a ``torch.nn.Module``,
            ``torch.fx.GraphModule`` or ``torch.export.ExportedProgram``.
        example_inputs: a tensor or tuple of tensors to capture an ``nn.Module`` with
            (torch only; ONNX models carry their own input types).
        direction: ``"backward"`` folds BN into the preceding layer only, ``"forward"`` into
            the following layer only, ``"both"`` tries backward first, then forward.
        inplace: edit the given model rather than a copy (the default never touches it).

    Returns:
        ``(folded_model, report)``: the folded model is of the same kind as the input
        (ModelProto for ONNX input) and the report holds one decision per BatchNorm.
    """
    if direction not in ("backward", "forward", "both"):
        from bnfold.errors import BadInputError

        raise BadInputError(f"direction must be backward, forward or both, not {direction!r}")
    if _is_onnx(model):
        from bnfold.onnxfold import fold_onnx

        return fold_onnx(model, direction=direction, inplace=inplace)
    from bnfold.torchfold import fold_torch

    return fold_torch(model, example_inputs, direction=direction, inplace=inplace)
