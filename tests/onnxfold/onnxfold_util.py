"""Helpers for the ONNX fold tests: tiny models from text, onnxruntime runs, comparisons."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from bnfold.onnxfold import fold_onnx
from bnfold.report import FoldReport

RTOL = 1e-5


def model(text: str, inits: dict[str, np.ndarray], opset: int = 15) -> onnx.ModelProto:
    """A model from ONNX text (graph part only) and numpy initializers."""
    m = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n{text}')
    for name, arr in inits.items():
        m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
    onnx.checker.check_model(m, full_check=True)
    return m


def bn_params(prefix: str, c: int, rng: np.random.Generator, dtype=np.float32) -> dict:
    """Non-trivial BN parameters named ``<prefix>_scale`` ... ``<prefix>_var``."""
    return {
        f"{prefix}_scale": (rng.random(c) + 0.5).astype(dtype),
        f"{prefix}_b": (rng.standard_normal(c) * 0.3).astype(dtype),
        f"{prefix}_mean": (rng.standard_normal(c) * 0.5).astype(dtype),
        f"{prefix}_var": (rng.random(c) * 1.5 + 0.25).astype(dtype),
    }


def bn_inputs(prefix: str) -> str:
    return f"{prefix}_scale, {prefix}_b, {prefix}_mean, {prefix}_var"


def feeds(m: onnx.ModelProto, seed: int = 0, batch: int = 3) -> dict[str, np.ndarray]:
    """Random inputs for every graph input that is not an initializer; symbolic dims = batch."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in m.graph.initializer}
    out = {}
    for i in m.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        out[i.name] = rng.standard_normal(shape).astype(dtype)
    return out


def run(m: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run on onnxruntime's CPU provider with graph optimizations OFF (it would fold BNs)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def max_rel_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest |a - b| relative to the largest |a| of each output."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        scale = max(float(np.max(np.abs(x64))), 1e-30)
        worst = max(worst, float(np.max(np.abs(x64 - y64))) / scale)
    return worst


def bn_count(m: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in m.graph.node)


def check_fold(
    m: onnx.ModelProto,
    *,
    left: int = 0,
    direction: str = "both",
    rtol: float = RTOL,
    seed: int = 0,
    reference: tuple[dict[str, np.ndarray], list[np.ndarray]] | None = None,
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold ``m`` and hold the result to the contract: checker, onnxruntime, names, outputs.

    ``reference`` gives inputs and expected outputs, for originals onnxruntime cannot run.
    """
    before = m.SerializeToString()
    folded, report = fold_onnx(m, direction=direction)
    assert m.SerializeToString() == before, "the input model was modified"
    onnx.checker.check_model(folded, full_check=True)
    assert [i.name for i in folded.graph.input] == [i.name for i in m.graph.input]
    assert [o.name for o in folded.graph.output] == [o.name for o in m.graph.output]
    assert bn_count(folded) == left, [(d.bn, d.code, d.reason) for d in report.decisions]
    assert len(report.decisions) == bn_count(m)
    if reference is None:
        inputs = feeds(m, seed)
        expected = run(m, inputs)
    else:
        inputs, expected = reference
    err = max_rel_error(expected, run(folded, inputs))
    assert err <= rtol, f"max relative error {err:.3g} > {rtol:g}"
    return folded, report


def initializer(m: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name))


def float64_reference(
    m: onnx.ModelProto, inputs: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """``(inputs, outputs)`` of ``m`` evaluated in float64 by ``onnx.reference``.

    Every float32 tensor, input and output becomes float64, so the outputs are what the
    model computes without float32 rounding: a fold is held to that, not to the float32 run.
    """
    m64 = onnx.ModelProto()
    m64.CopyFrom(m)
    del m64.graph.value_info[:]
    for t in m64.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for v in [*m64.graph.input, *m64.graph.output]:
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            v.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    from onnx.reference import ReferenceEvaluator

    feeds64 = {k: v.astype(np.float64) for k, v in inputs.items()}
    outputs = ReferenceEvaluator(m64).run(None, feeds64)
    return inputs, [np.asarray(o) for o in outputs]
