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

* long ``B`` (NCHW feature maps from 8x8), or few rows: a sweep in memory order, each
  contiguous run summed on its own (vectorised), its partial sums added to its channel's
  totals.
* short ``B`` (small feature maps, ``(N, C)`` features, channels-last layouts): the channel's
  ``B`` columns are accumulated down the ``A`` rows, four rows at a time, vectorised across
  columns, then folded. :data:`ROW_MIN` gives the measured crossovers.

Inputs from ``_PARTS_MIN`` elements are split across threads (as many as
``torch.get_num_threads()``), and the result does not depend on the thread count. The row loop
splits the samples (the outer index) into contiguous ranges, one per thread: that is how
PyTorch's convolutions and elementwise ops split an NCHW tensor among its threads, so each
thread reads the part the op before the BN wrote on its own core, and in batch mode writes
the part the op after it reads there. Each thread keeps its runs' partial sums in an
``(outer, channels)`` table, which is then added up per channel in sample order, the order of
the serial loop, so the bits are the serial kernel's. Split by channels
instead, each thread read half its input from the other core's cache and wrote half of what
the next op's thread on its core reads: in a conv -> BN -> ReLU loop at 2 threads
(``bench/recalibrate.py --tables bn-context``, mobilenet_v2's long-run inputs at 64x64), the
ReLU after the fused call was faster with the sample split in 12 of 16 shape-runs, while the
fused call itself cost about the same either way. The column loop, and
the row loop when there are fewer samples than threads, split contiguous channel ranges
(every channel is reduced on its own). The threads are numba's threading layer (the kernels
release the GIL, and a ``*_parts`` twin runs them over the ranges), not Python threads: see
:func:`_threaded` for why, and for the guards. Both layers numba can bring have a hazard,
each handled there: GNU OpenMP is not fork-safe (a child forked after a threaded call runs
serially) and the workqueue fallback is not reentrant (one threaded call at a time; a
concurrent caller runs serially). Where the layer shares PyTorch's OpenMP runtime and changes
its thread count, the count is put back.

Batch mode normalises every BN input with its own batch statistics, so it needs the moments
and then a pass that writes the output. :func:`normalise` does both in one call
(``_jit.normalise_moments``): the input is taken in blocks of channels meant to stay cached
(``_BLOCK_BYTES``, ``_RUN_BYTES``), each block reduced by the kernel above (the same bits)
and then normalised, so where the block stays cached the input is read from memory once, as
the inference-mode ``batch_norm`` of a bare forward reads it. On mobilenet_v2's BN inputs at
64x64 (batch 32, 1 thread, a Zen 4 core; ``bench/recalibrate.py --tables bn-call``) the fused
call costs 0.3-1.9x of that ``batch_norm`` alone, the reduction followed by ``batch_norm``
1.4-3.4x; on the one input larger than the caches (12.5 MB) the two are even.

numba is an optional accelerator, not a requirement: without it (or for CUDA tensors),
:func:`bnfold.recalib.stats.batch_moments` uses the torch path. ``BNFOLD_NO_JIT=1`` forces the
torch path (for comparison and debugging). Kernels are compiled on first use (a few seconds)
and cached on disk by numba, so later processes load them in well under a second.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import numpy as np

__all__ = ["ROW_MIN", "available", "disable", "moments", "normalise"]

#: Per-channel run length from which the row loop is always used. The column loop sums four
#: rows at a time into float64 accumulators it loads and stores per element, so its cost per
#: element falls with the number of rows ``A`` while the row loop's (a horizontal sum per run)
#: falls with the run length ``B``. Measured on ``(A, C, B)`` float32 inputs of 1 MiB (one
#: Zen 4 core; column time / row time): at A = 32 the column loop is faster up to B = 48
#: (0.34x at B = 4, 0.44x at 16, 0.79x at 32, 0.70x at 48), even at 64 and slower from 96
#: (1.22x); at A = 8 faster up to B = 24 (0.52-0.88x) and slower from 32 (1.36x); at A = 4
#: faster only at B = 4 (0.81x); below four rows it is slower everywhere (1.1x to 18x).
ROW_MIN = 64
#: Inputs from this many elements (64 KiB of float32) are split across threads, one
#: contiguous range of samples or channels per thread, when the caller allows more than one. Chosen from
#: one-off timings of batch mode on mobilenet_v2 (2 cores, 64x64, batch 32) at 16K, 64K and
#: 256K, where the smallest was fastest; the grid in the README has the resulting figures.
_PARTS_MIN = 1 << 14

#: Bytes of input per block of the fused batch-mode kernel: a block is reduced, then normalised
#: while it is still cached. A block of an NCHW input is one run per sample, ``N`` runs a
#: sample's stride apart, so a block sized to fit L2 (256 KiB) breaks the input into short
#: runs far apart: on a Zen 4 core (1 MiB L2) that made the fused call 2.2-3.2x
#: ``batch_norm`` on mobilenet_v2's 32x96x32x32 and 32x144x16x16 inputs, against 1.3-1.6x with
#: 2 MiB blocks (the re-read then comes from L3). Blocks are also never made of runs shorter
#: than ``_RUN_BYTES``, which keeps the hardware prefetchers streaming at large batch sizes.
_BLOCK_BYTES = 2 << 20
_RUN_BYTES = 64 << 10

#: Whether the row loop splits samples (True) or channel ranges across threads. A module
#: switch, read per call, so a benchmark can time the two splits side by side.
SPLIT_SAMPLES = True

_kernels: tuple[Any, ...] | None = None
_loaded = False


class _Parallel:
    """The state of the threaded kernels in this process."""

    #: one threaded call at a time: numba's fallback layer (workqueue) is not reentrant
    lock = threading.Lock()
    #: the process that first ran a threaded kernel; a child forked after that runs serially
    #: (GNU OpenMP is not fork-safe, and numba aborts a forked child that uses it)
    pid = 0
    #: set when no threading layer could be loaded: everything runs serially
    off = False


def _compile() -> tuple[Any, ...] | None:
    """Import the kernels (numba compiles them on the first call per dtype, then caches)."""
    try:
        from bnfold.recalib import _jit
    except ImportError:  # numba not installed, or too old/new for this numpy
        return None
    except Exception as e:  # a broken install: say so once, keep working on the torch path
        warnings.warn(f"bnfold: numba kernels unavailable ({e}); using torch", stacklevel=2)
        return None
    return (
        (_jit.row_moments, _jit.row_moments_parts, _jit.row_moments_samples),
        (_jit.plane_moments, _jit.plane_moments_parts),
        (_jit.normalise_moments, _jit.normalise_moments_parts, _jit.normalise_rows_samples),
    )


def _get() -> tuple[Any, ...] | None:
    global _kernels, _loaded
    if not _loaded:
        _kernels = None if os.environ.get("BNFOLD_NO_JIT") == "1" else _compile()
        _loaded = True
    return _kernels


def disable(reason: str) -> None:
    """Stop using the kernels in this process (after a compile failure), saying why once."""
    global _kernels, _loaded
    if _kernels is not None:
        warnings.warn(f"bnfold: numba kernels disabled ({reason}); using torch", stacklevel=2)
    _kernels, _loaded = None, True


def available() -> bool:
    """Whether the compiled kernels can be used (numba importable, not disabled)."""
    return _get() is not None


def _kernels_or_raise() -> tuple[Any, ...]:
    kernels = _kernels if _loaded else _get()
    if kernels is None:
        raise RuntimeError("numba kernels are not available")
    return kernels


def _run(
    kernel: tuple[Any, ...],
    x: np.ndarray,
    threads: int,
    *args: Any,
    by_samples: tuple[Any, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run a kernel over all channels of ``x``; returns ``(mean, m2)``.

    ``kernel`` starts with the pair ``(serial, threaded)``: ``serial(x, lo, hi, *args, mean,
    m2)`` covers channels ``[lo, hi)``, ``threaded(x, parts, *args, mean, m2)`` runs ``parts``
    contiguous channel ranges of it on numba's threads. A third entry, where present, splits
    the outer (sample) axis instead: ``kernel[2](x, parts, *by_samples, mean, m2)``, used when
    there are at least as many samples as threads. Every variant gives the same bits.
    """
    outer, channels = x.shape[0], x.shape[1]
    mean = np.empty(channels)
    m2 = np.empty(channels)
    split_samples = SPLIT_SAMPLES and len(kernel) > 2 and outer >= threads
    parts = min(threads, outer if split_samples else channels, x.size // _PARTS_MIN)
    if parts > 1:
        threaded, threaded_args = (
            (kernel[2], args if by_samples is None else by_samples)
            if split_samples
            else (kernel[1], args)
        )
        if _threaded(threaded, x, parts, threaded_args, mean, m2):
            return mean, m2
    kernel[0](x, 0, channels, *args, mean, m2)
    return mean, m2


def _threaded(
    kernel: Any, x: np.ndarray, parts: int, args: tuple[Any, ...], mean: Any, m2: Any
) -> bool:
    """Run ``kernel`` on ``parts`` numba threads; False where it cannot (then it runs serially).

    Why numba's threading layer and not Python threads: right after a PyTorch op its OpenMP
    workers keep spinning on every core, and a helper thread woken through a condition
    variable competes with them (on 2 cores, splitting mobilenet_v2's BN inputs across Python
    threads made batch mode no faster). numba's OpenMP workers spin-wait as PyTorch's do and
    take work in microseconds. PyTorch's thread count is put back if the layer changed it (it
    can, where both load the same OpenMP runtime).
    """
    if _Parallel.off or (_Parallel.pid and _Parallel.pid != os.getpid()):
        return False
    if not _Parallel.lock.acquire(blocking=False):
        return False  # another thread is in a threaded kernel: run this one serially
    try:
        import numba
        import torch

        torch_threads = torch.get_num_threads()
        parts = min(parts, int(getattr(numba.config, "NUMBA_NUM_THREADS", parts)))
        try:
            if numba.get_num_threads() != parts:
                numba.set_num_threads(parts)
            kernel(x, parts, *args, mean, m2)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # no threading layer loads here
            _Parallel.off = True
            warnings.warn(
                f"bnfold: threaded kernels unavailable ({e}); running serially", stacklevel=3
            )
            return False
        finally:
            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)
        _Parallel.pid = _Parallel.pid or os.getpid()
        return True
    finally:
        _Parallel.lock.release()


def _rows(x: np.ndarray) -> bool:
    """Whether ``x`` (viewed as ``(A, C, B)``) is reduced by the row loop, not the column loop:
    runs from ``ROW_MIN``, runs longer than three per row, or fewer than four rows (the
    crossovers measured at :data:`ROW_MIN`)."""
    outer, _, inner = x.shape
    return inner >= ROW_MIN or outer < 4 or inner > 3 * outer


def moments(x: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float64 ``(mean, M2)`` of a C-contiguous ``(A, C, B)`` float32/64 array.

    Args:
        x: the activations viewed as ``(outer, channels, inner)``.
        threads: how many threads may share the work (match the framework's intra-op count).

    Raises:
        RuntimeError: when :func:`available` is False.
    """
    row, plane, _ = _kernels_or_raise()
    return _run(row if _rows(x) else plane, x, threads)


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
    _, _, fused = _kernels_or_raise()
    channel_bytes = max(1, x.shape[2] * x.itemsize)  # one channel's run per sample
    rows = max(1, x.shape[0])
    block = max(1, _BLOCK_BYTES // (rows * channel_bytes), -(-_RUN_BYTES // channel_bytes))
    by_rows = _rows(x)
    return _run(
        fused if by_rows else fused[:2],
        x,
        threads,
        y,
        by_rows,
        block,
        weight,
        bias,
        eps,
        by_samples=(y, block, weight, bias, eps),
    )
