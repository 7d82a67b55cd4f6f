"""Fused float64 moment kernels for CPU activations (numba).

Why a compiled kernel: the exact per-channel reduction needs every float32 element widened to
float64 before it is summed. PyTorch on the CPU has no reduction that reads float32 and
accumulates in float64 at memory speed: ``sum(dtype=float64)`` converts the whole tensor
first, and ``var_mean``/``batch_norm_update_stats`` accumulate in double but element by
element (about 65x and 20x the cost of a float32 sum on a ResNet activation). The torch
fallback in :mod:`bnfold.recalib.stats` therefore makes a float64 copy and reduces it, about
five memory passes per BN input, which is what kept one-pass recalibration well below the
speed of a bare forward. These kernels widen in registers instead and
read the float32 input once: per channel, the float64 sums ``S1`` of ``x`` and ``S2`` of
``x^2``, then ``mean = S1/n`` and ``M2 = S2 - S1^2/n``. That last step cancels: it costs about
``eps64 * (1 + 2r)`` relative, ``r = mean^2 / variance``, harmless for the activations BNs
see (r is a few units) but not for a channel far from zero. So any channel with ``r`` above
``_jit.RECENTRE`` (64: a mean more than 8 standard deviations from zero) or a negative ``M2`` is
summed a second time about the mean just found (the corrected two-pass algorithm), which
bounds the error by about ``130 * eps64`` times the summation's own growth. Against the torch
path the kernels agree to about 1e-13 relative or better (they sum in a different order).

Two loop shapes, chosen by the length ``B`` of the contiguous run each channel has per outer
index (the input is viewed as ``(A, C, B)``: ``A`` outer elements, ``C`` channels, ``B``
elements per channel per outer index):

* ``B >= ROW_MIN`` (NCHW feature maps): a sweep in memory order, each contiguous run summed
  on its own (vectorised), its partial sums added to its channel's totals.
* short ``B`` (small feature maps, ``(N, C)`` features, channels-last layouts): the channel's
  ``B`` columns are accumulated down the ``A`` rows, vectorised across columns, then folded.

Every channel is reduced on its own, so large inputs are split across threads in contiguous
channel ranges (as many as ``torch.get_num_threads()``) and the result does not depend on the
thread count. The kernels are compiled serial and release the GIL; the threads are a small Python
pool. numba's own parallel backends are avoided on purpose: its OpenMP layer shares
``libgomp`` with PyTorch and would reset PyTorch's intra-op thread count, and its workqueue
layer aborts the process on concurrent calls.

Batch mode normalises every BN input with its own batch statistics, so it needs the moments
and then a pass that writes the output. :func:`normalise` does both in one call
(``_jit.normalise_moments``): the input is taken in blocks of channels small enough to stay in
the core's cache (``_BLOCK_BYTES``), each block reduced by the kernel above (the same bits)
and then normalised while cached, so the input is read from memory once, as the
inference-mode ``batch_norm`` of a bare forward reads it. On mobilenet_v2 (64x64, batch 32, 1
thread) that took batch-mode recalibration from 0.86x to 0.94x of a bare forward.

numba is an optional accelerator, not a requirement: without it (or for CUDA tensors),
:func:`bnfold.recalib.stats.batch_moments` uses the torch path. ``BNFOLD_NO_JIT=1`` forces the
torch path (for comparison and debugging). Kernels are compiled on first use (a few seconds)
and cached on disk by numba, so later processes load them in well under a second.
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["ROW_MIN", "available", "disable", "moments", "normalise"]

#: Per-channel run length from which the row loop is used. Measured on (32, C, B) float32
#: inputs, C = 64 and 512: the column loop is faster up to B = 12-16 (1.4-2.5x at B = 4-8),
#: the two are even at 24, and from B = 32 the row loop is faster (1.3x at 32, 1.9x at 64,
#: 3.2x at 128), because the column loop loads and stores its float64 accumulators per element.
ROW_MIN = 32
#: Inputs smaller than this (16 MB of float32) run on the calling thread alone. Right after a
#: PyTorch op, its OpenMP workers keep spinning for a while on every core, so a helper thread
#: competes with them: on 2 cores, splitting resnet-mini's activations (<= 0.5M elements) made
#: batch-mode recalibration slower (0.80x of a bare forward, against 0.87x unsplit).
_SPLIT_MIN = 1 << 22

#: Bytes of input per block of the fused batch-mode kernel: a block is reduced, then normalised
#: while it is still in the per-core cache. Measured on (32, C, B) float32 inputs of 0.8-12 MB:
#: 256 KiB is the fastest of 64 KiB-1 MiB on every shape (by 2-10% against 64 KiB and 1 MiB).
_BLOCK_BYTES = 256 << 10

_kernels: tuple[Any, Any, Any] | None = None
_loaded = False
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def _compile() -> tuple[Any, Any, Any] | None:
    """Import the kernels (numba compiles them on the first call per dtype, then caches)."""
    try:
        from bnfold.recalib import _jit
    except ImportError:  # numba not installed, or too old/new for this numpy
        return None
    except Exception as e:  # a broken install: say so once, keep working on the torch path
        warnings.warn(f"bnfold: numba kernels unavailable ({e}); using torch", stacklevel=2)
        return None
    return _jit.row_moments, _jit.plane_moments, _jit.normalise_moments


def _get() -> tuple[Any, Any, Any] | None:
    global _kernels, _loaded
    if not _loaded:
        _kernels = None if os.environ.get("BNFOLD_NO_JIT") == "1" else _compile()
        _loaded = True
    return _kernels


def _executor() -> ThreadPoolExecutor:
    """The shared helper threads; a forked child (DataLoader workers) builds its own."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="bnfold")
            _pool_pid = os.getpid()
        return _pool


def disable(reason: str) -> None:
    """Stop using the kernels in this process (after a compile failure), saying why once."""
    global _kernels, _loaded
    if _kernels is not None:
        warnings.warn(f"bnfold: numba kernels disabled ({reason}); using torch", stacklevel=2)
    _kernels, _loaded = None, True


def available() -> bool:
    """Whether the compiled kernels can be used (numba importable, not disabled)."""
    return _get() is not None


def _kernels_or_raise() -> tuple[Any, Any, Any]:
    kernels = _kernels if _loaded else _get()
    if kernels is None:
        raise RuntimeError("numba kernels are not available")
    return kernels


def _split(kernel: Any, x: np.ndarray, threads: int, *args: Any) -> tuple[np.ndarray, np.ndarray]:
    """Run ``kernel(x, lo, hi, *args, mean, m2)`` over contiguous channel ranges on threads,
    one range per ``_SPLIT_MIN`` elements at most; returns ``(mean, m2)``."""
    channels = x.shape[1]
    mean = np.empty(channels)
    m2 = np.empty(channels)
    parts = min(threads, channels, x.size // _SPLIT_MIN) if threads > 1 else 1
    if parts <= 1:
        kernel(x, 0, channels, *args, mean, m2)
        return mean, m2
    bounds = [channels * k // parts for k in range(parts + 1)]
    futures = [
        _executor().submit(kernel, *(x, bounds[k], bounds[k + 1], *args, mean, m2))
        for k in range(1, parts)
    ]
    kernel(x, bounds[0], bounds[1], *args, mean, m2)
    for f in futures:
        f.result()
    return mean, m2


def moments(x: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float64 ``(mean, M2)`` of a C-contiguous ``(A, C, B)`` float32/64 array.

    Args:
        x: the activations viewed as ``(outer, channels, inner)``.
        threads: how many threads may share the work (match the framework's intra-op count).

    Raises:
        RuntimeError: when :func:`available` is False.
    """
    row, plane, _ = _kernels_or_raise()
    return _split(row if x.shape[2] >= ROW_MIN else plane, x, threads)


def normalise(
    x: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    eps: float,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`moments` of ``x``, and ``y`` = ``x`` normalised with them (batch mode's BN call).

    ``y = x * scale + shift`` per channel, ``scale = weight / sqrt(M2 / n + eps)`` and
    ``shift = bias - mean * scale`` computed in float64 and rounded once to ``x``'s dtype: the
    inference-mode ``batch_norm`` with the batch's mean and biased variance, which is what a
    training-mode BN computes. The input is reduced and normalised block by block, each block
    small enough to stay in cache between the two, so it is read from memory once (a separate
    reduction followed by ``batch_norm`` reads it twice). The moments are the bits
    :func:`moments` returns.

    Args:
        x: the activations viewed as ``(outer, channels, inner)``.
        y: where the output goes, the same shape and dtype.
        weight: float64 ``(C,)`` (ones for an affine-free BN).
        bias: float64 ``(C,)`` (zeros for an affine-free BN).
        eps: the BN's epsilon.
        threads: as for :func:`moments`.
    """
    _, _, kernel = _kernels_or_raise()
    block = max(1, _BLOCK_BYTES // max(1, x.shape[0] * x.shape[2] * x.itemsize))
    return _split(kernel, x, threads, y, ROW_MIN, block, weight, bias, eps)
