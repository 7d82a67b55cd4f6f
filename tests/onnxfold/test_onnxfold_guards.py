"""Each guard keeps a BN that cannot be folded exactly, and says why."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxfold_util import bn_count, bn_inputs, bn_params, check_fold, model

from bnfold.errors import BadInputError
from bnfold.sites import SkipCode


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(3)


def _w(rng, *shape):
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


def _skip(m: onnx.ModelProto, code: SkipCode, direction: str = "both", left: int = 1):
    folded, report = check_fold(m, left=left, direction=direction)
    d = report.decisions[0]
    assert not d.folded and d.code is code, (d.code, d.reason)
    assert d.reason
    return folded, d


def test_training_mode(rng):
    m = model(
        f"""g (float[N,3,8,8] x) => (float[N,6,6,6] y) {{
            c = Conv(x, w)
            y, rm, rv = BatchNormalization<training_mode = 1>(c, {bn_inputs("bn")})
        }}""",
        {"w": _w(rng, 6, 3, 3, 3), **bn_params("bn", 6, rng)},
    )
    # onnxruntime normalises with batch statistics here: the fold must leave it alone.
    _folded, d = _skip(m, SkipCode.TRAINING_MODE)
    assert "training" in d.reason


def test_opset9_statistics_outputs_used(rng):
    m = model(
        f"""g (float[N,3,8,8] x) => (float[N,6,6,6] y, float[6] rm) {{
            c = Conv(x, w)
            y, rm, rv, sm, sv = BatchNormalization(c, {bn_inputs("bn")})
        }}""",
        {"w": _w(rng, 6, 3, 3, 3), **bn_params("bn", 6, rng)},
        opset=9,
    )
    folded, report = __import__("bnfold").onnxfold.fold_onnx(m)
    assert bn_count(folded) == 1 and report.decisions[0].code is SkipCode.TRAINING_MODE


def test_producer_output_read_elsewhere(rng):
    m = model(
        f"""g (float[N,3,8,8] x) => (float[N,6,6,6] y) {{
            c = Conv(x, w)
            b = BatchNormalization(c, {bn_inputs("bn")})
            y = Add(b, c)
        }}""",
        {"w": _w(rng, 6, 3, 3, 3), **bn_params("bn", 6, rng)},
    )
    _, d = _skip(m, SkipCode.MULTIPLE_USERS)
    assert "Add" in d.reason


def test_producer_output_is_graph_output(rng):
    m = model(
        f"""g (float[N,3,8,8] x) => (float[N,6,6,6] y, float[N,6,6,6] c) {{
            c = Conv(x, w)
            y = BatchNormalization(c, {bn_inputs("bn")})
        }}""",
        {"w": _w(rng, 6, 3, 3, 3), **bn_params("bn", 6, rng)},
    )
    _skip(m, SkipCode.GRAPH_OUTPUT)


def test_bn_output_read_twice_blocks_forward(rng):
    m = model(
        f"""g (float[N,4,8,8] x) => (float[N,6,8,8] y, float[N,4,8,8] z) {{
            r = Relu(x)
            z = BatchNormalization(r, {bn_inputs("bn")})
            y = Conv(z, w)
        }}""",
        {"w": _w(rng, 6, 4, 1, 1), **bn_params("bn", 4, rng)},
    )
    _skip(m, SkipCode.GRAPH_OUTPUT)


@pytest.mark.parametrize("which", ["w", "bn_var"])
def test_parameter_is_graph_input(rng, which):
    m = model(
        f"""g (float[N,3,8,8] x, float[{"6,3,3,3" if which == "w" else "6"}] {which})
            => (float[N,6,6,6] y) {{
            c = Conv(x, w)
            y = BatchNormalization(c, {bn_inputs("bn")})
        }}""",
        {"w": _w(rng, 6, 3, 3, 3), **bn_params("bn", 6, rng)},
    )
    _, d = _skip(m, SkipCode.NOT_CONSTANT)
    assert which in d.reason


def test_shared_weight_is_copied(rng):
    """Two Convs share w; folding the BN after one must not change the other."""
    m = model(
        f"""g (float[N,3,8,8] x) => (float[N,6,6,6] y, float[N,6,6,6] y2) {{
            c = Conv(x, w)
            y = BatchNormalization(c, {bn_inputs("bn")})
            y2 = Conv(x, w)
        }}""",
        {"w": _w(rng, 6, 3, 3, 3), **bn_params("bn", 6, rng)},
    )
    folded, _report = check_fold(m)
    names = {t.name for t in folded.graph.initializer}
    assert "w" in names and "w__bnfold_BatchNormalization_0" in names
    assert folded.graph.node[1].input[1] == "w"


def test_matmul_on_3d_input_channel_axis(rng):
    """BN normalises axis 1 (time) of a (N, T, F) MatMul output, not its features."""
    m = model(
        f"""g (float[N,5,4] x) => (float[N,5,5] y) {{
            h = MatMul(x, w)
            y = BatchNormalization(h, {bn_inputs("bn")})
        }}""",
        {"w": _w(rng, 4, 5), **bn_params("bn", 5, rng)},
    )
    _, d = _skip(m, SkipCode.CHANNEL_AXIS)
    assert "axis 1" in d.reason and "axis 2" in d.reason


def test_zero_padded_conv_forward(rng):
    m = model(
        f"""g (float[N,4,8,8] x) => (float[N,6,8,8] y) {{
            r = Relu(x)
            z = BatchNormalization(r, {bn_inputs("bn")})
            y = Conv<pads = [1, 1, 1, 1]>(z, w)
        }}""",
        {"w": _w(rng, 6, 4, 3, 3), **bn_params("bn", 4, rng)},
    )
    _, d = _skip(m, SkipCode.PADDING)
    assert "pads" in d.reason


def test_same_padding_with_3x3_kernel(rng):
    m = model(
        f"""g (float[N,4,8,8] x) => (float[N,6,8,8] y) {{
            r = Relu(x)
            z = BatchNormalization(r, {bn_inputs("bn")})
            y = Conv<auto_pad = "SAME_UPPER">(z, w)
        }}""",
        {"w": _w(rng, 6, 4, 3, 3), **bn_params("bn", 4, rng)},
    )
    _skip(m, SkipCode.PADDING)


def test_no_partner(rng):
    m = model(
        f"""g (float[N,4,8,8] x) => (float[N,4,8,8] y) {{
            r = Relu(x)
            y = BatchNormalization(r, {bn_inputs("bn")})
        }}""",
        bn_params("bn", 4, rng),
    )
    _skip(m, SkipCode.NO_PARTNER)


def test_direction_restricts(rng):
    m = model(
        f"""g (float[N,3,8,8] x) => (float[N,6,6,6] y) {{
            c = Conv(x, w)
            y = BatchNormalization(c, {bn_inputs("bn")})
        }}""",
        {"w": _w(rng, 6, 3, 3, 3), **bn_params("bn", 6, rng)},
    )
    _, d = _skip(m, SkipCode.DIRECTION_DISABLED, direction="forward")
    assert "backward" in d.reason
    check_fold(m, direction="backward")


def test_non_float_bias_dtype(rng):
    """A Gemm whose C is int64 beside double A/B breaks Gemm's type constraint: no runtime
    loads it, so the model is refused before any fold, naming the operator and the type."""
    w = _w(rng, 4, 5).astype(np.float64)
    p = {k: v.astype(np.float64) for k, v in bn_params("bn", 5, rng).items()}
    m = model(
        f"""g (double[N,4] x) => (double[N,5] y) {{
            h = Gemm(x, w, c)
            y = BatchNormalization(h, {bn_inputs("bn")})
        }}""",
        {"w": w, "c": np.zeros(5, np.float64), **p},
    )
    m.graph.initializer[1].CopyFrom(
        helper.make_tensor("c", onnx.TensorProto.INT64, [5], [0, 0, 0, 0, 0])
    )
    with pytest.raises(BadInputError, match=r"not a valid ONNX model.*Gemm.*int64"):
        __import__("bnfold").onnxfold.fold_onnx(m)
