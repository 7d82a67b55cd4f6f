"""Small ONNX models for the verification tests, and a fold written with bnfold.foldmath.

The fold here is the plain backward Conv <- BN rewrite (weights from ``foldmath``, the conv
renamed to write the BN's output), enough to give ``verify`` a correctly folded model and its
FoldReport without depending on the ONNX front end.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold import foldmath
from bnfold.report import FoldReport
from bnfold.sites import Direction, FoldDecision


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def conv_bn_chain(channels: tuple[int, ...] = (3, 8, 8, 8, 4), seed: int = 0) -> onnx.ModelProto:
    """X[N,C0,8,8] -> (Conv -> BN -> Relu) per stage -> Y, batch dim symbolic ``N``."""
    rng = np.random.default_rng(seed)
    nodes = []
    inits = []
    prev = "X"
    for i, (cin, cout) in enumerate(itertools.pairwise(channels)):
        w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
        inits += [
            _init(f"w{i}", w),
            _init(f"b{i}", (rng.standard_normal(cout) * 0.1).astype(np.float32)),
            _init(f"gamma{i}", (rng.random(cout) + 0.5).astype(np.float32)),
            _init(f"beta{i}", (rng.standard_normal(cout) * 0.2).astype(np.float32)),
            _init(f"mean{i}", (rng.standard_normal(cout) * 0.5).astype(np.float32)),
            _init(f"var{i}", (rng.random(cout) * 1.5 + 0.25).astype(np.float32)),
        ]
        nodes.append(
            helper.make_node(
                "Conv", [prev, f"w{i}", f"b{i}"], [f"conv{i}"], name=f"conv{i}", pads=[1] * 4
            )
        )
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [f"conv{i}", f"gamma{i}", f"beta{i}", f"mean{i}", f"var{i}"],
                [f"bn{i}"],
                name=f"bn{i}",
                epsilon=1e-5,
            )
        )
        last = i == len(channels) - 2
        nodes.append(helper.make_node("Relu", [f"bn{i}"], ["Y" if last else f"relu{i}"]))
        prev = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        "conv_bn_chain",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", channels[0], 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", channels[-1], 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def hand_fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every Conv -> BN of ``model`` backward with foldmath; the conv writes the BN output."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    report = FoldReport(model=graph.name, framework="onnx")
    keep = []
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            keep.append(node)
            continue
        conv = producers[node.input[0]]
        arr = {n: numpy_helper.to_array(inits[n]) for n in node.input[1:]}
        gamma, beta, mean, var = (arr[n] for n in node.input[1:])
        eps = next(a.f for a in node.attribute if a.name == "epsilon")
        affine = foldmath.bn_affine(mean, var, eps, gamma, beta)
        w = numpy_helper.to_array(inits[conv.input[1]])
        b = numpy_helper.to_array(inits[conv.input[2]])
        w2, b2 = foldmath.fold_backward(w, b, affine, foldmath.CONV)
        inits[conv.input[1]].CopyFrom(_init(conv.input[1], foldmath.round_to(w2, w.dtype)))
        inits[conv.input[2]].CopyFrom(_init(conv.input[2], foldmath.round_to(b2, b.dtype)))
        conv.output[0] = node.output[0]
        report.decisions.append(
            FoldDecision.fold(
                node.name,
                Direction.BACKWARD,
                conv.name,
                params={conv.input[1]: [conv.input[1], *node.input[1:]]},
                tensor=node.output[0],
            )
        )
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    onnx.checker.check_model(folded)
    return folded, report


def perturb(model: onnx.ModelProto, initializer: str, rel: float) -> onnx.ModelProto:
    """A copy of ``model`` with one initializer scaled by ``1 + rel``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == initializer:
            arr = numpy_helper.to_array(t)
            t.CopyFrom(_init(initializer, (arr * np.float32(1 + rel)).astype(arr.dtype)))
            return out
    raise KeyError(initializer)
