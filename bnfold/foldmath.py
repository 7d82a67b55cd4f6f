"""The fold arithmetic, written once for every front end.

A BatchNormalization in inference mode is a per-channel affine map::

    BN(x) = s * x + t,   s = gamma / sqrt(var + eps),   t = beta - mean * s

Folding it *backward* into a producer P (``y = BN(P(x))``) scales P's weight along its
output-channel axis and maps the bias through the affine: ``W' = W * s``, ``b' = b * s + t``.
Folding it *forward* into a consumer Q (``y = Q(BN(x))``) scales Q's weight along its
input-channel axis and adds what the shift contributes: ``W' = W * s``,
``b'[o] = b[o] + sum_{i,k} W[o, i, k] * t[i]``. The forward fold is exact only where every
input position the consumer reads is a real (shifted) activation, i.e. no zero padding: the
front ends decide that; this module only computes.

Every computation is carried out in float64 and rounded *once* to the parameter dtype with
:func:`round_to`, which is correctly rounded for float16 and bfloat16 too (casting through
float32 first, as ``ml_dtypes`` and torch do, rounds twice and is off by one ulp in rare
ties).

Grouped weights are handled by one index map (:func:`_channel_index`): a weight has a *full*
axis whose size is the whole channel count of its side, and a *per-group* axis whose size is
the channel count of one group. Conv weights are ``(C_out, C_in/g, k...)`` (full = out),
ConvTranspose weights are ``(C_in, C_out/g, k...)`` (full = in); Linear and Gemm weights have
no groups. Channel ``i`` of the per-group axis, in the row ``f`` of the full axis, is channel
``(f // (F/g)) * P + i`` of its side.

Four facts let a BN fold through an operator that sits between it and its partner; the
front ends prove from shapes that one holds, and this module states and computes them:

* **A constant per-channel addend** (``P(x) + c -> BN``): ``BN(P(x) + c) = s * P(x) +
  (s * c + t)``, so ``c`` joins P's bias (:func:`add_to_bias`), or, where the Add must stay,
  P's bias becomes ``s * (b + c) + t - c`` (:func:`fold_backward_before_add`).
* **A concatenation along the channel axis** (``Concat(P_1(x), ..., P_k(x)) -> BN``): channel
  ``c`` of the result is channel ``c - offset_i`` of input ``i``, so the BN is ``k`` smaller
  BNs, one per input (:func:`split`), each folded into its own producer.
* **A reshape that keeps the channel coordinate** (``Linear (B, N, C) -> (B*N, C) -> BN``): in
  row-major order an element's coordinate on axis ``a`` of shape ``d`` is
  ``(f // prod(d[a+1:])) % d[a]`` for its flat index ``f``, so two shapes whose channel axes
  have the same size and the same product of trailing dims give every element the same
  channel (:func:`same_channel_coordinate`).
* **Averaging** (``BN -> average pool -> Q``): a mean of values of one channel commutes with
  that channel's affine map, ``mean(s * x + t) = s * mean(x) + t``, when every averaged value is
  a real activation (no zero padding counted): the pooled tensor then folds forward like the
  BN's own output, with a Flatten after it repeating each channel over the pooled positions.

No torch or onnx import here: the front ends translate to and from numpy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "Affine",
    "WeightLayout",
    "add_to_bias",
    "bn_affine",
    "non_finite_channels",
    "compose",
    "fold_backward_before_add",
    "per_channel_addend",
    "same_channel_coordinate",
    "split",
    "fold_backward",
    "fold_forward",
    "fold_gemm_backward",
    "fold_gemm_forward",
    "round_to",
    "CONV",
    "CONV_TRANSPOSE",
    "LINEAR",
    "MATMUL",
]

Side = Literal["in", "out"]


@dataclass(frozen=True)
class Affine:
    """A per-channel affine map ``x -> scale * x + shift`` in float64."""

    scale: np.ndarray
    shift: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])


@dataclass(frozen=True)
class WeightLayout:
    """Which weight axes hold input and output channels, and which of them is grouped.

    Args:
        out_axis: axis of output channels.
        in_axis: axis of input channels.
        full: the side whose axis holds *all* its channels; the other axis holds one group's.
        groups: number of groups (1 for dense layers).
    """

    out_axis: int
    in_axis: int
    full: Side = "out"
    groups: int = 1

    def with_groups(self, groups: int) -> WeightLayout:
        return WeightLayout(self.out_axis, self.in_axis, self.full, int(groups))


#: Conv weight ``(C_out, C_in/g, k...)``.
CONV = WeightLayout(out_axis=0, in_axis=1, full="out")
#: ConvTranspose weight ``(C_in, C_out/g, k...)``.
CONV_TRANSPOSE = WeightLayout(out_axis=1, in_axis=0, full="in")
#: Linear / Gemm(transB=1) weight ``(out, in)``.
LINEAR = WeightLayout(out_axis=0, in_axis=1)
#: MatMul / Gemm(transB=0) weight ``(in, out)``.
MATMUL = WeightLayout(out_axis=1, in_axis=0, full="in")


def bn_affine(
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
) -> Affine:
    """The affine map of an inference-mode BatchNorm, in float64.

    ``gamma``/``beta`` default to 1/0 (PyTorch ``affine=False``). ``eps`` is taken as the
    float64 value of what the model stores (ONNX stores a float32 attribute; PyTorch a Python
    float), because the runtime adds it to ``var`` in that precision anyway.
    """
    mean64 = np.asarray(mean, dtype=np.float64).reshape(-1)
    var64 = np.asarray(var, dtype=np.float64).reshape(-1)
    if mean64.shape != var64.shape:
        raise ValueError(f"mean has {mean64.size} channels but var has {var64.size}")
    gamma64 = np.ones_like(mean64) if gamma is None else np.asarray(gamma, np.float64).reshape(-1)
    beta64 = np.zeros_like(mean64) if beta is None else np.asarray(beta, np.float64).reshape(-1)
    if gamma64.shape != mean64.shape or beta64.shape != mean64.shape:
        raise ValueError("gamma, beta, mean and var must have one value per channel")
    # var + eps == 0 gives inf (or 0/0 = NaN); non_finite_channels reports it to the guards.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale = gamma64 / np.sqrt(var64 + np.float64(eps))
        return Affine(scale=scale, shift=beta64 - mean64 * scale)


def non_finite_channels(
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
) -> list[int]:
    """Channels whose BN scale or shift is not finite (``var + eps == 0``, NaN/Inf statistics).

    Such a BN is not an affine map a weight can absorb: a backward fold turns the producer's
    weight into inf/NaN, a forward fold sums a non-finite shift into every output of the
    consumer, so NaN would appear on elements the original keeps finite.
    """
    try:
        affine = bn_affine(mean, var, eps, gamma, beta)
    except ValueError:  # channel counts disagree: another guard reports it
        return []
    bad = ~(np.isfinite(affine.scale) & np.isfinite(affine.shift))
    return [int(c) for c in np.flatnonzero(bad)]


def compose(first: Affine, second: Affine) -> Affine:
    """``second(first(x))`` as one affine map (a BN chain such as Conv -> BN -> BN)."""
    return Affine(second.scale * first.scale, second.scale * first.shift + second.shift)


def split(affine: Affine, sizes: Sequence[int]) -> list[Affine]:
    """The BN after ``Concat(x_1, ..., x_k)`` along its channel axis, as one BN per input.

    ``sizes`` are the inputs' channel counts, in Concat order; they must add up to the BN's.
    """
    if sum(sizes) != affine.channels or any(n <= 0 for n in sizes):
        raise ValueError(f"inputs of {list(sizes)} channels do not make {affine.channels}")
    bounds = np.cumsum([0, *sizes])
    return [
        Affine(affine.scale[a:b].copy(), affine.shift[a:b].copy())
        for a, b in itertools.pairwise(int(v) for v in bounds)
    ]


def per_channel_addend(shape: Sequence[int], rank: int, axis: int, channels: int) -> bool:
    """Whether an addend of ``shape`` adds one value per channel to a rank-``rank`` tensor.

    Broadcasting aligns trailing dims: the addend may not add dims (its rank is at most
    ``rank``) and may vary only along ``axis`` (where its size is ``channels`` or 1), so it
    is constant across every other axis and never changes the sum's shape.
    """
    dims = list(shape)
    if len(dims) > rank:
        return False
    aligned = [1] * (rank - len(dims)) + dims
    return all(d == 1 or (a == axis and d == channels) for a, d in enumerate(aligned))


def add_to_bias(bias: np.ndarray | None, addend: np.ndarray, channels: int) -> np.ndarray:
    """``b + c`` per channel in float64, for ``P(x) + c`` with a per-channel addend ``c``.

    ``addend`` holds one value per channel or a single value (see :func:`per_channel_addend`).
    """
    c = np.broadcast_to(np.asarray(addend, np.float64).reshape(-1), (channels,))
    b = np.zeros(channels) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    return b + c


def fold_backward_before_add(
    weight: np.ndarray,
    bias: np.ndarray | None,
    addend: np.ndarray,
    affine: Affine,
    layout: WeightLayout,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``BN(P(x) + c)`` into P while the Add of ``c`` stays: returns ``(W', b')``.

    ``P'(x) + c = s * (W x + b + c) + t`` for ``W' = W * s`` and ``b' = s * (b + c) + t - c``:
    the addend is read, never changed, so code that adds it (a PyTorch ``forward``) needs no
    edit.
    """
    combined = add_to_bias(bias, addend, affine.channels)
    w, b = fold_backward(weight, combined, affine, layout)
    return w, b - add_to_bias(None, addend, affine.channels)


def same_channel_coordinate(
    src: Sequence[int | None], src_axis: int, dst: Sequence[int | None], dst_axis: int
) -> bool:
    """Whether reshaping ``src`` into ``dst`` keeps every element's channel.

    The channel axes must have the same static size and the same static product of trailing
    dims (leading dims, the batch among them, may be unknown: ``None`` or negative).
    """
    if not (0 <= src_axis < len(src) and 0 <= dst_axis < len(dst)):
        return False
    tails = [list(src[src_axis:]), list(dst[dst_axis:])]
    if any(d is None or d < 0 for tail in tails for d in tail):
        return False
    (c_src, *in_src), (c_dst, *in_dst) = tails
    return c_src == c_dst and math.prod(in_src) == math.prod(in_dst)  # type: ignore[arg-type]


def _channel_index(shape: tuple[int, ...], layout: WeightLayout, side: Side) -> np.ndarray:
    """For every weight element, the index of its channel on ``side``, broadcastable to shape."""
    ndim = len(shape)
    full_axis = layout.out_axis if layout.full == "out" else layout.in_axis
    part_axis = layout.in_axis if layout.full == "out" else layout.out_axis

    def along(axis: int, values: np.ndarray) -> np.ndarray:
        view = [1] * ndim
        view[axis] = values.shape[0]
        return values.reshape(view)

    if side == layout.full:
        return along(full_axis, np.arange(shape[full_axis]))
    if shape[full_axis] % layout.groups:
        raise ValueError(f"axis {full_axis} of size {shape[full_axis]} is not divisible by groups")
    per_group = shape[full_axis] // layout.groups
    group = along(full_axis, np.arange(shape[full_axis]) // per_group)
    return group * shape[part_axis] + along(part_axis, np.arange(shape[part_axis]))


def _side_channels(shape: tuple[int, ...], layout: WeightLayout, side: Side) -> int:
    axis = layout.out_axis if side == "out" else layout.in_axis
    return shape[axis] * (layout.groups if side != layout.full else 1)


def fold_backward(
    weight: np.ndarray,
    bias: np.ndarray | None,
    affine: Affine,
    layout: WeightLayout,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``BN(P(x))`` into P: returns ``(W', b')`` in float64.

    ``bias=None`` means the producer has none (it gets one: ``b' = t``).
    """
    w = np.asarray(weight, dtype=np.float64)
    channels = _side_channels(w.shape, layout, "out")
    if channels != affine.channels:
        raise ValueError(f"producer has {channels} output channels, BN has {affine.channels}")
    idx = _channel_index(w.shape, layout, "out")
    b = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    return w * affine.scale[idx], b * affine.scale + affine.shift


def fold_forward(
    weight: np.ndarray,
    bias: np.ndarray | None,
    affine: Affine,
    layout: WeightLayout,
    repeat: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``Q(BN(x))`` into Q: returns ``(W', b')`` in float64.

    Args:
        weight: Q's weight.
        bias: Q's bias, or None.
        affine: the BN's map.
        layout: Q's weight layout; the output side must be the full (ungrouped) axis or
            groups must be 1, since a transposed grouped consumer is never exactly foldable.
        repeat: positions per channel when a Flatten sits between BN and Q: feature
            ``c * repeat + p`` of Q's input is channel ``c`` of the BN (channel-major).
    """
    if layout.groups != 1 and layout.full != "out":
        raise ValueError("forward folding needs the output axis to be the full channel axis")
    w = np.asarray(weight, dtype=np.float64)
    in_channels = _side_channels(w.shape, layout, "in")
    if in_channels != affine.channels * repeat:
        raise ValueError(
            f"consumer reads {in_channels} input features, BN gives {affine.channels} x {repeat}"
        )
    scale = np.repeat(affine.scale, repeat)
    shift = np.repeat(affine.shift, repeat)
    idx = _channel_index(w.shape, layout, "in")
    new_w = w * scale[idx]
    reduce_axes = tuple(a for a in range(w.ndim) if a != layout.out_axis)
    contribution = (w * shift[idx]).sum(axis=reduce_axes)
    b = np.zeros_like(contribution) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    return new_w, b + contribution


def fold_gemm_backward(
    b_matrix: np.ndarray,
    c: np.ndarray | None,
    affine: Affine,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    trans_b: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``BN(Gemm(A, B, C))`` with per-column BN into B and C (alpha, beta become 1).

    ``Gemm = alpha * A' @ B' + beta * C``; the BN scales column ``n`` of the result, so
    ``B'' = alpha * s * B'`` (along B's output axis) and ``C'' = s * beta * C + t``. Folding
    alpha and beta into the parameters, rather than dividing t by beta, keeps one rounding.
    The returned C keeps C's broadcast rank (at least 1-D).
    """
    layout = LINEAR if trans_b else MATMUL
    w, _ = fold_backward(np.asarray(b_matrix, np.float64) * np.float64(alpha), None, affine, layout)
    c64 = np.zeros(affine.channels) if c is None else np.asarray(c, np.float64) * np.float64(beta)
    if c64.ndim == 0:
        c64 = np.full(affine.channels, c64)
    return w, c64 * affine.scale + affine.shift


def fold_gemm_forward(
    b_matrix: np.ndarray,
    c: np.ndarray | None,
    affine: Affine,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    trans_b: bool = False,
    repeat: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``Gemm(BN(A), B, C)`` (transA=0, BN per column of A) into B and C.

    ``alpha * (A s + t) B' + beta C = A (alpha s B') + (alpha t B' + beta C)``.
    """
    layout = LINEAR if trans_b else MATMUL
    b64 = np.asarray(b_matrix, np.float64) * np.float64(alpha)
    w, contribution = fold_forward(b64, None, affine, layout, repeat=repeat)
    if c is None:
        return w, contribution
    return w, np.asarray(c, np.float64) * np.float64(beta) + contribution


def round_to(x: np.ndarray, dtype: np.dtype | type | str) -> np.ndarray:
    """Round a float64 array once, to nearest-even, into ``dtype``.

    numpy's float64 -> float32/float16 casts are correctly rounded. For bfloat16 the value is
    rounded to 8 significant bits in float64 (the bfloat16 grid), after which the conversion
    is exact; ``ml_dtypes``' own float64 -> bfloat16 cast goes through float32 and can round
    twice.
    """
    target = np.dtype(dtype)
    x64 = np.asarray(x, dtype=np.float64)
    if target.name != "bfloat16":
        return x64.astype(target)
    return _round_bfloat16(x64).astype(np.float32).astype(target)


_BF16_MIN_NORMAL = 2.0**-126
_BF16_SUBNORMAL_STEP = 2.0**-133


def _round_bfloat16(x64: np.ndarray) -> np.ndarray:
    """Values of ``x64`` rounded to the bfloat16 grid, still as float64 (exact there)."""
    bits = np.ascontiguousarray(x64).view(np.uint64)
    drop = np.uint64(52 - 7)  # float64 mantissa bits that bfloat16 does not keep
    half = np.uint64(1) << (drop - np.uint64(1))
    lsb = (bits >> drop) & np.uint64(1)
    rounded = ((bits + half - np.uint64(1) + lsb) >> drop) << drop
    out = rounded.view(np.float64).copy()
    special = ~np.isfinite(x64)
    out[special] = x64[special]
    tiny = np.isfinite(x64) & (np.abs(x64) < _BF16_MIN_NORMAL)
    if tiny.any():
        # Subnormals sit on a fixed grid of 2**-133: scale (exact), round to integer, scale back.
        out[tiny] = np.rint(x64[tiny] / _BF16_SUBNORMAL_STEP) * _BF16_SUBNORMAL_STEP
    # Past the largest finite bfloat16 the float32 cast in round_to overflows to inf, as RNE
    # requires for values at or beyond the halfway point to 2**128.
    return out
