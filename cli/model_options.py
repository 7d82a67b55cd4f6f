"""The options that name a PyTorch model and its inputs, shared by the commands that load one.

The commands pass them to :mod:`bnfold.sources` and :mod:`bnfold.inputspec`; nothing here
reads a model.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

__all__ = [
    "MODEL_HELP",
    "Weights",
    "FactoryArgs",
    "InputShape",
    "Shapes",
    "Dtype",
    "model_spec",
]

MODEL_HELP = (
    "package.module:factory (imported and called: it runs that module's code), timm:NAME, "
    "torchvision:NAME (never downloads weights), a .pt2 ExportedProgram, a TorchScript file, "
    "or a reference model name."
)

Weights = Annotated[
    str | None,
    typer.Option(
        "--weights",
        help="state_dict for the factory: .pt/.pth (torch.load weights_only=True) or "
        ".safetensors. Keys and shapes must match the module exactly.",
    ),
]
FactoryArgs = Annotated[
    list[str] | None,
    typer.Option(
        "--factory-arg",
        help="KEY=VALUE passed to the factory (repeatable); VALUE is a Python literal "
        "(10, 0.5, True, (1, 2)) or else a string.",
    ),
]
InputShape = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        help="Shape of the model's single input, e.g. 1x3x224x224 [default: the example the "
        "source carries, or the size the model declares (timm)].",
    ),
]
Shapes = Annotated[
    list[str] | None,
    typer.Option(
        "--shape",
        help="Shape of one input by forward() parameter name, NAME:1x3x224x224 (repeatable).",
    ),
]
Dtype = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="dtype of the generated inputs: float32, float16, bfloat16, float64, int64, ... "
        "[default: the model's parameter dtype].",
    ),
]


def model_spec(
    source: str, weights: str | None, factory_args: list[str] | None, allow_pickle: bool
) -> Any:
    """A :class:`bnfold.sources.ModelSpec` from the command-line values."""
    from bnfold.sources import ModelSpec, parse_factory_args

    return ModelSpec(
        source,
        weights=weights,
        factory_args=parse_factory_args(factory_args or []),
        allow_pickle=allow_pickle,
    )
