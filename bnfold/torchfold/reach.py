"""Folds that reach through an operation between a BN and its layer, in fx graphs.

:mod:`.discover` pairs a BN with the layer right next to it. This module handles the
operations real networks put in between, each exact by a fact stated in
:mod:`bnfold.foldmath`:

- **a constant added per channel** (``conv(x) + self.bias`` -> BN, a bias kept outside the
  layer): the layer's bias absorbs the BN while the Add stays as written
  (:func:`bnfold.foldmath.fold_backward_before_add`), so the user's ``forward`` is untouched;
- **a channel concatenation** (``torch.cat([conv_1(x_1), ..., conv_k(x_k)], 1)`` -> BN, as in
  MixConv): the BN splits into one part per input, each folded into its own layer; every
  input must be read by the ``cat`` alone (a DenseNet feature map reused elsewhere is not);
- **a reshape that keeps every element's channel** (``linear(x).flatten(0, 1)`` -> BN1d, as in
  LeViT's LinearNorm): proven from the recorded shapes, so example inputs are needed;
- **averaging** (BN -> ``AdaptiveAvgPool``/unpadded ``AvgPool``/``mean`` over spatial dims,
  or an eval-mode ``Dropout`` -> [flatten] -> Linear/Conv): the BN folds forward through it.

:func:`reach_site` is asked only when :mod:`.discover` found no neighbour; when nothing here
applies either, it says what the neighbour is, so the reason names the blocking node.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold import foldmath
from bnfold.guards import SiteFacts, check
from bnfold.passthrough import returns_its_input
from bnfold.sites import Direction, FoldDecision
from bnfold.torchfold.discover import (
    Site,
    _axes,
    _base_facts,
    _bn_channels,
    _channels,
    _dtype_problem,
    _forward_layer_problem,
    _is_flatten,
    _shared,
    reads_values,
)
from bnfold.torchfold.ops import BatchNorm, Layer, as_layer, flatten_repeat, shape_of
from bnfold.torchfold.rewrite import (
    _bias_ref,
    _exact,
    _layout,
    _required,
    _tensor,
    bn_affine_of,
    to_torch,
)

__all__ = ["ReachSite", "Part", "reach_site", "apply_reach", "site_layers"]

aten = torch.ops.aten

_ADDS = (operator.add, torch.add, aten.add.Tensor)
_CATS = (torch.cat, torch.concat, torch.concatenate, aten.cat.default)
_RESHAPE_METHODS = ("view", "reshape", "flatten", "squeeze", "unsqueeze")
_RESHAPE_FUNCTIONS = (
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.squeeze.dim,
    aten.unsqueeze.default,
)
#: Methods whose *second* argument is read only for its shape or dtype.
_SHAPE_OF_SECOND = ("reshape_as", "view_as", "expand_as", "type_as")
_SHAPE_OF_SECOND_ATEN = (
    aten.reshape_as.default,
    aten.view_as.default,
    aten.expand_as.default,
    aten.type_as.default,
)
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_FUNCTIONS = (
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default,
    aten._adaptive_avg_pool3d.default,
)
_AVG_FUNCTIONS = (
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    aten.avg_pool1d.default,
    aten.avg_pool2d.default,
    aten.avg_pool3d.default,
)
_MEANS = (torch.mean, aten.mean.dim)


@dataclass
class Part:
    """One layer a (share of a) BN folds into backward.

    Attributes:
        layer: the layer.
        channels: the BN channels it receives (all of them without a ``cat``).
        addend: the constant added to the layer's output before the BN, or None.
        addend_name: where the addend comes from, for the report.
    """

    layer: Layer
    channels: int
    addend: torch.Tensor | None = None
    addend_name: str | None = None


@dataclass
class ReachSite(Site):
    """A backward site through an Add of a constant and/or a channel ``cat``."""

    parts: list[Part] = field(default_factory=list)


def site_layers(site: Site) -> list[Layer]:
    """Every layer a site changes."""
    if isinstance(site, ReachSite):
        return [p.layer for p in site.parts]
    return [] if site.layer is None else [site.layer]


def _name(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return f"{node.name} ({target})" if target and target != node.name else node.name


def values_readers(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that read its values (graph output included)."""
    out = []
    for u in node.users:
        if u.op != "output" and not reads_values(u):
            continue
        second = (u.op == "call_method" and u.target in _SHAPE_OF_SECOND) or (
            u.op == "call_function" and u.target in _SHAPE_OF_SECOND_ATEN
        )
        if second and u.args[0] is not node:
            continue  # x.reshape_as(node) reads only node's shape
        out.append(u)
    return out


def _is_call(node: Any, functions: tuple[Any, ...], methods: tuple[str, ...] = ()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _constant(node: Any, gm: fx.GraphModule) -> tuple[torch.Tensor, str] | None:
    """The value of a stored tensor, possibly through one pure reshape, and its name."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = _tensor_at(gm, str(node.target))
        return None if value is None else (value, str(node.target))
    if _is_call(node, _RESHAPE_FUNCTIONS, _RESHAPE_METHODS) and node.args:
        inner = _constant(node.args[0], gm)
        rest = [*node.args[1:], *node.kwargs.values()]
        if inner is None or any(isinstance(a, fx.Node) for a in rest):
            return None
        fn = getattr(torch.Tensor, str(node.target)) if node.op == "call_method" else node.target
        with torch.no_grad():
            value = fn(inner[0], *node.args[1:], **node.kwargs)  # type: ignore[operator]
        return value, inner[1]
    return None


def _tensor_at(gm: fx.GraphModule, target: str) -> torch.Tensor | None:
    owner, _, attr = target.rpartition(".")
    value = getattr(gm.get_submodule(owner), attr, None)
    return value if isinstance(value, torch.Tensor) else None


def _add_operands(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, torch.Tensor, str] | None:
    """``(computed, constant, its name)`` for ``computed + constant`` (alpha 1), else None."""
    if not _is_call(node, _ADDS, ("add",)) or len(node.args) != 2:
        return None
    if node.kwargs.get("alpha", 1) != 1 or set(node.kwargs) - {"alpha"}:
        return None
    for k in (0, 1):
        computed, const = node.args[k], _constant(node.args[1 - k], gm)
        if isinstance(computed, fx.Node) and const is not None:
            return computed, const[0], const[1]
    return None


def _origin(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return "the input is not a graph value"
    if node.op == "placeholder":
        return f"the input is graph input {node.name}"
    return f"the input comes from {_name(node)}"


def _rank(node: fx.Node, bn: BatchNorm, gm: fx.GraphModule) -> int | None:
    """The rank of the BN's input (from shapes, else from the BN module's accepted ranks)."""
    shape = shape_of(node)
    if shape is not None:
        return len(shape)
    if bn.module is not None:
        mod = gm.get_submodule(bn.module)
        for cls, rank in ((nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5)):
            if isinstance(mod, cls):
                return rank
    return None


# ---- backward ------------------------------------------------------------------------------


def _part(
    node: fx.Node,
    reader: fx.Node,
    bn: BatchNorm,
    gm: fx.GraphModule,
    uses: dict[int, set[str]],
    channels: int | None,
) -> tuple[Part | None, SiteFacts]:
    """The layer computing ``node`` (read by ``reader``), maybe plus a constant, and its facts.

    ``channels``: the BN channels the layer must give; None for all of them, 0 for a ``cat``
    input of unrecorded shape (the caller checks the layers' counts add up).
    """
    facts = _base_facts(bn, Direction.BACKWARD, gm)
    layer_node, addend, addend_name, add = node, None, None, None
    operands = _add_operands(node, gm)
    if operands is not None:
        add = node
        layer_node, addend, addend_name = operands
    layer = as_layer(layer_node, gm) if isinstance(layer_node, fx.Node) else None
    if layer is None or layer.input is None:
        facts.neighbour = _origin(node)
        return None, facts
    facts.partner, facts.partner_op = layer.site, layer.op
    facts.unsupported = bn.unsupported or layer.unsupported
    chain = [(layer_node, add or reader)] + ([(add, reader)] if add is not None else [])
    for value, wanted in chain:
        readers = values_readers(value)
        facts.graph_output |= any(u.op == "output" for u in readers)
        facts.extra_users += [u.name for u in readers if u is not wanted and u.op != "output"]
    facts.non_constant = layer.non_constant + bn.non_constant
    facts.shared = _shared([layer.weight, layer.bias, bn.mean, bn.var, bn.gamma, bn.beta], gm, uses)
    facts.partner_axis = _axes(bn, layer, shape_of(layer_node), gm)
    facts.bn_axis = 1
    gives = _channels(layer, gm, "out")
    share = _bn_channels(bn, gm) if channels is None else (channels or None)
    if (
        facts.partner_axis == facts.bn_axis
        and not facts.unsupported
        and gives is not None
        and share not in (None, gives)
    ):
        facts.unsupported = f"{layer.op} gives {gives} channels but its share of the BN has {share}"
    if addend is not None and not facts.unsupported and gives is not None:
        rank = _rank(layer_node, bn, gm)
        if rank is None:
            facts.bn_axis = None
        elif not foldmath.per_channel_addend(tuple(addend.shape), rank, 1, gives):
            facts.unsupported = (
                f"{_name(add)} adds {addend_name} of shape {list(addend.shape)}, which varies "  # type: ignore[arg-type]
                f"along axes other than {layer.op}'s channels, so it is not a bias"
            )
    facts.dtype = _dtype_problem(layer, gm)
    part = Part(layer, gives or 0, addend, addend_name)
    return part, facts


def _backward(bn: BatchNorm, gm: fx.GraphModule, uses: dict[int, set[str]]) -> Site:
    node = bn.input
    if _is_call(node, _CATS):
        return _concat(bn, node, gm, uses)
    if _is_call(node, _RESHAPE_FUNCTIONS, _RESHAPE_METHODS) and node.args:
        inner = node.args[0]
        if isinstance(inner, fx.Node):
            site = _reshape(bn, node, inner, gm, uses)
            if site is not None:
                return site
    part, facts = _part(node, bn.node, bn, gm, uses, None)
    site = ReachSite(bn, None if part is None else part.layer, Direction.BACKWARD, facts)
    if part is not None:
        site.parts = [part]
    return site


def _reshape(
    bn: BatchNorm, reshape: fx.Node, inner: fx.Node, gm: fx.GraphModule, uses: dict[int, set[str]]
) -> Site | None:
    """Layer -> reshape -> BN: an ordinary backward fold once the channel is proven kept."""
    part, facts = _part(inner, reshape, bn, gm, uses, None)
    if part is None or part.addend is not None:
        return None
    facts.via = _name(reshape)
    readers = values_readers(reshape)
    facts.graph_output |= any(u.op == "output" for u in readers)
    facts.extra_users += [u.name for u in readers if u is not bn.node and u.op != "output"]
    src, dst = shape_of(inner), shape_of(reshape)
    axis = None if src is None else (len(src) - 1 if part.layer.kind == "linear" else 1)
    if src is None or dst is None or axis is None:
        facts.bn_axis = None
    elif foldmath.same_channel_coordinate(src, axis, dst, 1):
        facts.bn_axis = facts.partner_axis = 1
        wanted = _bn_channels(bn, gm)
        if not facts.unsupported and part.channels and wanted not in (None, part.channels):
            facts.unsupported = f"{part.layer.op} gives {part.channels} channels, the BN {wanted}"
    else:
        facts.axis_problem = (
            f"{_name(reshape)} turns {list(src)} into {list(dst)}, which moves "
            f"{part.layer.op}'s channel axis {axis} away from the BN's axis 1"
        )
    return Site(bn, part.layer, Direction.BACKWARD, facts)


def _concat(bn: BatchNorm, cat: fx.Node, gm: fx.GraphModule, uses: dict[int, set[str]]) -> Site:
    facts = _base_facts(bn, Direction.BACKWARD, gm)
    site = ReachSite(bn, None, Direction.BACKWARD, facts)
    via = _name(cat)
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    rank = _rank(cat, bn, gm)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        facts.neighbour = f"the input comes from {via}, whose inputs are not a plain list"
        return site
    if rank is not None and dim < 0:
        dim += rank
    if dim != 1:
        where = f"dim {dim}" if rank is not None or dim >= 0 else f"dim {dim} of unknown rank"
        facts.neighbour = f"the input comes from {via} along {where}, not the channel dim 1"
        return site
    if len({id(t) for t in tensors}) != len(tensors):
        facts.neighbour = f"the input comes from {via}, which reads one tensor more than once"
        return site
    parts: list[Part] = []
    part_facts: list[SiteFacts] = []
    for i, t in enumerate(tensors):
        shape = shape_of(t) if isinstance(t, fx.Node) else None
        channels = shape[1] if shape is not None and len(shape) > 1 and shape[1] > 0 else None
        part, pf = (
            _part(t, cat, bn, gm, uses, channels or 0) if isinstance(t, fx.Node) else (None, facts)
        )
        pf.via = f"{via} (input {i})"
        if part is None:
            facts.neighbour = f"the input comes from {via}, whose input {i} " + (
                pf.neighbour or "is not a layer output"
            ).removeprefix("the input ")
            return site
        parts.append(part)
        part_facts.append(pf)
    site.parts = parts
    site.layer = parts[0].layer
    facts.partner = ", ".join(p.layer.site for p in parts)
    facts.partner_op = via
    readers = values_readers(cat)
    facts.graph_output = any(u.op == "output" for u in readers)
    facts.extra_users = [u.name for u in readers if u is not bn.node and u.op != "output"]
    total, bn_channels = sum(p.channels for p in parts), _bn_channels(bn, gm)
    if bn_channels is not None and total != bn_channels:
        facts.unsupported = f"{via}'s inputs give {total} channels but the BN has {bn_channels}"
        return site
    failing = next((pf for pf in part_facts if check(pf) is not None), None)
    if failing is not None:
        failing.graph_output |= facts.graph_output
        failing.extra_users = facts.extra_users + failing.extra_users
        site.facts = failing
    else:
        facts.via = via
    return site


# ---- forward -------------------------------------------------------------------------------


def _pool_problem(node: fx.Node, gm: fx.GraphModule) -> tuple[bool, str | None]:
    """``(averages per channel, padding sentence)`` for a pooling node.

    An ``nn.Identity`` and an eval-mode dropout (timm's classifier heads put one between BN
    and Linear) pass every value through, a trivial average: they count too.
    """
    if _is_identity(node, gm):
        return True, None
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if type(mod) in _ADAPTIVE_POOLS:
            return True, None
        if type(mod) in _AVG_POOLS:
            return True, _avg_problem(
                node, mod.padding, mod.ceil_mode, getattr(mod, "divisor_override", None)
            )
        return False, None
    if _is_call(node, _ADAPTIVE_FUNCTIONS):
        return True, None
    if _is_call(node, _AVG_FUNCTIONS):
        names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
        args = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        divisor = node.args[6] if len(node.args) > 6 else node.kwargs.get("divisor_override")
        return True, _avg_problem(
            node, args.get("padding", 0), args.get("ceil_mode", False), divisor
        )
    if _is_call(node, _MEANS, ("mean",)):
        raw = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        shape = shape_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if shape is None or not isinstance(raw, (int, list, tuple)):
            return False, None
        dims: list[Any] = [raw] if isinstance(raw, int) else list(raw)
        spatial = all(isinstance(d, int) and d % len(shape) >= 2 for d in dims)
        return bool(dims) and spatial and not node.kwargs.get("dtype"), None
    return False, None


def _is_identity(node: fx.Node, gm: fx.GraphModule) -> bool:
    """An ``nn.Identity`` or an eval-mode dropout module: its output is its input."""
    return node.op == "call_module" and returns_its_input(gm.get_submodule(str(node.target)))


def _avg_problem(node: fx.Node, padding: Any, ceil_mode: Any, divisor: Any) -> str | None:
    pads = [padding] if isinstance(padding, int) else list(padding)
    if any(pads):
        return (
            f"{_name(node)} pads its input (padding {padding}): a window over the border "
            "averages the BN shift with padding, so bnfold folds only through unpadded averaging"
        )
    if ceil_mode:
        return f"{_name(node)} has ceil_mode=True: windows past the edge average fewer values"
    if divisor is not None:
        return f"{_name(node)} divides by divisor_override={divisor}, not the window size"
    return None


def _forward(bn: BatchNorm, gm: fx.GraphModule, uses: dict[int, set[str]]) -> Site:
    facts = _base_facts(bn, Direction.FORWARD, gm)
    site = Site(bn, None, Direction.FORWARD, facts)
    cur = bn.out
    readers = values_readers(cur)
    pools: list[fx.Node] = []
    padding = None
    while len(readers) == 1 and readers[0].op != "output":
        averaging, problem = _pool_problem(readers[0], gm)
        if not averaging or readers[0].args[:1] != (cur,):
            break
        padding = padding or problem
        pools.append(readers[0])
        cur = readers[0]
        readers = values_readers(cur)
    if not pools:
        facts.neighbour = _readers_sentence(readers)
        return site
    facts.via = " -> ".join(_name(p) for p in pools)
    facts.graph_output = any(u.op == "output" for u in readers)
    shape = shape_of(cur)
    repeat: int | None = 1
    layer = None
    first = next((u for u in readers if u.op != "output"), None)
    if first is not None:
        layer = as_layer(first, gm)
        flat = None
        if layer is None:
            r = flatten_repeat(first, gm, shape)
            flattens = r is not None or _is_flatten(first, gm)
            last = first
            after = [v for v in values_readers(first) if v.op != "output"]
            # timm heads put an eval-mode dropout between the flatten and the Linear
            while len(after) == 1 and _is_identity(after[0], gm) and after[0].args[:1] == (last,):
                facts.graph_output |= any(u.op == "output" for u in values_readers(last))
                last = after[0]
                after = [v for v in values_readers(last) if v.op != "output"]
            candidate = as_layer(after[0], gm) if after and flattens else None
            if candidate is not None and candidate.kind == "linear" and candidate.input is last:
                layer, flat, repeat = candidate, last, r
                facts.graph_output |= any(u.op == "output" for u in values_readers(last))
                facts.extra_users += [v.name for v in after if v is not candidate.node]
        if layer is not None and layer.input is not (flat or cur):
            layer = None
    if layer is None:
        facts.neighbour = _readers_sentence(readers)
        return site
    facts.extra_users += [u.name for u in readers if u is not first and u.op != "output"]
    site.layer = layer
    facts.partner, facts.partner_op = layer.site, layer.op
    facts.unsupported = bn.unsupported or layer.unsupported
    facts.non_constant = layer.non_constant + bn.non_constant
    facts.shared = _shared([layer.weight, layer.bias, bn.mean, bn.var, bn.gamma, bn.beta], gm, uses)
    facts.bn_axis = 1
    if repeat is None:
        facts.partner_axis = None
    elif layer.kind == "linear" and layer.input is cur:
        facts.partner_axis = None if shape is None else len(shape) - 1
    elif layer.kind == "linear":
        facts.partner_axis = 1
    else:
        facts.partner_axis = _axes(bn, layer, shape, gm)
    site.repeat = repeat or 1
    facts.unsupported = facts.unsupported or _forward_layer_problem(
        bn, layer, gm, facts, site.repeat
    )
    facts.padding = padding
    if layer.zero_padding is not None and padding is None:
        facts.padding = (
            f"{layer.op} pads with zeros (padding {layer.zero_padding}), so its border would see "
            "the BN shift instead of 0"
        )
    facts.dtype = _dtype_problem(layer, gm)
    return site


def _readers_sentence(readers: list[fx.Node]) -> str:
    if not readers:
        return "the output is not read"
    if all(u.op == "output" for u in readers):
        return "the output is a model output"
    names = ", ".join(_name(u) for u in readers if u.op != "output")
    return f"the output is read by {names}"


def reach_site(
    bn: BatchNorm, gm: fx.GraphModule, uses: dict[int, set[str]], direction: Direction
) -> Site:
    """A site through an operation in between, or a partner-less site naming the neighbour."""
    if direction is Direction.BACKWARD:
        return _backward(bn, gm, uses)
    return _forward(bn, gm, uses)


# ---- rewrite -------------------------------------------------------------------------------


def apply_reach(
    site: ReachSite,
    gm: fx.GraphModule,
    origin: dict[str, list[str]],
    exact: dict[str, tuple[int, Any]],
) -> FoldDecision:
    """Fold a backward site through an Add of a constant and/or a ``cat`` (see the module).

    Like :func:`bnfold.torchfold.rewrite.apply_fold`, parameters are replaced (never edited
    in place), computed from float64 values (the unrounded result of an earlier fold when
    there is one) and rounded once.
    """
    bn = site.bn
    affine = bn_affine_of(bn, gm)
    pieces = (
        foldmath.split(affine, [p.channels for p in site.parts])
        if len(site.parts) > 1
        else [affine]
    )
    bn_names = [r.name for r in (bn.gamma, bn.beta, bn.mean, bn.var) if r is not None]
    scale_names = [r.name for r in (bn.gamma, bn.var) if r is not None]
    params: dict[str, list[str]] = {}
    for part, piece in zip(site.parts, pieces, strict=True):
        params.update(_fold_part(part, piece, gm, origin, exact, bn_names, scale_names))
    tensor = bn.out.name
    bn.out.replace_all_uses_with(bn.input)
    for node in dict.fromkeys([*bn.trailing, bn.out, bn.node]):
        if node.graph is gm.graph and not node.users:
            gm.graph.erase_node(node)
    return FoldDecision.fold(
        bn.name,
        Direction.BACKWARD,
        ", ".join(p.layer.site for p in site.parts),
        params=params,
        tensor=tensor,
    )


def _fold_part(
    part: Part,
    affine: foldmath.Affine,
    gm: fx.GraphModule,
    origin: dict[str, list[str]],
    exact: dict[str, tuple[int, Any]],
    bn_names: list[str],
    scale_names: list[str],
) -> dict[str, list[str]]:
    layer = part.layer
    assert layer.weight is not None
    weight = _required(layer.weight, gm)
    bias = _tensor(layer.bias, gm)
    w_f64 = _exact(layer.weight, gm, exact)
    b_f64 = _exact(layer.bias, gm, exact)
    assert w_f64 is not None
    layout = _layout(layer)
    if part.addend is None:
        w64, b64 = foldmath.fold_backward(w_f64, b_f64, affine, layout)
    else:
        addend = part.addend.detach().to("cpu", torch.float64).numpy()
        w64, b64 = foldmath.fold_backward_before_add(w_f64, b_f64, addend, affine, layout)
    w_name = layer.weight.name
    w_origin = origin.get(w_name, [w_name])
    b_origin = origin.get(layer.bias.name, [layer.bias.name]) if layer.bias is not None else []
    if part.addend_name is not None:
        b_origin = [*b_origin, part.addend_name]
    bias_ref = _bias_ref(layer, gm)
    layer.weight.set(gm, to_torch(w64, weight), parameter=isinstance(weight, nn.Parameter))
    bias_like = bias if bias is not None else weight
    bias_ref.set(gm, to_torch(b64, bias_like), parameter=isinstance(bias_like, nn.Parameter))
    for ref, value in ((layer.weight, w64), (bias_ref, b64)):
        exact[ref.name] = (id(ref.get(gm)), value)
    origin[w_name] = list(dict.fromkeys(w_origin + scale_names))
    origin[bias_ref.name] = list(dict.fromkeys(b_origin + bn_names))
    return {w_name: origin[w_name], bias_ref.name: origin[bias_ref.name]}
