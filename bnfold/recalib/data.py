"""Turn any iterable of batches into model calls, within a budget, on a device.

A batch is passed to the model as follows (``forward_fn`` overrides all of it):

* a tensor ``x``: ``model(x)``;
* a tuple or list: ``model(batch[0])`` — the first element is the input, the rest (targets,
  sample ids, ...) is ignored, because torchvision-style ``(input, target)`` pairs are by far
  the most common loader output. A model with several positional inputs takes a
  ``forward_fn=lambda m, b: m(*b)`` or a dict batch;
* a dict: ``model(**batch)`` (keyword arguments, as Hugging Face style loaders yield them).

The budget counts *samples* as the size of the first dimension of the input tensor (the first
tensor found in the batch); the last batch is truncated so exactly ``num_samples`` samples are
seen. ``len()`` is never called, so generators and iterable datasets work.

:func:`load_data_spec` reads the CLI's ``--data`` argument: a ``.npy``/``.npz`` file, a folder
of them, or ``module:function`` returning an iterable.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from bnfold.errors import BadInputError

__all__ = [
    "ForwardFn",
    "call_model",
    "iter_budget",
    "to_device",
    "batch_size",
    "first_input",
    "load_data_spec",
]

ForwardFn = Callable[[Any, Any], Any]


def to_device(batch: Any, device: torch.device | str | None) -> Any:
    """Move every tensor of a (nested) batch to ``device``; None leaves it where it is."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _as_tensor(x: Any) -> Any:
    """numpy arrays become tensors; anything else is left alone."""
    if type(x).__module__ == "numpy" and hasattr(x, "shape"):
        return torch.from_numpy(x)
    return x


def first_input(batch: Any) -> Any:
    """The model input of ``batch`` as :func:`call_model` uses it."""
    if isinstance(batch, tuple | list):
        if not batch:
            raise BadInputError("a batch is an empty tuple/list; yield (input, ...) or a tensor")
        return _as_tensor(batch[0])
    return _as_tensor(batch)


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        for v in batch.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(batch, tuple | list):
        for v in batch:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def batch_size(batch: Any) -> int:
    """Samples in ``batch``: the first dimension of its first tensor (1 if none is found)."""
    t = _first_tensor(batch)
    if t is None or t.dim() == 0:
        return 1
    return int(t.shape[0])


def _truncate(batch: Any, n: int) -> Any:
    """The first ``n`` samples of every tensor in ``batch`` that has a batch dimension."""
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.dim() else batch
    if isinstance(batch, Mapping):
        return {k: _truncate(v, n) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_truncate(v, n) for v in batch)
    return batch


def _normalise(batch: Any) -> Any:
    """numpy arrays inside a batch become tensors, so models and budgets see one type."""
    if isinstance(batch, Mapping):
        return {k: _as_tensor(v) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_as_tensor(v) for v in batch)
    return _as_tensor(batch)


def iter_budget(
    data: Iterable[Any], *, num_samples: int | None = None, num_batches: int | None = None
) -> Iterator[Any]:
    """Yield batches of ``data`` until the budget is spent or the data ends.

    Args:
        data: any iterable (a DataLoader, a list, a generator); ``len()`` is never used.
        num_samples: stop after this many samples, truncating the last batch.
        num_batches: stop after this many batches.
    """
    if num_samples is not None and num_samples <= 0:
        raise BadInputError(f"num_samples must be positive, got {num_samples}")
    if num_batches is not None and num_batches <= 0:
        raise BadInputError(f"num_batches must be positive, got {num_batches}")
    try:
        it = iter(data)
    except TypeError:
        raise BadInputError(
            f"data of type {type(data).__name__} is not iterable; pass a DataLoader, a list of "
            "batches or a generator"
        ) from None
    seen = 0
    for i, batch in enumerate(it):
        if num_batches is not None and i >= num_batches:
            return
        batch = _normalise(batch)
        if num_samples is not None:
            left = num_samples - seen
            size = batch_size(batch)
            if size > left:
                batch = _truncate(batch, left)
                size = left
            seen += size
            yield batch
            if seen >= num_samples:
                return
        else:
            yield batch


def call_model(model: Any, batch: Any, forward_fn: ForwardFn | None = None) -> Any:
    """Call ``model`` on ``batch`` following the rules in the module docstring."""
    if forward_fn is not None:
        return forward_fn(model, batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(first_input(batch))


# ---------------------------------------------------------------------------------------------
# --data SPEC for the CLI


def _load_array_file(path: Path) -> list[Any]:
    import numpy as np

    try:
        if path.suffix == ".npy":
            return [np.load(path, allow_pickle=False)]
        with np.load(path, allow_pickle=False) as z:
            if not z.files:
                raise BadInputError(f"{path} holds no arrays; save at least one with np.savez")
            # one array: a stack of samples; several: one keyword input each (dict batch)
            if len(z.files) == 1:
                return [z[z.files[0]]]
            return [{k: z[k] for k in z.files}]
    except BadInputError:
        raise
    except Exception as e:
        raise BadInputError(f"cannot read {path}: {e}".splitlines()[0]) from None


def load_data_spec(spec: str, *, batch_size: int = 32) -> Iterable[Any]:
    """Resolve the CLI's ``--data SPEC`` into an iterable of batches.

    Args:
        spec: a ``.npy`` file (samples stacked on the first axis), a ``.npz`` file (one array:
            samples; several arrays: keyword inputs of the model, each with samples first), a
            folder of such files (read in sorted name order, each file split into batches), or
            ``module:function`` naming a function that takes no argument and returns an
            iterable of batches.
        batch_size: how many samples of an array file go into one batch.
    """
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
        if not files:
            raise BadInputError(f"folder {spec} holds no .npy or .npz files")
        return _ArrayBatches(files, batch_size)
    if path.suffix in (".npy", ".npz"):
        if not path.is_file():
            raise BadInputError(f"data file {spec} does not exist")
        return _ArrayBatches([path], batch_size)
    if ":" in spec and not path.exists():
        module_name, _, func_name = spec.partition(":")
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise BadInputError(f"cannot import {module_name!r} from --data {spec}: {e}") from None
        fn = getattr(module, func_name, None)
        if not callable(fn):
            raise BadInputError(f"{module_name} has no function {func_name!r} (--data {spec})")
        try:
            return fn()
        except Exception as e:
            raise BadInputError(f"--data {spec} raised {type(e).__name__}: {e}") from None
    raise BadInputError(
        f"--data {spec!r} is neither a .npy/.npz file, a folder of them, nor module:function"
    )


class _ArrayBatches:
    """Re-iterable batches over array files, read lazily one file at a time."""

    def __init__(self, files: list[Path], batch_size: int) -> None:
        if batch_size <= 0:
            raise BadInputError(f"batch size must be positive, got {batch_size}")
        self.files = files
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[Any]:
        for f in self.files:
            for arr in _load_array_file(f):
                if isinstance(arr, dict):
                    n = min(int(v.shape[0]) for v in arr.values())
                    for i in range(0, n, self.batch_size):
                        yield {k: v[i : i + self.batch_size] for k, v in arr.items()}
                else:
                    for i in range(0, int(arr.shape[0]), self.batch_size):
                        yield arr[i : i + self.batch_size]
