"""An index over an ONNX graph, edited in place on the ``ModelProto``.

onnx-graphsurgeon's import/export converts every initializer to numpy and back, which for a
ResNet-50-sized file costs about as much as loading and saving it again. A fold touches only
a few tensors per BN, so bnfold works on the ``ModelProto`` directly, with an index of
producers, consumers, initializers and Constant nodes, and converts to numpy only the
parameters it folds.

Two things the index knows beyond the proto:

* **Shapes and dtypes** of every value, from ONNX shape inference run on a *skeleton* of the
  model whose large initializers are replaced by typed graph inputs (inference never needs
  their bytes, and copying them would double the memory).
* **Constant values** computed by parameter subgraphs. The dynamo exporter writes, e.g., a
  bias-less Conv's zero bias as ``Expand(CastLike(0, x), Shape(weight))``: its value depends
  only on constants and on the *dtype* or *static shape* of other tensors, so it is a constant
  and is evaluated (with ``onnx.reference``) rather than treated as unknown.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = [
    "GraphIndex",
    "ValueInfo",
    "attr",
    "attr_float",
    "attr_int",
    "attr_ints",
    "attr_str",
    "static_dims",
    "subgraph_names",
]

#: Initializers up to this many elements stay in the skeleton used for shape inference
#: (Reshape targets and the like, whose values inference reads).
_SMALL = 64
#: Operators whose output is not a function of their inputs, never evaluated as constants.
_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}


@dataclass(frozen=True)
class ValueInfo:
    """Element type and shape of a value; ``None`` for unknown dims (symbolic or missing)."""

    elem_type: int
    shape: tuple[int | None, ...] | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def np_dtype(self) -> np.dtype:
        return helper.tensor_dtype_to_np_dtype(self.elem_type)


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of attribute ``name`` of ``node``, or ``default`` when absent.

    The result is ``Any`` because an attribute's Python type depends on its ``type`` field,
    which only the model knows: an int, float, bytes, tensor, graph or a list of those. Code
    that needs one kind reads it through :func:`attr_int`, :func:`attr_float`,
    :func:`attr_str` or :func:`attr_ints`, which convert it.
    """
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    """Attribute ``name`` of ``node`` as an int (flags, ``group``, axes), else ``default``."""
    return int(attr(node, name, default))


def attr_float(node: onnx.NodeProto, name: str, default: float) -> float:
    """Attribute ``name`` of ``node`` as a float (``epsilon``, ``alpha``), else ``default``."""
    return float(attr(node, name, default))


def attr_str(node: onnx.NodeProto, name: str, default: str) -> str:
    """Attribute ``name`` of ``node`` as text, else ``default``.

    ONNX stores STRING attributes as bytes; they are decoded as UTF-8.
    """
    value = attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def attr_ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    """Attribute ``name`` of ``node`` as a list of ints (``pads``, ``kernel_shape``), or None.

    ``None`` (rather than a default list) lets the caller tell an absent attribute, whose
    meaning the operator defines from other inputs, from an explicit one.
    """
    value = attr(node, name, None)
    return None if value is None else [int(v) for v in value]


def static_dims(shape: tuple[int | None, ...]) -> tuple[int, ...] | None:
    """``shape`` when every dim is known, else None (a symbolic dim has no static value)."""
    known = tuple(d for d in shape if d is not None)
    return known if len(known) == len(shape) else None


def subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every value name a node's subgraphs (If/Loop/Scan bodies) read, recursively."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for n in g.node:
                names.update(i for i in n.input if i)
                names |= subgraph_names(n)
    return names


def skeleton_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for checking and shape inference, without its large tensors.

    Initializers over ``_SMALL`` elements (or in external data) become graph inputs of the
    same type and shape, so ONNX's checker and shape inference see every type and shape but
    do not serialise hundreds of megabytes (which costs more than loading the file).
    """
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph, g = model.graph, skeleton.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    g.sparse_initializer.extend(graph.sparse_initializer)
    inputs = {i.name for i in graph.input}
    for t in graph.initializer:
        if t.name in inputs:  # an overridable default: the graph input declares it
            continue
        if int(np.prod(t.dims, dtype=np.int64)) <= _SMALL and t.data_location == 0:
            g.initializer.append(t)
        else:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return skeleton


class GraphIndex:
    """Producers, consumers, parameters and shapes of one graph, kept current under edits.

    Args:
        model: the model whose main graph is indexed (and later edited in place).
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.graph_inputs = {i.name for i in self.graph.input}
        self.graph_outputs = {o.name for o in self.graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.removed: set[int] = set()
        self.names: set[str] = set(self.initializers) | self.graph_inputs | self.graph_outputs
        for node in self.graph.node:
            self._add_node(node)
        self.info = self._infer_shapes()
        self._values: dict[str, np.ndarray | None] = {}
        self._pending: dict[int, list[onnx.NodeProto]] = {}

    # ---- structure -------------------------------------------------------------------------

    def _add_node(self, node: onnx.NodeProto) -> None:
        for o in node.output:
            if o:
                self.producer[o] = node
                self.names.add(o)
        for i in [*node.input, *sorted(subgraph_names(node))]:
            if i:
                self.consumers[i].append(node)
        self.names.add(node.name)

    def nodes(self) -> Iterator[onnx.NodeProto]:
        """The live nodes, in graph order."""
        return (n for n in self.graph.node if id(n) not in self.removed)

    def users(self, name: str) -> list[onnx.NodeProto]:
        """Live nodes reading ``name`` (each once, even when it reads it twice)."""
        seen: set[int] = set()
        out = []
        for n in self.consumers.get(name, []):
            if id(n) not in self.removed and id(n) not in seen:
                seen.add(id(n))
                out.append(n)
        return out

    def unique_name(self, base: str) -> str:
        """``base``, or ``base_<k>`` for the first k that no value, node or initializer uses."""
        name, k = base, 1
        while name in self.names:
            name = f"{base}_{k}"
            k += 1
        self.names.add(name)
        return name

    def replace_input(self, node: onnx.NodeProto, old: str, new: str) -> None:
        """Make ``node`` read ``new`` wherever it read ``old``."""
        for k, i in enumerate(node.input):
            if i == old:
                node.input[k] = new
                self.consumers[new].append(node)
        self.consumers[old] = [n for n in self.consumers[old] if n is not node]

    def set_output(self, node: onnx.NodeProto, index: int, new: str) -> None:
        """Rename output ``index`` of ``node`` to ``new`` (its old name no longer exists)."""
        old = node.output[index]
        if self.producer.get(old) is node:
            del self.producer[old]
        node.output[index] = new
        self.producer[new] = node

    def remove_node(self, node: onnx.NodeProto) -> None:
        """Mark ``node`` removed (dropped from the proto by :meth:`commit`)."""
        self.removed.add(id(node))
        for o in node.output:
            if self.producer.get(o) is node:
                del self.producer[o]

    def insert_after(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> onnx.NodeProto:
        """Append ``node`` to the graph, placed right after ``anchor`` by :meth:`commit`.

        A node inserted later goes *before* those inserted earlier: it takes over the
        anchor's output name, so the earlier ones (which read that name) now read it.
        """
        self._pending.setdefault(id(anchor), []).insert(0, node)
        self._add_node(node)
        return node

    def add_initializer(self, name: str, array: np.ndarray, like: onnx.TensorProto | None) -> None:
        """Add an initializer holding ``array`` (written straight into ``raw_data``)."""
        t = self.graph.initializer.add()
        t.name = name
        if like is not None and like.data_type:
            t.data_type = like.data_type
        else:
            t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.raw_data = np.ascontiguousarray(array).tobytes()  # ONNX raw_data is little-endian
        self.initializers[name] = t
        self.names.add(name)

    def remove_dead(self, candidates: Iterable[str]) -> None:
        """Remove nodes and initializers that fed only what a fold removed, transitively.

        Only values reachable backwards from ``candidates`` are considered, so dead code the
        model already had is left as it was.
        """
        stack = list(candidates)
        dead_inits: set[str] = set()
        while stack:
            name = stack.pop()
            if not name or name in self.graph_outputs or self.users(name):
                continue
            node = self.producer.get(name)
            if node is not None:
                if any(self.users(o) or o in self.graph_outputs for o in node.output if o):
                    continue
                self.remove_node(node)
                for i in node.input:
                    self.consumers[i] = [n for n in self.consumers[i] if n is not node]
                    stack.append(i)
            elif name in self.initializers and name not in self.graph_inputs:
                dead_inits.add(name)
        if dead_inits:
            keep = [k for k, t in enumerate(self.graph.initializer) if t.name not in dead_inits]
            if len(keep) != len(self.graph.initializer):
                for k in sorted(set(range(len(self.graph.initializer))) - set(keep), reverse=True):
                    del self.graph.initializer[k]
            for name in dead_inits:
                del self.initializers[name]

    def commit(self) -> None:
        """Write the node list back: drop removed nodes, place inserted ones after anchors."""
        pending = self._pending
        if not self.removed and not pending:
            return
        order: list[onnx.NodeProto] = []
        for n in self.graph.node:
            if id(n) not in self.removed:
                order.append(n)
            order.extend(m for m in pending.get(id(n), []) if id(m) not in self.removed)
        copies = [onnx.NodeProto() for _ in order]
        for c, n in zip(copies, order, strict=True):
            c.CopyFrom(n)
        del self.graph.node[:]
        self.graph.node.extend(copies)
        self.removed.clear()
        self._pending = {}

    # ---- shapes ----------------------------------------------------------------------------

    def _infer_shapes(self) -> dict[str, ValueInfo]:
        """Types and shapes of every value, inferred on a skeleton without large tensors."""
        skeleton = skeleton_of(self.model)
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
        except Exception:  # inference is best effort: unknown shapes become skip reasons
            inferred = skeleton
        out: dict[str, ValueInfo] = {}
        for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                continue
            shape = (
                tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
                if tt.HasField("shape")
                else None
            )
            out[vi.name] = ValueInfo(tt.elem_type, shape)
        for t in inferred.graph.initializer:
            out[t.name] = ValueInfo(t.data_type, tuple(t.dims))
        return out

    def value_info(self, name: str) -> ValueInfo | None:
        """Type and shape of ``name`` (initializers from their dims), or None if unknown."""
        t = self.initializers.get(name)
        if t is not None:
            return ValueInfo(t.data_type, tuple(t.dims))
        return self.info.get(name)

    # ---- constants -------------------------------------------------------------------------

    def overridable(self, name: str) -> bool:
        """An initializer that is also a graph input: the caller may feed another value."""
        return name in self.graph_inputs

    def tensor_proto(self, name: str) -> onnx.TensorProto | None:
        """The TensorProto behind an initializer or a Constant node's ``value``, if any."""
        if name in self.initializers and name not in self.graph_inputs:
            return self.initializers[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return a.t
        return None

    def is_constant(self, name: str) -> bool:
        """Whether ``name`` is a constant, without decoding an initializer's bytes."""
        if name in self.initializers:
            return name not in self.graph_inputs
        return self.constant(name) is not None

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        """The shape of ``name`` if known (initializers from their dims, no decoding)."""
        info = self.value_info(name)
        return None if info is None else info.shape

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant (possibly computed), else None.

        Initializers are decoded on each call rather than cached: the large ones are read
        once, by the fold that replaces them, and caching them would hold a second copy of
        the model's weights.
        """
        if name in self.initializers:
            return (
                None if self.overridable(name) else numpy_helper.to_array(self.initializers[name])
            )
        if name in self._values:
            return self._values[name]
        self._values[name] = None  # breaks cycles while evaluating
        value = self._evaluate(name)
        self._values[name] = value
        return value

    def constant_nodes(self, name: str) -> set[int]:
        """ids of the nodes computing the constant ``name`` (its parameter subgraph)."""
        out: set[int] = set()
        stack = [name]
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or id(node) in out:
                continue
            out.add(id(node))
            if node.op_type in ("Shape", "Size"):
                continue
            inputs = node.input[:1] if node.op_type == "CastLike" else node.input
            stack.extend(i for i in inputs if i)
        return out

    def _evaluate(self, name: str) -> np.ndarray | None:
        if self.overridable(name):
            return None
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        if op in _NONDETERMINISTIC or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            return None
        if op in ("Shape", "Size"):
            return self._shape_value(node)
        feeds: dict[str, np.ndarray] = {}
        inputs = list(node.input)
        if op == "CastLike":
            info = self.value_info(inputs[1])
            if info is None or not info.elem_type:
                return None
            src = self.constant(inputs[0])
            if src is None:
                return None
            value = src.astype(info.np_dtype)
            return value
        for i in inputs:
            if not i:
                continue
            v = self.constant(i)
            if v is None:
                return None
            feeds[i] = v
        try:
            from onnx.reference import ReferenceEvaluator

            outputs = ReferenceEvaluator(node).run(None, feeds)
        except Exception:  # an op the reference cannot run is simply not a known constant
            return None
        # run() returns a name -> value dict only for intermediate=True; here it is a list
        assert isinstance(outputs, list)
        for o, v in zip(node.output, outputs, strict=False):
            if o and o != name:
                self._values[o] = np.asarray(v)
        return np.asarray(outputs[list(node.output).index(name)])

    def _shape_value(self, node: onnx.NodeProto) -> np.ndarray | None:
        info = self.value_info(node.input[0])
        if info is None or info.shape is None:
            return None
        shape = info.shape
        if node.op_type == "Size":
            known = static_dims(shape)
            return None if known is None else np.array(int(np.prod(known)), dtype=np.int64)
        rank = len(shape)
        start = attr_int(node, "start", 0)
        end = attr_int(node, "end", rank)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        dims = shape[start:end]
        if None in dims:
            return None
        return np.array(dims, dtype=np.int64)
