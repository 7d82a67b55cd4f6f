"""The math of folding through an operator: per-channel addends, channel splits, reshapes
that keep channels, and averaging, each against direct float64 evaluation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from test_foldmath import assert_close, bn_eval, rng_affine, t64

from bnfold.foldmath import (
    CONV,
    LINEAR,
    add_to_bias,
    fold_backward,
    fold_backward_before_add,
    fold_forward,
    per_channel_addend,
    same_channel_coordinate,
    split,
)


@given(c=st.integers(1, 5), bias=st.booleans(), scalar=st.booleans(), seed=st.integers(0, 999))
def test_conv_add_constant_folds_into_the_bias(c, bias, scalar, seed) -> None:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(c, 3, 3, 3))
    b = rng.normal(size=c) if bias else None
    addend = rng.normal(size=(1,) if scalar else (1, c, 1, 1))
    affine, stats = rng_affine(rng, c)
    x = t64(rng.normal(size=(2, 3, 5, 5)))
    conv = F.conv2d(x, t64(w), None if b is None else t64(b))
    ref = bn_eval(conv + t64(addend), stats)
    w2, b2 = fold_backward(w, add_to_bias(b, addend, c), affine, CONV)
    assert_close(F.conv2d(x, t64(w2), t64(b2)), ref)
    # the Add stays: the layer's bias absorbs everything but the addend
    w3, b3 = fold_backward_before_add(w, b, addend, affine, CONV)
    assert_close(F.conv2d(x, t64(w3), t64(b3)) + t64(addend), ref)


def test_per_channel_addend_shapes() -> None:
    assert per_channel_addend((1, 6, 1, 1), 4, 1, 6)
    assert per_channel_addend((6, 1, 1), 4, 1, 6)
    assert per_channel_addend((1,), 4, 1, 6)
    assert per_channel_addend((), 4, 1, 6)
    assert not per_channel_addend((6,), 4, 1, 6)  # aligns with the last axis, W
    assert not per_channel_addend((1, 6, 5, 5), 4, 1, 6)
    assert not per_channel_addend((2, 1, 6, 1, 1), 4, 1, 6)  # would broadcast the sum up
    assert per_channel_addend((6,), 3, 2, 6)  # a Linear's (B, N, C) output


@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4), seed=st.integers(0, 999))
def test_split_over_a_concat_is_one_bn_per_input(sizes, seed) -> None:
    rng = np.random.default_rng(seed)
    affine, stats = rng_affine(rng, sum(sizes))
    ws = [rng.normal(size=(n, 2, 3)) for n in sizes]
    x = t64(rng.normal(size=(2, 2, 7)))
    ref = bn_eval(torch.cat([F.conv1d(x, t64(w)) for w in ws], 1), stats)
    folded = [
        fold_backward(w, None, part, CONV) for w, part in zip(ws, split(affine, sizes), strict=True)
    ]
    out = torch.cat([F.conv1d(x, t64(w), t64(b)) for w, b in folded], 1)
    assert_close(out, ref)


def _channel_of(shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Every element's coordinate on ``axis``, in row-major flat order."""
    return np.indices(shape)[axis].reshape(-1)


@given(
    dims=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    cut=st.integers(0, 3),
    seed=st.integers(0, 999),
)
def test_same_channel_coordinate_matches_an_explicit_index_map(dims, cut, seed) -> None:
    """Compare the predicate with where every element's channel actually goes."""
    rng = np.random.default_rng(seed)
    src = tuple(dims)
    src_axis = int(rng.integers(0, len(src)))
    # a random reshape target of the same size: merge the dims before a random cut point
    cut = min(cut, len(src) - 1)
    dst = (int(np.prod(src[: cut + 1])), *src[cut + 1 :])
    dst_axis = int(rng.integers(0, len(dst)))
    same = np.array_equal(_channel_of(src, src_axis), _channel_of(dst, dst_axis))
    predicted = same_channel_coordinate(src, src_axis, dst, dst_axis)
    # sound always; complete unless the channel axis has size 1 (then any map is "the same")
    assert predicted == same if src[src_axis] > 1 else (not predicted or same)


def test_linear_norm_reshape_keeps_the_channel() -> None:
    """LeViT: (B, N, C) -> (B*N, C), and the batch may be unknown."""
    assert same_channel_coordinate((None, 5, 6), 2, (None, 6), 1)
    assert same_channel_coordinate((2, 6, 4, 4), 1, (2, 6, 16), 1)
    assert not same_channel_coordinate((2, 5, 6), 2, (20, 3), 1)
    assert not same_channel_coordinate((2, 5, 6), 2, (2, 30), 1)
    assert not same_channel_coordinate((2, 6, None), 1, (2, 6, 4), 1)


@given(c=st.integers(1, 4), k=st.integers(1, 3), seed=st.integers(0, 999))
def test_averaging_commutes_with_the_affine_map(c, k, seed) -> None:
    """BN -> AvgPool (no padding) -> Flatten -> Linear folds forward with the pooled repeat."""
    rng = np.random.default_rng(seed)
    affine, stats = rng_affine(rng, c)
    x = t64(rng.normal(size=(2, c, 6, 6)))
    pooled = F.avg_pool2d(bn_eval(x, stats), k, stride=k)
    positions = pooled.shape[2] * pooled.shape[3]
    w = rng.normal(size=(3, c * positions))
    ref = F.linear(pooled.flatten(1), t64(w))
    w2, b2 = fold_forward(w, None, affine, LINEAR, repeat=positions)
    assert_close(F.linear(F.avg_pool2d(x, k, stride=k).flatten(1), t64(w2), t64(b2)), ref)
