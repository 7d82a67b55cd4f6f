"""Example inputs of a PyTorch model from the user's shape options.

Capture, ONNX export and verification need one example batch. It comes, in this order, from

1. ``input_shape`` (CLI ``--input-shape 1x3x224x224``): the model's single input;
2. ``shapes`` (CLI ``--shape NAME:DIMS``, repeatable): one shape per ``forward`` parameter,
   matched by name and fed in the order of ``forward``'s signature;
3. the example the source carries (reference models, ``.pt2`` files);
4. the size the model declares (timm's ``pretrained_cfg["input_size"]``), batch 1.

Otherwise a command that needs inputs stops with one line asking for ``--input-shape``.
Generated values are reproducible from the seed: floats standard normal (drawn in float32,
then cast), integers uniform in ``[0, 4)`` (small, so index-like inputs stay in range),
booleans fair coin flips, as in verification. ``dtype`` (CLI ``--dtype``) is the inputs' dtype;
by default the dtype of the model's first floating parameter.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from bnfold.errors import BadInputError

__all__ = ["DTYPES", "parse_dims", "parse_dtype", "example_inputs", "input_names"]

#: ``--dtype`` names -> torch dtype attribute names.
DTYPES = {
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
    "float64": "float64",
    "double": "float64",
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "int64": "int64",
    "long": "int64",
    "int32": "int32",
    "int": "int32",
    "uint8": "uint8",
    "bool": "bool",
}
_INT_HIGH = 4


def parse_dims(text: str | Sequence[int], option: str = "--input-shape") -> tuple[int, ...]:
    """``"1x3x224x224"`` (or a sequence of ints) -> ``(1, 3, 224, 224)``; positive dims only."""
    if isinstance(text, str):
        parts = text.strip().lower().split("x")
        try:
            dims = tuple(int(p) for p in parts)
        except ValueError:
            raise BadInputError(
                f"{option} {text!r}: give positive integers joined by 'x', e.g. 1x3x224x224"
            ) from None
    else:
        try:
            dims = tuple(int(d) for d in text)
        except (TypeError, ValueError):
            raise BadInputError(f"{option} {text!r}: give a sequence of positive ints") from None
    if not dims or any(d <= 0 for d in dims):
        raise BadInputError(f"{option} {text!r}: every dim must be a positive integer")
    return dims


def parse_dtype(name: Any) -> Any:
    """A torch dtype from ``float32``/``fp16``/``int64``/... or a torch dtype itself."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    key = DTYPES.get(str(name).strip().lower().removeprefix("torch."))
    if key is None:
        raise BadInputError(
            f"--dtype {name!r} is not supported; use one of {', '.join(sorted(set(DTYPES)))}"
        )
    return getattr(torch, key)


def _positional_params(model: Any) -> list[inspect.Parameter]:
    """The positional parameters of ``model``'s forward (none when it has no signature)."""
    import torch

    target = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    try:
        params = inspect.signature(target.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p for p in params if p.kind in kinds]


def input_names(model: Any) -> list[str]:
    """Names of the positional inputs of ``model``'s forward (``x``, ``input_ids``, ...)."""
    return [p.name for p in _positional_params(model)]


def _required_names(model: Any) -> list[str]:
    return [p.name for p in _positional_params(model) if p.default is inspect.Parameter.empty]


def _model_dtype(model: Any) -> Any:
    import torch

    target = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    params = getattr(target, "parameters", None)
    if callable(params):
        for p in params():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _random(shape: tuple[int, ...], dtype: Any, gen: Any) -> Any:
    import torch

    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if not dtype.is_floating_point:
        return torch.randint(0, _INT_HIGH, shape, generator=gen).to(dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def _shape_map(shapes: Any) -> dict[str, tuple[int, ...]]:
    if isinstance(shapes, Mapping):
        return {str(k): parse_dims(v, f"--shape {k}") for k, v in shapes.items()}
    from bnfold.verification.inputs import parse_shapes

    return parse_shapes([shapes] if isinstance(shapes, str) else list(shapes))


def example_inputs(
    loaded: Any,
    *,
    input_shape: Any = None,
    shapes: Any = None,
    dtype: Any = None,
    seed: int = 0,
    required: bool = True,
) -> tuple[Any, ...] | None:
    """One example batch for ``loaded`` (a :class:`bnfold.sources.LoadedSource`).

    Args:
        loaded: the model and what its source says about inputs.
        input_shape: the single input's shape (``"1x3x224x224"`` or a tuple).
        shapes: ``{"x": (1, 3, 224, 224)}`` or ``["x:1x3x224x224", ...]``.
        dtype: the inputs' dtype (name or torch dtype); default the model's parameter dtype.
        seed: seed of the generated values.
        required: raise when no shape is known (else return None).

    Raises:
        BadInputError: bad or conflicting shape options, names the model does not take, or
            no shape at all when ``required``.
    """
    import torch

    if input_shape is not None and shapes:
        raise BadInputError("give --input-shape (one input) or --shape NAME:DIMS, not both")
    model = loaded.model
    gen = torch.Generator().manual_seed(seed)
    chosen = parse_dtype(dtype) if dtype is not None else None
    if input_shape is not None:
        names = _required_names(model)
        if len(names) > 1:
            raise BadInputError(
                f"{loaded.label} takes {len(names)} inputs ({', '.join(names)}); give one "
                "--shape NAME:DIMS for each instead of --input-shape"
            )
        dims = parse_dims(input_shape)
        return (_random(dims, chosen or _model_dtype(model), gen),)
    if shapes:
        by_name = _shape_map(shapes)
        names = input_names(model)
        unknown = [n for n in by_name if n not in names]
        if unknown:
            raise BadInputError(
                f"--shape for unknown input(s) {', '.join(unknown)}; {loaded.label}'s inputs "
                f"are: {', '.join(names) or 'unknown (use --input-shape)'}"
            )
        required_names = _required_names(model)
        missing = [n for n in required_names if n not in by_name]
        if missing:
            raise BadInputError(
                f"no --shape for input(s) {', '.join(missing)} of {loaded.label}; give "
                f"--shape NAME:DIMS for each of {', '.join(required_names)}"
            )
        # positional order; an optional parameter may be given only if those before it are
        ordered = names[: max(names.index(n) for n in by_name) + 1]
        gaps = [n for n in ordered if n not in by_name]
        if gaps:
            raise BadInputError(
                f"--shape skips input(s) {', '.join(gaps)} of {loaded.label}; inputs are fed "
                "by position, so give them too"
            )
        use = chosen or _model_dtype(model)
        return tuple(_random(by_name[n], use, gen) for n in ordered)
    if loaded.example_inputs is not None:
        if chosen is None:
            return tuple(loaded.example_inputs)
        return tuple(
            x.to(chosen) if isinstance(x, torch.Tensor) else x for x in loaded.example_inputs
        )
    if loaded.input_size is not None:
        return (_random((1, *loaded.input_size), chosen or _model_dtype(model), gen),)
    if required:
        raise BadInputError(
            f"{loaded.label} has no example inputs and declares no input size; give "
            "--input-shape, e.g. --input-shape 1x3x224x224 (or --shape NAME:DIMS per input)"
        )
    return None
