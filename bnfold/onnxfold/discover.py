"""Find the neighbour a BatchNormalization could fold into, and gather the guard facts.

For each BN this module looks one step back (the producer of its input) and one step forward
(the single reader of its output, possibly through a ``Flatten``) and describes the pair as a
:class:`~bnfold.guards.SiteFacts`; :func:`bnfold.guards.check` then decides. Everything the
rewrite needs (which inputs hold the weight and bias, the Flatten repeat factor, readers that
only look at a tensor's shape) travels in a :class:`Site`.

Readers that use only the *shape or dtype* of a tensor (``Shape``, ``Size``, the second input
of ``CastLike``) do not see its values, so they do not block a fold: the rewrite points them at
a tensor of the same shape and dtype. Nodes that compute the BN's own parameters die with the
BN and are ignored too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold import foldmath
from bnfold.guards import SiteFacts
from bnfold.onnxfold.graph import (
    GraphIndex,
    attr_float,
    attr_int,
    attr_ints,
    attr_str,
    static_dims,
)
from bnfold.sites import Direction

__all__ = ["Site", "backward_site", "forward_site", "bn_training", "FLOAT_TYPES"]

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}
_BACKWARD_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")
_FORWARD_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Flatten", "Reshape")
_FLATTEN_OPS = ("Flatten", "Reshape")


@dataclass
class Site:
    """A BN and the neighbour it may fold into, with what the rewrite needs.

    Attributes:
        bn: the BatchNormalization node.
        name: the BN's report name.
        direction: backward or forward.
        facts: the guard facts for :func:`bnfold.guards.check`.
        partner: the Conv/ConvTranspose/Gemm/MatMul node whose parameters change.
        add: for MatMul + Add -> BN, the Add holding the bias.
        flatten: for BN -> Flatten -> Gemm/MatMul, the Flatten.
        repeat: spatial positions per channel after the Flatten (1 without one).
    """

    bn: onnx.NodeProto
    name: str
    direction: Direction
    facts: SiteFacts
    partner: onnx.NodeProto | None = None
    add: onnx.NodeProto | None = None
    flatten: onnx.NodeProto | None = None
    repeat: int = 1


def bn_training(g: GraphIndex, bn: onnx.NodeProto) -> bool:
    """A BN in training mode, by the rules of its opset.

    Opset 14 on: ``training_mode=1``. Opsets 7-13 have no attribute: the spec makes the
    statistics outputs (running mean/var, saved mean/var) the mark of training mode, so a BN
    with any of them named is in training mode even when nothing reads them. Opset 6 and
    older: ``is_test=0``.
    """
    if attr_int(bn, "training_mode", 0):
        return True
    if g.opset < 7 and not attr_int(bn, "is_test", 0):
        return True
    if g.opset < 14 and any(o for o in bn.output[1:]):
        return True
    return any(o and (g.users(o) or o in g.graph_outputs) for o in bn.output[1:])


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.op_type


def _shape_only(node: onnx.NodeProto, tensor: str) -> bool:
    """``node`` reads only the shape or element type of ``tensor``."""
    if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
        return True
    if node.op_type == "CastLike" and node.domain in ("", "ai.onnx"):
        return tensor not in node.input[:1]
    return False


def _readers(g: GraphIndex, tensor: str, wanted: onnx.NodeProto, ignore: set[int]) -> list[str]:
    """Names of readers of ``tensor`` besides ``wanted`` that see its values.

    Shape-only readers are left out: the rewrite re-points them at a same-shaped survivor.
    """
    return [
        _name(n)
        for n in g.users(tensor)
        if n is not wanted and id(n) not in ignore and not _shape_only(n, tensor)
    ]


def _bn_param_nodes(g: GraphIndex, bn: onnx.NodeProto) -> set[int]:
    """Nodes computing the BN's parameters: they die with the BN."""
    out: set[int] = set()
    for p in bn.input[1:5]:
        if p:
            out |= g.constant_nodes(p)
    return out


def _non_constant(g: GraphIndex, names: list[str]) -> list[str]:
    return [n for n in names if n and not g.is_constant(n)]


def _dtype_problem(g: GraphIndex, partner: onnx.NodeProto, params: list[str]) -> str | None:
    """A sentence when the partner's parameters are not floating point of one type."""
    types = []
    for p in params:
        info = g.value_info(p)
        if info is None:
            continue
        types.append(info.elem_type)
        if info.elem_type not in FLOAT_TYPES:
            dtype = onnx.helper.tensor_dtype_to_string(info.elem_type)
            return f"{_name(partner)}'s parameter {p} is {dtype}; only float parameters fold"
    if len(set(types)) > 1:
        return f"{_name(partner)}'s weight and bias have different dtypes"
    return None


def _bn_facts(g: GraphIndex, bn: onnx.NodeProto, name: str, direction: Direction) -> SiteFacts:
    facts = SiteFacts(bn=name, direction=direction, training=bn_training(g, bn))
    if g.opset < 9 and not attr_int(bn, "spatial", 1):
        # spatial=0 keeps statistics per element (C x D1 x ... x Dn), which equal per-channel
        # ones only when every spatial extent is 1.
        shape = g.shape(bn.input[0])
        if shape is None or len(shape) < 2 or any(d != 1 for d in shape[2:]):
            facts.unsupported = (
                "BN has spatial=0: it keeps statistics per element, not per channel, so no "
                "per-channel weight can absorb it"
            )
    return facts


def _matmul_weight_problem(g: GraphIndex, node: onnx.NodeProto) -> str | None:
    info = g.value_info(node.input[1])
    if info is None or info.rank != 2:
        return f"{_name(node)}'s second input is not a 2-D weight"
    return None


def backward_site(g: GraphIndex, bn: onnx.NodeProto, name: str) -> Site:
    """The site for folding ``bn`` into the producer of its input."""
    facts = _bn_facts(g, bn, name, Direction.BACKWARD)
    site = Site(bn=bn, name=name, direction=Direction.BACKWARD, facts=facts)
    x = bn.input[0]
    producer = g.producer.get(x)
    if (
        producer is None
        or producer.op_type not in _BACKWARD_OPS
        or producer.domain
        not in (
            "",
            "ai.onnx",
        )
    ):
        return site
    add = None
    if producer.op_type == "Add":
        add = producer
        producer = _matmul_of_add(g, add)
        if producer is None:
            return site
    site.partner, site.add = producer, add
    facts.partner = _name(producer)
    facts.partner_op = producer.op_type
    if len([o for o in producer.output if o]) != 1:
        facts.unsupported = f"{_name(producer)} has more than one output"
        return site
    ignore = _bn_param_nodes(g, bn)
    facts.graph_output = x in g.graph_outputs
    facts.extra_users = _readers(g, x, bn, ignore)
    if add is not None:
        facts.graph_output |= producer.output[0] in g.graph_outputs
        facts.extra_users += _readers(g, producer.output[0], add, ignore)

    params = _partner_params(producer, add)
    facts.non_constant = _non_constant(g, [*params, *bn.input[1:5]])
    facts.non_finite = _non_finite(g, bn) if not facts.non_constant else []
    if producer.op_type == "MatMul" and (problem := _matmul_weight_problem(g, producer)):
        facts.unsupported = problem
        return site
    facts.bn_axis = 1
    facts.partner_axis = 1
    if producer.op_type == "MatMul":
        out = g.value_info(producer.output[0])
        facts.partner_axis = None if out is None or out.rank is None else out.rank - 1
    if not facts.non_constant and facts.partner_axis == facts.bn_axis:
        facts.dtype = _dtype_problem(g, producer, params)
        facts.unsupported = facts.unsupported or _channel_problem(g, bn, producer, params)
    return site


def _matmul_of_add(g: GraphIndex, add: onnx.NodeProto) -> onnx.NodeProto | None:
    """The MatMul of a ``MatMul + Add(constant)`` pair, or None."""
    for k in (0, 1):
        mm = g.producer.get(add.input[k])
        if mm is not None and mm.op_type == "MatMul" and g.is_constant(add.input[1 - k]):
            return mm
    return None


def _partner_params(partner: onnx.NodeProto, add: onnx.NodeProto | None) -> list[str]:
    """Names of the partner's weight and bias inputs (those present)."""
    params = [i for i in partner.input[1:3] if i]
    if add is not None:
        params.append(bias_input(add, partner))
    return params


def bias_input(add: onnx.NodeProto, matmul: onnx.NodeProto) -> str:
    """The Add input that is not the MatMul's output."""
    return add.input[1] if add.input[0] == matmul.output[0] else add.input[0]


def _channel_problem(
    g: GraphIndex, bn: onnx.NodeProto, partner: onnx.NodeProto, params: list[str]
) -> str | None:
    """A sentence when the BN's channel count differs from the partner's output channels."""
    mean = g.constant(bn.input[3])
    shape = g.shape(params[0]) if params else None
    weight = None if shape is None else static_dims(shape)
    if mean is None or weight is None:
        return None
    c = int(np.asarray(mean).size)
    op = partner.op_type
    if op == "Conv":
        n = weight[0]
    elif op == "ConvTranspose":
        n = weight[1] * attr_int(partner, "group", 1)
    elif op == "Gemm":
        n = weight[0] if attr_int(partner, "transB", 0) else weight[-1]
    else:
        n = weight[-1]
    if n != c:
        return f"BN has {c} channels but {_name(partner)} produces {n}"
    return _bias_problem(g, partner, params, n)


def _bias_problem(
    g: GraphIndex, node: onnx.NodeProto, params: list[str], channels: int
) -> str | None:
    """A sentence when a Conv bias is neither ``channels`` values nor one repeated value."""
    if node.op_type not in ("Conv", "ConvTranspose") or len(params) < 2:
        return None
    bias = g.constant(params[1])
    if bias is None or bias.shape == (channels,):
        return None
    flat = np.asarray(bias).reshape(-1)
    if flat.size and np.all(flat == flat[0]):
        return None
    return f"{_name(node)}'s bias has shape {list(bias.shape)}, not [{channels}]"


def forward_site(g: GraphIndex, bn: onnx.NodeProto, name: str) -> Site:
    """The site for folding ``bn`` into the reader of its output."""
    facts = _bn_facts(g, bn, name, Direction.FORWARD)
    site = Site(bn=bn, name=name, direction=Direction.FORWARD, facts=facts)
    y = bn.output[0]
    ignore = _bn_param_nodes(g, bn)
    users = [n for n in g.users(y) if id(n) not in ignore and not _shape_only(n, y)]
    candidates = [n for n in users if n.op_type in _FORWARD_OPS and n.domain in ("", "ai.onnx")]
    if not candidates:
        return site
    first = candidates[0]
    flatten = None
    consumer = first
    if first.op_type in _FLATTEN_OPS:
        if first.input[0] != y:
            return site
        flatten = first
        readers = g.users(first.output[0])
        if not readers or readers[0].op_type not in ("Gemm", "MatMul"):
            return site
        consumer = readers[0]
    site.partner, site.flatten = consumer, flatten
    facts.partner, facts.partner_op = _name(consumer), consumer.op_type
    facts.graph_output = y in g.graph_outputs
    facts.extra_users = _readers(g, y, first, ignore)
    if flatten is not None:
        facts.graph_output |= flatten.output[0] in g.graph_outputs
        facts.extra_users += _readers(g, flatten.output[0], consumer, set())
    read = flatten.output[0] if flatten is not None else y
    if consumer.input[0] != read or read in consumer.input[1:]:
        facts.unsupported = f"{_name(consumer)} reads the BN output as a weight, not its input"
        return site
    if consumer.op_type == "ConvTranspose":
        facts.unsupported = (
            f"{_name(consumer)} is a ConvTranspose: output positions receive different numbers "
            "of input positions, so the BN shift does not become a bias"
        )
        return site
    params = _partner_params(consumer, None)
    facts.non_constant = _non_constant(g, [*params, *bn.input[1:5]])
    facts.non_finite = _non_finite(g, bn) if not facts.non_constant else []
    if consumer.op_type == "MatMul" and (problem := _matmul_weight_problem(g, consumer)):
        facts.unsupported = problem
        return site
    x_info = g.value_info(bn.input[0])
    rank = None if x_info is None else x_info.rank
    facts.bn_axis = 1
    if flatten is not None:
        dims = None if x_info is None or x_info.shape is None else static_dims(x_info.shape[1:])
        if dims is None:
            facts.partner_axis = None
        elif problem := _flatten_problem(g, flatten, len(dims) + 1, int(np.prod(dims))):
            facts.unsupported = problem
            return site
        else:
            site.repeat = int(np.prod(dims[1:], dtype=np.int64))
            facts.partner_axis = 1
    elif consumer.op_type == "Conv":
        facts.partner_axis = 1
        facts.padding = _padding_problem(g, consumer)
    elif consumer.op_type == "Gemm" and attr_int(consumer, "transA", 0):
        facts.partner_axis = 0
    else:
        facts.partner_axis = None if rank is None else rank - 1
    if not facts.non_constant and facts.partner_axis == facts.bn_axis:
        facts.dtype = _dtype_problem(g, consumer, params)
        facts.unsupported = facts.unsupported or _forward_channel_problem(g, bn, consumer, site)
    return site


def _flatten_problem(g: GraphIndex, node: onnx.NodeProto, rank: int, features: int) -> str | None:
    """A sentence unless ``node`` turns ``(N, C, d...)`` into ``(N, C * prod(d))``."""
    if node.op_type == "Flatten":
        axis = attr_int(node, "axis", 1)
        if (axis + rank if axis < 0 else axis) != 1:
            return f"{_name(node)} does not flatten from axis 1, so channels mix with the batch"
        return None
    out = g.value_info(node.output[0])
    if out is None or out.shape is None or len(out.shape) != 2 or out.shape[1] != features:
        return f"{_name(node)} is not a flatten to (batch, {features}) that keeps channels apart"
    return None


def _padding_problem(g: GraphIndex, conv: onnx.NodeProto) -> str | None:
    """A sentence when ``conv`` zero-pads its input (the border would see the BN shift)."""
    auto_pad = attr_str(conv, "auto_pad", "NOTSET")
    pads = attr_ints(conv, "pads")
    if auto_pad == "VALID":
        return None
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        kernel: Sequence[int | None] | None = attr_ints(conv, "kernel_shape")
        if kernel is None:
            w = g.value_info(conv.input[1])
            kernel = None if w is None or w.shape is None else list(w.shape[2:])
        if kernel is not None and all(k == 1 for k in kernel):
            return None
        return (
            f"{_name(conv)} pads its input with zeros (auto_pad={auto_pad}): the border would "
            "see the BN shift instead of 0"
        )
    if pads is None or all(int(p) == 0 for p in pads):
        return None
    return (
        f"{_name(conv)} pads its input with zeros (pads={list(pads)}): the border would see "
        "the BN shift instead of 0"
    )


def _forward_channel_problem(
    g: GraphIndex, bn: onnx.NodeProto, consumer: onnx.NodeProto, site: Site
) -> str | None:
    """A sentence when the consumer's input features do not match the BN's channels."""
    mean = g.constant(bn.input[3])
    shape = g.shape(consumer.input[1])
    weight = None if shape is None else static_dims(shape)
    if mean is None or weight is None:
        return None
    c = int(np.asarray(mean).size) * site.repeat
    if consumer.op_type == "Conv":
        n = weight[1] * attr_int(consumer, "group", 1)
    elif consumer.op_type == "Gemm":
        n = weight[1] if attr_int(consumer, "transB", 0) else weight[0]
    else:
        n = weight[0]
    if n != c:
        return f"BN gives {c} input features but {_name(consumer)} reads {n}"
    return _bias_problem(g, consumer, [consumer.input[1], *consumer.input[2:3]], weight[0])


def _non_finite(g: GraphIndex, bn: onnx.NodeProto) -> list[int]:
    """Channels whose scale or shift is inf/NaN (see :func:`foldmath.non_finite_channels`)."""
    gamma, beta, mean, var = (g.constant(name) for name in bn.input[1:5])
    if mean is None or var is None:
        return []
    return foldmath.non_finite_channels(mean, var, attr_float(bn, "epsilon", 1e-5), gamma, beta)
