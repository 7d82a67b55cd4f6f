"""Property tests of the math core: fold(x) equals direct evaluation, in float64.

torch is used only as an independent evaluator of convolutions (in float64); the core itself
never imports it.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from bnfold.foldmath import (
    CONV,
    CONV_TRANSPOSE,
    LINEAR,
    MATMUL,
    Affine,
    bn_affine,
    compose,
    fold_backward,
    fold_forward,
    fold_gemm_backward,
    fold_gemm_forward,
    round_to,
)

TOL = 1e-12


def rng_affine(rng: np.random.Generator, c: int) -> tuple[Affine, tuple[np.ndarray, ...]]:
    mean, var = rng.normal(size=c), rng.uniform(0.1, 2.0, size=c)
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    return bn_affine(mean, var, 1e-5, gamma, beta), (mean, var, gamma, beta)


def bn_eval(x: torch.Tensor, stats: tuple[np.ndarray, ...], eps: float = 1e-5) -> torch.Tensor:
    mean, var, gamma, beta = (torch.from_numpy(a) for a in stats)
    return F.batch_norm(x, mean, var, gamma, beta, training=False, eps=eps)


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= TOL * scale, f"max abs error {err} (scale {scale})"


def test_bn_affine_defaults_are_identity_affine() -> None:
    a = bn_affine(np.zeros(3), np.ones(3), 0.0)
    np.testing.assert_array_equal(a.scale, 1.0)
    np.testing.assert_array_equal(a.shift, 0.0)


def test_bn_affine_rejects_mismatched_channels() -> None:
    with pytest.raises(ValueError, match="channels"):
        bn_affine(np.zeros(3), np.ones(4), 1e-5)


@given(
    groups=st.sampled_from([1, 2, 4]),
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 3),
    dims=st.integers(1, 3),
    k=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_backward_conv_any_rank_grouped(groups, cin_g, cout_g, dims, k, bias, seed) -> None:
    rng = np.random.default_rng(seed)
    cin, cout = cin_g * groups, cout_g * groups
    w = rng.normal(size=(cout, cin_g, *([k] * dims)))
    b = rng.normal(size=cout) if bias else None
    affine, stats = rng_affine(rng, cout)
    x = t64(rng.normal(size=(2, cin, *([5] * dims))))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    ref = bn_eval(conv(x, t64(w), None if b is None else t64(b), groups=groups, padding=1), stats)
    w2, b2 = fold_backward(w, b, affine, CONV.with_groups(groups))
    assert_close(conv(x, t64(w2), t64(b2), groups=groups, padding=1), ref)


@given(
    groups=st.sampled_from([1, 2, 3]),
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 3),
    dims=st.integers(1, 3),
    stride=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_backward_conv_transpose_grouped(groups, cin_g, cout_g, dims, stride, seed) -> None:
    rng = np.random.default_rng(seed)
    cin, cout = cin_g * groups, cout_g * groups
    w = rng.normal(size=(cin, cout_g, *([3] * dims)))
    b = rng.normal(size=cout)
    affine, stats = rng_affine(rng, cout)
    x = t64(rng.normal(size=(2, cin, *([4] * dims))))
    convt = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
    ref = bn_eval(convt(x, t64(w), t64(b), stride=stride, groups=groups), stats)
    w2, b2 = fold_backward(w, b, affine, CONV_TRANSPOSE.with_groups(groups))
    assert_close(convt(x, t64(w2), t64(b2), stride=stride, groups=groups), ref)


def test_conv_transpose_with_equal_channels_uses_output_axis() -> None:
    """C_in == C_out is where folding along the wrong axis goes unnoticed by shape checks."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 4, 3, 3))
    affine, stats = rng_affine(rng, 4)
    x = t64(rng.normal(size=(1, 4, 5, 5)))
    ref = bn_eval(F.conv_transpose2d(x, t64(w)), stats)
    w2, b2 = fold_backward(w, None, affine, CONV_TRANSPOSE)
    assert_close(F.conv_transpose2d(x, t64(w2), t64(b2)), ref)
    wrong, _ = fold_backward(w, None, affine, CONV)
    assert not np.allclose(wrong, w2)


@given(
    groups=st.sampled_from([1, 2, 4]),
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 3),
    dims=st.integers(1, 3),
    k=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_conv_unpadded_grouped(groups, cin_g, cout_g, dims, k, bias, seed) -> None:
    rng = np.random.default_rng(seed)
    cin, cout = cin_g * groups, cout_g * groups
    w = rng.normal(size=(cout, cin_g, *([k] * dims)))
    b = rng.normal(size=cout) if bias else None
    affine, stats = rng_affine(rng, cin)
    x = t64(rng.normal(size=(2, cin, *([4] * dims))))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    bt = None if b is None else t64(b)
    ref = conv(bn_eval(x, stats), t64(w), bt, groups=groups, stride=2)
    w2, b2 = fold_forward(w, b, affine, CONV.with_groups(groups))
    assert_close(conv(x, t64(w2), t64(b2), groups=groups, stride=2), ref)


def test_forward_conv_zero_padding_is_not_exact() -> None:
    """The reason zero-padded consumers are skipped: the border sees the shift, not zero."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 2, 3, 3))
    affine, stats = rng_affine(rng, 2)
    x = t64(rng.normal(size=(1, 2, 5, 5)))
    ref = F.conv2d(bn_eval(x, stats), t64(w), padding=1)
    w2, b2 = fold_forward(w, None, affine, CONV)
    out = F.conv2d(x, t64(w2), t64(b2), padding=1)
    assert (out - ref).abs().max() > 1e-3
    assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])


@given(layout=st.sampled_from(["linear", "matmul"]), seed=st.integers(0, 2**16))
def test_dense_both_directions(layout, seed) -> None:
    rng = np.random.default_rng(seed)
    n_in, n_out = 5, 4
    lay = LINEAR if layout == "linear" else MATMUL
    w = rng.normal(size=(n_out, n_in) if layout == "linear" else (n_in, n_out))
    wt = t64(w) if layout == "linear" else t64(w).T
    b = rng.normal(size=n_out)
    x = t64(rng.normal(size=(3, n_in)))
    a_out, s_out = rng_affine(rng, n_out)
    w2, b2 = fold_backward(w, b, a_out, lay)
    w2t = t64(w2) if layout == "linear" else t64(w2).T
    assert_close(F.linear(x, w2t, t64(b2)), bn_eval(F.linear(x, wt, t64(b)), s_out))
    a_in, s_in = rng_affine(rng, n_in)
    w3, b3 = fold_forward(w, b, a_in, lay)
    w3t = t64(w3) if layout == "linear" else t64(w3).T
    assert_close(F.linear(x, w3t, t64(b3)), F.linear(bn_eval(x, s_in), wt, t64(b)))


@given(c=st.integers(1, 4), h=st.integers(1, 3), w_=st.integers(1, 3), seed=st.integers(0, 999))
def test_forward_through_flatten(c, h, w_, seed) -> None:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, c * h * w_))
    b = rng.normal(size=6)
    affine, stats = rng_affine(rng, c)
    x = t64(rng.normal(size=(2, c, h, w_)))
    ref = F.linear(bn_eval(x, stats).flatten(1), t64(w), t64(b))
    w2, b2 = fold_forward(w, b, affine, LINEAR, repeat=h * w_)
    assert_close(F.linear(x.flatten(1), t64(w2), t64(b2)), ref)


@given(
    trans_b=st.booleans(),
    alpha=st.floats(-2, 2).filter(lambda v: abs(v) > 0.1),
    beta=st.floats(-2, 2),
    c_shape=st.sampled_from(["none", "scalar", "row", "full"]),
    seed=st.integers(0, 999),
)
def test_gemm_backward_and_forward_honour_alpha_beta(trans_b, alpha, beta, c_shape, seed) -> None:
    rng = np.random.default_rng(seed)
    m, k, n = 3, 5, 4
    a = rng.normal(size=(m, k))
    bm = rng.normal(size=(n, k) if trans_b else (k, n))
    c = {
        "none": None,
        "scalar": np.array(rng.normal()),
        "row": rng.normal(size=n),
        "full": rng.normal(size=(m, n)),
    }[c_shape]

    def gemm(a_, b_, c_, al, be):
        y = al * (a_ @ (b_.T if trans_b else b_))
        return y if c_ is None else y + be * c_

    aff, _ = rng_affine(rng, n)
    b2, c2 = fold_gemm_backward(bm, c, aff, alpha=alpha, beta=beta, trans_b=trans_b)
    ref = gemm(a, bm, c, alpha, beta) * aff.scale + aff.shift
    np.testing.assert_allclose(gemm(a, b2, c2, 1.0, 1.0), ref, rtol=0, atol=1e-12)

    aff_in, _ = rng_affine(rng, k)
    b3, c3 = fold_gemm_forward(bm, c, aff_in, alpha=alpha, beta=beta, trans_b=trans_b)
    ref = gemm(a * aff_in.scale + aff_in.shift, bm, c, alpha, beta)
    np.testing.assert_allclose(gemm(a, b3, c3, 1.0, 1.0), ref, rtol=0, atol=1e-12)


def test_compose_is_sequential_application() -> None:
    rng = np.random.default_rng(2)
    a, _ = rng_affine(rng, 3)
    b, _ = rng_affine(rng, 3)
    x = rng.normal(size=3)
    ab = compose(a, b)
    np.testing.assert_allclose(ab.scale * x + ab.shift, b.scale * (a.scale * x + a.shift) + b.shift)


def test_channel_mismatch_is_an_error() -> None:
    rng = np.random.default_rng(3)
    aff, _ = rng_affine(rng, 3)
    with pytest.raises(ValueError, match="output channels"):
        fold_backward(np.ones((4, 2, 1, 1)), None, aff, CONV)
    with pytest.raises(ValueError, match="input features"):
        fold_forward(np.ones((4, 2)), None, aff, LINEAR)


# --- one rounding -------------------------------------------------------------------------


def _nearest_even(x: float, grid: np.ndarray) -> float:
    """Exact round-to-nearest-even of x onto a sorted grid of finite values (rationals)."""
    fx = Fraction(x)
    i = int(np.searchsorted(grid, x))
    cands = [float(grid[j]) for j in (i - 1, i) if 0 <= j < len(grid)]
    best = min(cands, key=lambda g: (abs(Fraction(g) - fx), 0))
    ties = [g for g in cands if abs(Fraction(g) - fx) == abs(Fraction(best) - fx)]
    if len(ties) == 2:
        return _even_of(ties)
    return best


def _even_of(pair: list[float]) -> float:
    for g in pair:
        m = np.array(g, np.float32).view(np.uint32)
        if (int(m) >> 16) & 1 == 0:
            return g
    return pair[0]


def _bf16_grid() -> np.ndarray:
    """Every finite bfloat16 value, sorted (NaN bit patterns included, then dropped)."""
    with np.errstate(invalid="ignore"):
        values = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
        grid = np.unique(values.astype(np.float64))
    return grid[np.isfinite(grid)]


_BF16_GRID = _bf16_grid()


@given(
    st.floats(min_value=-3e38, max_value=3e38, allow_nan=False, allow_infinity=False)
    | st.builds(lambda m, e: m * 2.0**e, st.floats(1, 2), st.integers(-140, 100))
)
def test_round_to_bfloat16_is_correctly_rounded(x: float) -> None:
    got = float(round_to(np.array([x]), ml_dtypes.bfloat16).astype(np.float64)[0])
    want = _nearest_even(x, _BF16_GRID)
    if abs(x) >= float(_BF16_GRID[-1]) + 2.0 ** (127 - 8):  # halfway to 2**128: overflow
        assert math.isinf(got)
    else:
        assert got == want, (x, got, want)


def test_round_to_bfloat16_avoids_double_rounding() -> None:
    """1 + 2**-8 + 2**-40 lies just above a bfloat16 tie; via float32 it lands on the tie."""
    x = np.array([1 + 2**-8 + 2**-40, -(1 + 2**-8 + 2**-40), 1 + 2**-8, 1 + 3 * 2**-8])
    got = round_to(x, ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_array_equal(got, [1 + 2**-7, -(1 + 2**-7), 1.0, 1 + 2**-6])


@given(st.lists(st.floats(-65000, 65000), min_size=1, max_size=20))
def test_round_to_float16_matches_exact_rounding(xs: list[float]) -> None:
    got = round_to(np.array(xs), np.float16)
    for x, g in zip(xs, got, strict=True):
        lo = np.float16(x)
        # numpy's float64 -> float16 cast is correctly rounded; check it against neighbours.
        nb = [np.nextafter(lo, np.float16(-np.inf)), lo, np.nextafter(lo, np.float16(np.inf))]
        errs = [abs(Fraction(float(v)) - Fraction(x)) for v in nb if np.isfinite(v)]
        assert abs(Fraction(float(g)) - Fraction(x)) == min(errs)
