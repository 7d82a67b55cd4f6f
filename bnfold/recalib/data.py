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

:func:`load_data_spec` (re-exported from :mod:`bnfold.data`, which owns data specs for every
command) reads the CLI's ``--data`` argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from bnfold.data import as_tensor, load_data_spec, normalise_batch
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


def first_input(batch: Any) -> Any:
    """The model input of ``batch`` as :func:`call_model` uses it."""
    if isinstance(batch, tuple | list):
        if not batch:
            raise BadInputError("a batch is an empty tuple/list; yield (input, ...) or a tensor")
        return as_tensor(batch[0])
    return as_tensor(batch)


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
        batch = normalise_batch(batch)
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
