"""Spec corners and regressions found by the randomised tests, one test each."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxfold_util import bn_count, bn_inputs, bn_params, check_fold, feeds, initializer, model

from bnfold import foldmath
from bnfold.onnxfold import fold_onnx
from bnfold.sites import Direction, SkipCode


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


def _w(rng, *shape):
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


@pytest.mark.parametrize("direction", ["forward", "both"])
def test_bn_bn_conv_forward_folds_both_rounding_once(rng, direction):
    inits = {"w": _w(rng, 5, 4, 1, 1), **bn_params("a", 4, rng), **bn_params("b", 4, rng)}
    m = model(
        f"""g (float[N,4,6,6] x) => (float[N,5,6,6] y) {{
            p = BatchNormalization(x, {bn_inputs("a")})
            q = BatchNormalization(p, {bn_inputs("b")})
            y = Conv(q, w)
        }}""",
        inits,
    )
    folded, report = check_fold(m, direction=direction)
    assert all(d.folded and d.direction is Direction.FORWARD for d in report.decisions)
    affine = foldmath.compose(
        *(
            foldmath.bn_affine(
                inits[f"{p}_mean"], inits[f"{p}_var"], 1e-5, inits[f"{p}_scale"], inits[f"{p}_b"]
            )
            for p in ("a", "b")
        )
    )
    w64, b64 = foldmath.fold_forward(inits["w"], None, affine, foldmath.CONV)
    conv = folded.graph.node[0]
    np.testing.assert_array_equal(initializer(folded, conv.input[1]), w64.astype(np.float32))
    np.testing.assert_array_equal(initializer(folded, conv.input[2]), b64.astype(np.float32))


def test_bn_bn_matmul_forward_stays_topologically_sorted(rng):
    """Regression: the second fold's Add was placed after the first one's, which read it."""
    m = model(
        f"""g (float[N,4] x) => (float[N,3] y) {{
            p = BatchNormalization(x, {bn_inputs("a")})
            q = BatchNormalization(p, {bn_inputs("b")})
            y = MatMul(q, w)
        }}""",
        {"w": _w(rng, 4, 3), **bn_params("a", 4, rng), **bn_params("b", 4, rng)},
    )
    folded, _ = check_fold(m, direction="forward")
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add", "Add"]


def test_conv_bn_bn_backward(rng):
    m = model(
        f"""g (float[N,3,6,6] x) => (float[N,4,4,4] y) {{
            c = Conv(x, w)
            p = BatchNormalization(c, {bn_inputs("a")})
            y = BatchNormalization(p, {bn_inputs("b")})
        }}""",
        {"w": _w(rng, 4, 3, 3, 3), **bn_params("a", 4, rng), **bn_params("b", 4, rng)},
    )
    folded, _ = check_fold(m, direction="backward")
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert folded.graph.node[0].output[0] == "y"


def test_opset9_statistics_outputs_named_but_unused_mean_training(rng):
    """BN-9 with its five outputs is training mode by the spec, read or not."""
    m = model(
        f"""g (float[N,3,8,8] x) => (float[N,6,6,6] y) {{
            c = Conv(x, w)
            y, rm, rv, sm, sv = BatchNormalization(c, {bn_inputs("bn")})
        }}""",
        {"w": _w(rng, 6, 3, 3, 3), **bn_params("bn", 6, rng)},
        opset=9,
    )
    folded, report = fold_onnx(m)
    (d,) = report.decisions
    assert bn_count(folded) == 1 and d.code is SkipCode.TRAINING_MODE


def test_opset9_single_output_folds(rng):
    m = model(
        f"""g (float[N,3,8,8] x) => (float[N,6,6,6] y) {{
            c = Conv(x, w)
            y = BatchNormalization(c, {bn_inputs("bn")})
        }}""",
        {"w": _w(rng, 6, 3, 3, 3), **bn_params("bn", 6, rng)},
        opset=9,
    )
    check_fold(m)


def _spatial0(rng, xshape: list[int]) -> onnx.ModelProto:
    c = xshape[1]
    inits = [numpy_helper.from_array(v, k) for k, v in bn_params("bn", c, rng).items()]
    inits.append(numpy_helper.from_array(_w(rng, c, c, *([1] * (len(xshape) - 2))), "w"))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node(
            "BatchNormalization",
            ["c", "bn_scale", "bn_b", "bn_mean", "bn_var"],
            ["y"],
            "bn",
            spatial=0,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, xshape)],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_spatial0_with_spatial_extent_is_skipped(rng):
    folded, report = fold_onnx(_spatial0(rng, [2, 3, 4, 4]))
    (d,) = report.decisions
    assert d.code is SkipCode.UNSUPPORTED and "spatial=0" in d.reason
    assert bn_count(folded) == 1


def test_spatial0_without_spatial_extent_folds(rng):
    m = _spatial0(rng, [2, 3, 1, 1])
    x = feeds(m)
    # onnxruntime wants spatial=0 statistics shaped like one sample; the float64 spec value:
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    c = np.einsum("oi,ni->no", inits["w"][:, :, 0, 0], x["x"][:, :, 0, 0].astype(np.float64))
    s = inits["bn_scale"] / np.sqrt(inits["bn_var"] + 1e-5)
    y = (c - inits["bn_mean"]) * s + inits["bn_b"]
    check_fold(m, reference=(x, [y.reshape(2, 3, 1, 1).astype(np.float32)]))


def test_bn_in_subgraph_gets_a_decision(rng):
    branch_nodes = [
        helper.make_node(
            "BatchNormalization", ["y", "s_scale", "s_b", "s_mean", "s_var"], ["z"], "inner"
        )
    ]
    branch = helper.make_graph(
        branch_nodes,
        "then",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4, 4, 4])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["z2"])],
        "else",
        [],
        [helper.make_tensor_value_info("z2", TensorProto.FLOAT, [2, 4, 4, 4])],
    )
    inits = {"w": _w(rng, 4, 3, 3, 3), **bn_params("bn", 4, rng), **bn_params("s", 4, rng)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], "conv"),
        helper.make_node("BatchNormalization", ["c", *bn_inputs("bn").split(", ")], ["y"], "outer"),
        helper.make_node("If", ["cond"], ["out"], "if", then_branch=branch, else_branch=other),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4, 4, 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    inputs = {**feeds(m), "cond": np.array(True)}
    from onnxfold_util import run

    expected = run(m, inputs)
    folded, report = fold_onnx(m)
    onnx.checker.check_model(folded, full_check=True)
    outer, inner = report.decisions
    assert outer.bn == "outer" and outer.folded
    assert inner.bn == "inner" and not inner.folded and "subgraph" in inner.reason
    np.testing.assert_allclose(run(folded, inputs)[0], expected[0], rtol=1e-5, atol=1e-6)


def test_constant_value_floats_parameters_fold(rng):
    p = bn_params("bn", 4, rng)
    consts = "\n".join(
        f"{k} = Constant<value_floats = [{', '.join(repr(float(v)) for v in arr)}]>()"
        for k, arr in p.items()
    )
    m = model(
        f"""g (float[N,3,6,6] x) => (float[N,4,4,4] y) {{
            {consts}
            c = Conv(x, w)
            y = BatchNormalization(c, {bn_inputs("bn")})
        }}""",
        {"w": _w(rng, 4, 3, 3, 3)},
    )
    folded, _ = check_fold(m)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_matmul_on_last_axis_is_an_axis_mismatch(rng):
    """Regression: the reason was a channel count, though the axes differ whatever the counts."""
    m = model(
        f"""g (float[N,4,5] x) => (float[N,4,3] y) {{
            c = MatMul(x, w)
            y = BatchNormalization(c, {bn_inputs("bn")})
        }}""",
        {"w": _w(rng, 5, 3), **bn_params("bn", 4, rng)},
    )
    _, report = check_fold(m, left=1)
    assert report.decisions[0].code is SkipCode.CHANNEL_AXIS
