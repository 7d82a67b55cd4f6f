"""Folds that reach through an operator between the BN and its partner, and their near misses.

Conv -> Add(constant) -> BN (paddle2onnx's bias), a channel Concat of producers -> BN (MixConv),
MatMul -> Reshape -> BN -> Reshape (LeViT's LinearNorm) and BN -> average pool -> Flatten ->
Gemm (classifier heads). Every fold is held to a float64 evaluation of the original model;
every near miss keeps its BN with a reason naming what blocked each direction.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnxfold_util import (
    bn_inputs,
    bn_params,
    check_fold,
    feeds,
    float64_reference,
    model,
)

from bnfold.onnxfold import fold_onnx
from bnfold.sites import Direction, SkipCode


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


def _fold64(m, left: int = 0, **kw):
    """Fold and compare with the float64 evaluation of the original."""
    return check_fold(m, left=left, reference=float64_reference(m, feeds(m)), **kw)


def _kept(m, code: SkipCode, direction: str = "both"):
    _folded, report = _fold64(m, left=1, direction=direction)
    (d,) = [d for d in report.decisions if not d.folded]
    assert d.code is code, (d.code, d.reason)
    return d


# ---- Conv -> Add(constant) -> BN ---------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "wshape", "yshape"),
    [("Conv", (6, 4, 3, 3), "N,6,6,6"), ("ConvTranspose", (4, 6, 3, 3), "N,6,10,10")],
)
@pytest.mark.parametrize("addend", [(1, 6, 1, 1), (6, 1, 1), (1,)], ids=["1C11", "C11", "scalar"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_conv_add_constant_bn_folds_into_conv_bias(rng, op, wshape, yshape, addend, bias):
    inits = {"w": _w(rng, *wshape), "c": _w(rng, *addend), **bn_params("bn", 6, rng)}
    b_in = ""
    if bias:
        inits["b"] = _w(rng, 6)
        b_in = ", b"
    m = model(
        f"""g (float[N,4,8,8] x) => (float[{yshape}] y) {{
            h = {op}(x, w{b_in})
            a = Add(h, c)
            y = BatchNormalization(a, {bn_inputs("bn")})
        }}""",
        inits,
    )
    folded, report = _fold64(m)
    assert [n.op_type for n in folded.graph.node] == [op]
    assert folded.graph.node[0].output[0] == "y"
    (d,) = report.decisions
    assert d.direction is Direction.BACKWARD and d.target == op
    assert any("c" in sources for sources in d.params.values())


def test_conv_add_of_spatially_varying_constant_is_kept(rng):
    """A (1, C, H, W) addend is not a bias: it differs between positions."""
    inits = {"w": _w(rng, 6, 4, 3, 3), "c": _w(rng, 1, 6, 6, 6), **bn_params("bn", 6, rng)}
    m = model(
        f"""g (float[N,4,8,8] x) => (float[N,6,6,6] y) {{
            h = Conv(x, w)
            a = Add(h, c)
            y = BatchNormalization(a, {bn_inputs("bn")})
        }}""",
        inits,
    )
    d = _kept(m, SkipCode.UNSUPPORTED)
    assert "not a bias" in d.reason and d.reason.startswith("backward: ")


# ---- Concat -> BN --------------------------------------------------------------------------


def test_concat_of_convs_splits_the_bn(rng):
    """MixConv: kernels of different sizes on channel groups, concatenated, then one BN."""
    inits = {
        "w1": _w(rng, 3, 4, 3, 3),
        "w2": _w(rng, 2, 4, 5, 5),
        "b2": _w(rng, 2),
        "w3": _w(rng, 4, 3, 1, 1),
        "c3": _w(rng, 1, 4, 1, 1),
        "st": np.array([0], np.int64),
        "en": np.array([3], np.int64),
        "ax": np.array([1], np.int64),
        **bn_params("bn", 9, rng),
    }
    m = model(
        f"""g (float[N,4,8,8] x) => (float[N,9,8,8] y) {{
            a = Conv<pads = [1, 1, 1, 1]>(x, w1)
            b = Conv<pads = [2, 2, 2, 2]>(x, w2, b2)
            p = Slice(x, st, en, ax)
            r = Conv(p, w3)
            q = Add(r, c3)
            cat = Concat<axis = 1>(a, b, q)
            y = BatchNormalization(cat, {bn_inputs("bn")})
        }}""",
        inits,
    )
    folded, report = _fold64(m)
    (d,) = report.decisions
    assert d.folded and d.direction is Direction.BACKWARD and d.target == "Conv, Conv, Conv"
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Conv", "Slice", "Conv", "Concat"]
    assert folded.graph.node[-1].output[0] == "y"


def test_concat_of_gemm_and_matmul_splits_the_bn(rng):
    inits = {"w1": _w(rng, 4, 3), "w2": _w(rng, 5, 4), "c2": _w(rng, 5), **bn_params("bn", 8, rng)}
    m = model(
        f"""g (float[N,4] x) => (float[N,8] y) {{
            a = MatMul(x, w1)
            b = Gemm<transB = 1, alpha = 0.5>(x, w2, c2)
            cat = Concat<axis = 1>(a, b)
            y = BatchNormalization(cat, {bn_inputs("bn")})
        }}""",
        inits,
    )
    _fold64(m)


def test_concat_with_negative_axis_is_the_channel_axis(rng):
    inits = {"w1": _w(rng, 3, 4, 1, 1), "w2": _w(rng, 2, 4, 1, 1), **bn_params("bn", 5, rng)}
    m = model(
        f"""g (float[N,4,5,5] x) => (float[N,5,5,5] y) {{
            a = Conv(x, w1)
            b = Conv(x, w2)
            cat = Concat<axis = -3>(a, b)
            y = BatchNormalization(cat, {bn_inputs("bn")})
        }}""",
        inits,
    )
    _fold64(m)


def test_concat_input_with_a_second_user_is_kept(rng):
    """DenseNet: an earlier feature map is concatenated and also read elsewhere."""
    inits = {
        "w1": _w(rng, 3, 4, 1, 1),
        "w2": _w(rng, 2, 4, 1, 1),
        "w3": _w(rng, 3, 5, 1, 1),
        **bn_params("bn", 5, rng),
    }
    m = model(
        f"""g (float[N,4,5,5] x) => (float[N,5,5,5] y, float[N,3,5,5] z) {{
            a = Conv(x, w1)
            b = Conv(x, w2)
            cat = Concat<axis = 1>(a, b)
            n = BatchNormalization(cat, {bn_inputs("bn")})
            y = Relu(n)
            z = Relu(a)
        }}""",
        inits,
    )
    d = _kept(m, SkipCode.MULTIPLE_USERS)
    assert "Concat" in d.reason and "Relu" in d.reason
    assert d.reason.startswith("backward: ") and "; forward: " in d.reason


def test_concat_along_a_spatial_axis_is_kept(rng):
    inits = {"w1": _w(rng, 3, 4, 1, 1), "w2": _w(rng, 3, 4, 1, 1), **bn_params("bn", 3, rng)}
    m = model(
        f"""g (float[N,4,5,5] x) => (float[N,3,10,5] y) {{
            a = Conv(x, w1)
            b = Conv(x, w2)
            cat = Concat<axis = 2>(a, b)
            n = BatchNormalization(cat, {bn_inputs("bn")})
            y = Relu(n)
        }}""",
        inits,
    )
    d = _kept(m, SkipCode.NO_PARTNER)
    assert "axis 2" in d.reason and "Relu" in d.reason


def test_concat_of_a_graph_input_is_kept(rng):
    inits = {"w1": _w(rng, 3, 4, 1, 1), **bn_params("bn", 7, rng)}
    m = model(
        f"""g (float[N,4,5,5] x) => (float[N,7,5,5] y) {{
            a = Conv(x, w1)
            cat = Concat<axis = 1>(a, x)
            n = BatchNormalization(cat, {bn_inputs("bn")})
            y = Relu(n)
        }}""",
        inits,
    )
    d = _kept(m, SkipCode.NO_PARTNER)
    assert "graph input" in d.reason


# ---- MatMul -> Reshape -> BN -> Reshape ----------------------------------------------------


def _linear_norm(rng, target: str, bn_channels: int, shape_out: str) -> object:
    """LeViT's LinearNorm: Linear on (B, N, C), BN1d over the flattened tokens, reshape back."""
    inits = {
        "w": _w(rng, 4, 6),
        "flat": np.array([int(v) for v in target.split(",")], np.int64),
        **bn_params("bn", bn_channels, rng),
    }
    return model(
        f"""g (float[2,5,4] x) => (float[2,5,6] y) {{
            h = MatMul(x, w)
            f = Reshape(h, flat)
            n = BatchNormalization(f, {bn_inputs("bn")})
            s = Shape(h)
            y = Reshape(n, s)
        }}""".replace("float[2,5,6] y", f"float[{shape_out}] y"),
        inits,
    )


def test_linear_norm_folds_through_the_reshape(rng):
    m = _linear_norm(rng, "-1,6", 6, "2,5,6")
    folded, report = _fold64(m)
    (d,) = report.decisions
    assert d.folded and d.target == "MatMul" and d.tensor == "n"
    assert [n.op_type for n in folded.graph.node] == [
        "MatMul",
        "Add",
        "Reshape",
        "Shape",
        "Reshape",
    ]


def test_reshape_that_moves_the_channel_axis_is_kept(rng):
    """(2, 5, 6) -> (20, 3): channel k of the BN is not one Linear output channel."""
    m = _linear_norm(rng, "20,3", 3, "2,5,6")
    d = _kept(m, SkipCode.CHANNEL_AXIS)
    assert "moves" in d.reason and "Reshape" in d.reason


def test_conv_reshape_to_tokens_folds(rng):
    """(N, C, H, W) -> (N, C, H*W) -> BatchNorm1d keeps the channel of every element."""
    inits = {
        "w": _w(rng, 6, 4, 3, 3),
        "flat": np.array([0, 6, 36], np.int64),
        **bn_params("bn", 6, rng),
    }
    m = model(
        f"""g (float[N,4,8,8] x) => (float[N,6,36] y) {{
            h = Conv(x, w)
            f = Reshape(h, flat)
            y = BatchNormalization(f, {bn_inputs("bn")})
        }}""",
        inits,
    )
    _fold64(m)


# ---- BN -> average pool -> Flatten -> Gemm ------------------------------------------------


@pytest.mark.parametrize(
    ("pool", "features"),
    [
        ("GlobalAveragePool(r)", 6),
        ("AveragePool<kernel_shape = [2, 2], strides = [2, 2]>(r)", 24),
        ("AveragePool<kernel_shape = [3, 3], count_include_pad = 1>(r)", 54),
        ("ReduceMean<axes = [2, 3], keepdims = 1>(r)", 6),
    ],
    ids=["global", "avgpool", "avgpool-count-pad", "reducemean"],
)
def test_bn_pool_flatten_gemm_folds_forward(rng, pool, features):
    inits = {"w": _w(rng, 3, features), "c": _w(rng, 3), **bn_params("bn", 6, rng)}
    m = model(
        f"""g (float[N,6,5,5] x) => (float[N,3] y) {{
            r = Relu(x)
            n = BatchNormalization(r, {bn_inputs("bn")})
            p = {pool.replace("(r)", "(n)")}
            f = Flatten(p)
            y = Gemm<transB = 1>(f, w, c)
        }}""".replace(
            "AveragePool<kernel_shape = [3, 3], count_include_pad = 1>",
            "AveragePool<kernel_shape = [3, 3], count_include_pad = 1>",
        ),
        inits,
    )
    folded, report = _fold64(m, opset_check=None) if False else _fold64(m)
    (d,) = report.decisions
    assert d.direction is Direction.FORWARD and d.target == "Gemm"
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]


def test_reducemean_without_keepdims_into_matmul(rng):
    inits = {"w": _w(rng, 6, 3), "ax": np.array([2, 3], np.int64), **bn_params("bn", 6, rng)}
    m = model(
        f"""g (float[N,6,5,5] x) => (float[N,3] y) {{
            r = Relu(x)
            n = BatchNormalization(r, {bn_inputs("bn")})
            p = ReduceMean<keepdims = 0>(n, ax)
            y = MatMul(p, w)
        }}""",
        inits,
        opset=18,
    )
    _fold64(m)


def test_bn_global_pool_pointwise_conv_folds_forward(rng):
    """A squeeze-excitation style head: global pool, then a 1x1 conv."""
    inits = {"w": _w(rng, 3, 6, 1, 1), **bn_params("bn", 6, rng)}
    m = model(
        f"""g (float[N,6,5,5] x) => (float[N,3,1,1] y) {{
            r = Relu(x)
            n = BatchNormalization(r, {bn_inputs("bn")})
            p = GlobalAveragePool(n)
            y = Conv(p, w)
        }}""",
        inits,
    )
    _fold64(m)


def test_padded_pool_is_kept(rng):
    inits = {"w": _w(rng, 3, 54), **bn_params("bn", 6, rng)}
    m = model(
        f"""g (float[N,6,5,5] x) => (float[N,3] y) {{
            r = Relu(x)
            n = BatchNormalization(r, {bn_inputs("bn")})
            p = AveragePool<kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]>(n)
            f = Flatten(p)
            y = Gemm<transB = 1>(f, w)
        }}""",
        inits,
    )
    d = _kept(m, SkipCode.PADDING)
    assert "pads" in d.reason and "Relu" in d.reason


def test_mean_over_the_channel_axis_is_kept(rng):
    """Averaging across channels mixes channels with different affine maps."""
    inits = {"w": _w(rng, 25, 3), **bn_params("bn", 6, rng)}
    m = model(
        f"""g (float[N,6,5,5] x) => (float[N,3] y) {{
            r = Relu(x)
            n = BatchNormalization(r, {bn_inputs("bn")})
            p = ReduceMean<axes = [1], keepdims = 0>(n)
            f = Flatten(p)
            y = MatMul(f, w)
        }}""",
        inits,
    )
    d = _kept(m, SkipCode.NO_PARTNER)
    assert "channel axis" in d.reason


def test_pool_output_with_a_second_reader_is_kept(rng):
    inits = {"w": _w(rng, 3, 6), **bn_params("bn", 6, rng)}
    m = model(
        f"""g (float[N,6,5,5] x) => (float[N,3] y, float[N,6] z) {{
            r = Relu(x)
            n = BatchNormalization(r, {bn_inputs("bn")})
            p = GlobalAveragePool(n)
            z = Flatten(p)
            y = Gemm<transB = 1>(z, w)
        }}""",
        inits,
    )
    _kept(m, SkipCode.GRAPH_OUTPUT)


# ---- reasons name both sides ---------------------------------------------------------------


def test_kept_bn_names_the_blocking_node_on_each_side(rng):
    m = model(
        f"""g (float[N,4,5,5] x) => (float[N,4,5,5] y) {{
            r = Relu(x)
            n = BatchNormalization(r, {bn_inputs("bn")})
            y = Add(n, x)
        }}""",
        bn_params("bn", 4, rng),
    )
    _, report = fold_onnx(m)
    (d,) = report.decisions
    assert d.code is SkipCode.NO_PARTNER
    assert d.reason == (
        "backward: no foldable producer (Conv, ConvTranspose, Linear/Gemm, MatMul): r comes "
        "from Relu Relu; forward: no foldable consumer (Conv, ConvTranspose, Linear/Gemm, "
        "MatMul): n is read by Add Add"
    )


def test_linear_with_bias_norm_folds_through_the_reshape(rng):
    """MatMul + Add (a Linear with bias) -> Reshape -> BN: the Add keeps the bias."""
    inits = {
        "w": _w(rng, 4, 6),
        "b": _w(rng, 6),
        "flat": np.array([-1, 6], np.int64),
        **bn_params("bn", 6, rng),
    }
    m = model(
        f"""g (float[2,5,4] x) => (float[10,6] y) {{
            h = MatMul(x, w)
            a = Add(h, b)
            f = Reshape(a, flat)
            y = BatchNormalization(f, {bn_inputs("bn")})
        }}""",
        inits,
    )
    folded, _ = _fold64(m)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add", "Reshape"]


def test_concat_bn_bn_chain_folds_both_with_one_rounding(rng):
    inits = {
        "w1": _w(rng, 3, 4, 1, 1),
        "w2": _w(rng, 2, 4, 3, 3),
        **bn_params("bn1", 5, rng),
        **bn_params("bn2", 5, rng),
    }
    m = model(
        f"""g (float[N,4,5,5] x) => (float[N,5,5,5] y) {{
            a = Conv(x, w1)
            b = Conv<pads = [1, 1, 1, 1]>(x, w2)
            cat = Concat<axis = 1>(a, b)
            n = BatchNormalization(cat, {bn_inputs("bn1")})
            y = BatchNormalization(n, {bn_inputs("bn2")})
        }}""",
        inits,
    )
    folded, report = _fold64(m)
    assert [d.target for d in report.decisions] == ["Conv, Conv", "Conv, Conv"]
    assert len(folded.graph.initializer) == 4
