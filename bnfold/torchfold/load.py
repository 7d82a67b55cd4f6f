"""Load a PyTorch model from a file or a reference-model name.

Formats, tried by what the file *is* rather than by its extension alone:

- an ExportedProgram archive (``torch.export.save``; ``.pt2``) -> ``torch.export.load``, once
  :mod:`bnfold.torchfold.pt2_safety` has checked that loading it cannot run code from the
  file (the archive holds pickles, and torch unpickles some of them without restriction);
- a TorchScript archive (``torch.jit.save``) -> ``torch.jit.load``; bnfold can load it but
  cannot fold it (scripted code is not an fx graph), so the folder says so in one line;
- a pickled whole ``nn.Module`` (``torch.save(model)``) -> only with ``allow_pickle=True``,
  because unpickling runs arbitrary code from the file;
- a name from :func:`bnfold.models.names` when no such file exists -> the reference model and
  its example input.

A ``state_dict`` file holds weights without the code that defines the network, so it cannot
be loaded on its own: build the module with its factory, ``load_state_dict`` it, and call
:func:`bnfold.fold` on the module.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from bnfold.errors import BadInputError, UnsupportedModelError
from bnfold.torchfold.pt2_safety import check_pt2_archive, restricted_unpickling

__all__ = ["load_torch", "is_torchscript", "require_foldable"]


def _known_names() -> str:
    from bnfold.models import names

    return ", ".join(names())


def _zip_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def is_torchscript(model: Any) -> bool:
    """True for a ``torch.jit.ScriptModule`` / ``ScriptFunction``."""
    import torch

    return isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction))


def _example_from_program(program: Any) -> tuple[Any, ...] | None:
    example = getattr(program, "example_inputs", None)
    if not example:
        return None
    args, kwargs = example
    return tuple(args) if not kwargs else None


def load_torch(src: str, *, allow_pickle: bool = False) -> tuple[Any, tuple[Any, ...] | None]:
    """Load a PyTorch model and, where the source carries one, an example input.

    Args:
        src: a file path (``.pt2`` ExportedProgram, TorchScript, or pickled module) or the
            name of a reference model in :mod:`bnfold.models`.
        allow_pickle: accept a pickled whole-module file. Unpickling executes code stored in
            the file, so only enable it for files you trust.

    Returns:
        ``(model, example_inputs)``: an ``ExportedProgram``, ``ScriptModule`` or ``nn.Module``,
        and a tuple of example tensors (None when the file stores none).

    Raises:
        BadInputError: a missing file, an unknown name, a refused pickle, a state_dict, or a
            file that is none of the supported formats.
    """
    import torch

    path = Path(src)
    if not path.exists():
        from bnfold.models import REGISTRY, build

        if src in REGISTRY:
            model, example = build(src)
            return model, (example,)
        raise BadInputError(
            f"{src} is neither an existing file nor a reference model; known models: "
            f"{_known_names()}"
        )
    if path.is_dir():
        raise BadInputError(f"{src} is a folder; give a .pt2, TorchScript or .pt file")
    members = _zip_members(path)
    if any(m.endswith("serialized_exported_program.json") or "/models/" in m for m in members):
        check_pt2_archive(path)
        try:
            with restricted_unpickling():
                program = torch.export.load(str(path))
        except Exception as e:  # torch raises many types for a damaged archive
            raise BadInputError(f"cannot read ExportedProgram {src}: {e}".splitlines()[0]) from e
        return program, _example_from_program(program)
    if any(m.endswith("constants.pkl") or m.endswith("/code/") for m in members) or any(
        "/code/" in m for m in members
    ):
        try:
            return torch.jit.load(str(path), map_location="cpu"), None
        except Exception as e:
            raise BadInputError(f"cannot read TorchScript file {src}: {e}".splitlines()[0]) from e
    if not members and path.read_bytes()[:1] != b"\x80":
        raise BadInputError(
            f"{src} is not a PyTorch file; give a .pt2 ExportedProgram, a TorchScript file, a "
            f"pickled module, or a reference model name ({_known_names()})"
        )
    return _load_pickle(path, allow_pickle)


def _load_pickle(path: Path, allow_pickle: bool) -> tuple[Any, tuple[Any, ...] | None]:
    """A ``torch.save`` file: a state_dict is refused, a whole module needs opting in."""
    import torch

    try:
        # weights_only=True never runs code: safe to look at what the file holds.
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        safe_error = e
    else:
        if isinstance(obj, dict):
            raise BadInputError(_state_dict_message(path))
        if isinstance(obj, torch.nn.Module):
            return obj.eval(), None
        raise BadInputError(f"{path} holds a {type(obj).__name__}, not a model")
    if not allow_pickle:
        raise BadInputError(
            f"{path} is a pickled model; unpickling runs arbitrary code from the file, so "
            "bnfold refuses it unless you trust it and pass allow_pickle=True (CLI: "
            "--allow-pickle), or save it with torch.export.save as a .pt2 instead"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise BadInputError(
            f"cannot read {path} as a PyTorch file ({type(safe_error).__name__}); give a .pt2 "
            "ExportedProgram, a TorchScript file, a pickled module or a reference model name"
        ) from e
    if isinstance(obj, dict):
        raise BadInputError(_state_dict_message(path))
    if not isinstance(obj, torch.nn.Module):
        raise BadInputError(f"{path} holds a {type(obj).__name__}, not an nn.Module")
    return obj, None


def _state_dict_message(path: Path) -> str:
    """The way forward for a weights-only file, for every command (fold, recalibrate, ...)."""
    return (
        f"{path} holds a state_dict (weights only, no network code); name the code that builds "
        f"the network and pass the file as its weights: CLI `package.module:factory --weights "
        f"{path}` (or timm:NAME / torchvision:NAME), Python bnfold.load_model('package.module:factory', "
        "weights=...) and then bnfold.fold / bnfold.recalibrate / bnfold.export on the module"
    )


def require_foldable(model: Any, src: str) -> None:
    """Refuse a TorchScript model with a one-line reason (it has no fx graph to rewrite)."""
    if is_torchscript(model):
        raise UnsupportedModelError(
            f"{src} is TorchScript, which bnfold cannot fold; save the model with "
            "torch.export.save (a .pt2 ExportedProgram) and fold that"
        )
