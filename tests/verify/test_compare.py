"""The comparator: ULP distance, statistics, and the allclose-style pass rule."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnfold.errors import BadInputError
from bnfold.verification.compare import (
    Accumulator,
    Tolerance,
    compare_arrays,
    default_tolerance,
    resolve_tolerance,
    ulp_distance,
)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_adjacent_values_are_one_ulp_apart(dtype):
    x = np.array([1.0, -3.5, 1e-3, 0.0], dtype=dtype)
    up = np.nextafter(x, np.array(np.inf, dtype=dtype))
    assert ulp_distance(up, x).tolist() == [1, 1, 1, 1]
    up2 = np.nextafter(up, np.array(np.inf, dtype=dtype))
    assert ulp_distance(up2, x).tolist() == [2, 2, 2, 2]


def test_ulps_across_zero_and_signed_zero():
    tiny = np.nextafter(np.float32(0), np.float32(1))
    a = np.array([tiny, 0.0], dtype=np.float32)
    b = np.array([-tiny, -0.0], dtype=np.float32)
    assert ulp_distance(a, b).tolist() == [2, 0]


def test_ulps_measured_in_candidate_dtype_after_rounding_reference():
    # A float64 reference between two float32 neighbours rounds to the nearer one.
    x = np.float32(1.0)
    eps = float(np.nextafter(x, np.float32(2)) - x)
    ref = np.array([1.0 + 0.4 * eps, 1.0 + 0.6 * eps], dtype=np.float64)
    cand = np.array([1.0, 1.0], dtype=np.float32)
    assert ulp_distance(cand, ref).tolist() == [0, 1]


def test_bfloat16_ulps():
    cand = np.array([1.0, 1.0078125], dtype=ml_dtypes.bfloat16)  # 1 and its neighbour
    ref = np.array([1.0, 1.0], dtype=np.float64)
    assert ulp_distance(cand, ref).tolist() == [0, 1]


def test_nan_handling_in_ulps():
    a = np.array([np.nan, np.nan, 1.0], np.float32)
    b = np.array([np.nan, 1.0, 1.0], np.float32)
    d = ulp_distance(a, b)
    assert d[0] == 0 and math.isinf(d[1]) and d[2] == 0


def test_default_tolerances_follow_dtype():
    assert default_tolerance(np.dtype(np.float32)) == Tolerance(2e-5, None, 2e-6)
    assert default_tolerance(np.dtype(np.float16)).rtol == 1e-2
    assert default_tolerance(np.dtype(np.float64)).rtol == 1e-10
    assert default_tolerance(np.dtype(ml_dtypes.bfloat16)).rtol == 5e-2
    assert default_tolerance(np.dtype(np.int64)) == Tolerance(0.0, 0.0)
    assert default_tolerance(np.dtype(np.bool_)) == Tolerance(0.0, 0.0)
    # The default atol scales with the output, a given one is absolute.
    assert default_tolerance(np.dtype(np.float32)).absolute(100.0) == pytest.approx(2e-4)
    assert Tolerance(0.1, 0.5, 1e-5).absolute(100.0) == 0.5


def test_resolve_tolerance_global_per_output_and_star():
    f32 = np.dtype(np.float32)
    assert resolve_tolerance("y", f32, rtol=1e-2).rtol == 1e-2
    assert resolve_tolerance("y", f32, rtol={"y": 1e-2}).rtol == 1e-2
    assert resolve_tolerance("z", f32, rtol={"y": 1e-2}).rtol == 2e-5
    assert resolve_tolerance("z", f32, rtol={"y": 1e-2, "*": 3e-3}).rtol == 3e-3
    assert resolve_tolerance("y", f32, atol={"y": 0.5}).atol == 0.5
    with pytest.raises(BadInputError, match="rtol"):
        resolve_tolerance("y", f32, rtol=-1.0)
    with pytest.raises(BadInputError, match="atol"):
        resolve_tolerance("y", f32, atol=float("nan"))


@given(
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=30),
    st.lists(st.floats(-0.01, 0.01).map(lambda v: float(np.float32(v))), min_size=30, max_size=30),
    st.floats(0, 1e-2),
    st.floats(0, 1e-2),
)
def test_pass_rule_matches_numpy_allclose(values, noise, rtol, atol):
    ref = np.array(values, dtype=np.float32)
    cand = (ref + np.array(noise[: ref.size], np.float32)).astype(np.float32)
    stats = compare_arrays(cand, ref, Tolerance(rtol, atol))
    expected = np.allclose(cand.astype(np.float64), ref.astype(np.float64), rtol=rtol, atol=atol)
    assert stats.passed == expected


def test_statistics_of_a_known_error():
    ref = np.array([1.0, 2.0, -4.0, 0.0], np.float32)
    cand = np.array([1.0, 2.5, -4.0, 0.25], np.float32)
    s = compare_arrays(cand, ref, Tolerance(0.0, 0.3))
    assert s.max_abs == 0.5
    assert math.isinf(s.max_rel)  # 0.25 against a reference 0
    assert s.p50_abs == pytest.approx(0.125)
    assert s.mismatches == 1 and not s.passed
    err2 = 0.5**2 + 0.25**2
    assert s.sqnr_db == pytest.approx(10 * math.log10(21.0 / err2))
    dot = 1 + 5 + 16
    assert s.cosine == pytest.approx(dot / math.sqrt(21.0 * (1 + 6.25 + 16 + 0.0625)))


def test_identical_outputs():
    x = np.linspace(-1, 1, 11, dtype=np.float32)
    s = compare_arrays(x, x.copy(), default_tolerance(x.dtype))
    assert s.passed and s.max_abs == 0 and s.max_ulp == 0
    assert math.isinf(s.sqnr_db) and s.cosine == pytest.approx(1.0)
    assert json.loads(json.dumps(s.to_dict()))["sqnr_db"] == "inf"


def test_non_finite_values_must_match():
    ref = np.array([np.nan, np.inf, 1.0], np.float32)
    assert compare_arrays(ref.copy(), ref, Tolerance(0.1, 0.1)).passed
    bad = np.array([1.0, np.inf, 1.0], np.float32)
    s = compare_arrays(bad, ref, Tolerance(0.1, 0.1))
    assert not s.passed and s.mismatches == 1 and math.isinf(s.max_abs)
    wrong_inf = np.array([np.nan, -np.inf, 1.0], np.float32)
    assert not compare_arrays(wrong_inf, ref, Tolerance(0.1, 0.1)).passed


def test_accumulator_spans_batches_and_scales_default_atol():
    acc = Accumulator("y", default_tolerance(np.dtype(np.float32)))
    acc.add(np.array([100.0, 0.0], np.float32), np.array([100.0, 0.0], np.float32))
    # 1e-4 near zero passes only because another batch holds a magnitude of 100.
    acc.add(np.array([0.0001], np.float32), np.array([0.0], np.float32))
    s = acc.result()
    assert s.elements == 3
    assert s.atol == pytest.approx(2e-4)
    assert s.passed
    alone = compare_arrays(
        np.array([0.0001], np.float32), np.array([0.0], np.float32), default_tolerance(np.float32)
    )
    assert not alone.passed


def test_shape_mismatch_is_bad_input():
    with pytest.raises(BadInputError, match="shape"):
        compare_arrays(np.zeros(3, np.float32), np.zeros(4, np.float32), Tolerance(0, 0))
