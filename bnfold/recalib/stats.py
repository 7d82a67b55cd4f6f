"""Per-channel population statistics, exact in float64.

The accumulator keeps, per channel, the element count ``n``, the mean and ``M2`` (the sum of
squared deviations from the mean). Each batch is reduced on its own in float64 (its mean first,
then the centred sum of squares, so no ``E[x^2] - E[x]^2`` cancellation), then merged with
Chan et al.'s parallel formula::

    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    M2 = M2_a + M2_b + delta^2 * n_a * n_b / n

The result is the statistics of the whole data set up to float64 rounding, whatever the batch
size or order. The same merge combines the accumulators of several ``torch.distributed`` ranks:
every rank gathers all ``(n, mean, M2)`` triples and merges them in rank order, so all ranks end
bit-identical, also when shards are uneven or a rank never reached a BatchNorm.

:class:`BatchVarianceMean` is the estimator of ``torch.optim.swa_utils.update_bn`` and similar
tools (every batch weighs the same, the spread between batch means is dropped); it is offered
only under its own name, for comparison and reproduction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar, cast, overload

import numpy as np
import torch

from bnfold.recalib import kernels

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "ChannelStats",
    "BatchVarianceMean",
    "make_accumulator",
    "Scratch",
    "batch_moments",
    "moments",
    "affine_vectors",
    "normalised_moments",
    "FusedBatchNorm",
    "torch_moments",
    "all_reduce_stats",
]

Estimator = Literal["exact", "batch-variance-mean"]
ESTIMATORS: tuple[str, ...] = ("exact", "batch-variance-mean")

_F64 = torch.float64
T = TypeVar("T")

#: A float64 ``(C,)`` vector of moments: a tensor, or a numpy array from the CPU kernels.
Vector = torch.Tensor | np.ndarray


class Scratch:
    """A float64 work buffer reused across batches and BatchNorms.

    Allocating a fresh float64 copy of every BN input for every batch costs more than the
    reduction itself (the allocator returns large blocks to the OS, so each batch pays page
    faults on megabytes of new memory). One buffer, grown to the largest input seen and shared
    by all the BNs of a run (hooks run one at a time), removes that cost.
    """

    def __init__(self) -> None:
        self._flat: dict[torch.device, torch.Tensor] = {}

    def take(self, numel: int, device: torch.device) -> torch.Tensor:
        """A flat float64 tensor of ``numel`` elements on ``device`` (contents undefined)."""
        flat = self._flat.get(device)
        if flat is None or flat.numel() < numel:
            flat = torch.empty(numel, dtype=_F64, device=device)
            self._flat[device] = flat
        return flat[:numel]


def batch_moments(
    x: torch.Tensor, channel_axis: int, scratch: Scratch | None = None
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Reduce one batch to per-channel ``(n, mean, M2)`` in float64 tensors.

    Every element is widened to float64 before it is added, and ``M2`` is centred (no
    ``E[x^2] - E[x]^2`` cancellation left unchecked). CPU tensors go through the compiled
    kernels of :mod:`bnfold.recalib.kernels` when numba is installed; anything else (CUDA, no
    numba) through a float64 copy reduced by torch. Both compute the same float64 quantities
    and differ only in summation order (about 1e-13 relative).

    Args:
        x: the activations, any float dtype and device.
        channel_axis: the axis that holds the channels; every other axis is reduced.
        scratch: a reusable work buffer for the torch path (a fresh one when None).

    Returns:
        ``n`` (elements per channel) and float64 ``mean`` and ``M2`` of shape ``(C,)``.
    """
    n, mean, m2 = moments(x, channel_axis, scratch)
    return n, torch.as_tensor(mean), torch.as_tensor(m2)


def moments(
    x: torch.Tensor, channel_axis: int, scratch: Scratch | None = None
) -> tuple[int, Vector, Vector]:
    """:func:`batch_moments` without the conversion: numpy arrays from the CPU kernels.

    The per-BN-call path of recalibration uses this form, since its consumers (the lazy
    merges, the batch-mode normalisation) work on numpy vectors anyway.
    """
    axis = channel_axis % x.dim()
    channels = x.shape[axis]
    n = x.numel() // channels if channels else 0
    host = _kernel_moments(x, axis) if n and x.device.type == "cpu" else None
    if host is not None:
        return n, *host
    return n, *torch_moments(x, axis, scratch)


def _kernel_moments(x: torch.Tensor, axis: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The compiled kernels' ``(mean, M2)``, or None when they are unavailable."""
    if not kernels.available():
        return None
    return _or_disable(kernels.moments, _outer_channel_inner(x, axis), torch.get_num_threads())


def _or_disable(kernel: Callable[..., T], *args: Any) -> T | None:
    """``kernel(*args)``, or None after switching the kernels off when numba failed to
    compile for this machine (the torch path then does the work)."""
    try:
        return kernel(*args)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        kernels.disable(f"{type(e).__name__}: {e}")
        return None


def _outer_channel_inner(x: torch.Tensor, axis: int) -> np.ndarray:
    """``x`` as a C-contiguous ``(outer, channels, inner)`` float32/float64 numpy array.

    A tensor stored in another dense order (channels-last) is viewed in its memory order
    instead of copied, with the channel axis splitting outer from inner. Half-precision
    inputs are widened to float32 (exact).
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    view = _dense_view(x, axis)
    if view is None:  # a strided slice or an overlapping view: one contiguous copy
        view = cast(np.ndarray, _dense_view(x.contiguous(), axis))
    return view


#: How to view a dense tensor as ``(outer, channels, inner)`` in its memory order: the
#: permutation that makes it contiguous (None when it already is) and the view's shape.
DenseLayout = tuple[tuple[int, ...] | None, tuple[int, int, int]]


def _dense_layout(x: torch.Tensor, axis: int) -> DenseLayout | None:
    """How :func:`_dense_view` views ``x``; None if ``x`` is not dense (a strided slice)."""
    order: tuple[int, ...] | None = None
    shape = x.shape
    if not x.is_contiguous():
        strides = x.stride()
        order = tuple(sorted(range(x.dim()), key=lambda d: -strides[d]))
        permuted = x.permute(order)
        if not permuted.is_contiguous():
            return None
        shape, axis = permuted.shape, order.index(axis)
    return order, (math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))


def _view(x: torch.Tensor, layout: DenseLayout) -> np.ndarray:
    """``x`` as the numpy view ``layout`` describes (no copy)."""
    order, shape = layout
    if order is not None:
        x = x.permute(order)
    if x.requires_grad:
        x = x.detach()
    return x.numpy().reshape(shape)


def _dense_view(x: torch.Tensor, axis: int) -> np.ndarray | None:
    """``x`` in its memory order as an ``(outer, channels, inner)`` view; None if not dense."""
    layout = _dense_layout(x, axis)
    return None if layout is None else _view(x, layout)


#: What batch mode's fused call needs to know of an input, worked out once per layout: its
#: dense layout and the elements per channel; None where only the two-step path applies.
FusedLayout = tuple[DenseLayout, int] | None


def _fused_layout(x: torch.Tensor) -> FusedLayout:
    """The fused call's view of ``x`` (channels on axis 1), or None: not a float32/float64 CPU
    tensor in a dense layout, or one whose ``empty_like`` would not share its layout."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() < 2:
        return None
    n = x.numel() // x.shape[1] if x.shape[1] else 0
    layout = _dense_layout(x, 1)
    if not n or layout is None or torch.empty_like(x).stride() != x.stride():
        return None
    return layout, n


def _normalise(
    x: torch.Tensor, layout: FusedLayout, affine: tuple[np.ndarray, np.ndarray] | None, eps: float
) -> tuple[int, np.ndarray, np.ndarray, torch.Tensor] | None:
    """The fused call on ``x`` with its layout and affine vectors already worked out."""
    if layout is None or affine is None or len(affine[0]) != x.shape[1]:
        return None
    if not kernels.available():
        return None
    dense, n = layout
    y = torch.empty_like(x)
    reduced = _or_disable(
        kernels.normalise, _view(x, dense), _view(y, dense), *affine, eps, torch.get_num_threads()
    )
    return None if reduced is None else (n, *reduced, y)


def normalised_moments(
    x: torch.Tensor, affine: tuple[np.ndarray, np.ndarray], eps: float
) -> tuple[int, np.ndarray, np.ndarray, torch.Tensor] | None:
    """Batch mode's BN call in one read: ``(n, mean, M2)`` of ``x`` (channels on axis 1) and
    ``x`` normalised with the batch mean and biased variance.

    ``affine`` is the BN's ``(weight, bias)`` from :func:`affine_vectors`. The moments are the
    bits :func:`moments` gives; the output is what inference-mode ``batch_norm`` computes
    from them, up to the rounding of its scale and shift (see
    :func:`bnfold.recalib.kernels.normalise`). Returns None where only the two-step path
    applies: no kernels, a tensor off the CPU, half precision, a layout that is not dense.
    """
    return _normalise(x, _fused_layout(x), affine, eps)


class FusedBatchNorm:
    """Batch mode's fused call for one BatchNorm, with what its calls share worked out once.

    A BN sees inputs of one shape, layout and dtype batch after batch, and the same weight
    and bias tensors: the input's layout and the float64 affine vectors are kept between
    calls, keyed by what they were derived from (the shape, strides and dtype; the tensors
    themselves, held so that a new tensor at a reused address cannot match, and their
    version counters, so an in-place edit is seen). A call then costs the kernel, the output's
    allocation and two numpy views, a fraction of the per-call checks it replaces.
    """

    def __init__(self, eps: float) -> None:
        self.eps = eps
        self._layout_key: tuple[Any, ...] | None = None
        self._layout: FusedLayout = None
        self._affine_key: tuple[Any, ...] | None = None
        self._affine: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> tuple[int, np.ndarray, np.ndarray, torch.Tensor] | None:
        """:func:`normalised_moments` of ``x`` with this BN's ``weight`` and ``bias``."""
        key = (x.shape, x.stride(), x.dtype, x.is_cpu)
        if key != self._layout_key:
            self._layout_key, self._layout = key, _fused_layout(x)
        versions = (
            -1 if weight is None else weight._version,
            -1 if bias is None else bias._version,
        )
        seen = self._affine_key
        if seen is None or seen[0] is not weight or seen[1] is not bias or seen[2] != versions:
            self._affine_key = (weight, bias, versions)
            self._affine = affine_vectors(weight, bias, x.shape[1] if x.dim() > 1 else 0)
        return _normalise(x, self._layout, self._affine, self.eps)


def affine_vectors(
    weight: torch.Tensor | None, bias: torch.Tensor | None, channels: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """A BN's weight and bias as float64 host vectors (ones and zeros where absent), for
    :func:`normalised_moments`; None when either is off the CPU, half precision or misshapen.
    """
    vectors = []
    for t, fill in ((weight, 1.0), (bias, 0.0)):
        if t is None:
            vectors.append(np.full(channels, fill))
        elif (
            t.device.type != "cpu"
            or t.dtype not in (torch.float32, torch.float64)
            or t.numel() != channels
        ):
            return None
        else:
            vectors.append(t.detach().numpy().reshape(channels).astype(np.float64))
    return vectors[0], vectors[1]


def _host_f64(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """A float64 numpy view (or copy) of a ``(C,)`` tensor or array."""
    if isinstance(t, np.ndarray):
        return t.astype(np.float64, copy=False)
    if t.device.type == "cpu" and t.dtype == _F64 and not t.requires_grad:
        return t.numpy()
    return t.detach().to("cpu", _F64).numpy()


def torch_moments(
    x: torch.Tensor, axis: int, scratch: Scratch | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path of :func:`batch_moments`: float64 ``(mean, M2)`` on ``x``'s device."""
    channels = x.shape[axis]
    # One float64 copy, laid out channel-major so each channel is a contiguous row: row
    # reductions run at memory speed, where reducing the strided axes of an NCHW tensor does
    # not. The copy is scratch, so it is centred and squared in place (two vectorised passes,
    # about 3x faster than a row-wise dot product, and bit-identical to it).
    moved = x.movedim(axis, 0)
    if scratch is None:
        rows = torch.empty(moved.shape, dtype=_F64, device=x.device)
    else:
        rows = scratch.take(x.numel(), x.device).view(moved.shape)
    rows.copy_(moved)
    rows = rows.view(channels, -1)
    mean = rows.mean(dim=1)
    rows.sub_(mean[:, None]).square_()
    return mean, rows.sum(dim=1)


class _Flushed(Generic[T]):
    """An accumulator attribute that applies the queued merges before it is read or set."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    @overload
    def __get__(self, obj: None, owner: type) -> _Flushed[T]: ...
    @overload
    def __get__(self, obj: ChannelStats, owner: type) -> T: ...
    def __get__(self, obj: ChannelStats | None, owner: type) -> _Flushed[T] | T:
        if obj is None:
            return self
        obj._flush()
        return cast(T, getattr(obj, self.slot))

    def __set__(self, obj: ChannelStats, value: T) -> None:
        obj._flush()
        setattr(obj, self.slot, value)


class ChannelStats:
    """Exact per-channel count, mean and M2 in float64, merged with Chan's formula.

    Merges are applied lazily: :meth:`add_batch` queues a batch's moments and the queue is
    merged in arrival order when the statistics are read (or every ``_FLUSH_EVERY`` batches).
    On the CPU the queue is merged with numpy, whose per-call cost is a fraction of torch's on
    ``(C,)`` vectors; the float64 operations, and so the results, are the same either way.

    Attributes:
        channels: number of channels.
        count: elements seen per channel (the same for every channel).
        mean: float64 tensor ``(C,)``.
        m2: float64 tensor ``(C,)``, the sum of squared deviations from ``mean``.
        batches: how many batches (or calls) contributed.
    """

    estimator: Estimator = "exact"
    _FLUSH_EVERY = 64
    count = _Flushed[int]()
    mean = _Flushed[torch.Tensor]()
    m2 = _Flushed[torch.Tensor]()

    def __init__(self, channels: int, device: torch.device | str | None = None) -> None:
        self.channels = channels
        self._count = 0
        self._mean = torch.zeros(channels, dtype=_F64, device=device)
        self._m2 = torch.zeros(channels, dtype=_F64, device=device)
        self._pending: list[tuple[int, Vector, Vector]] = []
        self.batches = 0

    def update(
        self, x: torch.Tensor, channel_axis: int = 1, scratch: Scratch | None = None
    ) -> None:
        """Add one batch of activations whose channels lie on ``channel_axis``."""
        self.add_batch(*batch_moments(x.detach(), channel_axis, scratch))

    def add_batch(self, n: int, mean: Vector, m2: Vector) -> None:
        """Add one batch already reduced by :func:`batch_moments` (its ``n``, mean and M2)."""
        self.merge(n, mean, m2)
        self.batches += 1

    def merge(self, n: int, mean: Vector, m2: Vector) -> None:
        """Merge the moments ``(n, mean, M2)`` of another part of the data (Chan et al.)."""
        if n == 0:
            return
        self._pending.append((n, mean, m2))
        if len(self._pending) >= self._FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        """Merge the queued moments, in the order they arrived."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if self._mean.device.type != "cpu":
            device = self._mean.device
            for n, mean, m2 in pending:
                self._chan(
                    n,
                    torch.as_tensor(mean).to(device, _F64),
                    torch.as_tensor(m2).to(device, _F64),
                )
            return
        count, acc_mean, acc_m2 = self._count, self._mean.numpy(), self._m2.numpy()
        for n, mean_t, m2_t in pending:
            b_mean, b_m2 = _host_f64(mean_t), _host_f64(m2_t)
            if count == 0:
                count, acc_mean, acc_m2 = n, b_mean.copy(), b_m2.copy()
                continue
            total = count + n
            delta = b_mean - acc_mean
            acc_mean = acc_mean + delta * (n / total)
            acc_m2 = acc_m2 + b_m2 + delta * delta * (count * n / total)
            count = total
        self._count = count
        self._mean, self._m2 = torch.from_numpy(acc_mean), torch.from_numpy(acc_m2)

    def _chan(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """One Chan merge with torch ops (accumulators on an accelerator)."""
        if self._count == 0:
            self._count, self._mean, self._m2 = n, mean.clone(), m2.clone()
            return
        total = self._count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + delta * delta * (self._count * n / total)
        self._count = total

    def population_var(self) -> torch.Tensor:
        """Biased variance ``M2 / n`` (what normalisation over the whole data set uses)."""
        return self.m2 / max(self.count, 1)

    def unbiased_var(self) -> torch.Tensor:
        """Unbiased variance ``M2 / (n - 1)``: what PyTorch keeps in ``running_var``."""
        return self.m2 / max(self.count - 1, 1)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(mean, running_var)`` pair to store: float64 mean and unbiased variance."""
        return self.mean, self.unbiased_var()

    def state(self) -> torch.Tensor:
        """``(3, C)`` float64: count (broadcast), mean, M2 — what ranks exchange."""
        count = torch.full_like(self.mean, float(self.count))
        return torch.stack([count, self.mean, self.m2])

    def merge_state(self, state: torch.Tensor, batches: int = 0) -> None:
        """Merge a :meth:`state` tensor from another accumulator."""
        n = int(state[0, 0].item()) if state.shape[1] else 0
        self.merge(n, state[1], state[2])
        self.batches += batches


class BatchVarianceMean(ChannelStats):
    """The equal-weight estimator: mean of batch means, mean of unbiased batch variances.

    This is what ``swa_utils.update_bn`` (momentum ``None``) and AIMET/pycls re-estimation
    compute. It ignores how far batch means lie apart, so it underestimates the variance when
    batches differ (correlated pixels, class-ordered data). Kept only as a named option.
    """

    estimator: Estimator = "batch-variance-mean"

    def add_batch(self, n: int, mean: Vector, m2: Vector) -> None:
        if n == 0:
            return
        # store running sums of batch means and batch variances in mean/m2; count = batches
        device = self.mean.device
        var = torch.as_tensor(m2).to(device, _F64) / max(n - 1, 1)
        self.mean = self.mean + torch.as_tensor(mean).to(device, _F64)
        self.m2 = self.m2 + var
        self.count += n
        self.batches += 1

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = max(self.batches, 1)
        return self.mean / b, self.m2 / b

    def unbiased_var(self) -> torch.Tensor:
        return self.m2 / max(self.batches, 1)

    def population_var(self) -> torch.Tensor:
        return self.unbiased_var()

    def merge(self, n: int, mean: Vector, m2: Vector) -> None:
        self.mean = self.mean + torch.as_tensor(mean).to(self.mean.device, _F64)
        self.m2 = self.m2 + torch.as_tensor(m2).to(self.m2.device, _F64)
        self.count += n


def make_accumulator(
    estimator: str, channels: int, device: torch.device | str | None = None
) -> ChannelStats:
    """Build the accumulator for ``estimator`` (``"exact"`` or ``"batch-variance-mean"``)."""
    if estimator == "exact":
        return ChannelStats(channels, device)
    if estimator == "batch-variance-mean":
        return BatchVarianceMean(channels, device)
    from bnfold.errors import BadInputError

    raise BadInputError(f"unknown estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}")


def all_reduce_stats(accs: list[ChannelStats]) -> None:
    """Merge accumulators exactly across ``torch.distributed`` ranks, in rank order.

    Every rank all-gathers every accumulator's ``(count, mean, M2)`` as float64 (one collective
    for all of them, plus one for the batch counts) and merges the gathered parts in rank order
    from empty, so all ranks compute the same float64 operations on the same operands and end
    bit-identical. A rank that saw no data for a BatchNorm contributes ``n = 0``, a no-op.
    Does nothing when ``torch.distributed`` is not initialised or has one rank.
    """
    import torch.distributed as dist

    if not accs or not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    if world == 1:
        return
    # gloo gathers CPU tensors; NCCL needs them on the current CUDA device
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flat = torch.cat([a.state().reshape(-1).to(device) for a in accs])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    batches = torch.tensor([a.batches for a in accs], dtype=torch.int64, device=device)
    gathered_b = [torch.empty_like(batches) for _ in range(world)]
    dist.all_gather(gathered_b, batches)
    offset = 0
    for i, acc in enumerate(accs):
        size = 3 * acc.channels
        parts = [g[offset : offset + size].reshape(3, acc.channels).cpu() for g in gathered]
        home = acc.mean.device
        acc.count, acc.batches = 0, 0
        acc.mean = torch.zeros(acc.channels, dtype=_F64)
        acc.m2 = torch.zeros(acc.channels, dtype=_F64)
        for rank, part in enumerate(parts):
            acc.merge_state(part, int(gathered_b[rank][i].item()))
        acc.mean, acc.m2 = acc.mean.to(home), acc.m2.to(home)
        offset += size
