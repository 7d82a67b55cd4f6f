"""Model sources: one loader for every command (export, fold, recalibrate, verify).

A source is one string, read in this order:

- ``timm:NAME`` / ``torchvision:NAME``: ``timm.create_model(NAME, pretrained=False, **args)``
  or ``torchvision.models.get_model(NAME, weights=None, **args)``. bnfold never downloads
  weights: they come from ``--weights`` only (random initialisation otherwise);
- an existing file: ``.onnx`` (where the command takes ONNX), ``.pt2`` ExportedProgram,
  TorchScript, or a pickled module (only with ``allow_pickle``), read by
  :func:`bnfold.torchfold.load.load_torch`;
- a reference model name from :mod:`bnfold.models`;
- ``package.module:factory``: the module is imported and ``factory(**factory_args)`` must
  return an ``nn.Module``. Importing a module executes its code: naming it is the user's
  explicit choice of code to run, exactly as for ``--data module:function``; the current
  directory is put on ``sys.path`` so that a local package is found. ``factory`` may be a
  dotted attribute path (``nets:Classes.build``) and a class works as a factory.

``weights`` (factories and reference models) is a state_dict: ``.safetensors`` files are read
with the safetensors library (tensors only, no code), anything else with
``torch.load(weights_only=True)``, which refuses files that would run code. A checkpoint that
nests the state_dict under ``state_dict`` or ``model`` is unwrapped, and a ``module.`` prefix
on every key (``DataParallel``) is dropped. The file must match the module exactly: missing
keys, unexpected keys and shape mismatches stop the load with one line naming the first ones.

``factory_args`` come from ``--factory-arg KEY=VALUE``: a VALUE that parses as a Python
literal (``10``, ``0.5``, ``True``, ``None``, ``(1, 2)``, ``'x'``) is that literal, anything
else is the string itself (``act=relu``).
"""

from __future__ import annotations

import ast
import importlib
import keyword
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bnfold.errors import BadInputError, UnsupportedModelError

__all__ = [
    "ModelSpec",
    "LoadedSource",
    "SourceKind",
    "load_source",
    "load_model",
    "is_factory_spec",
    "parse_factory_args",
    "read_state_dict",
    "apply_state_dict",
]

SourceKind = Literal["module", "program", "torchscript", "onnx"]

#: How many offending keys a mismatch message names.
_SHOWN = 3
#: Keys of a checkpoint dict that may hold the state_dict itself.
_NESTED_KEYS = ("state_dict", "model")
_HUBS = ("timm", "torchvision")


@dataclass(frozen=True)
class ModelSpec:
    """What the user named: a source string, plus weights and factory arguments.

    Attributes:
        source: see the module docstring.
        weights: a state_dict file for a factory or reference model.
        factory_args: keyword arguments for the factory.
        allow_pickle: accept a pickled whole-module file (unpickling runs its code).
    """

    source: str
    weights: str | None = None
    factory_args: Mapping[str, Any] = field(default_factory=dict)
    allow_pickle: bool = False


@dataclass
class LoadedSource:
    """A loaded model and what the source says about its inputs.

    Attributes:
        model: an ``nn.Module``, ``ExportedProgram``, ``ScriptModule``, or an ONNX path.
        kind: which of those it is.
        label: a name for reports and default output names (``resnet18``, ``model``).
        example_inputs: inputs the source carries (reference models, ``.pt2`` files).
        input_size: the per-sample input size the model declares (timm's
            ``pretrained_cfg["input_size"]``), without the batch dimension.
        path: the file the model came from (outputs must not overwrite it).
    """

    model: Any
    kind: SourceKind
    label: str
    example_inputs: tuple[Any, ...] | None = None
    input_size: tuple[int, ...] | None = None
    path: Path | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """The files this source was read from (the model and, if any, the weights)."""
        return (self.path,) if self.path is not None else ()


def _is_identifier_path(text: str) -> bool:
    parts = text.split(".")
    return all(p.isidentifier() and not keyword.iskeyword(p) for p in parts)


def is_factory_spec(text: str) -> bool:
    """Whether ``text`` names ``package.module:factory`` or a ``timm:``/``torchvision:`` model
    (an existing file of that name wins)."""
    module, sep, attr = text.partition(":")
    if not sep or not module or not attr or Path(text).exists():
        return False
    if module in _HUBS:
        return True
    return _is_identifier_path(module) and _is_identifier_path(attr)


def parse_factory_args(items: Iterable[str]) -> dict[str, Any]:
    """``["num_classes=10", "act=relu"]`` -> ``{"num_classes": 10, "act": "relu"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise BadInputError(
                f"--factory-arg {item!r} must look like KEY=VALUE, e.g. num_classes=10"
            )
        if key in out:
            raise BadInputError(f"--factory-arg {key} given twice; give it once")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            out[key] = value
    return out


def load_model(
    source: str,
    *,
    weights: str | None = None,
    factory_args: Mapping[str, Any] | None = None,
    input_shape: Any = None,
    shapes: Any = None,
    dtype: Any = None,
    allow_pickle: bool = False,
) -> tuple[Any, tuple[Any, ...] | None]:
    """Load a PyTorch model from a source and build its example inputs.

    The Python counterpart of the CLI's model arguments::

        model, inputs = bnfold.load_model(
            "mypkg.nets:build", weights="w.safetensors", factory_args={"num_classes": 10},
            input_shape=(1, 3, 224, 224),
        )

    Args:
        source, weights, factory_args, allow_pickle: see :class:`ModelSpec`.
        input_shape, shapes, dtype: see :func:`bnfold.inputspec.example_inputs`.

    Returns:
        ``(model, example_inputs)``; the inputs are None when neither the source nor the
        arguments give a shape.
    """
    from bnfold.inputspec import example_inputs

    loaded = load_source(
        ModelSpec(source, weights, dict(factory_args or {}), allow_pickle), onnx_ok=False
    )
    inputs = example_inputs(
        loaded, input_shape=input_shape, shapes=shapes, dtype=dtype, required=False
    )
    return loaded.model, inputs


def load_source(spec: ModelSpec, *, onnx_ok: bool = True) -> LoadedSource:
    """Resolve a :class:`ModelSpec` into a model (see the module docstring for the order).

    Args:
        spec: what the user named.
        onnx_ok: whether the command takes an ONNX model (fold, verify, recalibrate).

    Raises:
        BadInputError: an unknown source, factory or module; weights that do not match; an
            option that does not apply to the source.
        UnsupportedModelError: a factory that fails or returns something other than a module.
    """
    src = spec.source
    path = Path(src)
    if src.lower().endswith(".onnx") and not is_factory_spec(src):
        if not onnx_ok:
            raise BadInputError(
                f"{src} is already ONNX; use `bnfold fold` to fold it, `bnfold export` takes "
                "a PyTorch model"
            )
        if not path.is_file():
            raise BadInputError(f"model file {src} does not exist; give an existing .onnx file")
        _no_factory_options(spec, "an ONNX file")
        return LoadedSource(src, "onnx", path.stem, path=path)
    if is_factory_spec(src):
        module, input_size = _from_factory(spec)
        name = src.partition(":")[2].rsplit(".", 1)[-1]
        if spec.weights is not None:
            apply_state_dict(module, read_state_dict(spec.weights), spec.weights, src)
        return LoadedSource(module.eval(), "module", name, input_size=input_size)
    from bnfold.models import REGISTRY
    from bnfold.torchfold.load import is_torchscript, load_torch

    if not path.exists() and src in REGISTRY:
        if spec.factory_args:
            raise BadInputError(
                f"--factory-arg does not apply to the reference model {src}; name its factory "
                "as module:function to pass arguments"
            )
        model, example = load_torch(src)
        if spec.weights is not None:
            apply_state_dict(model, read_state_dict(spec.weights), spec.weights, src)
        return LoadedSource(model, "module", src, example_inputs=example)
    if not path.exists() and ":" in src:
        raise BadInputError(
            f"{src} is not a model source; give package.module:factory (e.g. "
            "torchvision.models:resnet18), timm:NAME, torchvision:NAME, a model file or a "
            "reference model name"
        )
    _no_factory_options(spec, "a model file")
    model, example = load_torch(src, allow_pickle=spec.allow_pickle)
    kind: SourceKind = "module"
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        kind = "program"
    elif is_torchscript(model):
        kind = "torchscript"
    return LoadedSource(model, kind, path.stem, example_inputs=example, path=path)


def _no_factory_options(spec: ModelSpec, what: str) -> None:
    if spec.weights is not None:
        raise BadInputError(
            f"--weights applies to a factory (module:factory, timm:NAME, torchvision:NAME) or a "
            f"reference model, not to {what} ({spec.source}), which holds its own weights"
        )
    if spec.factory_args:
        raise BadInputError(f"--factory-arg applies to a factory, not to {what} ({spec.source})")


def _from_factory(spec: ModelSpec) -> tuple[Any, tuple[int, ...] | None]:
    """Build the module; returns it and the input size it declares (timm), if any."""
    import torch

    module_name, _, attr = spec.source.partition(":")
    args = dict(spec.factory_args)
    if module_name in _HUBS:
        for banned in ("pretrained", "weights", "pretrained_cfg_overlay"):
            if banned in args:
                raise BadInputError(
                    f"--factory-arg {banned} is not allowed: bnfold never downloads weights; "
                    "give them as a state_dict file with --weights"
                )
        build = _hub_factory(module_name, attr)
        where = f"{module_name}:{attr}"
    else:
        factory = _import_factory(module_name, attr, spec.source)
        build = factory
        where = spec.source
    try:
        module = build(**args)
    except BadInputError:
        raise
    except TypeError as e:
        raise BadInputError(f"{where} does not take these arguments: {_first_line(e)}") from None
    except Exception as e:  # the user's factory can raise anything
        raise UnsupportedModelError(
            f"{where} raised {type(e).__name__}: {_first_line(e)}"
        ) from None
    if not isinstance(module, torch.nn.Module):
        raise UnsupportedModelError(
            f"{where} returned a {type(module).__name__}, not a torch.nn.Module"
        )
    return module, _declared_input_size(module)


def _hub_factory(hub: str, name: str) -> Any:
    """``timm.create_model``/``torchvision.models.get_model`` with weights forced off."""
    try:
        package = importlib.import_module(hub)
    except ImportError:
        raise BadInputError(
            f"{hub}:{name} needs the {hub} package; install it (pip install {hub})"
        ) from None
    if hub == "timm":
        known = set(package.list_models())
        if name not in known:
            raise BadInputError(
                f"timm has no model {name!r}; list them with timm.list_models('{name[:4]}*')"
            )
        return lambda **kw: package.create_model(name, pretrained=False, **kw)
    models = importlib.import_module("torchvision.models")
    known = set(models.list_models())
    if name not in known:
        close = sorted(n for n in known if n.startswith(name[:3]))[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise BadInputError(f"torchvision has no model {name!r}{hint}")
    return lambda **kw: models.get_model(name, weights=None, **kw)


def _import_factory(module_name: str, attr: str, spec: str) -> Any:
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInputError(f"cannot import {module_name!r} for {spec}: {_first_line(e)}") from None
    except Exception as e:  # importing runs the module's code, which can raise anything
        raise BadInputError(
            f"importing {module_name!r} for {spec} raised {type(e).__name__}: {_first_line(e)}"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadInputError(f"{module_name} has no factory {attr!r} ({spec})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadInputError(f"{spec} is a {type(obj).__name__}, not a callable factory")
    return obj


def _declared_input_size(module: Any) -> tuple[int, ...] | None:
    """timm models carry ``pretrained_cfg["input_size"]`` (``(3, 224, 224)``)."""
    for name in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(module, name, None)
        if isinstance(cfg, Mapping):
            size = cfg.get("input_size")
            if (
                isinstance(size, (tuple, list))
                and size
                and all(isinstance(d, int) and d > 0 for d in size)
            ):
                return tuple(size)
    return None


def read_state_dict(path: str) -> dict[str, Any]:
    """A state_dict from ``.safetensors`` or a ``torch.save`` file, never running code."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"weights file {path} does not exist")
    if p.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise BadInputError(
                f"{path} is a .safetensors file; install safetensors (pip install "
                "'bnfold[safetensors]')"
            ) from None
        try:
            return dict(load_file(str(p), device="cpu"))
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise BadInputError(f"cannot read safetensors file {path}: {_first_line(e)}") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInputError(
            f"cannot read {path} as a state_dict with weights_only=True ({type(e).__name__}: "
            f"{_first_line(e)}); save it with torch.save(model.state_dict(), path) or as "
            ".safetensors"
        ) from None
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        nested = [k for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)]
        if nested:
            obj = obj[nested[0]]
    if not isinstance(obj, Mapping) or not _all_tensors(obj):
        raise BadInputError(
            f"{path} holds a {type(obj).__name__}, not a state_dict (a mapping of names to "
            "tensors); save it with torch.save(model.state_dict(), path)"
        )
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _all_tensors(obj: Mapping[Any, Any]) -> bool:
    import torch

    return all(isinstance(v, torch.Tensor) for v in obj.values())


def apply_state_dict(module: Any, state: Mapping[str, Any], path: str, source: str) -> None:
    """``module.load_state_dict(state, strict=True)`` after a check that names offenders.

    Raises:
        BadInputError: missing keys, unexpected keys or a shape mismatch (first few named).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches (file vs model)", shapes),
    ):
        if items:
            shown = ", ".join(items[:_SHOWN]) + (", ..." if len(items) > _SHOWN else "")
            problems.append(f"{len(items)} {label} ({shown})")
    if problems:
        raise BadInputError(
            f"weights {path} do not match {source}: " + "; ".join(problems) + "; check the "
            "factory and its --factory-arg values"
        )
    try:
        module.load_state_dict(state, strict=True)
    except Exception as e:  # e.g. a dtype that cannot be copied
        raise BadInputError(f"cannot load weights {path} into {source}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
