"""Every fold pattern of the ONNX front end, checked on onnxruntime against the original."""

from __future__ import annotations

import numpy as np
import pytest
from onnxfold_util import bn_inputs, bn_params, check_fold, model

from bnfold.sites import Direction


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


@pytest.mark.parametrize(
    ("xshape", "wshape", "attrs", "yshape"),
    [
        ("N,4,9,9", (6, 4, 3, 3), "pads = [1, 1, 1, 1]", "N,6,9,9"),
        ("N,4,9,9", (6, 2, 3, 3), "group = 2, strides = [2, 2]", "N,6,4,4"),
        ("N,4,9,9", (4, 1, 3, 3), "group = 4, pads = [1, 1, 1, 1]", "N,4,9,9"),
        ("N,4,16", (6, 4, 5), "pads = [2, 2]", "N,6,16"),
        ("N,2,5,6,6", (4, 2, 1, 3, 3), "", "N,4,5,4,4"),
    ],
    ids=["conv2d", "grouped", "depthwise", "conv1d", "conv3d"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_backward(rng, xshape, wshape, attrs, yshape, bias):
    inits = {"w": _w(rng, *wshape), **bn_params("bn", wshape[0], rng)}
    b_in = ", b" if bias else ""
    if bias:
        inits["b"] = _w(rng, wshape[0])
    attr_text = f"<{attrs}>" if attrs else ""
    m = model(
        f"""g (float[{xshape}] x) => (float[{yshape}] y) {{
            c = Conv{attr_text}(x, w{b_in})
            y = BatchNormalization(c, {bn_inputs("bn")})
        }}""",
        inits,
    )
    folded, report = check_fold(m)
    (d,) = report.decisions
    assert d.folded and d.direction is Direction.BACKWARD and d.tensor == "y"
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert folded.graph.node[0].output[0] == "y"


@pytest.mark.parametrize(
    ("wshape", "attrs", "yshape"),
    [
        ((4, 4, 4, 4), "strides = [2, 2], pads = [1, 1, 1, 1]", "N,4,12,12"),
        ((4, 3, 3, 3), "group = 2", "N,6,8,8"),
        ((4, 2, 3), "group = 4", "N,8,8"),
    ],
    ids=["square", "grouped", "conv1d-grouped"],
)
def test_conv_transpose_backward(rng, wshape, attrs, yshape):
    c_out = wshape[1] * (2 if "group = 2" in attrs else 4 if "group = 4" in attrs else 1)
    spatial = "6,6" if len(wshape) == 4 else "6"
    inits = {"w": _w(rng, *wshape), "b": _w(rng, c_out), **bn_params("bn", c_out, rng)}
    m = model(
        f"""g (float[N,4,{spatial}] x) => (float[{yshape}] y) {{
            c = ConvTranspose<{attrs}>(x, w, b)
            y = BatchNormalization(c, {bn_inputs("bn")})
        }}""",
        inits,
    )
    _, report = check_fold(m)
    assert report.decisions[0].target is not None


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), ()], ids=["noC", "C1d", "C2d", "Cscalar"])
def test_gemm_backward(rng, trans_b, c_shape):
    wshape = (5, 4) if trans_b else (4, 5)
    inits = {"w": _w(rng, *wshape), **bn_params("bn", 5, rng)}
    c_in = ""
    if c_shape is not None:
        inits["c"] = np.asarray(_w(rng, *c_shape) if c_shape else np.float32(0.7))
        c_in = ", c"
    m = model(
        f"""g (float[N,4] x) => (float[N,5] y) {{
            h = Gemm<alpha = 1.5, beta = 0.5, transB = {trans_b}>(x, w{c_in})
            y = BatchNormalization(h, {bn_inputs("bn")})
        }}""",
        inits,
    )
    folded, _ = check_fold(m)
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]


def test_matmul_backward_adds_bias(rng):
    inits = {"w": _w(rng, 4, 5), **bn_params("bn", 5, rng)}
    m = model(
        f"""g (float[N,4] x) => (float[N,5] y) {{
            h = MatMul(x, w)
            y = BatchNormalization(h, {bn_inputs("bn")})
        }}""",
        inits,
    )
    folded, report = check_fold(m)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]
    assert folded.graph.node[1].output[0] == "y" and report.decisions[0].tensor == "y"


@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_backward(rng, bias_first):
    inits = {"w": _w(rng, 4, 5), "b": _w(rng, 5), **bn_params("bn", 5, rng)}
    add = "Add(b, h)" if bias_first else "Add(h, b)"
    m = model(
        f"""g (float[N,4] x) => (float[N,5] y) {{
            h = MatMul(x, w)
            a = {add}
            y = BatchNormalization(a, {bn_inputs("bn")})
        }}""",
        inits,
    )
    folded, _ = check_fold(m)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]


def test_chain_conv_bn_bn(rng):
    inits = {"w": _w(rng, 6, 3, 3, 3), **bn_params("bn1", 6, rng), **bn_params("bn2", 6, rng)}
    m = model(
        f"""g (float[N,3,8,8] x) => (float[N,6,6,6] y) {{
            c = Conv(x, w)
            z = BatchNormalization(c, {bn_inputs("bn1")})
            y = BatchNormalization(z, {bn_inputs("bn2")})
        }}""",
        inits,
    )
    folded, report = check_fold(m)
    assert all(d.target == report.decisions[0].target for d in report.decisions)
    assert {t.name for t in folded.graph.initializer} == {
        "w__bnfold_BatchNormalization_1",
        "w_bias__bnfold_BatchNormalization_1",
    }


@pytest.mark.parametrize(
    ("wshape", "attrs"),
    [
        ((6, 4, 1, 1), ""),
        ((4, 1, 3, 3), "group = 4"),
        ((6, 4, 3, 3), 'auto_pad = "VALID"'),
        ((6, 4, 1, 1), 'auto_pad = "SAME_UPPER"'),
        ((6, 2, 2, 2), "group = 2, strides = [2, 2], pads = [0, 0, 0, 0]"),
    ],
    ids=["pointwise", "depthwise-unpadded", "valid", "same-1x1", "grouped-strided"],
)
def test_conv_forward(rng, wshape, attrs):
    inits = {"w": _w(rng, *wshape), "b": _w(rng, wshape[0]), **bn_params("bn", 4, rng)}
    attr_text = f"<{attrs}>" if attrs else ""
    m = model(
        f"""g (float[N,4,8,8] x) => (float[N,{wshape[0]},?,?] y) {{
            r = Relu(x)
            z = BatchNormalization(r, {bn_inputs("bn")})
            y = Conv{attr_text}(z, w, b)
        }}""",
        inits,
    )
    folded, report = check_fold(m)
    (d,) = report.decisions
    assert d.direction is Direction.FORWARD and d.tensor == "y"
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Conv"]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False])
def test_gemm_forward(rng, trans_b, with_c):
    wshape = (5, 4) if trans_b else (4, 5)
    inits = {"w": _w(rng, *wshape), **bn_params("bn", 4, rng)}
    if with_c:
        inits["c"] = _w(rng, 5)
    m = model(
        f"""g (float[N,4] x) => (float[N,5] y) {{
            r = Relu(x)
            z = BatchNormalization(r, {bn_inputs("bn")})
            y = Gemm<alpha = 0.5, beta = 2.0, transB = {trans_b}>(z, w{", c" if with_c else ""})
        }}""",
        inits,
    )
    _, report = check_fold(m)
    assert report.decisions[0].direction is Direction.FORWARD


def test_matmul_forward(rng):
    inits = {"w": _w(rng, 4, 5), **bn_params("bn", 4, rng)}
    m = model(
        f"""g (float[N,4] x) => (float[N,5] y) {{
            r = Relu(x)
            z = BatchNormalization(r, {bn_inputs("bn")})
            y = MatMul(z, w)
        }}""",
        inits,
    )
    folded, report = check_fold(m)
    assert [n.op_type for n in folded.graph.node] == ["Relu", "MatMul", "Add"]
    assert report.decisions[0].tensor == "y"


@pytest.mark.parametrize("flatten", ["Flatten(z)", "Reshape(z, shape)"])
def test_flatten_gemm_forward(rng, flatten):
    inits = {"w": _w(rng, 7, 4 * 3 * 3), "c": _w(rng, 7), **bn_params("bn", 4, rng)}
    inits["shape"] = np.array([0, -1], dtype=np.int64)
    m = model(
        f"""g (float[N,4,3,3] x) => (float[N,7] y) {{
            r = Relu(x)
            z = BatchNormalization(r, {bn_inputs("bn")})
            f = {flatten}
            y = Gemm<transB = 1>(f, w, c)
        }}""",
        inits,
    )
    _, report = check_fold(m)
    assert report.decisions[0].direction is Direction.FORWARD


@pytest.mark.parametrize("opset", [9, 14, 15])
def test_bn_opsets(rng, opset):
    inits = {"w": _w(rng, 6, 3, 3, 3), **bn_params("bn", 6, rng)}
    attrs = "<epsilon = 0.01>" if opset == 9 else "<epsilon = 0.01, training_mode = 0>"
    m = model(
        f"""g (float[N,3,8,8] x) => (float[N,6,6,6] y) {{
            c = Conv(x, w)
            y = BatchNormalization{attrs}(c, {bn_inputs("bn")})
        }}""",
        inits,
        opset=opset,
    )
    check_fold(m)


def test_fp16_activations_fp32_statistics(rng):
    """BatchNormalization-15 allows fp16 X with fp32 statistics: parameters stay fp16."""
    inits = {"w": _w(rng, 6, 3, 3, 3).astype(np.float16), **bn_params("bn", 6, rng)}
    m = model(
        f"""g (float16[N,3,8,8] x) => (float16[N,6,6,6] y) {{
            c = Conv(x, w)
            y = BatchNormalization(c, {bn_inputs("bn")})
        }}""",
        inits,
    )
    folded, _ = check_fold(m, rtol=3e-3)
    assert {t.data_type for t in folded.graph.initializer} == {10}  # FLOAT16


def test_parameters_from_constant_nodes(rng):
    p = bn_params("bn", 6, rng)
    w = _w(rng, 6, 3, 3, 3)

    def const(name: str, arr: np.ndarray) -> str:
        vals = ", ".join(repr(float(v)) for v in arr.reshape(-1))
        dims = ", ".join(str(s) for s in arr.shape)
        return f"{name} = Constant<value = float[{dims}] {{{vals}}}>()"

    consts = "\n".join(const(k, v) for k, v in {"w": w, **p}.items())
    m = model(
        f"""g (float[N,3,8,8] x) => (float[N,6,6,6] y) {{
            {consts}
            c = Conv(x, w)
            y = BatchNormalization(c, {bn_inputs("bn")})
        }}""",
        {},
    )
    folded, _ = check_fold(m)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_zero_bias_computed_by_constant_subgraph(rng):
    """The dynamo exporter's bias-less Conv bias: Expand(CastLike(0, x), Shape(w)[0:1])."""
    inits = {"w": _w(rng, 6, 3, 3, 3), **bn_params("bn", 6, rng)}
    m = model(
        """g (float[N,3,8,8] x) => (float[N,6,6,6] y) {
            s = Shape<start = 0, end = 1>(w)
            zero = Constant<value = float {0}>()
            z = CastLike(zero, x)
            b = Expand(z, s)
            c = Conv(x, w, b)
            one = Constant<value_floats = [1.0]>()
            onec = CastLike(one, c)
            cs = Shape<start = 1, end = 2>(c)
            scale = Expand(onec, cs)
            y = BatchNormalization(c, scale, bn_b, bn_mean, bn_var)
        }""",
        inits,
    )
    folded, _ = check_fold(m)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
