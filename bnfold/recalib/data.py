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

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from bnfold.data import as_tensor, load_data_spec, normalise_batch
from bnfold.errors import BadInputError, BnfoldError

__all__ = [
    "ForwardFn",
    "Replay",
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
    """Call ``model`` on ``batch`` following the rules in the module docstring.

    A model that cannot run on the batch (wrong sample shape or rank, a string, dict keys it
    does not take) is bad data, said in one line with the batch's shape; bnfold's own errors
    and the drivers' control flow pass through unchanged.
    """
    try:
        if forward_fn is not None:
            return forward_fn(model, batch)
        if isinstance(batch, Mapping):
            return model(**batch)
        return model(first_input(batch))
    except BnfoldError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise BadInputError(
            f"the model cannot run on a batch of {describe_batch(batch)} "
            f"({type(e).__name__}: {lines[0][:200]}); check that the data matches the model's "
            "input"
        ) from None


def describe_batch(batch: Any) -> str:
    """``shape 4x3x32x32 float32``, ``{x: shape 2x3}`` or the type name, for messages."""
    if isinstance(batch, torch.Tensor | np.ndarray):
        return f"shape {'x'.join(map(str, batch.shape)) or 'scalar'} {str(batch.dtype).replace('torch.', '')}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {describe_batch(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, tuple | list) and batch:
        return describe_batch(batch[0])
    return f"type {type(batch).__name__}"


def _nbytes(batch: Any) -> int | None:
    """Host bytes held by a (nested) batch; None if any tensor lives on an accelerator."""
    if isinstance(batch, torch.Tensor):
        return batch.nbytes if batch.device.type == "cpu" else None
    if isinstance(batch, np.ndarray):
        return batch.nbytes
    parts: Iterable[Any] = ()
    if isinstance(batch, Mapping):
        parts = batch.values()
    elif isinstance(batch, tuple | list):
        parts = batch
    total = 0
    for part in parts:
        size = _nbytes(part)
        if size is None:
            return None
        total += size
    return total


def _clone(batch: Any) -> Any:
    """A copy of every tensor/array in ``batch`` (so a model that edits its input in place
    cannot change what the next pass sees)."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, np.ndarray):
        return batch.copy()
    if isinstance(batch, Mapping):
        return {k: _clone(v) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_clone(v) for v in batch)
    return batch


class Replay:
    """The budgeted batches of ``data``, kept in host memory so later passes replay them.

    Population-mode recalibration iterates the data once per BatchNorm depth level. Keeping
    the batches of the first pass (up to ``budget_bytes``) means the loader runs once: decoding
    and augmentation are paid once, every level sees the very same samples (a shuffling or
    randomly augmenting loader would otherwise give each level another draw), and a one-shot
    iterator (a generator) works. Replayed batches are copies, so a model that edits its input
    in place cannot change what a later pass sees.

    Batches are recorded as they are first pulled, so a partial iteration (the level probe
    reads one batch) loses nothing. When the data outgrows the budget, or holds accelerator
    tensors, recording stops: the pass under way streams on, and later passes iterate ``data``
    again, which needs a re-iterable ``data`` (a DataLoader, a list) — a one-shot iterator then
    fails with a clear error.
    """

    def __init__(
        self,
        data: Iterable[Any],
        budget_bytes: int,
        *,
        num_samples: int | None = None,
        num_batches: int | None = None,
        started: Iterator[Any] | None = None,
    ) -> None:
        """``started``: the budgeted batches of a first read of ``data`` already under way
        (the level probe took its first batch from it); it is continued, not read again."""
        self._data = data
        self._budget = budget_bytes
        self._limits = {"num_samples": num_samples, "num_batches": num_batches}
        self._live: Iterator[Any] | None = started
        self._kept: list[Any] | None = []
        self._bytes = 0
        self._done = False
        self._source_passes = 0 if started is None else 1

    def _fresh(self) -> Iterator[Any]:
        if self._source_passes and isinstance(self._data, Iterator):
            raise BadInputError(
                f"the data did not fit the replay cache ({self._budget / 2**20:.0f} MiB) and is "
                "a one-shot iterator, but mode='population' needs one pass per BatchNorm depth "
                "level; raise data_cache_mb, pass a re-iterable loader, or use mode='batch'"
            )
        self._source_passes += 1
        return iter_budget(self._data, **self._limits)

    def __iter__(self) -> Iterator[Any]:
        if self._kept is None:
            yield from self._fresh()
            return
        for batch in list(self._kept):
            yield _clone(batch)
        if self._done:
            return
        if self._live is None:
            self._live = self._fresh()
        for batch in self._live:
            if self._kept is not None:
                size = _nbytes(batch)
                if size is None or self._bytes + size > self._budget:
                    self._kept = None
                else:
                    self._kept.append(batch)
                    self._bytes += size
                    yield _clone(batch)
                    continue
            yield batch
        self._done = True
        self._live = None


def _cast_tensor(t: Any, dtype: torch.dtype, seen: set[torch.dtype]) -> Any:
    if not isinstance(t, torch.Tensor) or t.dtype == dtype:
        return t
    if t.dtype == torch.float64 or t.dtype == torch.uint8:
        if t.dtype not in seen:
            seen.add(t.dtype)
            if t.dtype == torch.float64:
                warnings.warn(
                    f"float64 batches are cast to {str(dtype).removeprefix('torch.')}, the "
                    "model's dtype",
                    stacklevel=4,
                )
            else:
                warnings.warn(
                    f"uint8 batches are cast to {str(dtype).removeprefix('torch.')} unscaled "
                    "(0-255); if the model was trained on scaled or normalised images, scale "
                    "the data first (x / 255, then mean/std)",
                    stacklevel=4,
                )
        return t.to(dtype)
    return t


def _cast_batch(batch: Any, dtype: torch.dtype, seen: set[torch.dtype]) -> Any:
    batch = normalise_batch(batch)
    if isinstance(batch, Mapping):
        return {k: _cast_tensor(v, dtype, seen) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        # only the input (the first element) feeds the model; targets keep their dtype
        if not batch:
            return batch
        return type(batch)([_cast_tensor(batch[0], dtype, seen), *batch[1:]])
    return _cast_tensor(batch, dtype, seen)


class _CastBatches:
    """A re-iterable ``data`` whose float64 and uint8 inputs are cast to the model's dtype."""

    def __init__(self, data: Iterable[Any], dtype: torch.dtype) -> None:
        self._data, self._dtype = data, dtype
        self._seen: set[torch.dtype] = set()

    def __iter__(self) -> Iterator[Any]:
        for batch in self._data:
            yield _cast_batch(batch, self._dtype, self._seen)


def cast_for_model(data: Iterable[Any], dtype: torch.dtype | None) -> Iterable[Any]:
    """``data`` with float64 and uint8 inputs cast to ``dtype`` (a floating model's dtype),
    each cast announced once with a warning, as the CLI's data reader does.

    float64 is what numpy makes by default, and a float32 model refuses it; uint8 is how images
    are stored, and its 0-255 range is rarely what the model was trained on, hence the warning.
    A one-shot iterator stays one (population mode must know it cannot read it again).
    """
    if dtype is None or not dtype.is_floating_point or dtype == torch.float64:
        return data
    if isinstance(data, Iterator):
        seen: set[torch.dtype] = set()
        return (_cast_batch(b, dtype, seen) for b in data)
    return _CastBatches(data, dtype)
