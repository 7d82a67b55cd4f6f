"""Find fold sites in an fx graph and describe them as :class:`bnfold.guards.SiteFacts`.

Everything comes from the traced graph: a BN's producer is the node that computes its input,
its consumer the node that reads its output, and "used elsewhere" means other fx users or
other call sites of the same module or tensor. Module order (``named_modules``) is never
consulted, because a module's position says nothing about where it is called.

Channel axes are decided from the ranks of the tensors involved: a BN always normalises axis
1, a Conv keeps its channels on axis 1 (batched) or 0 (unbatched), a Linear on its last axis.
Ranks come from shapes recorded by fx ``ShapeProp`` or ``torch.export``; without them, the BN
module's accepted ranks (BatchNorm2d takes only 4-D input) can still prove a Conv2d -> BN2d
pair, while a Linear -> BatchNorm1d pair (2-D or 3-D input) stays undecided and is skipped as
``unknown-shape`` rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from bnfold import foldmath
from bnfold.guards import SiteFacts
from bnfold.sites import Direction
from bnfold.torchfold.bnlike import input_ranks
from bnfold.torchfold.ops import BatchNorm, Layer, ParamRef, as_layer, flatten_repeat, shape_of

__all__ = ["Site", "usage_map", "backward_site", "forward_site", "reads_values"]

_FLATTENS = ("flatten",)


@dataclass
class Site:
    """A BN and the neighbour it might fold into, with the facts the guards judge."""

    bn: BatchNorm
    layer: Layer | None
    direction: Direction
    facts: SiteFacts
    repeat: int = 1


def usage_map(gm: fx.GraphModule) -> dict[int, set[str]]:
    """For every stored tensor, the names of the nodes that use it."""
    uses: dict[int, set[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            for t in [*mod.parameters(), *mod.buffers()]:
                uses.setdefault(id(t), set()).add(node.name)
        elif node.op == "get_attr":
            value = ParamRef.from_target(str(node.target)).get(gm)
            if isinstance(value, torch.Tensor):
                for user in node.users:
                    uses.setdefault(id(value), set()).add(user.name)
    return uses


def _shared(
    refs: list[ParamRef | None], gm: fx.GraphModule, uses: dict[int, set[str]]
) -> str | None:
    for ref in refs:
        if ref is None:
            continue
        value = ref.get(gm)
        sites = uses.get(id(value), set()) if value is not None else set()
        if len(sites) > 1:
            return (
                f"{ref.name} is used at {len(sites)} sites ({', '.join(sorted(sites))}); "
                "folding one would change the others"
            )
    return None


def _bn_ranks(bn: BatchNorm, gm: fx.GraphModule) -> set[int]:
    """Input ranks the BN accepts (its module class checks them at run time)."""
    if bn.module is not None:
        ranks = input_ranks(gm.get_submodule(bn.module))
        if ranks is not None:
            return ranks
    return set(range(2, 9))


def _layer_axis(layer: Layer, rank: int) -> int | None:
    """Axis of ``layer``'s channels in a tensor of ``rank`` (its input or its output)."""
    if layer.kind == "linear":
        return rank - 1 if rank >= 1 else None
    if rank == layer.spatial + 2:
        return 1
    if rank == layer.spatial + 1:
        return 0
    return None


def _axes(
    bn: BatchNorm, layer: Layer, shape: tuple[int, ...] | None, gm: fx.GraphModule
) -> int | None:
    """The partner's channel axis in the BN's coordinates, or None when unknowable."""
    if shape is not None:
        return _layer_axis(layer, len(shape))
    ranks = _bn_ranks(bn, gm)
    if layer.kind != "linear":
        ranks &= {layer.spatial + 1, layer.spatial + 2}
    axes = {_layer_axis(layer, r) for r in ranks}
    return axes.pop() if len(axes) == 1 else None


def _channels(layer: Layer, gm: fx.GraphModule, side: str) -> int | None:
    w = layer.weight.get(gm) if layer.weight is not None else None
    if w is None:
        return None
    if layer.kind == "conv_transpose":
        return int(w.shape[1] * layer.groups) if side == "out" else int(w.shape[0])
    if side == "out":
        return int(w.shape[0])
    return int(w.shape[1] * (layer.groups if layer.kind == "conv" else 1))


def _bn_channels(bn: BatchNorm, gm: fx.GraphModule) -> int | None:
    for ref in (bn.mean, bn.gamma):
        t = ref.get(gm) if ref is not None else None
        if t is not None:
            return int(t.numel())
    return None


def _non_finite(bn: BatchNorm, gm: fx.GraphModule) -> list[int]:
    """Channels whose scale or shift is inf/NaN (see :func:`foldmath.non_finite_channels`)."""

    def f64(ref: ParamRef | None) -> np.ndarray | None:
        t = ref.get(gm) if ref is not None else None
        return None if t is None else t.detach().to("cpu", torch.float64).numpy()

    mean, var = f64(bn.mean), f64(bn.var)
    if mean is None or var is None:
        return []
    return foldmath.non_finite_channels(mean, var, bn.eps, f64(bn.gamma), f64(bn.beta))


def _conv_transpose_problem(layer: Layer) -> str:
    return (
        f"{layer.op} is a ConvTranspose: each output sums a position-dependent number of "
        "inputs, so the BN shift cannot become a bias; fold it backward instead"
    )


def _forward_layer_problem(
    bn: BatchNorm, layer: Layer, gm: fx.GraphModule, facts: SiteFacts, repeat: int
) -> str | None:
    """Why ``layer`` cannot absorb ``bn`` forward, whatever lies between them: a transposed
    conv, or input features that are not the BN's channels ``repeat`` times."""
    if layer.kind == "conv_transpose":
        return _conv_transpose_problem(layer)
    channels, bn_channels = _channels(layer, gm, "in"), _bn_channels(bn, gm)
    if (
        facts.partner_axis == facts.bn_axis
        and channels is not None
        and bn_channels is not None
        and channels != bn_channels * repeat
    ):
        return f"{layer.op} reads {channels} features but the BN gives {bn_channels} x {repeat}"
    return None


def _base_facts(bn: BatchNorm, direction: Direction, gm: fx.GraphModule) -> SiteFacts:
    return SiteFacts(
        bn=bn.name,
        direction=direction,
        training=bn.training,
        running_stats=bn.running_stats,
        non_finite=_non_finite(bn, gm),
    )


def _dtype_problem(layer: Layer, gm: fx.GraphModule) -> str | None:
    w = layer.weight.get(gm) if layer.weight is not None else None
    if w is not None and w.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
    ):
        return f"{layer.op} has {w.dtype} weights; only float16/bfloat16/float32/float64 fold"
    return None


_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "get_device"})
_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout"})
_METADATA_OPS = (
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.sym_size.default,
)


def reads_values(node: fx.Node) -> bool:
    """False for a node that reads only a tensor's metadata (``x.size(0)``, ``x.shape``).

    A fold keeps every shape, dtype and device, so such a reader sees the same thing whether
    it reads the layer's output, the BN's output, or the input the BN is rewired to; it
    must not block a fold the way a reader of the values does.
    """
    if node.op == "call_method":
        return str(node.target) not in _METADATA_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return str(node.args[1]) not in _METADATA_ATTRS
        return node.target not in _METADATA_OPS
    return True


def backward_site(bn: BatchNorm, gm: fx.GraphModule, uses: dict[int, set[str]]) -> Site:
    """The site folding ``bn`` into the layer that computes its input."""
    facts = _base_facts(bn, Direction.BACKWARD, gm)
    producer = bn.input
    layer = as_layer(producer, gm) if isinstance(producer, fx.Node) else None
    site = Site(bn, layer, Direction.BACKWARD, facts)
    if layer is None:
        return site
    facts.partner, facts.partner_op = layer.site, layer.op
    facts.unsupported = bn.unsupported or layer.unsupported
    users = list(producer.users)
    facts.graph_output = any(u.op == "output" for u in users)
    facts.extra_users = [
        u.name for u in users if u is not bn.node and u.op != "output" and reads_values(u)
    ]
    facts.non_constant = layer.non_constant + bn.non_constant
    facts.shared = _shared([layer.weight, layer.bias, bn.mean, bn.var, bn.gamma, bn.beta], gm, uses)
    shape = shape_of(producer)
    facts.partner_axis = _axes(bn, layer, shape, gm)
    facts.bn_axis = 1
    channels, bn_channels = _channels(layer, gm, "out"), _bn_channels(bn, gm)
    axes_match = facts.partner_axis == facts.bn_axis
    if (
        axes_match
        and not facts.unsupported
        and channels is not None
        and bn_channels not in (None, channels)
    ):
        facts.unsupported = f"{layer.op} gives {channels} channels but the BN has {bn_channels}"
    facts.dtype = _dtype_problem(layer, gm)
    return site


def _is_flatten(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) is nn.Flatten
    if node.op == "call_method":
        return node.target in _FLATTENS
    return node.op == "call_function" and node.target in (
        torch.flatten,
        torch.ops.aten.flatten.using_ints,
    )


def forward_site(bn: BatchNorm, gm: fx.GraphModule, uses: dict[int, set[str]]) -> Site:
    """The site folding ``bn`` into the layer that reads its output (maybe through a Flatten)."""
    facts = _base_facts(bn, Direction.FORWARD, gm)
    users = list(bn.out.users)
    readers = [u for u in users if u.op != "output" and reads_values(u)]
    shape = shape_of(bn.out)
    repeat: int | None = 1
    between = bn.out
    layer = None
    extra: list[str] = []
    for u in readers:
        candidate = as_layer(u, gm)
        flat = None
        if candidate is None and len(u.users) >= 1:
            r = flatten_repeat(u, gm, shape)
            if r is not None or _is_flatten(u, gm):
                flat = u
                after = [v for v in u.users if v.op != "output"]
                candidate = as_layer(after[0], gm) if after else None
                if candidate is not None and candidate.kind != "linear":
                    candidate = None
                if candidate is not None:
                    extra += [v.name for v in u.users if v is not candidate.node]
                    repeat = r
        if candidate is not None and candidate.input is not (flat or bn.out):
            candidate = None  # the BN output is the layer's weight or bias, not its input
        if candidate is not None and layer is None:
            layer, between = candidate, flat or bn.out
        else:
            extra.append(u.name)
    site = Site(bn, layer, Direction.FORWARD, facts)
    if layer is None:
        return site
    facts.partner, facts.partner_op = layer.site, layer.op
    facts.unsupported = bn.unsupported or layer.unsupported
    facts.graph_output = any(u.op == "output" for u in users) or (
        between is not bn.out and any(u.op == "output" for u in between.users)
    )
    facts.extra_users = extra
    facts.non_constant = layer.non_constant + bn.non_constant
    facts.shared = _shared([layer.weight, layer.bias, bn.mean, bn.var, bn.gamma, bn.beta], gm, uses)
    facts.bn_axis = 1
    if between is not bn.out:
        facts.partner_axis = 1 if repeat is not None else None
    else:
        facts.partner_axis = _axes(bn, layer, shape, gm)
    site.repeat = repeat or 1
    if repeat is not None:
        facts.unsupported = facts.unsupported or _forward_layer_problem(
            bn, layer, gm, facts, site.repeat
        )
    elif layer.kind == "conv_transpose" and not facts.unsupported:
        facts.unsupported = _conv_transpose_problem(layer)
    if layer.zero_padding is not None:
        facts.padding = (
            f"{layer.op} pads with zeros (padding {layer.zero_padding}), so its border would see "
            "the BN shift instead of 0; fold backward, or use reflect/replicate/circular padding"
        )
    facts.dtype = _dtype_problem(layer, gm)
    return site
