"""Refuse an ONNX model that no runtime could load, before anything is folded.

A fold of an invalid model would be written with exit 0 and fail later, in deployment. The
model must pass ``onnx.checker`` with full (strict) shape inference: that covers a graph
cycle or a node input nothing produces (nodes must be topologically sorted), a missing
initializer, operator attributes the opset does not define (``training_mode`` at opset 9,
``spatial`` at 15), BN parameters of the wrong rank or length, and inputs of types an operator
does not accept. The checker runs on a skeleton without the large tensors
(:func:`bnfold.onnxfold.graph.skeleton_of`): serialising a 100 MB model for it costs more
than loading the file. The checks the checker skips or cannot see on the skeleton are made
here: every tensor's data length against its dims, and graph output names that repeat.
"""

from __future__ import annotations

import math
import re

import onnx

from bnfold.errors import BadInputError

__all__ = ["check_onnx_model"]

_PACKED_4BIT = {
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1")
    if hasattr(onnx.TensorProto, name)
}
_TWO_PER_ELEMENT = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}


def check_onnx_model(model: onnx.ModelProto, label: str) -> None:
    """Raise :class:`BadInputError` (one line, naming the problem) unless ``model`` is valid.

    Args:
        model: the model, with external data already loaded (tensors still marked external
            are skipped by the length check).
        label: how to name the model in the message (its path).
    """
    from bnfold.onnxfold.graph import skeleton_of

    if not model.HasField("graph") or not model.opset_import or not model.ir_version:
        raise BadInputError(
            f"{label} is not an ONNX model (no graph, opset or IR version); give a file "
            "written by an ONNX exporter"
        )
    for tensor in _main_graph_tensors(model):
        problem = _data_length_problem(tensor)
        if problem:
            raise BadInputError(f"{label} is not a valid ONNX model: {problem}")
    seen: set[str] = set()
    for out in model.graph.output:
        if out.name in seen:
            raise BadInputError(
                f"{label} is not a valid ONNX model: graph output {out.name!r} is listed twice"
            )
        seen.add(out.name)
    try:
        onnx.checker.check_model(_with_io_shapes(skeleton_of(model)), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise BadInputError(
            f"{label} is not a valid ONNX model ({_summary(e)}); fix or re-export it"
        ) from None


def _with_io_shapes(skeleton: onnx.ModelProto) -> onnx.ModelProto:
    """Give shape-less graph outputs the shape inference finds, or leave them out.

    The checker demands a ``shape`` field on every graph input and output, but a missing one
    only means "rank unknown", which exporters write and onnxruntime loads. An output whose
    rank inference cannot find either is dropped from the checked copy once it is known to
    be produced by a node, an input or an initializer.
    """
    graph = skeleton.graph
    shapeless = [
        o
        for o in graph.output
        if o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape")
    ]
    if not shapeless:
        return skeleton
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton)
        known = {vi.name: vi for vi in inferred.graph.value_info}
    except Exception:  # the strict check below reports what inference cannot do
        known = {}
    produced = {o for n in graph.node for o in n.output}
    produced |= {i.name for i in graph.input} | {t.name for t in graph.initializer}
    kept = []
    for out in graph.output:
        if out in shapeless:
            vi = known.get(out.name)
            if vi is not None and vi.type.tensor_type.HasField("shape"):
                out.type.CopyFrom(vi.type)
            elif out.name in produced:
                continue
        kept.append(out)
    del graph.output[:]
    graph.output.extend(kept)
    return skeleton


def _main_graph_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors.extend(a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return tensors


def _data_length_problem(t: onnx.TensorProto) -> str | None:
    """A sentence when the stored data holds more or fewer elements than the dims say."""
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type in (
        onnx.TensorProto.STRING,
        onnx.TensorProto.UNDEFINED,
    ):
        return None
    if any(d < 0 for d in t.dims):
        return f"tensor {t.name!r} has a negative dimension {list(t.dims)}"
    count = math.prod(t.dims)
    if t.HasField("raw_data"):
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        expected = (count + 1) // 2 if t.data_type in _PACKED_4BIT else count * itemsize
        # One copy of the bytes (protobuf hands out a copy per access; ByteSize() serialises,
        # which costs the same): ~40 ms on a 100 MB model, the price of never writing a
        # tensor that no runtime can read.
        got = len(t.raw_data)
        unit = "bytes"
    else:
        field = onnx.helper.tensor_dtype_to_field(t.data_type)
        got = len(getattr(t, field))
        if t.data_type in _PACKED_4BIT:
            expected = (count + 1) // 2
        else:
            expected = count * (2 if t.data_type in _TWO_PER_ELEMENT else 1)
        unit = "values"
        if got == 0 and count == 0:
            return None
    if got != expected:
        return (
            f"tensor {t.name!r} declares dims {list(t.dims)} ({expected} {unit}) but holds "
            f"{got} {unit}"
        )
    return None


def _summary(error: Exception) -> str:
    """The checker's message on one line, without the node dump it appends."""
    text = " ".join(str(error).split())
    if "must be topologically sorted" in text:
        found = re.search(r"however input '([^']*)' of node: name: (\S*) OpType: (\S+)", text)
        if found:
            name, node, op = found.groups()
            return (
                f"input {name!r} of {op} {node} is produced by no earlier node, graph input or "
                "initializer: a cycle, a dangling input or a missing initializer"
            )
    for cut in (" of node: ", " ==> Context:", " Node ("):
        if cut in text:
            text = text.split(cut)[0]
    return text[:240]
