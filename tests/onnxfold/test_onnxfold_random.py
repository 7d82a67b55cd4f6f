"""Randomised differential tests: random valid graphs, folded three ways, run on onnxruntime.

Every seed builds a graph with :mod:`random_graphs`, folds it backward, forward and both ways,
and holds the result to the whole contract: the checker passes (full check), onnxruntime
loads it, graph inputs and outputs are unchanged, every BN has exactly one decision, a folded
BN is gone and a skipped one stays with a code and a reason, and the outputs match the
original's (onnxruntime, optimizations off) to 1e-5 of the output scale in float32.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxfold_util import max_rel_error, run
from random_graphs import build

from bnfold.onnxfold import fold_onnx
from bnfold.sites import Direction

FP32_RTOL = 1e-5
#: float16 parameters are rounded once (2**-11 relative) where the original rounds the
#: activations after each layer instead; a few layers of that stay well inside 1%.
FP16_RTOL = 1e-2


def check_random(seed: int) -> None:
    """Fold the random graph of ``seed`` in every direction and check the contract."""
    g = build(seed)
    m = g.model
    onnx.checker.check_model(m, full_check=True)
    expected = run(m, g.feeds)
    before = m.SerializeToString()
    for direction in ("backward", "forward", "both"):
        folded, report = fold_onnx(m, direction=direction)
        assert m.SerializeToString() == before, "the input model was modified"
        where = f"seed {seed}, direction {direction}"
        onnx.checker.check_model(folded, full_check=True)
        assert [i.name for i in folded.graph.input] == [i.name for i in m.graph.input], where
        assert [o.name for o in folded.graph.output] == [o.name for o in m.graph.output], where
        assert [(i.type) for i in folded.graph.input] == [i.type for i in m.graph.input], where
        assert [d.bn for d in report.decisions] == g.bns, where
        left = {n.name for n in folded.graph.node if n.op_type == "BatchNormalization"}
        for d in report.decisions:
            if d.folded:
                assert d.bn not in left, (where, d)
                assert d.direction is not None and d.target
                if direction != "both":
                    assert d.direction is Direction(direction), (where, d)
            else:
                assert d.bn in left, (where, d)
                assert d.code is not None and d.reason, (where, d)
        assert len(left) == len(report.skipped), where
        got = run(folded, g.feeds)
        err = max_rel_error(expected, got)
        rtol = FP16_RTOL if g.half else FP32_RTOL
        if err > rtol and not g.half:
            # The float32 original can itself be the inaccurate one (a training-mode BN over
            # a batch of two amplifies rounding): then judge both against float64.
            truth = reference64(m, g.feeds)
            err = max_rel_error(truth, got) - max_rel_error(truth, expected)
        assert err <= rtol, f"{where}: max relative error {err:.3g} > {rtol:g}; " + str(
            [(d.bn, d.direction, d.target) for d in report.folded]
        )


def reference64(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``m`` computed in float64 by the ONNX reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    m64 = onnx.ModelProto()
    m64.CopyFrom(m)
    tensors = list(m64.graph.initializer) + [
        a.t for n in m64.graph.node for a in n.attribute if a.name == "value"
    ]
    for t in tensors:
        if t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for n in m64.graph.node:
        for a in n.attribute:
            if a.name == "value_floats":
                n.attribute.remove(a)
                n.attribute.append(
                    helper.make_attribute("value", numpy_helper.from_array(np.array(a.floats)))
                )
            elif a.name == "value_float":
                n.attribute.remove(a)
                n.attribute.append(
                    helper.make_attribute("value", numpy_helper.from_array(np.array(a.f)))
                )
    for v in [*m64.graph.input, *m64.graph.output]:
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            v.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    return ReferenceEvaluator(m64).run(None, {k: v.astype(np.float64) for k, v in feeds.items()})


@pytest.mark.parametrize("seed", range(150))
def test_random_graph(seed: int) -> None:
    check_random(seed)


@pytest.mark.slow
def test_random_graphs_quick() -> None:
    for seed in range(150, 450):
        check_random(seed)


@pytest.mark.slow
def test_random_graphs_many() -> None:
    for seed in range(450, 3000):
        check_random(seed)


def test_generator_covers_the_cases() -> None:
    """The seeds of the default run meet every kind of node and storage the pass handles."""
    ops: set[str] = set()
    opsets: set[int] = set()
    half = 0
    for seed in range(150):
        g = build(seed)
        ops |= {n.op_type for n in g.model.graph.node}
        opsets.add(g.model.opset_import[0].version)
        half += g.half
    assert {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Flatten", "Reshape"} <= ops
    assert {"Constant", "Relu", "Transpose", "BatchNormalization"} <= ops
    assert {"Concat", "GlobalAveragePool", "AveragePool"} <= ops
    assert opsets == {9, 14, 15}
    assert half >= 10
