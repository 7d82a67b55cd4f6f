"""The numba kernels behind :mod:`bnfold.recalib.kernels` (see there for the algorithm).

Defined at module level so numba can cache the compiled code on disk; importing this module
fails with ImportError when numba is not installed, which the caller treats as "no kernels".
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

#: Largest ``mean^2 / variance`` accepted from the one-pass raw sums; a channel beyond it is
#: summed again about its mean.
RECENTRE = 64.0

#: Column block of the short-run loop: wide enough to vectorise, small enough for the cache.
BLOCK = 1024

# reassociation lets LLVM vectorise the float64 sums; it changes only the order of the
# additions, never their precision. contract allows fused multiply-adds (more accurate).
_jit = numba.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True)


@numba.njit(nogil=True, cache=True, inline="always")  # type: ignore[untyped-decorator]
def off_centre(s1: float, s2: float, n: int) -> bool:
    # M2 = S2 - S1^2/n loses ~eps * (1 + 2 r) relative, r = (mean - centre)^2 / variance;
    # beyond r = RECENTRE (or on a negative M2) the channel is summed again about its mean
    return s1 * s1 / n > RECENTRE * (s2 - s1 * s1 / n)


@numba.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True, inline="always")  # type: ignore[untyped-decorator]
def run_sums(x: Any, a: int, c: int) -> tuple[float, float]:
    # the float64 sums of x and x^2 over one contiguous run (vectorised)
    t1 = 0.0
    t2 = 0.0
    for b in range(x.shape[2]):
        v = np.float64(x[a, c, b])
        t1 += v
        t2 += v * v
    return t1, t2


@numba.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True, inline="always")  # type: ignore[untyped-decorator]
def finish_channel(x: Any, c: int, s1: float, s2: float, mean: Any, m2: Any) -> None:
    # mean and M2 of channel c from its raw sums, summed again about the mean when off centre
    outer, _channels, inner = x.shape
    n = outer * inner
    centre = 0.0
    if off_centre(s1, s2, n):
        centre = s1 / n
        s1 = 0.0
        s2 = 0.0
        for a in range(outer):
            for b in range(inner):
                d = np.float64(x[a, c, b]) - centre
                s1 += d
                s2 += d * d
    mean[c] = centre + s1 / n
    m2[c] = s2 - s1 * s1 / n


@_jit
def row_moments(x: Any, lo: int, hi: int, mean: Any, m2: Any) -> None:
    # sweeps the input in memory order (prefetch-friendly), one contiguous run at a time;
    # per-run partial sums are added to per-channel totals (a two-level, more accurate sum)
    outer = x.shape[0]
    s1 = np.zeros(hi - lo)
    s2 = np.zeros(hi - lo)
    for a in range(outer):
        for c in range(lo, hi):
            t1, t2 = run_sums(x, a, c)
            s1[c - lo] += t1
            s2[c - lo] += t2
    for c in range(lo, hi):
        finish_channel(x, c, s1[c - lo], s2[c - lo], mean, m2)


@_jit
def plane_moments(x: Any, lo: int, hi: int, mean: Any, m2: Any) -> None:
    # short runs: the channels' columns are accumulated down the rows (vectorised across
    # columns), then each channel's columns are folded. Four rows are summed together
    # before they meet the accumulators, which are then loaded and stored once per four
    # rows instead of once per row (1.3-1.8x on the 4x4 and 2x2 maps of the late stages)
    block = BLOCK
    outer, channels, inner = x.shape
    n = outer * inner
    flat = x.reshape(outer, channels * inner)
    first, last = lo * inner, hi * inner
    grouped = outer - outer % 4
    centre = np.zeros(last - first)
    recentre = np.zeros(hi - lo, dtype=np.bool_)
    sums = np.empty(last - first)
    squares = np.empty(last - first)
    for attempt in range(2):
        for start in range(first, last, block):
            stop = min(last, start + block)
            width = stop - start
            # block-local accumulators: LLVM vectorises the inner loops only when it can
            # prove the accumulators do not alias the input
            acc1 = np.zeros(width)
            acc2 = np.zeros(width)
            mu = centre[start - first : stop - first]
            for a in range(0, grouped, 4):
                r0 = flat[a, start:stop]
                r1 = flat[a + 1, start:stop]
                r2 = flat[a + 2, start:stop]
                r3 = flat[a + 3, start:stop]
                if attempt == 0:
                    for j in range(width):
                        v0 = np.float64(r0[j])
                        v1 = np.float64(r1[j])
                        v2 = np.float64(r2[j])
                        v3 = np.float64(r3[j])
                        acc1[j] += (v0 + v1) + (v2 + v3)
                        acc2[j] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3)
                else:
                    for j in range(width):
                        m = mu[j]
                        d0 = np.float64(r0[j]) - m
                        d1 = np.float64(r1[j]) - m
                        d2 = np.float64(r2[j]) - m
                        d3 = np.float64(r3[j]) - m
                        acc1[j] += (d0 + d1) + (d2 + d3)
                        acc2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            for a in range(grouped, outer):
                row = flat[a, start:stop]
                for j in range(width):
                    d = np.float64(row[j]) - mu[j]
                    acc1[j] += d
                    acc2[j] += d * d
            sums[start - first : stop - first] = acc1
            squares[start - first : stop - first] = acc2
        again = False
        for c in range(lo, hi):
            # each channel's columns through a slice indexed from zero, so LLVM can prove
            # the index non-negative and vectorise the fold (3-4x at 16-64 columns)
            k = (c - lo) * inner
            run1 = sums[k : k + inner]
            run2 = squares[k : k + inner]
            s1 = 0.0
            s2 = 0.0
            for b in range(inner):
                s1 += run1[b]
                s2 += run2[b]
            mean[c] = centre[k] + s1 / n
            m2[c] = s2 - s1 * s1 / n
            if attempt == 0 and off_centre(s1, s2, n):
                recentre[c - lo] = True
                again = True
        if not again:
            break
        # only the channels off centre move their centre; the others (centre 0) are summed
        # again to the same bits, so no channel's result depends on which range it shares
        # (the thread count sets the ranges)
        for c in range(lo, hi):
            if recentre[c - lo]:
                centre[(c - lo) * inner : (c - lo + 1) * inner] = mean[c]


@numba.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True, inline="always")  # type: ignore[untyped-decorator]
def scale_shift(
    x: Any, c0: int, c1: int, weight: Any, bias: Any, eps: float, mean: Any, m2: Any
) -> tuple[Any, Any]:
    # y = x * scale + shift, the form inference-mode batch_norm evaluates, with scale and
    # shift from the float64 moments rounded once to the input's dtype (channels [c0, c1))
    n = x.shape[0] * x.shape[2]
    scale = np.empty(c1 - c0, dtype=x.dtype)
    shift = np.empty(c1 - c0, dtype=x.dtype)
    for c in range(c0, c1):
        s = weight[c] / np.sqrt(m2[c] / n + eps)
        scale[c - c0] = s
        shift[c - c0] = bias[c] - mean[c] * s
    return scale, shift


@numba.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True, inline="always")  # type: ignore[untyped-decorator]
def normalise_runs(
    x: Any, y: Any, a0: int, a1: int, c0: int, c1: int, scale: Any, shift: Any
) -> None:
    # y = x * scale + shift on rows [a0, a1) of channels [c0, c1), one run at a time
    for a in range(a0, a1):
        for c in range(c0, c1):
            src = x[a, c]
            dst = y[a, c]
            k = scale[c - c0]
            d = shift[c - c0]
            for b in range(x.shape[2]):
                dst[b] = src[b] * k + d


@_jit
def normalise_moments(
    x: Any,
    lo: int,
    hi: int,
    y: Any,
    rows: bool,
    block: int,
    weight: Any,
    bias: Any,
    eps: float,
    mean: Any,
    m2: Any,
) -> None:
    # batch mode's fused BN call: channels [lo, hi) in blocks of ``block`` channels that fit
    # the cache; each block is reduced by the kernel above that :func:`moments` would pick
    # (same channels, same order, same bits), then normalised with its batch mean and
    # biased variance while it is still cached, so the input is read from memory once
    outer, _channels, inner = x.shape
    for c0 in range(lo, hi, block):
        c1 = min(hi, c0 + block)
        if rows:
            row_moments(x, c0, c1, mean, m2)
        else:
            plane_moments(x, c0, c1, mean, m2)
        scale, shift = scale_shift(x, c0, c1, weight, bias, eps, mean, m2)
        if rows:
            normalise_runs(x, y, 0, outer, c0, c1, scale, shift)
        else:
            # short runs: the per-channel factors spread over the block's columns, so the
            # loop runs across channels
            width = (c1 - c0) * inner
            scales = np.repeat(scale, inner)
            shifts = np.repeat(shift, inner)
            for a in range(outer):
                src = x[a, c0:c1].reshape(width)
                dst = y[a, c0:c1].reshape(width)
                for j in range(width):
                    dst[j] = src[j] * scales[j] + shifts[j]


# The same kernels over ``parts`` contiguous channel ranges, run by numba's threading layer
# (OpenMP where it loads), whose workers wait by spinning as PyTorch's do: see
# :mod:`bnfold.recalib.kernels` for why these are used instead of Python threads. One wrapper
# per kernel, spelled out: a factory closing over the kernel would share one on-disk cache
# entry between the three (numba keys its cache by the function's qualified name and line).
_parallel = numba.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True, parallel=True)


@_parallel
def row_moments_parts(x: Any, parts: int, mean: Any, m2: Any) -> None:
    channels = x.shape[1]
    for k in numba.prange(parts):
        row_moments(x, channels * k // parts, channels * (k + 1) // parts, mean, m2)


@_parallel
def plane_moments_parts(x: Any, parts: int, mean: Any, m2: Any) -> None:
    channels = x.shape[1]
    for k in numba.prange(parts):
        plane_moments(x, channels * k // parts, channels * (k + 1) // parts, mean, m2)


@_parallel
def normalise_moments_parts(
    x: Any,
    parts: int,
    y: Any,
    rows: bool,
    block: int,
    weight: Any,
    bias: Any,
    eps: float,
    mean: Any,
    m2: Any,
) -> None:
    channels = x.shape[1]
    for k in numba.prange(parts):
        lo = channels * k // parts
        hi = channels * (k + 1) // parts
        normalise_moments(x, lo, hi, y, rows, block, weight, bias, eps, mean, m2)


# The row loop split by samples instead: each thread reduces the runs of its own contiguous
# range of samples (outer indices), which is the range the PyTorch op before the BN wrote on
# that core, and the normalising pass writes the same range, the one the op after reads there.
# The per-run sums go to an ``(outer, channels)`` table that is then added up per channel in
# sample order, the order :func:`row_moments` adds them in, so the bits are the same as the
# serial kernel's for any number of parts.


@numba.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True, inline="always")  # type: ignore[untyped-decorator]
def row_partials(x: Any, parts: int, c0: int, c1: int, p1: Any, p2: Any) -> None:
    # per-run sums of channels [c0, c1), each part a contiguous range of samples; inlined
    # where it is called, so the loop below is part of the caller's parallel region
    outer = x.shape[0]
    for k in numba.prange(parts):
        for a in range(outer * k // parts, outer * (k + 1) // parts):
            for c in range(c0, c1):
                p1[a, c], p2[a, c] = run_sums(x, a, c)


@numba.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True, inline="always")  # type: ignore[untyped-decorator]
def add_partials(x: Any, p1: Any, p2: Any, lo: int, hi: int, mean: Any, m2: Any) -> None:
    # channels [lo, hi): the per-run sums added in sample order, as row_moments adds them
    s1 = np.zeros(hi - lo)
    s2 = np.zeros(hi - lo)
    for a in range(x.shape[0]):
        for c in range(lo, hi):
            s1[c - lo] += p1[a, c]
            s2[c - lo] += p2[a, c]
    for c in range(lo, hi):
        finish_channel(x, c, s1[c - lo], s2[c - lo], mean, m2)


@_parallel
def row_moments_samples(x: Any, parts: int, mean: Any, m2: Any) -> None:
    outer, channels, _inner = x.shape
    p1 = np.empty((outer, channels))
    p2 = np.empty((outer, channels))
    row_partials(x, parts, 0, channels, p1, p2)
    for k in numba.prange(parts):
        add_partials(x, p1, p2, channels * k // parts, channels * (k + 1) // parts, mean, m2)


@_parallel
def normalise_rows_samples(
    x: Any,
    parts: int,
    y: Any,
    block: int,
    weight: Any,
    bias: Any,
    eps: float,
    mean: Any,
    m2: Any,
) -> None:
    # blocks of channels as in normalise_moments, so a block is normalised while cached
    outer, channels, _inner = x.shape
    p1 = np.empty((outer, channels))
    p2 = np.empty((outer, channels))
    for c0 in range(0, channels, block):
        c1 = min(channels, c0 + block)
        row_partials(x, parts, c0, c1, p1, p2)
        width = c1 - c0
        for k in numba.prange(parts):
            add_partials(
                x, p1, p2, c0 + width * k // parts, c0 + width * (k + 1) // parts, mean, m2
            )
        scale, shift = scale_shift(x, c0, c1, weight, bias, eps, mean, m2)
        for k in numba.prange(parts):
            normalise_runs(x, y, outer * k // parts, outer * (k + 1) // parts, c0, c1, scale, shift)
