"""Small ONNX models for the verification tests, and a way to break one fold of them."""

from __future__ import annotations

import io
import itertools

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper


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


def perturb(model: onnx.ModelProto, node: str, rel: float) -> onnx.ModelProto:
    """A copy of ``model`` with the weight (second input) of node ``node`` scaled by ``1 + rel``."""
    initializer = next(n.input[1] for n in model.graph.node if n.name == node)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == initializer:
            arr = numpy_helper.to_array(t)
            t.CopyFrom(_init(initializer, (arr * np.float32(1 + rel)).astype(arr.dtype)))
            return out
    raise KeyError(initializer)


def export_onnx(module: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """``module`` as ONNX with its BatchNorms kept (TorchScript exporter, no constant folding)."""
    buf = io.BytesIO()
    torch.onnx.export(
        module,
        (x,),
        buf,
        dynamo=False,
        do_constant_folding=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}},
    )
    return onnx.load_from_string(buf.getvalue())
